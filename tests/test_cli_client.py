"""The client commands against a real ``mlaas server`` process on 127.0.0.1.

One server per module (``mlaas server`` as a child process: free port, temp
data dir, SQLite, local executor), one tiny datagen pair and one tiny
pipeline (1 epoch). Commands run in-process through typer's ``CliRunner``
(real HTTP to the server); the error display is checked through the
installed console script, where ``main()``, stderr and the exit code meet as
a user sees them.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from mlaas import cli
from mlaas._local_server import LocalServer, free_port, mlaas_command, port_is_free
from mlaas.client import Client
from mlaas.data import synth
from mlaas.errors import NotFound, SpecError

pytestmark = [pytest.mark.slow, pytest.mark.network]

WIDE = {"COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
EVENTS = [{"MET_pt": 80.0, "PV_npvs": 31, "nJet": 3, "Jet_pt": [180.0, 95.5, 60.1]},
          {"MET_pt": 12.0, "PV_npvs": 25, "nJet": 2, "Jet_pt": [40.0, 28.0]},
          {"MET_pt": 12.0, "PV_npvs": 25, "nJet": 1, "Jet_pt": [40.0]}]  # fails the cut


def tiny_spec(epochs: int = 1, name: str = "cli-tiny") -> dict[str, Any]:
    return {
        "name": name,
        "data": {
            "tree": "Events",
            "sources": [{"name": "signal", "files": ["data/signal.root"], "label": 1},
                        {"name": "background", "files": ["data/background.root"], "label": 0}],
            "cut": "nJet >= 2",
            "features": ["MET_pt", "PV_npvs", {"branch": "Jet_pt", "max_len": 3}],
            "split": {"validation": 0.2, "test": 0.2, "seed": 1},
        },
        "model": {"builtin": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "batch_size": 256, "device": "cpu"},
    }


def run(server: LocalServer, *args: str) -> Any:
    return CliRunner().invoke(cli.app, [*args], env={**WIDE, "MLAAS_SERVER": server.url})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("cli-client")
    synth.generate(work / "data", 1500, seed=5)
    (work / "pipeline.yaml").write_text(yaml.safe_dump(tiny_spec()))
    (work / "events.json").write_text(json.dumps(EVENTS))
    return work


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[LocalServer]:
    with LocalServer(workdir / "server", log=workdir / "server.log",
                     args=["--cpus", "2"]) as running:
        yield running


@pytest.fixture(scope="module")
def done(server: LocalServer, workdir: Path) -> dict[str, Any]:
    """`mlaas submit --wait` of the tiny pipeline; the finished job."""
    result = run(server, "submit", str(workdir / "pipeline.yaml"), "--wait")
    assert result.exit_code == 0, result.output + "\n" + server.log_tail()
    job_id = result.stdout.splitlines()[0].strip()
    assert f"job {job_id} succeeded: model cli-tiny v" in result.stdout
    with server.client() as c:
        return c.job(job_id)


def test_submit_wait_registers_a_model_version(done: dict[str, Any], server: LocalServer) -> None:
    assert done["state"] == "succeeded" and done["model_name"] == "cli-tiny"
    assert isinstance(done["model_version"], int) and done["model_version"] >= 1
    with server.client() as c:
        versions = c.model("cli-tiny")
        files = [f["path"] for f in c.list_files()]
    assert str(done["model_version"]) in json.dumps(versions)
    assert sum(p.startswith("submit/") and p.endswith(".root") for p in files) == 2


def test_jobs_table_and_json(done: dict[str, Any], server: LocalServer) -> None:
    table = run(server, "jobs")
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if done["id"] in line)
    assert "succeeded" in row and f"cli-tiny v{done['model_version']}" in row
    listed = run(server, "jobs", "--json", "--state", "succeeded", "--mine")
    assert listed.exit_code == 0, listed.output
    assert done["id"] in [j["id"] for j in json.loads(listed.stdout)]
    none = run(server, "jobs", "--json", "--state", "queued", "--name", "no-such-name")
    assert json.loads(none.stdout) == []


def test_status_prints_the_job(done: dict[str, Any], server: LocalServer) -> None:
    result = run(server, "status", done["id"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["id"] == done["id"] and shown["state"] == "succeeded"
    assert shown["model_version"] == done["model_version"]


def test_logs_of_a_finished_job(done: dict[str, Any], server: LocalServer) -> None:
    plain = run(server, "logs", done["id"])
    followed = run(server, "logs", done["id"], "-f")  # returns at once: the job is final
    assert plain.exit_code == 0 and followed.exit_code == 0, plain.output + followed.output
    assert plain.stdout.strip() and followed.stdout == plain.stdout
    with server.client() as c:
        assert "".join(c.logs(done["id"])) == plain.stdout


def test_download_writes_the_artifacts(done: dict[str, Any], server: LocalServer,
                                       tmp_path: Path) -> None:
    result = run(server, "download", done["id"], "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["roc_auc"] <= 1.0
    assert (tmp_path / "out" / "bundle.tar.gz").stat().st_size > 0
    with server.client() as c:
        listed = {a["path"] for a in c.artifacts(done["id"])}
        assert len(c.metrics(done["id"])) == 1  # one epoch
    written = {p.strip() for p in result.stdout.splitlines() if p.strip()}
    assert {str(tmp_path / "out" / p) for p in listed} == written


def test_models_lists_the_registered_model(done: dict[str, Any], server: LocalServer) -> None:
    result = run(server, "models")
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")]
            for line in result.stdout.splitlines() if "cli-tiny" in line]
    assert rows and rows[0][0] == "cli-tiny" and rows[0][1] == "1", result.stdout
    as_json = json.loads(run(server, "models", "--json").stdout)
    assert "cli-tiny" in [m["name"] for m in as_json]


def test_predict_by_model_name_matches_the_downloaded_bundle(
        done: dict[str, Any], server: LocalServer, workdir: Path, tmp_path: Path) -> None:
    events = str(workdir / "events.json")
    remote = run(server, "predict", "cli-tiny", "--input", events,
                 "--version", str(done["model_version"]))
    assert remote.exit_code == 0, remote.output
    scores = json.loads(remote.stdout)
    with server.client() as c:
        c.download(done["id"], tmp_path)
    local = run(server, "predict", str(tmp_path / "bundle.tar.gz"), "--input", events)
    assert local.exit_code == 0, local.output
    expected = json.loads(local.stdout)
    assert len(scores) == 3 and scores[2] is None and expected[2] is None
    assert scores[:2] == pytest.approx(expected[:2], abs=1e-5)


def test_a_missing_model_is_not_found(done: dict[str, Any], server: LocalServer,
                                      workdir: Path) -> None:
    result = run(server, "predict", "no-such-model", "--input", str(workdir / "events.json"))
    assert result.exit_code == 1
    assert isinstance(result.exception, NotFound)
    assert "no-such-model" in str(result.exception)


def test_cancel_a_long_job(server: LocalServer, workdir: Path) -> None:
    spec = workdir / "long.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(epochs=500, name="cli-long")))
    submitted = run(server, "submit", str(spec), "--name", "long-one")
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    cancelled = run(server, "cancel", job_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout.startswith(f"job {job_id}: ")
    with server.client() as c:
        final = c.wait(job_id, timeout=120, poll=0.5)
    assert final["state"] == "cancelled" and final["name"] == "long-one"
    again = run(server, "cancel", job_id)
    assert again.exit_code == 1 and type(again.exception).__name__ == "Conflict"


def test_submit_follow_streams_the_log(server: LocalServer, workdir: Path) -> None:
    result = run(server, "submit", str(workdir / "pipeline.yaml"), "--name", "followed",
                 "--follow")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.splitlines()[0].strip()
    with server.client() as c:
        log = "".join(c.logs(job_id))
    assert log.strip() and log in result.stdout
    assert f"job {job_id} succeeded" in result.stdout


def test_an_invalid_spec_is_a_spec_error_with_field_paths(server: LocalServer,
                                                          tmp_path: Path) -> None:
    bad = tiny_spec()
    bad["train"]["epochs"] = 0
    bad["data"]["featurs"] = ["x"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with Client(server.url) as c, pytest.raises(SpecError) as info:
        c.submit(path, upload_workspace_files=False)
    paths = [p for p, _ in info.value.problems]
    assert "train.epochs" in paths and "data" in " ".join(paths)


def test_workspace_files_round_trip(server: LocalServer, tmp_path: Path) -> None:
    local = tmp_path / "net.py"
    local.write_text("def build(n, spec): ...\n")
    with server.client() as c:
        put = c.upload_file("mine/net.py", local)
        c.upload_file("mine/raw.bin", b"\x00\x01")
        assert put["path"] == "mine/net.py" and put["size"] == local.stat().st_size
        listed = {f["path"]: f for f in c.list_files()}
        assert listed["mine/raw.bin"]["size"] == 2
        assert c.download_file("mine/net.py") == local.read_bytes()
        c.delete_file("mine/raw.bin")
        with pytest.raises(NotFound):
            c.download_file("mine/raw.bin")
        assert "mine/raw.bin" not in {f["path"] for f in c.list_files()}


def test_following_a_log_survives_a_server_kill_and_restart(workdir: Path, tmp_path: Path) -> None:
    """SIGKILL the server while a client follows a job's log; restart it on the same data
    dir and port: the follow resumes from its last byte and ends when the job does."""
    spec = tmp_path / "restart.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(epochs=400, name="cli-restart")))
    (tmp_path / "data").symlink_to(workdir / "data")
    first = LocalServer(tmp_path / "server", log=tmp_path / "server.log", args=["--cpus", "1"])
    pieces: list[str] = []
    with first:
        with first.client() as c:
            job_id = c.submit(spec)["id"]

        def follow() -> None:
            with Client(first.url) as cc:
                pieces.extend(cc.logs(job_id, follow=True, reconnect=90))

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not pieces and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pieces, "no log within 60 s\n" + first.log_tail()
        first.kill()
        before = "".join(pieces)
    second = LocalServer(tmp_path / "server", port=first.port, log=tmp_path / "server.log",
                         args=["--cpus", "1"])
    with second, second.client() as c:
        c.cancel(job_id)
        reader.join(90)
        assert not reader.is_alive(), "the follow did not end with the job"
        final = c.job(job_id)
        full = "".join(c.logs(job_id))
    assert final["state"] == "cancelled"
    assert "".join(pieces) == full and full.startswith(before)


# ----------------------------------------------------------- errors, as a user sees them


def console(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mlaas_command(), *args], capture_output=True, text=True, timeout=60,
                          env={**WIDE, "PATH": "/usr/bin:/bin", **(env or {})})


def test_tokens_from_mlaas_token_against_a_multi_user_server(workdir: Path,
                                                             tmp_path: Path) -> None:
    """A server trusting a proxy on 127.0.0.1 (so a test can log in as alice with a header),
    personal tokens created through the API; the CLI sends MLAAS_TOKEN and never prints it."""
    multi = LocalServer(tmp_path / "server", log=tmp_path / "server.log",
                        args=["--cpus", "1", "--trust-proxy-from", "127.0.0.1/32"])
    with multi, httpx.Client(base_url=multi.url, headers={"X-Forwarded-User": "alice"}) as login:
        def token(scopes: list[str]) -> str:
            made = login.post("/api/tokens", json={"name": "t", "scopes": scopes})
            assert made.status_code == 201, made.text
            return str(made.json()["token"])

        reader, bogus = token(["read"]), "mlaas_" + "x" * 43
        ok = console("jobs", "--json", env={"MLAAS_SERVER": multi.url, "MLAAS_TOKEN": reader})
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == []
        refused = console("submit", str(workdir / "pipeline.yaml"),
                          env={"MLAAS_SERVER": multi.url, "MLAAS_TOKEN": reader})
        assert refused.returncode == 1 and refused.stderr.startswith("Forbidden: "), refused.stderr
        for env in ({"MLAAS_SERVER": multi.url},
                    {"MLAAS_SERVER": multi.url, "MLAAS_TOKEN": bogus}):
            denied = console("jobs", env=env)
            assert denied.returncode == 1 and denied.stderr.startswith("Unauthorized: "), denied.stderr
            assert "Traceback" not in denied.stderr and "x" * 43 not in denied.stderr
        assert reader not in ok.stdout + ok.stderr + refused.stdout + refused.stderr


def test_a_server_error_is_one_readable_line(server: LocalServer) -> None:
    result = console("status", "no-such-job", "--server", server.url)
    assert result.returncode == 1
    assert result.stderr.startswith("NotFound: ") and "no-such-job" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_an_unreachable_server_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = console("jobs", env={"MLAAS_SERVER": url})
    assert result.returncode == 1
    assert result.stderr.startswith("ServerUnreachable: cannot reach the mlaas server at " + url)
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_command_lines_are_usage_errors(tmp_path: Path) -> None:
    events = tmp_path / "events.json"
    events.write_text("[]")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    cases = {
        ("predict", "some-model", "--input", str(tmp_path / "missing.json")): "does not exist",
        ("predict", str(bundle), "--input", str(events), "--version", "2"): "local bundle",
        ("submit", str(tmp_path / "missing.yaml")): "does not exist",
        ("jobs", "--limit", "0"): "--limit",
    }
    for args, words in cases.items():
        result = CliRunner().invoke(cli.app, list(args), env=WIDE)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output, (args, result.output)


def test_client_commands_have_help() -> None:
    for command, words in {"submit": ["--wait", "--follow", "workspace", "MLAAS_SERVER"],
                           "jobs": ["--state", "--mine"], "logs": ["--follow"],
                           "download": ["--output", "artifact"], "models": ["registered"],
                           "predict": ["--server", "--version", "--alias", "model"]}.items():
        result = CliRunner().invoke(cli.app, [command, "--help"], env=WIDE)
        assert result.exit_code == 0, result.output
        for word in words:
            assert word in result.stdout, f"{word!r} not in help of {command}"


def test_demo_submits_over_http_and_stops_its_server(tmp_path: Path) -> None:
    port = free_port()
    result = CliRunner().invoke(cli.app, ["demo", "--workdir", str(tmp_path), "-n", "1000",
                                          "--port", str(port)], env=WIDE)
    assert result.exit_code == 0, result.output + (tmp_path / "server.log").read_text()
    summary = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    assert summary["state"] == "succeeded" and summary["model_version"] == 1
    assert 0.5 < summary["test_roc_auc"] <= 1.0 and len(summary["predict_example"]) == 2
    assert summary["curl"].startswith(f"curl -s -X POST 'http://127.0.0.1:{port}/api/models/"
                                      "datagen-demo/predict?version=1'")
    assert (tmp_path / "job" / "metrics.json").exists()
    assert port_is_free(port)  # the server was stopped
