"""The job process ``python -m mlaas.platform.jobrun JOB_DIR``, run for real.

Exit codes (0, 75, 1, 2), the files it leaves (progress.json, exit.json, run/),
resuming after SIGTERM, and SIGTERM when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from job_pipelines import (
    SLOW_MODEL,
    make_data,
    model_file,
    pipeline,
    progress_epoch,
    wait_for,
    write_job,
)
from mlaas.platform import jobrun


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("jobrun"))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(job_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mlaas.platform.jobrun", str(job_dir)],
                            cwd=job_dir, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _run(job_dir: Path, timeout: float = 120) -> tuple[int, str]:
    proc = _start(job_dir)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_success_writes_progress_exit_and_bundle(data: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", pipeline(data, epochs=2))
    code, out = _run(job)
    assert code == 0, out
    assert (job / "run" / "bundle.tar.gz").is_file()
    assert (job / "run" / "checkpoint.pt").is_file()
    progress = json.loads((job / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["epoch"] == 2 and progress["epochs"] == 2
    assert progress["stopped"] == "completed" and progress["epochs_run"] == 2
    assert set(progress["metrics"]) >= {"train_loss", "val_loss", "lr"}
    assert progress["events_per_s"] > 0
    exit_info = json.loads((job / "exit.json").read_text())
    assert exit_info["exit_code"] == 0 and exit_info["error"] is None
    assert exit_info["finished_at"].endswith("+00:00")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and 0.0 <= summary["test"]["roc_auc"] <= 1.0
    assert not list(job.glob(".*.tmp")), "no temporary files left behind"


def test_mlaas_error_exits_1_with_the_message(data: Path, tmp_path: Path) -> None:
    spec = pipeline(data)
    spec["data"]["sources"][0]["files"] = [str(tmp_path / "missing.root")]
    job = write_job(tmp_path / "job", spec)
    code, out = _run(job)
    assert code == 1, out
    assert "missing.root" in out and "Traceback" not in out
    exit_info = json.loads((job / "exit.json").read_text())
    assert exit_info["exit_code"] == 1 and "missing.root" in exit_info["error"]


def test_other_exception_exits_2_with_traceback(data: Path, tmp_path: Path) -> None:
    source = textwrap.dedent('''
        from torch import nn

        class Boom(BaseException):
            """Escapes mlaas's error handling, like a bug would."""

        class Model(nn.Module):
            def __init__(self, n):
                super().__init__()
                self.lin = nn.Linear(n, 1)

            def forward(self, x):
                raise Boom("forward blew up")

        def build(n_features, spec):
            return Model(n_features)
    ''')
    job = write_job(tmp_path / "job", pipeline(data, model=model_file(tmp_path, source, "boom")))
    code, out = _run(job)
    assert code == 2, out
    assert "Traceback" in out and "Boom: forward blew up" in out
    assert json.loads((job / "exit.json").read_text())["exit_code"] == 2


def test_sigterm_exits_75_and_a_new_start_resumes(data: Path, tmp_path: Path) -> None:
    model = model_file(tmp_path, SLOW_MODEL, "slow", SLEEP=0.02)
    job = write_job(tmp_path / "job", pipeline(data, epochs=5, model=model, batch_size=128))
    proc = _start(job)
    wait_for(lambda: progress_epoch(job) >= 1, 120, "the first epoch's progress report")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "Preempted" in out and "Traceback" not in out
    assert json.loads((job / "exit.json").read_text())["exit_code"] == 75
    assert (job / "run" / "checkpoint.pt").is_file()
    done_before = progress_epoch(job)
    assert 1 <= done_before < 5

    code, out = _run(job)
    assert code == 0, out
    assert "resuming from" in out
    history = json.loads((job / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert json.loads((job / "exit.json").read_text())["exit_code"] == 0


def test_sigterm_before_training_exits_75_with_exit_json(data: Path, tmp_path: Path) -> None:
    # Right after the start: imports, pass 1 or the trainer's setup, wherever
    # the signal lands. Nothing is checkpointed yet; the job still says it
    # was preempted, in its log and in exit.json, so the server requeues it.
    model = model_file(tmp_path, SLOW_MODEL, "slow", SLEEP=0.02)
    job = write_job(tmp_path / "job", pipeline(data, epochs=50, model=model, batch_size=128))
    proc = _start(job)
    assert proc.stdout is not None
    seen = [proc.stdout.readline() for _ in range(1)]
    while seen[-1] and not seen[-1].startswith("[mlaas] starting"):
        seen.append(proc.stdout.readline())  # warnings printed before it, if any
    assert seen[-1].startswith("[mlaas] starting"), seen
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "Preempted: received SIGTERM" in out and "Traceback" not in out
    exit_info = json.loads((job / "exit.json").read_text())
    assert exit_info["exit_code"] == 75 and "SIGTERM" in exit_info["error"], exit_info


def test_parent_death_sends_sigterm(data: Path, tmp_path: Path) -> None:
    """A parent (standing in for the server) is SIGKILLed: the job checkpoints and exits 75."""
    model = model_file(tmp_path, SLOW_MODEL, "slow", SLEEP=0.02)
    job = write_job(tmp_path / "job", pipeline(data, epochs=50, model=model, batch_size=128))
    parent_code = textwrap.dedent(f'''
        import os, subprocess, sys, time
        env = dict(os.environ, OMP_NUM_THREADS="1", MLAAS_JOB_PARENT_PID=str(os.getpid()))
        log = open({str(job / "job.log")!r}, "ab")
        child = subprocess.Popen([sys.executable, "-m", "mlaas.platform.jobrun",
                                  {str(job)!r}], env=env, stdout=log, stderr=log,
                                 start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(600)
    ''')
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        wait_for(lambda: progress_epoch(job) >= 1, 120, "the first epoch's progress report")
        parent.kill()
        parent.wait(timeout=30)
        wait_for(lambda: (job / "exit.json").exists(), 60, "exit.json after the parent died")
    finally:
        parent.kill()
        parent.communicate(timeout=30)  # also closes the pipe
    exit_info = json.loads((job / "exit.json").read_text())
    assert exit_info["exit_code"] == 75, (job / "job.log").read_text()
    wait_for(lambda: not _alive(child_pid), 30, "the orphaned job process to end")
    assert "Preempted" in (job / "job.log").read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_usage_and_missing_pipeline(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mlaas.platform.jobrun"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "mlaas.platform.jobrun",
                           str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no pipeline.json" in proc.stderr
    assert not (tmp_path / "empty" / "exit.json").exists()


def test_second_process_of_a_job_waits_then_gives_up(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Never two processes on one run directory: the lock of jobrun.main, tested in-process."""
    job = write_job(tmp_path / "job", {"name": "x"})
    monkeypatch.setattr(jobrun, "LOCK_WAIT_S", 0.3)
    with open(job / ".lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(jobrun._LockTimeout, match="another process of this job still holds"):
            with jobrun._job_lock(job):
                pytest.fail("the lock was taken twice")
    with jobrun._job_lock(job):  # free again once the holder let go
        pass


def test_progress_file_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "progress.json"
    jobrun.write_json_atomic(target, {"epoch": 1})
    jobrun.write_json_atomic(target, {"epoch": 2})
    assert json.loads(target.read_text()) == {"epoch": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]
