"""The platform app's wiring and its configuration: settings, routes, errors, metrics, health.

In-process through TestClient (so the lifespan runs: real SQLite database,
real job manager and local executor); no job is started here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlaas.errors import ConfigError, Conflict, Forbidden, NotFound, PathError, QuotaExceeded
from mlaas.errors import RateLimited, SpecError, Unauthorized
from mlaas.platform.app import SINGLE_USER_NOTICE, _error_body, _status_of, create_platform_app
from mlaas.platform.config import PlatformConfig, load_config
from platform_support import TestClient
from servers import running

# -- configuration -------------------------------------------------------------------------


def test_config_defaults_mean_embedded_single_user(tmp_path: Path) -> None:
    config = PlatformConfig(data_dir=tmp_path)
    assert config.host == "127.0.0.1" and config.port == 8080 and config.executor == "local"
    assert config.cpus >= 1 and config.gpu_devices == []
    assert config.database_url == f"sqlite:///{(tmp_path / 'mlaas.db').resolve()}"
    assert config.auth.single_user
    assert PlatformConfig().data_dir == Path("~/.local/share/mlaas").expanduser()


def test_config_file_then_flags(tmp_path: Path) -> None:
    yml = tmp_path / "server.yaml"
    yml.write_text("port: 9000\ncpus: 3\ngpu_devices: [0, 1]\njobs: {max_time_s: 60}\n"
                   "auth: {rate_limit_per_minute: 100}\n")
    config = load_config(yml, port=9100, cpus=None, gpu_devices="2,3")
    assert config.port == 9100 and config.cpus == 3  # flags win; a flag not given is ignored
    assert config.gpu_devices == ["2", "3"] and config.jobs.max_time_s == 60
    assert config.auth.rate_limit_per_minute == 100 and config.auth.single_user

    toml = tmp_path / "server.toml"
    toml.write_text('db_url = "postgresql://postgres@127.0.0.1:5432/x"\n[jobs]\nmemory_bytes = 2000000000\nthreads = 2\n')
    config = load_config(toml)
    assert config.database_url == "postgresql://postgres@127.0.0.1:5432/x"
    assert config.jobs.memory_bytes == 2_000_000_000 and config.jobs.threads == 2


@pytest.mark.parametrize("text, field", [
    ("cpus: 0\n", "cpus"),
    ("port: 70000\n", "port"),
    ("jobs: {memory_bytes: -1}\n", "jobs.memory_bytes"),
    ("executor: ray\n", "executor"),
    ("prot: 80\n", "prot"),
    ("auth: {oidc_issuer: x}\n", "auth.oidc_issuer"),
    ("gpu_devices: [0, 1, 0]\n", "gpu_devices"),
])
def test_config_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p for p, _ in info.value.problems] == [field]
    assert str(path) in str(info.value) and field in str(info.value)


def test_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.toml").write_text("port = \n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(tmp_path / "broken.toml")
    with pytest.raises(ConfigError) as info:
        load_config(None, cpus=-2)
    assert info.value.problems[0][0] == "cpus"


def test_auth_settings_choose_the_multi_user_authenticator(tmp_path: Path) -> None:
    from mlaas.platform.auth.authenticator import PlatformAuthenticator

    config = PlatformConfig(data_dir=tmp_path, auth={"oidc_issuers": ["https://sso.example"]})
    assert not config.auth.single_user
    with pytest.raises(ConfigError) as info:  # issuers without an audience
        create_platform_app(config)
    assert info.value.context["field_path"] == "auth.audience"
    config = PlatformConfig(data_dir=tmp_path, auth={"trusted_proxies": ["127.0.0.1/32"]})
    app = create_platform_app(config)
    assert isinstance(app.state.authenticator, PlatformAuthenticator)
    app.state.authenticator.close()


# -- the error map -------------------------------------------------------------------------


@pytest.mark.parametrize("exc, status", [
    (NotFound("no job named 'x'"), 404),
    (Forbidden("job 'x' belongs to someone else"), 403),
    (Unauthorized("no token"), 401),
    (Conflict("already finished"), 409),
    (QuotaExceeded("full"), 413),
    (PathError("'..'"), 400),
    (SpecError("invalid", [("data.cut", "bad")]), 422),
    (RateLimited("slow down", retry_after=3), 429),
])
def test_error_statuses(exc: Exception, status: int) -> None:
    assert _status_of(exc) == status
    body = _error_body(exc)  # type: ignore[arg-type]
    assert body["error"] == type(exc).__name__ and body["message"]


def test_spec_error_body_lists_problems() -> None:
    body = _error_body(SpecError("invalid pipeline spec", [("data.cut", "bad"), ("x", "y")]))
    assert body["problems"] == [["data.cut", "bad"], ["x", "y"]]


# -- the running app -----------------------------------------------------------------------


@pytest.fixture()
def client(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[TestClient]:
    caplog.set_level(logging.INFO, logger="mlaas.platform")
    app = create_platform_app(PlatformConfig(data_dir=tmp_path / "data", cpus=1,
                                             poll_interval=0.1))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_single_user_mode_is_announced(client: TestClient,
                                       caplog: pytest.LogCaptureFixture) -> None:
    assert SINGLE_USER_NOTICE == "single-user mode: every request is the local admin user"
    assert any(r.getMessage() == SINGLE_USER_NOTICE for r in caplog.get_records("setup"))


def test_health_and_openapi_list_every_route(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/logs",
                 "/api/jobs/{job_id}/metrics", "/api/jobs/{job_id}/cancel",
                 "/api/jobs/{job_id}/artifacts", "/api/jobs/{job_id}/artifacts/{path}",
                 "/api/files", "/api/models", "/api/models/{name}/predict",
                 "/v2/models/{name}/infer", "/json", "/healthz"):
        assert path in paths, path
    assert list(paths).count("/healthz") == 1


def test_metrics_has_job_gauges_and_inference_metrics(client: TestClient) -> None:
    client.get("/v2/models/nothing/ready")  # one inference-route request, counted
    text = client.get("/metrics").text
    for state in ("queued", "running", "succeeded", "failed", "cancelled", "preempted"):
        assert f'mlaas_jobs{{state="{state}"}} 0.0' in text
    assert "mlaas_requests_total" in text


def test_errors_are_json_without_tracebacks(client: TestClient) -> None:
    r = client.get("/api/jobs/doesnotexist")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    assert "doesnotexist" in r.json()["message"]
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"] == "HTTPError"
    r = client.get("/api/jobs", params={"state": "sleeping"})
    assert r.status_code == 400 and r.json()["error"] == "BadRequest"
    r = client.get("/api/jobs", params={"limit": 0})
    assert r.status_code == 400
    r = client.post("/api/models/x%20y/predict", json=[{}])
    assert r.status_code in (400, 404) and "Traceback" not in r.text


def test_body_limit_applies_to_platform_routes(tmp_path: Path) -> None:
    app = create_platform_app(PlatformConfig(data_dir=tmp_path, cpus=1, max_body_bytes=1000))
    with TestClient(app) as c:
        r = c.post("/api/jobs", content=b"x" * 5000, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "RequestTooLarge"


def test_nothing_opens_before_the_lifespan(tmp_path: Path) -> None:
    app = create_platform_app(PlatformConfig(data_dir=tmp_path, cpus=1))
    assert not (tmp_path / "mlaas.db").exists()
    assert not hasattr(app.state, "platform")
    with TestClient(app):
        assert (tmp_path / "mlaas.db").exists()
        assert hasattr(app.state, "platform")
    assert not hasattr(app.state, "platform")


@pytest.mark.slow
def test_uploaded_models_are_claimed_by_their_first_uploader(
        tmp_path: Path, trained_archive: Any) -> None:
    from platform_support import AS_ALICE, AS_BOB, AS_ROOT, USERS, HeaderUsers

    app = create_platform_app(PlatformConfig(data_dir=tmp_path, cpus=1),
                              authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/api/models").status_code == 401
        assert c.get("/api/models").headers["www-authenticate"] == "Bearer"
        r = c.post("/api/models/mine", content=trained_archive, headers=AS_ALICE)
        assert r.status_code == 201, r.text
        assert r.json()["metadata"]["uploaded_by"] == "alice"
        assert c.post("/api/models/mine", content=trained_archive,
                      headers=AS_BOB).status_code == 404  # bob cannot even see it
        assert c.get("/api/models/mine", headers=AS_BOB).status_code == 404
        assert c.get("/api/models", headers=AS_BOB).json()["models"] == []
        assert [m["name"] for m in c.get("/api/models", headers=AS_ALICE).json()["models"]] \
            == ["mine"]
        r = c.post("/api/models/mine/predict", json=[{"MET_pt": 20.0, "Jet_pt": [30.0]}],
                   headers=AS_ALICE)
        assert r.status_code == 200 and len(r.json()["outputs"]) == 1
        assert c.post("/api/models/mine/predict", json=[{"MET_pt": 20.0}],
                      headers=AS_BOB).status_code == 404
        assert c.delete("/api/models/mine/versions/1", headers=AS_BOB).status_code == 404
        assert c.get("/api/models/mine", headers=AS_ROOT).status_code == 200  # admin
        assert c.delete("/api/models/mine/versions/1", headers=AS_ALICE).status_code == 200


@pytest.mark.slow
def test_issue4_a_refused_upload_claims_no_name(tmp_path: Path, trained_archive: Any) -> None:
    """A corrupt or oversized first upload leaves the name free: another user may take it."""
    from platform_support import AS_ALICE, AS_BOB, USERS, HeaderUsers

    config = PlatformConfig(data_dir=tmp_path, cpus=1,
                            max_body_bytes=len(trained_archive) + 1000)
    app = create_platform_app(config, authenticator=HeaderUsers(USERS))

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is hit while reading
        for _ in range(3):
            yield trained_archive

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/api/models/contested", content=b"not a bundle", headers=AS_ALICE)
        assert r.status_code == 400 and r.json()["error"] == "BundleError", r.text
        r = c.post("/upload", data={"name": "contested"},
                   files={"model": ("b.tar.gz", b"not a bundle")}, headers=AS_ALICE)
        assert r.status_code == 400 and r.json()["error"] == "BundleError", r.text
        r = c.post("/api/models/contested", content=chunks(), headers=AS_ALICE)
        assert r.status_code == 413, r.text
        with pytest.raises(NotFound):
            app.state.platform.store.get_model("contested")
        r = c.post("/api/models/contested", content=trained_archive, headers=AS_BOB)
        assert r.status_code == 201, r.text
        assert app.state.platform.store.get_model("contested").owner == "bob"
        # a refused upload to a name that has versions keeps its owner
        r = c.post("/api/models/contested", content=b"not a bundle", headers=AS_BOB)
        assert r.status_code == 400
        assert app.state.platform.store.get_model("contested").owner == "bob"
        assert c.get("/api/models/contested", headers=AS_ALICE).status_code == 404


def _counting(store: Any, monkeypatch: pytest.MonkeyPatch, *methods: str) -> list[str]:
    """The names of ``store``'s ``methods`` in the order they are called (each still
    calls the real one)."""
    calls: list[str] = []
    for method in methods:
        real = getattr(store, method)

        def counted(*args: Any, _real: Any = real, _method: str = method,
                    **kwargs: Any) -> Any:
            calls.append(_method)
            return _real(*args, **kwargs)

        monkeypatch.setattr(store, method, counted)
    return calls


def test_an_upload_asks_the_store_for_the_model_name_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``on_upload`` learns from ``ensure_model`` whether it created the name: no
    ``get_model`` before it."""
    from platform_support import AS_ALICE, AS_BOB, USERS, HeaderUsers

    app = create_platform_app(PlatformConfig(data_dir=tmp_path, cpus=1),
                              authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as c:
        store = app.state.platform.store
        store.ensure_model("theirs", owner="bob", group="atlas")
        calls = _counting(store, monkeypatch, "get_model", "ensure_model")
        r = c.post("/api/models/mine", content=b"not a bundle", headers=AS_ALICE)
        assert r.status_code == 400 and r.json()["error"] == "BundleError", r.text
        assert calls == ["ensure_model"]  # a new name, claimed, then released
        with pytest.raises(NotFound):
            store.get_model("mine")
        calls.clear()
        assert c.post("/api/models/theirs", content=b"x", headers=AS_ALICE).status_code == 404
        assert calls == ["ensure_model"]  # found, bob's: alice may not write it
        calls.clear()
        r = c.post("/api/models/theirs", content=b"not a bundle", headers=AS_BOB)
        assert r.status_code == 400 and calls == ["ensure_model"]
        assert store.get_model("theirs").owner == "bob"  # not bob's claim: kept


def test_overlapping_failed_first_uploads_leave_the_name_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Alice's first upload A claims a name; her second, B, starts while A is running
    (the name is taken then, by her). A fails and ends first, B fails last: the claim
    belongs to the uploads running, so the last to end lets the name go."""
    from platform_support import AS_ALICE, USERS, HeaderUsers

    app = create_platform_app(PlatformConfig(data_dir=tmp_path, cpus=1),
                              authenticator=HeaderUsers(USERS))
    ensured = [threading.Event(), threading.Event()]
    send = [threading.Event(), threading.Event()]
    status: list[int] = [0, 0]

    def body(i: int) -> Iterator[bytes]:
        send[i].wait(60)  # the server reads the body only after on_upload
        yield b"not a bundle"

    def upload(base: str, i: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            status[i] = client.post("/api/models/twice", content=body(i),
                                    headers=AS_ALICE).status_code

    with running(app) as address:
        base = f"http://{address}"
        store = app.state.platform.store
        real = store.ensure_model

        def ensure_model(*args: Any, **kwargs: Any) -> Any:
            got = real(*args, **kwargs)
            next(e for e in ensured if not e.is_set()).set()
            return got

        monkeypatch.setattr(store, "ensure_model", ensure_model)
        a = threading.Thread(target=upload, args=(base, 0))
        a.start()
        assert ensured[0].wait(60)
        b = threading.Thread(target=upload, args=(base, 1))
        b.start()
        assert ensured[1].wait(60)
        send[0].set()
        a.join(60)
        assert status[0] == 400
        assert store.get_model("twice").owner == "alice"  # B is still running
        send[1].set()
        b.join(60)
        assert status[1] == 400
        with pytest.raises(NotFound):
            store.get_model("twice")


@pytest.fixture(scope="module")
def trained_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """bundle.tar.gz bytes of a 1-epoch MLP (trained here, in-process)."""
    from mlaas.train.run import run
    from platform_support import make_data, pipeline

    tmp = tmp_path_factory.mktemp("bundle")
    files = make_data(tmp / "data")
    spec = pipeline(files=(str(files["signal"]), str(files["background"])))
    run(spec, tmp / "run", progress=False)
    return (tmp / "run" / "bundle.tar.gz").read_bytes()


def test_every_setting_is_documented() -> None:
    from mlaas.platform.config import AuthConfig, JobDefaults

    doc = (Path(__file__).parents[2] / "docs" / "platform-api.md").read_text()
    names = [*PlatformConfig.model_fields, *(f"jobs.{k}" for k in JobDefaults.model_fields),
             *(f"auth.{k}" for k in AuthConfig.model_fields)]
    missing = [n for n in names if f"`{n}`" not in doc and n not in ("jobs", "auth")]
    assert not missing, f"settings missing from docs/platform-api.md: {missing}"


class _Gate:
    """Authenticator policy: ``X-User: slow`` is rate limited, no header is a bearer challenge
    with the exact header the authenticator chose, anyone else is alice."""

    def authenticate(self, request: Any) -> Any:
        from platform_support import ALICE

        user = request.headers.get("x-user")
        if user == "slow":
            raise RateLimited("too many requests from 'slow'", retry_after=2.5)
        if not user:
            exc = Unauthorized("no credentials")
            exc.headers = {"WWW-Authenticate": 'Bearer realm="mlaas"'}  # type: ignore[attr-defined]
            raise exc
        return ALICE


def test_401_and_429_carry_their_headers(tmp_path: Path) -> None:
    app = create_platform_app(PlatformConfig(data_dir=tmp_path, cpus=1), authenticator=_Gate())
    with TestClient(app) as c:
        r = c.get("/api/jobs", headers={"X-User": "slow"})
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["error"] == "RateLimited" and r.json()["retry_after"] == 2.5
        r = c.get("/api/files")
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="mlaas"'
        r = c.get("/api/models", headers={"X-User": "slow"})  # the model routes too
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert c.get("/api/jobs", headers={"X-User": "alice"}).json() == {"jobs": []}


def test_server_command_reports_bad_settings(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlaas.cli import app as cli

    runner = CliRunner()
    bad = tmp_path / "server.toml"
    bad.write_text("cpus = 0\n")
    result = runner.invoke(cli, ["server", "--config", str(bad), "--data-dir", str(tmp_path)])
    assert isinstance(result.exception, ConfigError)
    assert "cpus" in str(result.exception) and str(bad) in str(result.exception)
    result = runner.invoke(cli, ["server", "--data-dir", str(tmp_path), "--gpu-devices", "0,0"])
    assert isinstance(result.exception, ConfigError) and "gpu_devices" in str(result.exception)
    result = runner.invoke(cli, ["server", "--port", "99999"])
    assert isinstance(result.exception, ConfigError) and "port" in str(result.exception)
    assert not (tmp_path / "mlaas.db").exists()  # nothing started


def test_job_out_survives_odd_progress_reports() -> None:
    from datetime import datetime, timezone

    from mlaas.platform.records import JobRecord, JobState
    from mlaas.platform.routes.jobs import JobOut, job_out

    now = datetime.now(timezone.utc)
    job = JobRecord(id="abc", name="n", owner="o", group="g", state=JobState.RUNNING, spec={},
                    model_name="n", created_at=now, updated_at=now,
                    progress={"epoch": 2.0, "epochs": "five", "events_per_s": 10,
                              "phase": 3, "metrics": [1]})
    out = JobOut.model_validate(job_out(job, None)).model_dump()
    assert out["progress"] == {"phase": None, "epoch": 2, "epochs": None, "events_per_s": 10.0,
                               "metrics": {}}
    assert out["state"] == "running" and out["created_at"] == now.isoformat()


def test_job_defaults_reach_the_manager(tmp_path: Path) -> None:
    config = PlatformConfig(data_dir=tmp_path, cpus=2, gpu_devices="3",
                            jobs={"max_time_s": 60, "threads": 1})
    app = create_platform_app(config)
    with TestClient(app):
        manager = app.state.platform.manager
        assert manager.defaults["max_time_s"] == 60 and manager.defaults["threads"] == 1
        assert manager.defaults["memory_bytes"] is None
        assert manager.executor.capacity() == {"cpus": 2, "gpus": 1, "devices": ["3"]}
