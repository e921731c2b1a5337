"""Accounting through the platform app: a real job's attempt, ``GET /api/usage``, /metrics,
``Client.usage`` and ``mlaas usage``.

The app runs in-process (TestClient, so the lifespan opens the SQLite store,
the accounting on the same database, the job manager and the local
executor); alice (group ``cms``) runs one real 1-epoch job, bob (``atlas``)
none, root is an admin (:class:`platform_support.HeaderUsers`). The client
and the CLI talk to the same app through the TestClient's ASGI transport
(no port); only the ``X-User`` header is added to say who calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from mlaas import cli, cli_usage
from mlaas.client import Client
from mlaas.errors import Forbidden
from mlaas.platform.app import create_platform_app
from mlaas.platform.config import PlatformConfig
from platform_support import (AS_ALICE, AS_BOB, AS_ROOT, USERS, HeaderUsers, TestClient,
                              make_data, pipeline, wait_for)

pytestmark = pytest.mark.slow

WIDE = {"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app after alice's one job succeeded (its id in ``api.job_id``)."""
    tmp = tmp_path_factory.mktemp("usage-api")
    files = make_data(tmp / "inputs")
    config = PlatformConfig(data_dir=tmp / "data", cpus=1, poll_interval=0.1, grace_s=5)
    app = create_platform_app(config, authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as client:
        for label, path in files.items():
            r = client.put(f"/api/files/data/{label}.root", content=path.read_bytes(),
                           headers=AS_ALICE)
            assert r.status_code == 201, r.text
        r = client.post("/api/jobs", json={"name": "usage", "spec": pipeline(name="usage")},
                        headers=AS_ALICE)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def final() -> dict[str, Any] | None:
            job = client.get(f"/api/jobs/{job_id}", headers=AS_ALICE).json()
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        job = wait_for(final, what=f"job {job_id} to finish")
        assert job["state"] == "succeeded", client.get(f"/api/jobs/{job_id}/logs",
                                                       headers=AS_ALICE).text[-2000:]
        client.job_id = job_id  # type: ignore[attr-defined]
        yield client


def _usage(api: TestClient, who: dict[str, str], **params: str) -> Any:
    return api.get("/api/usage", params=params, headers=who)


def test_own_usage_counts_the_attempt(api: TestClient) -> None:
    r = _usage(api, AS_ALICE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user"] == "alice" and body["group"] is None and body["since"] is None
    assert set(body["users"]) == {"alice"} and set(body["groups"]) == {"cms"}
    total = body["total"]
    assert (total["jobs"], total["attempts"], total["running"]) == (1, 1, 0)
    assert total["outcomes"]["succeeded"] == 1 and total["preemptions"] == 0
    assert total["cpu_hours"] > 0 and total["gpu_hours"] == {} and total["gpu_hours_total"] == 0
    assert total["wait_s"]["count"] == 1 and total["wait_s"]["p50"] >= 0
    assert body["users"]["alice"] == total == body["groups"]["cms"]
    # the attempt row carries where it ran and how it ended
    attempts = api.app.state.platform.accounting.attempts(api.job_id)  # type: ignore[attr-defined]
    assert [(a["attempt"], a["outcome"], a["user"], a["group"]) for a in attempts] == [
        (1, "succeeded", "alice", "cms")]
    assert attempts[0]["node"] and attempts[0]["ended_at"] >= attempts[0]["started_at"]


def test_a_user_without_jobs_sees_nothing(api: TestClient) -> None:
    body = _usage(api, AS_BOB).json()
    assert body["user"] == "bob" and body["users"] == {} and body["total"]["jobs"] == 0


def test_admin_sees_everybody_and_can_narrow(api: TestClient) -> None:
    body = _usage(api, AS_ROOT).json()
    assert body["user"] is None and set(body["users"]) == {"alice"}
    assert _usage(api, AS_ROOT, user="alice").json()["total"]["jobs"] == 1
    assert _usage(api, AS_ROOT, group="atlas").json()["total"]["jobs"] == 0
    assert _usage(api, AS_ROOT, group="cms").json()["groups"]["cms"]["jobs"] == 1


def test_group_members_see_their_group(api: TestClient) -> None:
    body = _usage(api, AS_ALICE, group="cms").json()
    assert body["group"] == "cms" and body["user"] is None and set(body["users"]) == {"alice"}


@pytest.mark.parametrize("who, params, status, message", [
    (AS_BOB, {"group": "cms"}, 403, "group 'cms' is readable only by its members"),
    (AS_BOB, {"user": "alice"}, 403, "user 'alice' is readable only by that user"),
    (AS_ALICE, {"since": "yesterday"}, 400, "since 'yesterday' is neither an ISO 8601"),
    (AS_ALICE, {"until": "2026-02-30"}, 400, "until '2026-02-30'"),
    (AS_ALICE, {"since": "1d", "until": "2d"}, 400, "must be before until"),
    (AS_ALICE, {"since": "99999999999999999w"}, 400, "out of range"),
    (AS_ROOT, {"user": "al\x01ice"}, 400, "is not a user name"),
    (AS_ROOT, {"group": "x" * 256}, 400, "group"),
], ids=["other group", "other user", "since not a time", "until not a date", "empty window",
        "too far back", "control character", "too long"])
def test_bad_or_forbidden_queries(api: TestClient, who: dict[str, str], params: dict[str, str],
                                  status: int, message: str) -> None:
    r = _usage(api, who, **params)
    assert r.status_code == status, r.text
    assert message in r.json()["message"]


def test_a_window_before_the_job_is_empty(api: TestClient) -> None:
    body = _usage(api, AS_ALICE, since="2020-01-01", until="2020-01-02T00:00:00Z").json()
    assert body["since"] == "2020-01-01T00:00:00+00:00" and body["total"]["jobs"] == 0
    recent = _usage(api, AS_ALICE, since="1h").json()
    assert recent["total"]["jobs"] == 1


def test_metrics_show_waits_attempts_and_queues(api: TestClient) -> None:
    # with logins, /metrics is for admins (and metrics_from peers) only
    assert api.get("/metrics", headers=AS_ALICE).status_code == 404
    response = api.get("/metrics", headers=AS_ROOT)
    assert response.status_code == 200, response.text
    text = response.text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['mlaas_job_wait_seconds_count{queue="default"}'] == 1
    assert samples['mlaas_job_wait_seconds_bucket{le="+Inf",queue="default"}'] == 1
    assert samples['mlaas_job_attempts_ended_total{outcome="succeeded",queue="default"}'] == 1
    for family in ("mlaas_preemptions_total", "mlaas_queue_pending_jobs",
                   "mlaas_queue_running_jobs", "mlaas_group_jobs", "mlaas_queue_devices_in_use",
                   "mlaas_queue_nominal_quota"):
        assert f"# TYPE {family} " in text, family
    assert not any(k.startswith("mlaas_group_jobs{") for k in samples)  # nothing queued/running


class _AsUser(Client):
    """The real client over the app's ASGI transport, naming its user in ``X-User``."""

    api: TestClient
    user = "alice"

    def __init__(self, base_url: str | None = None, **kwargs: Any) -> None:
        super().__init__("http://testserver", transport=self.api._transport)
        self._http.headers["X-User"] = self.user


def test_client_usage_and_its_errors(api: TestClient) -> None:
    _AsUser.api, _AsUser.user = api, "alice"
    with _AsUser() as c:
        assert c.usage(since="1d")["total"]["jobs"] == 1
        assert c.usage(group="cms")["group"] == "cms"
    _AsUser.user = "bob"
    with _AsUser() as c, pytest.raises(Forbidden, match="group 'cms'"):
        c.usage(group="cms")


def test_cli_usage(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    _AsUser.api, _AsUser.user = api, "root"
    monkeypatch.setattr(cli_usage, "Client", _AsUser)
    result = CliRunner().invoke(cli.app, ["usage", "--json", "--since", "1d"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["users"]["alice"]["jobs"] == 1
    table = CliRunner().invoke(cli.app, ["usage"], env=WIDE)
    assert table.exit_code == 0, table.output
    assert "per user" in table.output and "per group" in table.output
    assert "alice" in table.output and "cms" in table.output
    empty = CliRunner().invoke(cli.app, ["usage", "--until", "2020-01-01"], env=WIDE)
    assert empty.exit_code == 0 and "no jobs ran in this window" in empty.output
    bad = CliRunner().invoke(cli.app, ["usage", "--since", "soon"], env=WIDE)
    assert bad.exit_code != 0 and "since 'soon'" in str(bad.exception)
