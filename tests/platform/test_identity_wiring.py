"""Identity wired through the whole platform app: rate limits, and the token a job gets.

The app is :func:`create_platform_app` with its lifespan (job manager, real
job processes, SQLite). Rate limits use the small ``X-User`` header
authenticator of ``platform_support`` (a real policy, not a mock) so two
users can be told apart without an identity provider; the job-token test
logs in through the real OIDC test issuer on 127.0.0.1, because only an OIDC
login carries an access token worth handing to XRootD.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from platform_support import ALICE, AS_ALICE, AS_BOB, BOB, HeaderUsers, TestClient, make_data, \
    pipeline, wait_for
from support.oidc_issuer import OidcIssuer

from mlaas.platform.app import create_platform_app
from mlaas.platform.auth.jobtoken import TOKEN_DIR, TOKEN_FILE
from mlaas.platform.config import PlatformConfig
from mlaas.platform.principal import Principal

FINAL = ("succeeded", "failed", "cancelled")

# -- rate limits ---------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[TestClient]:
    config = PlatformConfig(data_dir=tmp_path / "data", cpus=1, poll_interval=0.2,
                            auth={"rate_limit_per_minute": 2})
    app = create_platform_app(config, authenticator=HeaderUsers({"alice": ALICE, "bob": BOB}))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _refused(response: Any) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1


def test_submissions_are_limited_per_user(limited: TestClient) -> None:
    body = {"name": "x", "spec": {"not": "a pipeline"}}  # counted even when invalid
    for _ in range(2):
        assert limited.post("/api/jobs", json=body, headers=AS_ALICE).status_code == 422
    r = limited.post("/api/jobs", json=body, headers=AS_ALICE)
    _refused(r)
    assert r.json()["error"] == "RateLimited" and "job submissions" in r.json()["message"]
    # reads are not limited, bob has his own bucket, inference has its own
    assert limited.get("/api/jobs", headers=AS_ALICE).status_code == 200
    assert limited.post("/api/jobs", json=body, headers=AS_BOB).status_code == 422
    assert limited.post("/api/models/nothing/predict", json=[{}],
                        headers=AS_ALICE).status_code == 404


def test_inference_is_limited_on_every_inference_route(limited: TestClient) -> None:
    # the bucket is shared by predict, KServe v2 infer and TFaaS /json
    assert limited.post("/api/models/m/predict", json=[{}], headers=AS_ALICE).status_code == 404
    assert limited.post("/v2/models/m/infer", json={"inputs": []},
                        headers=AS_ALICE).status_code == 404
    _refused(limited.post("/json", json={"model": "m", "keys": [], "values": []},
                          headers=AS_ALICE))
    _refused(limited.post("/v2/models/m/infer", json={"inputs": []}, headers=AS_ALICE))
    _refused(limited.post("/api/models/m/predict", json=[{}], headers=AS_ALICE))
    # model reads and submissions are not inference
    assert limited.get("/api/models", headers=AS_ALICE).status_code == 200
    assert limited.get("/v2/models/m", headers=AS_ALICE).status_code == 404
    assert limited.post("/api/jobs", json={"name": "x", "spec": {}},
                        headers=AS_ALICE).status_code == 422
    assert limited.post("/api/models/m/predict", json=[{}], headers=AS_BOB).status_code == 404


def test_no_limit_by_default(tmp_path: Path) -> None:
    app = create_platform_app(PlatformConfig(data_dir=tmp_path, cpus=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(30):
            assert client.post("/api/models/m/predict", json=[{}]).status_code == 404


# -- the user's token reaches the job ----------------------------------------------------

AUD = "mlaas-jobs"

# A user model that reports, in the job's log, what a WLCG tool would find: whether
# BEARER_TOKEN_FILE is set, the file's mode and the SHA-256 of its content (never the token).
PROBE_MODEL = """
import hashlib
import os
import stat

import torch

def build(n_features, spec):
    path = os.environ.get("BEARER_TOKEN_FILE")
    print("PROBE token file set:", path is not None, flush=True)
    if path is not None:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        with open(path) as fh:
            digest = hashlib.sha256(fh.read().strip().encode()).hexdigest()
        print(f"PROBE mode={mode:o} sha256={digest}", flush=True)
    print("PROBE BEARER_TOKEN set:", "BEARER_TOKEN" in os.environ, flush=True)
    return torch.nn.Sequential(torch.nn.Linear(n_features, 1))
