"""The jobs API in-process (TestClient) with a real SQLite store and real job processes.

Two users (``alice``, ``bob``) and an admin (``root``) are told apart by the
``X-User`` header (:class:`platform_support.HeaderUsers`). Jobs are small
1-2 epoch pipelines over workspace files uploaded through ``/api/files``.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlaas.platform.app import create_platform_app
from mlaas.platform.config import PlatformConfig
from platform_support import (AS_ALICE, AS_BOB, AS_ROOT, EVENTS, USERS, HeaderUsers, TestClient,
                              make_data, pipeline, wait_for)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The platform app (2 CPU slots) with alice's and bob's workspaces holding the data."""
    tmp = tmp_path_factory.mktemp("jobs-api")
    files = make_data(tmp / "inputs")
    config = PlatformConfig(data_dir=tmp / "data", cpus=2, poll_interval=0.1, grace_s=5)
    app = create_platform_app(config, authenticator=HeaderUsers(USERS))
    with TestClient(app, raise_server_exceptions=False) as client:
        for who in (AS_ALICE, AS_BOB):
            for label, path in files.items():
                r = client.put(f"/api/files/data/{label}.root", content=path.read_bytes(),
                               headers=who)
                assert r.status_code == 201, r.text
        client.app_data_dir = config.data_dir  # type: ignore[attr-defined]
        yield client


def _submit(api: TestClient, name: str, spec: dict[str, Any], who: dict[str, str] = AS_ALICE
            ) -> dict[str, Any]:
    r = api.post("/api/jobs", json={"name": name, "spec": spec}, headers=who)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _wait_final(api: TestClient, job_id: str, who: dict[str, str] = AS_ALICE
                ) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = api.get(f"/api/jobs/{job_id}", headers=who).json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(final, what=f"job {job_id} to finish")


@pytest.fixture(scope="module")
def finished(api: TestClient) -> dict[str, Any]:
    """One job of alice's, submitted, followed to its end through the log stream."""
    job = _submit(api, "higgs-api", pipeline(epochs=2))
    assert job["state"] in ("queued", "running") and job["owner"] == "alice"
    assert job["model_name"] == "higgs-api" and job["group"] == "cms"
    with api.stream("GET", f"/api/jobs/{job['id']}/logs", params={"follow": "true"},
                    headers=AS_ALICE) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        log = b"".join(r.iter_bytes()).decode()
    # the stream ended by itself: the job is final by now, without waiting
    now = api.get(f"/api/jobs/{job['id']}", headers=AS_ALICE).json()
    assert now["state"] in ("succeeded", "failed", "cancelled")
    assert now["state"] == "succeeded", log
    return {"job": now, "log": log}


def test_submit_succeeds_registers_and_serves(api: TestClient, finished: dict[str, Any]) -> None:
    job = finished["job"]
    assert job["model_version"] == 1 and job["exit_code"] == 0 and job["attempts"] == 1
    assert job["position"] is None and job["finished_at"] and job["started_at"]
    progress = job["progress"]
    assert progress["epoch"] == 2 and progress["epochs"] == 2 and progress["phase"] == "done"
    assert progress["events_per_s"] > 0 and "train_loss" in progress["metrics"]
    model = api.get("/api/models/higgs-api", headers=AS_ALICE).json()
    version = model["versions"][0] if "versions" in model else model
    assert version["metadata"]["job_id"] == job["id"]
    r = api.post("/api/models/higgs-api/predict", json=EVENTS, headers=AS_ALICE)
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    assert len(outputs) == 3 and outputs[1] is None and 0.0 <= outputs[0] <= 1.0

    history = api.get(f"/api/jobs/{job['id']}/metrics", headers=AS_ALICE).json()["history"]
    assert [h["epoch"] for h in history] == [1, 2] and "train_loss" in history[0]

    log = api.get(f"/api/jobs/{job['id']}/logs", headers=AS_ALICE).text
    assert log == finished["log"] and log
    tail = api.get(f"/api/jobs/{job['id']}/logs", params={"offset": len(log.encode()) - 5},
                   headers=AS_ALICE).text
    assert tail == log.encode()[-5:].decode(errors="replace")


