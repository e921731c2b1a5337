"""The local executor with real job processes: environment, slots, signals, limits.

There is no GPU on this machine: GPU slots are tested with a configured list of
fake device ids (``fake-gpu-0`` ...), which is all the executor ever looks at;
what is checked is which ids a job is given and the ``CUDA_VISIBLE_DEVICES``
value its process really sees.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from job_pipelines import (
    ENV_MODEL,
    SLOW_MODEL,
    STUBBORN_MODEL,
    make_data,
    model_file,
    pipeline,
    progress_epoch,
    wait_for,
    write_job,
)
from mlaas.errors import Conflict, PlatformError
from mlaas.platform.executors import LIMIT_MEMORY, LIMIT_WALL_TIME, Exited, Launch, LocalExecutor
from mlaas.platform.executors.base import Executor, read_log_tail
from mlaas.platform.executors.local import assign_devices, describe_exit, job_environment

FAKE_GPUS = ["fake-gpu-0", "fake-gpu-1", "fake-gpu-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("executor"))


@pytest.fixture
def executor() -> Iterator[LocalExecutor]:
    ex = LocalExecutor(cpus=2, gpu_devices=FAKE_GPUS, limit_grace_s=5.0)
    yield ex
    ex.shutdown(grace_s=0.5)


def _until_exited(ex: LocalExecutor, ids: set[str], timeout: float = 120) -> dict[str, Exited]:
    done: dict[str, Exited] = {}
    deadline = time.monotonic() + timeout
    while set(done) != ids:
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {sorted(ids - set(done))} still running after {timeout} s")
        for exited in ex.poll():
            done[exited.job_id] = exited
        time.sleep(0.05)
    return done


def _slow_job(root: Path, data: Path, name: str, epochs: int = 50) -> Path:
    model = model_file(root, SLOW_MODEL, "slow", SLEEP=0.02)
    return write_job(root / name, pipeline(data, epochs=epochs, model=model, batch_size=128))


# -- pure parts ---------------------------------------------------------------------------


def test_local_executor_is_an_executor() -> None:
    assert isinstance(LocalExecutor(cpus=1), Executor)


def test_devices_are_assigned_in_configured_order() -> None:
    assert assign_devices(FAKE_GPUS, 0) == []
    assert assign_devices(FAKE_GPUS, 2) == ["fake-gpu-0", "fake-gpu-1"]
    assert assign_devices(["fake-gpu-2"], 1) == ["fake-gpu-2"]
    with pytest.raises(Conflict, match="2 GPU"):
        assign_devices(["fake-gpu-2"], 2)
    with pytest.raises(ValueError, match="-1 GPUs"):
        assign_devices(FAKE_GPUS, -1)


def test_environment_is_built_from_an_allow_list(tmp_path: Path) -> None:
    server = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "PYTHONPATH": "/src",
              "MLAAS_DB_URL": "postgresql://u:pw@db/x", "MY_API_TOKEN": "t0k",
              "AWS_ACCESS_KEY_ID": "AKIA", "DB_PASSWORD": "pw", "JWT_SECRET": "s",
              "SOME_UNLISTED": "x", "X509_USER_PROXY": "/tmp/x509up", "SITE_NAME": "cern"}
    launch = Launch("j1", tmp_path, cpus=3, env={"MLAAS_JOB_ID": "j1", "LEAK_TOKEN": "no"})
    env = job_environment(launch, ["fake-gpu-1"], server_env=server,
                          pass_env=["SITE_NAME", "MY_API_TOKEN"])
    assert env["PATH"] == "/usr/bin" and env["LANG"] == "C.UTF-8" and env["PYTHONPATH"] == "/src"
    assert env["SITE_NAME"] == "cern"  # passed by the operator
    for secret in ("MLAAS_DB_URL", "MY_API_TOKEN", "AWS_ACCESS_KEY_ID", "DB_PASSWORD",
                   "JWT_SECRET", "LEAK_TOKEN", "X509_USER_PROXY", "SOME_UNLISTED"):
        assert secret not in env, secret
    assert env["HOME"] == str(tmp_path) and env["TMPDIR"] == str(tmp_path / "tmp")
    assert env["CUDA_VISIBLE_DEVICES"] == "fake-gpu-1"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MLAAS_JOB_CPUS"):
        assert env[name] == "3"
    threaded = Launch("j2", tmp_path, cpus=2, threads=1)
    assert job_environment(threaded, [], server_env={})["OMP_NUM_THREADS"] == "1"
    assert "PYTHONPATH" not in job_environment(launch, [], server_env={"PATH": "/bin"})
    assert job_environment(launch, [], server_env={})["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("code, text", [
    (0, "exited with code 0"),
    (1, "exited with code 1"),
    (75, "exited with code 75 (preempted: checkpoint written)"),
    (-9, "killed by signal SIGKILL (9)"),
    (-15, "killed by signal SIGTERM (15)"),
    (None, "exit status unknown"),
])
def test_exit_descriptions(code: int | None, text: str) -> None:
    assert describe_exit(code) == text


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = read_log_tail(log, lines=3)
    assert tail == "line 97\nline 98\nline 99"
    assert read_log_tail(tmp_path / "missing.log") == ""


def test_bad_configuration_and_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1 CPU"):
        LocalExecutor(cpus=0)
    with pytest.raises(ValueError, match="duplicates"):
        LocalExecutor(cpus=1, gpu_devices=["0", "0"])
    ex = LocalExecutor(cpus=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ex.start(Launch("nodir", tmp_path / "missing"))
    with pytest.raises(Conflict, match="asks for 2 CPUs"):
        ex.start(Launch("big", tmp_path, cpus=2))
    with pytest.raises(ValueError, match="at least 1"):
        ex.start(Launch("zero", tmp_path, cpus=0))
    with pytest.raises(Conflict, match="GPU"):
        ex.start(Launch("gpu", tmp_path, gpus=1))
    assert ex.running() == set()
    ex.terminate("unknown", grace_s=0)  # ignored
    ex.shutdown(grace_s=0)
    with pytest.raises(PlatformError, match="shut down"):
        ex.start(Launch("late", tmp_path))


# -- real job processes --------------------------------------------------------------------------


def test_environment_and_gpu_slots_seen_by_real_jobs(
        data: Path, tmp_path: Path, executor: LocalExecutor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets in the server's environment never reach a job; fake GPU ids are handed out."""
    for name, value in {"MLAAS_DB_URL": "postgresql://u:pw@127.0.0.1/x",
                        "MLAAS_TEST_API_TOKEN": "t0k", "AWS_SECRET_ACCESS_KEY": "k",
                        "PGPASSWORD": "pw", "UNRELATED_SERVER_SETTING": "1"}.items():
        monkeypatch.setenv(name, value)
    model = model_file(tmp_path, ENV_MODEL, "envdump")
    with_gpus = write_job(tmp_path / "gpu", pipeline(data, model=model))
    without = write_job(tmp_path / "cpu", pipeline(data, model=model))
    assert executor.capacity() == {"cpus": 2, "gpus": 3, "devices": FAKE_GPUS}
    assert executor.start(Launch("gpu", with_gpus, gpus=2)) == ["fake-gpu-0", "fake-gpu-1"]
    assert executor.start(Launch("cpu", without)) == []
    assert executor.running() == {"gpu", "cpu"}
    assert executor.free() == {"cpus": 0, "gpus": 1, "devices": ["fake-gpu-2"]}
    assert not executor.fits(Launch("more", tmp_path))
    with pytest.raises(Conflict, match="already running"):
        executor.start(Launch("cpu", without))

    done = _until_exited(executor, {"gpu", "cpu"})
    assert executor.free() == {"cpus": 2, "gpus": 3, "devices": FAKE_GPUS}
    assert done["gpu"].devices == ["fake-gpu-0", "fake-gpu-1"]
    for job_id, job_dir, visible in (("gpu", with_gpus, "fake-gpu-0,fake-gpu-1"),
                                     ("cpu", without, "")):
        assert done[job_id].exit_code == 1, done[job_id].log_tail  # build() stops on purpose
        assert "env written" in done[job_id].log_tail
        seen = json.loads((job_dir / "env.json").read_text())
        assert seen["CUDA_VISIBLE_DEVICES"] == visible
        assert seen["HOME"] == str(job_dir) and seen["TMPDIR"] == str(job_dir / "tmp")
        assert seen["OMP_NUM_THREADS"] == "1" and seen["MLAAS_JOB_ID"] == job_id
        for secret in ("MLAAS_DB_URL", "MLAAS_TEST_API_TOKEN", "AWS_SECRET_ACCESS_KEY",
                       "PGPASSWORD", "UNRELATED_SERVER_SETTING"):
            assert secret not in seen, secret
        log = (job_dir / "job.log").read_text()
        assert f"starting job {job_id}" in log and f"job {job_id} exited with code 1" in log