"""


@pytest.fixture(scope="module")
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer(audience=AUD) as iss:
        iss.add_user("alice", "pw", sub="alice", wlcg_groups=["/cms"], lifetime_s=3600)
        yield iss


def _oidc_app(tmp_path: Path, issuer: OidcIssuer, *, pass_token: bool) -> Any:
    config = PlatformConfig(data_dir=tmp_path / "data", cpus=1, poll_interval=0.2, auth={
        "oidc_issuers": [issuer.url], "audience": AUD, "pass_token_to_jobs": pass_token})
    return create_platform_app(config)


def _wait(client: TestClient, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = client.get(f"/api/jobs/{job_id}", headers=headers).json()
        return job if job["state"] in FINAL else None
    return wait_for(final, timeout=300, what=f"job {job_id} to finish")


@pytest.mark.slow
@pytest.mark.network
def test_job_gets_the_submitters_token_as_a_0600_file(tmp_path: Path,
                                                      issuer: OidcIssuer) -> None:
    token = issuer.password_token("alice", "pw")
    login = {"Authorization": f"Bearer {token}"}
    app = _oidc_app(tmp_path, issuer, pass_token=True)
    data_dir = tmp_path / "data"
    with TestClient(app, raise_server_exceptions=False) as client:
        for label, path in make_data(tmp_path / "inputs").items():
            assert client.put(f"/api/files/data/{label}.root", content=path.read_bytes(),
                              headers=login).status_code == 201
        assert client.put("/api/files/models/probe.py", content=PROBE_MODEL.encode(),
                          headers=login).status_code == 201
        spec = pipeline(model={"file": "models/probe.py"})
        job_id = client.post("/api/jobs", json={"name": "with-token", "spec": spec},
                             headers=login).json()["id"]
        secret_file = data_dir / "jobs" / job_id / TOKEN_DIR / TOKEN_FILE
        # a personal token is no credential for storage: its job gets no file
        personal = client.post("/api/tokens", json={"name": "ci", "scopes": ["submit", "read"]},
                               headers=login).json()["token"]
        as_token = {"Authorization": f"Bearer {personal}"}
        other = client.post("/api/jobs", json={"name": "by-token", "spec": spec},
                            headers=as_token).json()["id"]

        job = _wait(client, job_id, login)
        log = client.get(f"/api/jobs/{job_id}/logs", headers=login).text
        assert job["state"] == "succeeded", log
        assert "PROBE token file set: True" in log
        assert f"PROBE mode=600 sha256={hashlib.sha256(token.encode()).hexdigest()}" in log
        assert "PROBE BEARER_TOKEN set: False" in log  # the file, never the variable
        assert token not in log
        assert not secret_file.exists(), "the token file outlived the job"
        assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700

        # the artifacts are the run directory: .secrets is neither listed nor served
        listed = client.get(f"/api/jobs/{job_id}/artifacts", headers=login).json()["artifacts"]
        assert not any(".secrets" in a["path"] for a in listed)
        for path in ("../.secrets/bearer_token", "..%2F.secrets%2Fbearer_token",
                     ".secrets/bearer_token", "../job.log"):
            r = client.get(f"/api/jobs/{job_id}/artifacts/{path}", headers=login)
            assert r.status_code in (400, 404), (path, r.status_code)

        job = _wait(client, other, login)
        log = client.get(f"/api/jobs/{other}/logs", headers=login).text
        assert job["state"] == "succeeded", log
        assert "PROBE token file set: False" in log


@pytest.mark.network
def test_tokens_stay_home_unless_configured(tmp_path: Path, issuer: OidcIssuer) -> None:
    login = {"Authorization": f"Bearer {issuer.password_token('alice', 'pw')}"}
    app = _oidc_app(tmp_path, issuer, pass_token=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        spec = pipeline(files=("root://127.0.0.1:9//a.root", "root://127.0.0.1:9//b.root"))
        job = client.post("/api/jobs", json={"name": "no-token", "spec": spec}, headers=login)
        assert job.status_code == 201, job.text
        job_dir = tmp_path / "data" / "jobs" / job.json()["id"]
        assert not (job_dir / TOKEN_DIR).exists()
        client.post(f"/api/jobs/{job.json()['id']}/cancel", headers=login)


def test_final_transition_removes_the_token_file(tmp_path: Path) -> None:
    """RemovesJobTokens: whichever way a job ends, its token file goes with the transition."""
    from mlaas.platform.auth.jobtoken import RemovesJobTokens, existing_token_env, \
        job_token_env, remove_tokens_of_final_jobs
    from mlaas.platform.db import Database
    from mlaas.platform.records import JobState
    from mlaas.platform.store import SqlStore

    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.migrate()
    try:
        store = SqlStore(db)
        owner = Principal(user="alice", groups=("/cms",))
        record = store.create_job(name="j", owner=owner.user, group=owner.primary_group,
                                  spec={}, model_name="m", resources={}, priority=0,
                                  queue=None, visibility="private")
        job_dir = tmp_path / "jobs" / record.id
        job_dir.mkdir(parents=True)
        env = job_token_env("header.payload.sig", job_dir)
        assert existing_token_env(job_dir) == env
        wrapped = RemovesJobTokens(store, lambda job_id: tmp_path / "jobs" / job_id)
        assert wrapped.get_job(record.id).id == record.id  # everything else passes through
        wrapped.transition(record.id, {JobState.QUEUED}, JobState.RUNNING)
        assert existing_token_env(job_dir) == env  # still running: the token stays
        wrapped.transition(record.id, {JobState.RUNNING}, JobState.CANCELLED)
        assert existing_token_env(job_dir) == {}

        # at start-up, files of jobs that ended without the wrapper (a killed server) go
        jobs = {}
        for name in ("ended", "queued"):
            rec = store.create_job(name=name, owner="alice", group="/cms", spec={},
                                   model_name="m")
            jobs[name] = tmp_path / "jobs" / rec.id
            jobs[name].mkdir()
            job_token_env("header.payload.sig", jobs[name])
            if name == "ended":
                store.transition(rec.id, {JobState.QUEUED}, JobState.FAILED)
        stray = tmp_path / "jobs" / "0123456789abcdef0123456789abcdef"  # in no store
        stray.mkdir()
        job_token_env("header.payload.sig", stray)
        assert remove_tokens_of_final_jobs(store, tmp_path / "jobs") == 2
        assert existing_token_env(jobs["ended"]) == {} and existing_token_env(stray) == {}
        assert existing_token_env(jobs["queued"]) != {}
    finally:
        db.dispose()


# -- settings: the auth flags of mlaas server ---------------------------------------------


def test_auth_flags_merge_into_the_files_auth_section(tmp_path: Path) -> None:
    from mlaas.platform.config import load_config

    path = tmp_path / "server.yaml"
    path.write_text("auth:\n  oidc_issuers: [https://iam.example/]\n  audience: mlaas\n"
                    "  trusted_proxies: [10.2.0.0/16]\n")
    config = load_config(path, auth={"admin_group": "/ops", "trusted_proxies": ["10.1.0.0/16"],
                                     "rate_limit_per_minute": None, "pass_token_to_jobs": True})
    assert config.auth.oidc_issuers == ["https://iam.example/"] and config.auth.audience == "mlaas"
    assert config.auth.admin_group == "/ops" and config.auth.pass_token_to_jobs
    assert config.auth.trusted_proxies == ["10.1.0.0/16"]  # a flag's list replaces the file's
    assert config.auth.rate_limit_per_minute is None
    assert load_config(None, auth={}).auth.single_user


def test_server_command_reports_bad_auth_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlaas.cli import app as cli
    from mlaas.errors import ConfigError

    runner = CliRunner()
    for args, field in ((["--trust-proxy-from", "10.0.0.1/8"], "auth.trusted_proxies"),
                        (["--oidc-issuer", "https://iam.example/"], "auth.audience"),
                        (["--rate-limit", "0"], "auth.rate_limit_per_minute")):
        result = runner.invoke(cli, ["server", "--data-dir", str(tmp_path), *args])
        assert isinstance(result.exception, ConfigError), (args, result.output)
        assert field in str(result.exception) or result.exception.context.get(
            "field_path") == field, (args, str(result.exception))
    assert not (tmp_path / "mlaas.db").exists()  # nothing started