def test_artifacts_list_and_download(api: TestClient, finished: dict[str, Any]) -> None:
    job_id = finished["job"]["id"]
    listed = api.get(f"/api/jobs/{job_id}/artifacts", headers=AS_ALICE).json()["artifacts"]
    paths = {a["path"]: a["size"] for a in listed}
    for want in ("bundle.tar.gz", "metrics.json", "history.json", "stats.json",
                 "bundle/model.onnx", "plots/roc.png"):
        assert want in paths, sorted(paths)
    assert "checkpoint.pt" not in paths
    r = api.get(f"/api/jobs/{job_id}/artifacts/bundle.tar.gz", headers=AS_ALICE)
    assert r.status_code == 200 and len(r.content) == paths["bundle.tar.gz"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert any(n.endswith("model.onnx") for n in tar.getnames())
    r = api.get(f"/api/jobs/{job_id}/artifacts/plots/roc.png", headers=AS_ALICE)
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def test_artifact_path_tricks_are_refused(api: TestClient, finished: dict[str, Any],
                                          tmp_path: Path) -> None:
    job_id = finished["job"]["id"]
    run_dir = Path(api.app_data_dir) / "jobs" / job_id / "run"  # type: ignore[attr-defined]
    assert run_dir.is_dir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, run_dir / "link.txt")
    os.symlink(tmp_path, run_dir / "linkdir")
    os.symlink(run_dir / "metrics.json", run_dir / "inside-link.json")  # even inside: refused
    base = f"/api/jobs/{job_id}/artifacts/"
    log = finished["log"]
    # httpx removes literal dot segments before sending (then no route matches: 404);
    # percent-encoded ones reach the server, which refuses them itself (400)
    for path, status in [("../job.log", None), ("bundle/../../job.log", None),
                         ("..%2Fjob.log", 400), ("%2e%2e/job.log", 400),
                         ("bundle%2F..%2F..%2Fjob.log", 400), ("/etc/passwd", 400),
                         ("link.txt", 400), ("linkdir/secret.txt", 400),
                         ("inside-link.json", 400), ("checkpoint.pt", 404),
                         ("missing.bin", 404), ("plots", 404), ("a%00b", 400)]:
        r = api.get(base + path, headers=AS_ALICE)
        assert r.status_code == status if status else r.status_code in (400, 404), \
            (path, r.status_code, r.text)
        assert "not yours" not in r.text and log[:40] not in r.text
    listed = [a["path"] for a in api.get(base[:-1], headers=AS_ALICE).json()["artifacts"]]
    assert not any("link" in p for p in listed)


def test_other_users_jobs_are_not_found(api: TestClient, finished: dict[str, Any]) -> None:
    job_id = finished["job"]["id"]
    for method, path in [("GET", ""), ("GET", "/logs"), ("GET", "/metrics"),
                         ("GET", "/artifacts"), ("GET", "/artifacts/metrics.json"),
                         ("POST", "/cancel")]:
        r = api.request(method, f"/api/jobs/{job_id}{path}", headers=AS_BOB)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"] == "NotFound"
    assert job_id not in [j["id"] for j in api.get("/api/jobs", headers=AS_BOB).json()["jobs"]]
    # the same answer as for an id that does not exist
    assert api.get("/api/jobs/nope", headers=AS_BOB).json()["message"] == "no job named 'nope'"
    # the model it registered belongs to alice too
    assert api.post("/api/models/higgs-api/predict", json=EVENTS,
                    headers=AS_BOB).status_code == 404
    # the admin sees everything
    assert api.get(f"/api/jobs/{job_id}", headers=AS_ROOT).status_code == 200
    assert job_id in [j["id"] for j in api.get("/api/jobs", headers=AS_ROOT).json()["jobs"]]
    assert api.get("/api/jobs", headers={}).status_code == 401