def test_terminate_kills_a_job_that_ignores_sigterm(data: Path, tmp_path: Path,
                                                    executor: LocalExecutor) -> None:
    model = model_file(tmp_path, STUBBORN_MODEL, "stubborn")
    job = write_job(tmp_path / "job", pipeline(data, epochs=50, model=model))
    executor.start(Launch("stubborn", job))
    pid = executor.pid("stubborn")
    assert pid is not None
    wait_for(lambda: (job / "stubborn.started").exists(), 120, "the first training batch")
    executor.terminate("stubborn", grace_s=1.0)
    time.sleep(0.3)
    assert executor.poll() == [] and psutil.pid_exists(pid), "SIGTERM alone must not stop it"
    exited = _until_exited(executor, {"stubborn"}, timeout=60)["stubborn"]
    assert exited.exit_code == -signal.SIGKILL
    assert exited.reason == "terminated on request; killed by signal SIGKILL (9)"
    assert exited.limit is None
    assert not _group_alive(pid)


def _group_alive(pgid: int) -> bool:
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def test_terminate_without_kill_preempts(data: Path, tmp_path: Path,
                                         executor: LocalExecutor) -> None:
    job = _slow_job(tmp_path, data, "job")
    executor.start(Launch("slow", job))
    wait_for(lambda: progress_epoch(job) >= 1, 120, "the first epoch")
    executor.terminate("slow", grace_s=0.1, kill=False)
    exited = _until_exited(executor, {"slow"})["slow"]
    assert exited.exit_code == 75, exited.log_tail
    assert exited.reason == ("terminated on request; exited with code 75 "
                             "(preempted: checkpoint written)")
    assert (job / "run" / "checkpoint.pt").is_file()


