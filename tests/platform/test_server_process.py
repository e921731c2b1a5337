"""``mlaas server`` as a real process on 127.0.0.1: end to end, bad model files, durability.

The server runs with ``--cpus 1`` on a temporary data directory; requests are
real HTTP (httpx). Durability: the server is SIGKILLed while one job runs and
one waits, then started again on the same data directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from platform_support import EVENTS, make_data, pipeline, wait_for
from servers import HOST, free_port

pytestmark = [pytest.mark.slow, pytest.mark.network]

FINAL = ("succeeded", "failed", "cancelled")

# A user model that sleeps a little per batch, so a job runs long enough to be
# interrupted mid-training (the pace of the test, not a timing assertion).
SLOW_MODEL = """
import time
import torch

class Slow(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(n, 8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, 1))

    def forward(self, x):
        time.sleep(0.03)
        return self.net(x)

def build(n_features, spec):
    return Slow(n_features)
"""

# A user model whose forward raises: the job fails, its log names the error, file and line.
BAD_MODEL = """
import torch

class Bad(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(n, 1)

    def forward(self, x):
        raise RuntimeError("boom from the user's forward")

def build(n_features, spec):
    return Bad(n_features)
"""


class ServerProcess:
    """One ``mlaas server`` process (``python -m mlaas.cli server ...``), its output in a file."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.url = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlaas.cli", "server", "--data-dir", str(self.data_dir),
             "--host", HOST, "--port", str(self.port), "--cpus", "1"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            return False

        wait_for(up, timeout=90, what="the server to answer /healthz")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "data", free_port(), tmp_path / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _client(srv: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=60)


def _upload_data(c: httpx.Client, directory: Path) -> None:
    for label, path in make_data(directory).items():
        r = c.put(f"/api/files/data/{label}.root", content=path.read_bytes())
        assert r.status_code == 201, r.text


def _submit(c: httpx.Client, name: str, spec: dict[str, Any]) -> str:
    r = c.post("/api/jobs", json={"name": name, "spec": spec})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _job(c: httpx.Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"/api/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _wait_final(c: httpx.Client, job_id: str) -> dict[str, Any]:
    return wait_for(lambda: (lambda j: j if j["state"] in FINAL else None)(_job(c, job_id)),
                    timeout=300, what=f"job {job_id} to finish")


def _follow(c: httpx.Client, job_id: str) -> str:
    with c.stream("GET", f"/api/jobs/{job_id}/logs", params={"follow": "true"},
                  timeout=httpx.Timeout(60, read=300)) as r:
        assert r.status_code == 200
        return b"".join(r.iter_bytes()).decode(errors="replace")


def test_end_to_end_and_bad_model_file(server: ServerProcess, tmp_path: Path) -> None:
    assert "single-user mode: every request is the local admin user" in server.log.read_text()
    with _client(server) as c:
        _upload_data(c, tmp_path / "inputs")
        job_id = _submit(c, "e2e", pipeline(epochs=2))
        log = _follow(c, job_id)
        job = _job(c, job_id)  # the follow ended: the job is final now
        assert job["state"] == "succeeded", log
        assert job["model_name"] == "e2e" and job["model_version"] == 1
        model = c.get("/api/models/e2e").json()
        assert model["versions"][0]["metadata"]["job_id"] == job_id
        r = c.post("/api/models/e2e/predict", json=EVENTS)
        assert r.status_code == 200, r.text
        outputs = r.json()["outputs"]
        assert len(outputs) == 3 and outputs[1] is None
        assert "mlaas_jobs{state=\"succeeded\"} 1.0" in c.get("/metrics").text

        assert c.put("/api/files/models/bad.py", content=BAD_MODEL.encode()).status_code == 201
        bad = _submit(c, "bad-model", pipeline(model={"file": "models/bad.py"}))
        log = _follow(c, bad)
        job = _job(c, bad)
        assert job["state"] == "failed" and job["exit_code"] not in (0, None)
        # the user's exception, with the file and the line it came from
        assert "RuntimeError: boom from the user's forward" in log
        assert "line 10 of bad.py" in log and job["reason"]
        assert "Traceback (most recent call last)" in log  # the user's own traceback
        assert 'bad.py", line 10, in forward' in log
        assert c.get("/api/models/bad-model").status_code == 404  # nothing registered


def test_durability_across_sigkill(server: ServerProcess, tmp_path: Path) -> None:
    with _client(server) as c:
        _upload_data(c, tmp_path / "inputs")
        done = _submit(c, "before", pipeline(epochs=1))
        assert _wait_final(c, done)["state"] == "succeeded"
        artifacts = c.get(f"/api/jobs/{done}/artifacts").json()["artifacts"]
        bundle = c.get(f"/api/jobs/{done}/artifacts/bundle.tar.gz").content

        assert c.put("/api/files/models/slow.py", content=SLOW_MODEL.encode()).status_code == 201
        epochs = 12
        running = _submit(c, "interrupted", pipeline(epochs=epochs,
                                                     model={"file": "models/slow.py"}))
        queued = _submit(c, "waiting", pipeline(epochs=1))
        wait_for(lambda: (_job(c, running)["progress"].get("epoch") or 0) >= 2, timeout=300,
                 what="the running job to pass its second epoch")
        first = _job(c, running)
        assert first["state"] == "running" and first["attempts"] == 1
        assert first["progress"]["epoch"] < epochs, "the job finished before the kill"
        assert _job(c, queued)["state"] == "queued"

    server.kill()  # SIGKILL: no shutdown code runs in the server
    server.start()

    with _client(server) as c:
        after = _job(c, queued)
        assert after["state"] == "queued" and after["attempts"] == 0
        resumed = _job(c, running)
        assert resumed["state"] in ("queued", "running")
        assert _job(c, done)["state"] == "succeeded"
        assert c.get(f"/api/jobs/{done}/artifacts").json()["artifacts"] == artifacts
        assert c.get(f"/api/jobs/{done}/artifacts/bundle.tar.gz").content == bundle
        assert c.post("/api/models/before/predict", json=EVENTS).status_code == 200

        final = _wait_final(c, running)
        log = c.get(f"/api/jobs/{running}/logs").text
        assert final["state"] == "succeeded", log
        assert final["attempts"] == 2
        assert "resuming from" in log
        history = c.get(f"/api/jobs/{running}/metrics").json()["history"]
        assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
        assert _wait_final(c, queued)["state"] == "succeeded"
        versions = {m["name"]: m for m in c.get("/api/models").json()["models"]}
        assert {"before", "interrupted", "waiting"} <= set(versions)