def test_list_filters(api: TestClient, finished: dict[str, Any]) -> None:
    job_id = finished["job"]["id"]

    def ids(**params: Any) -> list[str]:
        r = api.get("/api/jobs", params=params, headers=AS_ROOT)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["jobs"]]

    assert job_id in ids(state="succeeded") and job_id not in ids(state="queued")
    assert job_id in ids(name="higgs-api") and job_id not in ids(name="other")
    assert job_id not in ids(mine="true")  # root's own jobs only
    mine = api.get("/api/jobs", params={"mine": "true"}, headers=AS_ALICE).json()["jobs"]
    assert job_id in [j["id"] for j in mine] and all(j["owner"] == "alice" for j in mine)
    assert len(ids(limit=1)) == 1


@pytest.mark.parametrize("body, field", [
    ({"name": "x", "spec": {"model": {"builtin": "mlp"}}}, "data"),
    ({"name": "x", "spec": {**pipeline(), "trian": {}}}, "trian"),
    ({"name": "x", "spec": pipeline(epochs=0)}, "train.epochs"),
    ({"name": "x", "spec": {**pipeline(), "data": {**pipeline()["data"], "cut": "MET_pt >"}}},
     "data.cut"),
    ({"name": "bad name!", "spec": pipeline()}, "name"),
    ({"name": "x", "spec": pipeline(name="no/slashes")}, "spec.name"),
    ({"spec": pipeline()}, "name"),
    ({"name": "x"}, "spec"),
    ({"name": "x", "spec": [1, 2]}, "spec"),
    ({"name": "x", "spec": pipeline(), "extra": 1}, "extra"),
])
def test_invalid_submissions_are_422_with_field_paths(api: TestClient, body: dict[str, Any],
                                                      field: str) -> None:
    r = api.post("/api/jobs", json=body, headers=AS_ALICE)
    assert r.status_code == 422, r.text
    got = r.json()
    assert got["error"] in ("SpecError", "ExpressionError")
    assert field in [p[0] for p in got["problems"]], got["problems"]