def test_a_job_killed_from_outside_reports_signal_and_log_tail(
        data: Path, tmp_path: Path, executor: LocalExecutor) -> None:
    job = _slow_job(tmp_path, data, "job")
    executor.start(Launch("victim", job))
    wait_for(lambda: progress_epoch(job) >= 1, 120, "the first epoch")
    pid = executor.pid("victim")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    exited = _until_exited(executor, {"victim"})["victim"]
    assert exited.exit_code == -9 and exited.reason == "killed by signal SIGKILL (9)"
    assert "starting job victim" in exited.log_tail
    assert "[mlaas] starting" in exited.log_tail  # written by the job process itself


def test_wall_time_and_memory_limits(data: Path, tmp_path: Path,
                                     executor: LocalExecutor) -> None:
    slow = _slow_job(tmp_path, data, "slow")
    hungry = _slow_job(tmp_path, data, "hungry")
    executor.start(Launch("slow", slow, max_time_s=1.0))
    executor.start(Launch("hungry", hungry, memory_bytes=40 * 2**20))  # torch alone needs more
    done = _until_exited(executor, {"slow", "hungry"})
    wall, mem = done["slow"], done["hungry"]
    assert wall.limit == LIMIT_WALL_TIME
    assert wall.reason.startswith("wall time exceeded (limit 1 s); ")
    assert wall.exit_code in (75, -9)  # checkpointed after SIGTERM, or SIGKILLed after grace
    assert mem.limit == LIMIT_MEMORY and mem.exit_code == -9
    assert mem.reason.startswith("memory limit exceeded (")
    assert "limit 40 MiB" in mem.reason and mem.reason.endswith("killed by signal SIGKILL (9)")


def test_shutdown_stops_every_job(data: Path, tmp_path: Path) -> None:
    ex = LocalExecutor(cpus=1)
    job = _slow_job(tmp_path, data, "job")
    ex.start(Launch("last", job))
    pid = ex.pid("last")
    wait_for(lambda: "[mlaas] starting" in (job / "job.log").read_text(), 60,
             "the job process to take over its SIGTERM handling")
    ended = ex.shutdown(grace_s=10.0)
    assert [e.job_id for e in ended] == ["last"]
    assert ended[0].exit_code == 75, ended[0].log_tail
    assert ex.running() == set() and pid is not None and not psutil.pid_exists(pid)


def test_jobs_outlive_the_thread_that_started_them(data: Path, tmp_path: Path,
                                                   executor: LocalExecutor) -> None:
    """Jobs die with their parent *thread* (PR_SET_PDEATHSIG); a short-lived caller must not
    take them along: the executor starts every process from its own long-lived thread.

    (Checked by hand: with Popen called in the caller's thread, this job exits 75 as soon
    as the caller ends.)
    """
    import threading

    job = _slow_job(tmp_path, data, "job")

    def caller() -> None:  # lives until the job has surely set PR_SET_PDEATHSIG
        executor.start(Launch("orphan", job))
        wait_for(lambda: progress_epoch(job) >= 1, 120, "the first epoch")

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join()
    ended_at = progress_epoch(job)
    wait_for(lambda: progress_epoch(job) >= ended_at + 2, 120,
             "two more epochs after the caller thread ended")
    assert executor.poll() == [] and executor.running() == {"orphan"}
    assert "Preempted" not in (job / "job.log").read_text()
