"""Who may read the platform's /metrics (its labels name every model and queue).

Single-user mode: everyone. With logins: admins, and peers in
``metrics_from`` (default 127.0.0.1/32, a local Prometheus) unless the peer
is a trusted proxy; anyone else gets the 404 of an unknown path. Callers log
in here through the trusted-proxy headers (a real PlatformAuthenticator);
the peer address is the ASGI client address of Starlette's TestClient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlaas.errors import ConfigError
from mlaas.platform.app import create_platform_app
from mlaas.platform.auth.authenticator import PlatformAuthenticator
from mlaas.platform.config import PlatformConfig, load_config
from platform_support import TestClient

PROXY = "10.1.1.1"
ADMIN = {"X-Forwarded-User": "root", "X-Forwarded-Groups": "/admins"}
USER = {"X-Forwarded-User": "alice", "X-Forwarded-Groups": "/cms"}


def _app(tmp_path: Path, proxies: list[str], **settings: Any) -> Any:
    config = PlatformConfig(data_dir=tmp_path / "platform", cpus=1, poll_interval=0.2,
                            **settings)
    auth = PlatformAuthenticator(validator=None, tokens=None, trusted_proxies=proxies,
                                 admin_group="/admins")
    return create_platform_app(config, authenticator=auth)


def _get(app: Any, peer: str, headers: dict[str, str] | None = None) -> Any:
    with TestClient(app, client=(peer, 40000), raise_server_exceptions=False) as client:
        return client.get("/metrics", headers=headers or {}), client.get("/no-such-route")


def test_multi_user_metrics_for_admins_and_local_scrapers_only(tmp_path: Path) -> None:
    app = _app(tmp_path, [f"{PROXY}/32"])
    r, _ = _get(app, PROXY, ADMIN)
    assert r.status_code == 200 and "mlaas_jobs" in r.text
    r, _ = _get(app, "127.0.0.1")  # the default metrics_from: a local Prometheus
    assert r.status_code == 200 and "mlaas_jobs" in r.text
    for peer, headers in ((PROXY, USER), (PROXY, {}), ("10.2.2.2", {}), ("10.2.2.2", ADMIN)):
        r, unknown = _get(app, peer, headers)  # ADMIN headers from an untrusted peer: ignored
        assert r.status_code == 404, (peer, headers, r.text)
        assert r.json() == unknown.json() and "mlaas" not in r.text  # like any unknown path


def test_metrics_from_is_configurable_and_a_proxy_peer_never_counts(tmp_path: Path) -> None:
    app = _app(tmp_path, ["127.0.0.1/32"], metrics_from=["10.2.0.0/16", "127.0.0.1/32"])
    assert _get(app, "10.2.2.2")[0].status_code == 200
    assert _get(app, "10.3.0.1")[0].status_code == 404
    # behind a proxy on 127.0.0.1 every user would come from 127.0.0.1: no pass for them
    assert _get(app, "127.0.0.1", USER)[0].status_code == 404
    assert _get(app, "127.0.0.1")[0].status_code == 404
    assert _get(app, "127.0.0.1", ADMIN)[0].status_code == 200


def test_single_user_metrics_stay_open(tmp_path: Path) -> None:
    app = create_platform_app(PlatformConfig(data_dir=tmp_path / "p", cpus=1, metrics_from=[]))
    r, _ = _get(app, "10.9.9.9")
    assert r.status_code == 200 and "mlaas_jobs" in r.text


def test_metrics_from_must_be_networks(tmp_path: Path) -> None:
    assert PlatformConfig(data_dir=tmp_path).metrics_from == ["127.0.0.1/32"]
    path = tmp_path / "bad.yaml"
    path.write_text("metrics_from: [10.0.0.5/8]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p, _ in info.value.problems] == ["metrics_from"]