def test_unparseable_bodies_are_422(api: TestClient) -> None:
    r = api.post("/api/jobs", content=b"{not json", headers={**AS_ALICE,
                                                              "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["problems"] == [["(body)", "not valid JSON"]]
    r = api.post("/api/jobs", params={"name": "y"}, content=b"data: [unclosed",
                 headers={**AS_ALICE, "content-type": "application/yaml"})
    assert r.status_code == 422 and r.json()["problems"] == [["(body)", "not valid YAML"]]
    r = api.post("/api/jobs", params={"name": "y"}, content=b"- a list",
                 headers={**AS_ALICE, "content-type": "text/yaml"})
    assert r.status_code == 422


@pytest.mark.parametrize("spec, field", [
    (pipeline(files=("../../../etc/passwd", "data/background.root")),
     "data.sources[0].files[0]"),
    (pipeline(files=("data/signal.root", "/etc/hosts")), "data.sources[1].files[0]"),
    (pipeline(model={"file": "../other-user/model.py"}), "model.file"),
    (pipeline(files=("file:///etc/passwd", "data/background.root")),
     "data.sources[0].files[0]"),
])
def test_workspace_escapes_are_400(api: TestClient, spec: dict[str, Any], field: str) -> None:
    before = len(api.get("/api/jobs", headers=AS_ROOT).json()["jobs"])
    r = api.post("/api/jobs", json={"name": "escape", "spec": spec}, headers=AS_ALICE)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "PathError" and r.json()["field_path"] == field
    assert len(api.get("/api/jobs", headers=AS_ROOT).json()["jobs"]) == before  # nothing queued


def test_yaml_submission_and_cancel(api: TestClient) -> None:
    body = yaml.safe_dump(pipeline(epochs=200, name="long-one"))
    r = api.post("/api/jobs", params={"name": "long"}, content=body.encode(),
                 headers={**AS_ALICE, "content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["name"] == "long" and job["model_name"] == "long-one"
    assert api.post(f"/api/jobs/{job['id']}/cancel", headers=AS_BOB).status_code == 404
    wait_for(lambda: api.get(f"/api/jobs/{job['id']}", headers=AS_ALICE).json()["state"]
             == "running", what="the long job to start")
    r = api.post(f"/api/jobs/{job['id']}/cancel", headers=AS_ALICE)
    assert r.status_code == 200, r.text
    done = _wait_final(api, job["id"])
    assert done["state"] == "cancelled" and done["model_version"] is None
    r = api.post(f"/api/jobs/{job['id']}/cancel", headers=AS_ALICE)
    assert r.status_code == 409 and r.json()["error"] == "Conflict"
    # a follow of a finished job returns the whole log and ends at once
    with api.stream("GET", f"/api/jobs/{job['id']}/logs", params={"follow": "1"},
                    headers=AS_ALICE) as s:
        assert b"".join(s.iter_bytes()) == api.get(f"/api/jobs/{job['id']}/logs",
                                                   headers=AS_ALICE).content


def test_queued_job_has_a_position_and_can_be_cancelled(api: TestClient) -> None:
    # two long jobs fill both CPU slots; the third waits at position 0
    busy = [_submit(api, f"busy-{i}", pipeline(epochs=200), AS_BOB) for i in range(2)]
    for job in busy:
        wait_for(lambda: api.get(f"/api/jobs/{job['id']}", headers=AS_BOB).json()["state"]
                 == "running", what=f"job {job['id']} to start")
    waiting = _submit(api, "waiting", pipeline(epochs=1), AS_BOB)
    try:
        got = api.get(f"/api/jobs/{waiting['id']}", headers=AS_BOB).json()
        assert got["state"] == "queued" and got["position"] == 0
        r = api.post(f"/api/jobs/{waiting['id']}/cancel", headers=AS_BOB)
        assert r.status_code == 200
        assert _wait_final(api, waiting["id"], AS_BOB)["state"] == "cancelled"
        assert _wait_final(api, waiting["id"], AS_BOB)["started_at"] is None
    finally:
        for job in busy:
            api.post(f"/api/jobs/{job['id']}/cancel", headers=AS_BOB)
        for job in busy:
            assert _wait_final(api, job["id"], AS_BOB)["state"] == "cancelled"


def test_jobs_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    """The same app on PostgreSQL (a fresh schema of the session's own database)."""
    config = PlatformConfig(data_dir=tmp_path / "data", db_url=pg_url, cpus=1, poll_interval=0.1)
    files = make_data(tmp_path / "inputs", events=500)
    with TestClient(create_platform_app(config)) as c:  # single-user mode: the local admin
        for label, path in files.items():
            assert c.put(f"/api/files/data/{label}.root",
                         content=path.read_bytes()).status_code == 201
        first = c.post("/api/jobs", json={"name": "pg-1", "spec": pipeline(epochs=50)}).json()
        second = c.post("/api/jobs", params={"name": "pg-2"},
                        content=yaml.safe_dump(pipeline()).encode(),
                        headers={"content-type": "application/yaml"}).json()
        assert first["owner"] == "local" and second["name"] == "pg-2"
        listed = c.get("/api/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [second["id"], first["id"]]  # newest first
        assert [j["id"] for j in c.get("/api/jobs", params={"name": "pg-1"}).json()["jobs"]] \
            == [first["id"]]
        got = c.get(f"/api/jobs/{second['id']}").json()
        assert got["state"] in ("queued", "running") and got["name"] == "pg-2"
        for job in (second, first):
            c.post(f"/api/jobs/{job['id']}/cancel")
        for job in (first, second):
            done = wait_for(lambda: (lambda j: j if j["state"] == "cancelled" else None)(
                c.get(f"/api/jobs/{job['id']}").json()), what=f"job {job['id']} cancelled")
            assert done["finished_at"]
        assert 'mlaas_jobs{state="cancelled"} 2.0' in c.get("/metrics").text
