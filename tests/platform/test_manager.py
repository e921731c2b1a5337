"""The job manager with a real SQL store, real storage, real job processes and a real registry.

States and their causes: success and registration, cancel (queued, running,
a job that ignores SIGTERM), preemption and resume, a process that dies, the
wall-time limit, requests that can never run, and recovery after the server
died (jobs requeued and resumed, exits while it was down honoured).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from job_pipelines import (
    SLOW_MODEL,
    STUBBORN_MODEL,
    make_data,
    model_file,
    pipeline,
    progress_epoch,
    wait_for,
)
from mlaas.errors import Conflict, Forbidden, NotFound
from mlaas.platform.executors import Launch, LocalExecutor
from mlaas.platform.manager import JobManager, fifo_admit
from mlaas.platform.principal import Principal
from mlaas.platform.records import JobRecord, JobState
from mlaas.platform.storage import Storage
from mlaas.serve.registry import Registry

ALICE = Principal(user="alice", groups=("cms",))
BOB = Principal(user="bob", groups=("atlas",))

MakeManager = Callable[..., JobManager]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("manager"))


@pytest.fixture
def make_manager(sqlite_store: object, storage: Storage) -> Iterator[MakeManager]:
    """Managers on the test's store and storage; every job process is stopped afterwards."""
    made: list[JobManager] = []

    def make(cpus: int = 2, **kwargs: object) -> JobManager:
        manager = JobManager(sqlite_store, storage, LocalExecutor(cpus=cpus),
                             Registry(storage.models_dir), poll_interval=0.1, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop(terminate_jobs=True, timeout=30)


def _slow(data: Path, root: Path, epochs: int = 50) -> dict[str, object]:
    return pipeline(data, epochs=epochs, batch_size=128,
                    model=model_file(root, SLOW_MODEL, "slow", SLEEP=0.02))


# -- the admission policy (pure) -----------------------------------------------------------


def _req(job_id: str, cpus: int = 1, gpus: int = 0) -> Launch:
    return Launch(job_id, Path("/nonexistent"), cpus=cpus, gpus=gpus)


@pytest.mark.parametrize("case, queued, free, want_admitted", [
    ("nothing queued", [], {"cpus": 4, "gpus": 0}, []),
    ("all fit", [_req("a"), _req("b")], {"cpus": 2, "gpus": 0}, ["a", "b"]),
    ("admits in queue order until slots run out", [_req("a"), _req("b"), _req("c")],
     {"cpus": 2, "gpus": 0}, ["a", "b"]),
    ("a head that does not fit blocks the jobs behind it", [_req("big", cpus=3), _req("small")],
     {"cpus": 2, "gpus": 0}, []),
    ("GPUs are counted like CPUs", [_req("g1", gpus=1), _req("g2", gpus=1), _req("c")],
     {"cpus": 4, "gpus": 1}, ["g1"]),
    ("no free slots, no admission", [_req("a")], {"cpus": 0, "gpus": 0}, []),
])
def test_fifo_admit(case: str, queued: list[Launch], free: dict[str, int],
                    want_admitted: list[str]) -> None:
    assert fifo_admit(queued, free) == want_admitted, case


# -- submit and cancel without running anything (both databases) ---------------------------


def _manager_on(store: object, storage: Storage) -> JobManager:
    return JobManager(store, storage, LocalExecutor(cpus=1), Registry(storage.models_dir))


def test_submit_writes_the_pipeline_and_cancel_of_a_queued_job(store: object,
                                                               storage: Storage) -> None:
    manager = _manager_on(store, storage)
    spec = {"name": "higgs", "train": {"epochs": 1}}
    job = manager.submit(principal=ALICE, name="first", spec=spec)
    assert job.state is JobState.QUEUED and job.owner == "alice" and job.group == "cms"
    assert job.model_name == "higgs"  # spec.name wins over the job name
    assert json.loads((storage.job_dir(job.id) / "pipeline.json").read_text()) == spec
    other = manager.submit(principal=ALICE, name="second", spec={}, model_name="m2",
                           resources={"cpus": 1})
    assert other.model_name == "m2" and other.resources == {"cpus": 1}

    cancelled = manager.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.finished_at is not None
    assert cancelled.reason == "cancelled before it ran"
    with pytest.raises(Conflict, match="already cancelled"):
        manager.cancel(job.id)
    with pytest.raises(NotFound):
        manager.cancel("nosuchjob")


def test_submit_into_someone_elses_model_is_refused(store: object, storage: Storage) -> None:
    manager = _manager_on(store, storage)
    store.ensure_model("alices-model", owner="alice", group="cms")  # type: ignore[attr-defined]
    with pytest.raises(NotFound, match="alices-model"):  # private: bob may not even see it
        manager.submit(principal=BOB, name="x", spec={}, model_name="alices-model")
    store.set_model_visibility("alices-model", "public")  # type: ignore[attr-defined]
    with pytest.raises(Forbidden, match="alices-model"):
        manager.submit(principal=BOB, name="x", spec={}, model_name="alices-model")
    assert store.list_jobs(owner="bob") == []  # type: ignore[attr-defined]
    assert manager.submit(principal=ALICE, name="x", spec={},
                          model_name="alices-model").state is JobState.QUEUED


def test_requests_that_can_never_run_fail_at_admission(sqlite_store: object,
                                                       storage: Storage) -> None:
    manager = _manager_on(sqlite_store, storage)
    big = manager.submit(principal=ALICE, name="big", spec={}, resources={"cpus": 4})
    gpu = manager.submit(principal=ALICE, name="gpu", spec={}, resources={"gpus": 1})
    bad = manager.submit(principal=ALICE, name="bad", spec={}, resources={"cpus": "many"})
    neg = manager.submit(principal=ALICE, name="neg", spec={}, resources={"max_time_s": -1})
    threads = manager.submit(principal=ALICE, name="threads", spec={}, resources={"threads": 0})
    manager.tick()
    get = sqlite_store.get_job  # type: ignore[attr-defined]
    assert get(big.id).state is JobState.FAILED
    assert get(big.id).reason == ("cannot run: asks for 4 CPU(s) and 0 GPU(s); this executor "
                                  "has 1 CPU(s) and 0 GPU(s)")
    assert "1 GPU(s)" in get(gpu.id).reason and get(gpu.id).state is JobState.FAILED
    assert get(bad.id).state is JobState.FAILED and "invalid resources" in get(bad.id).reason
    assert get(neg.id).state is JobState.FAILED and "max_time_s" in get(neg.id).reason
    assert get(threads.id).state is JobState.FAILED and "threads" in get(threads.id).reason
    assert manager.executor.running() == set()


def test_recover_maps_states_after_a_server_death(store: object, storage: Storage) -> None:
    """The store says running, but no process of this server runs the jobs."""
    manager = _manager_on(store, storage)

    def running_job(name: str) -> JobRecord:
        job = manager.submit(principal=ALICE, name=name, spec={})
        moved = store.transition(job.id, {JobState.QUEUED},  # type: ignore[attr-defined]
                                 JobState.RUNNING, attempts=1)
        assert moved is not None
        return moved

    vanished = running_job("vanished")           # no exit.json: died with the server
    preempted = running_job("preempted")         # exit.json 75: checkpointed on SIGTERM
    crashed = running_job("crashed")             # exit.json 1 while the server was down
    cancelling = running_job("cancelling")       # a cancel was pending
    store.update_job(cancelling.id, cancel_requested=True)  # type: ignore[attr-defined]
    halfway = manager.submit(principal=ALICE, name="halfway", spec={})
    store.transition(halfway.id, {JobState.QUEUED}, JobState.RUNNING)  # type: ignore[attr-defined]
    store.transition(halfway.id, {JobState.RUNNING}, JobState.PREEMPTED)  # type: ignore[attr-defined]
    queued = manager.submit(principal=ALICE, name="queued", spec={})

    def exit_file(job: JobRecord, code: int) -> None:
        (storage.job_dir(job.id) / "exit.json").write_text(json.dumps({"exit_code": code}))

    exit_file(preempted, 75)
    exit_file(crashed, 1)
    (storage.job_dir(crashed.id) / "job.log").write_text("Traceback ...\nValueError: bad\n")

    changed = manager.recover()
    assert {j.id for j in changed} == {vanished.id, preempted.id, crashed.id, cancelling.id,
                                       halfway.id}
    get = store.get_job  # type: ignore[attr-defined]
    for job in (vanished, preempted, halfway):
        assert get(job.id).state is JobState.QUEUED, job.name
    assert get(vanished.id).attempts == 1  # kept: the next start is attempt 2
    assert "the server stopped while the job ran" in get(vanished.id).reason
    assert get(crashed.id).state is JobState.FAILED
    assert get(crashed.id).exit_code == 1
    assert get(crashed.id).reason.startswith("exited with code 1 while the server was down")
    assert "ValueError: bad" in get(crashed.id).reason
    assert get(cancelling.id).state is JobState.CANCELLED
    assert get(queued.id).state is JobState.QUEUED
    assert manager.recover() == []  # nothing left to fix


# -- real jobs ------------------------------------------------------------------------------------


def test_success_registers_the_bundle(data: Path, make_manager: MakeManager,
                                      storage: Storage) -> None:
    succeeded: list[JobRecord] = []
    manager = make_manager(on_success=succeeded.append)
    manager.start()
    job = manager.submit(principal=ALICE, name="ok", spec=pipeline(data, name="jobmodel"))
    done = manager.wait(job.id, timeout=180)
    assert done.state is JobState.SUCCEEDED, done.reason
    assert done.exit_code == 0 and done.attempts == 1 and done.reason is None
    assert done.model_name == "jobmodel" and done.model_version == 1
    assert done.started_at is not None and done.finished_at >= done.started_at
    assert done.progress["epoch"] == 2 and done.progress["phase"] == "done"
    assert [r.id for r in succeeded] == [job.id]
    registry = Registry(storage.models_dir)
    version = registry.version("jobmodel", 1)
    assert version["metadata"]["job_id"] == job.id and version["metadata"]["owner"] == "alice"
    model = manager.store.get_model("jobmodel")
    assert (model.owner, model.group) == ("alice", "cms")
    job_dir = storage.job_dir(job.id)
    for name in ("pipeline.json", "job.log", "progress.json", "exit.json",
                 "run/bundle.tar.gz", "run/checkpoint.pt"):
        assert (job_dir / name).exists(), name


def test_cancel_a_running_job_that_ignores_sigterm(data: Path, tmp_path: Path,
                                                   make_manager: MakeManager,
                                                   storage: Storage) -> None:
    manager = make_manager(grace_s=1.0)
    manager.start()
    spec = pipeline(data, epochs=50, model=model_file(tmp_path, STUBBORN_MODEL, "stubborn"))
    job = manager.submit(principal=ALICE, name="stubborn", spec=spec)
    job_dir = storage.job_dir(job.id)
    wait_for(lambda: (job_dir / "stubborn.started").exists(), 120, "the first training batch")
    asked = manager.cancel(job.id)
    assert asked.state is JobState.RUNNING and asked.cancel_requested
    done = manager.wait(job.id, timeout=60)
    assert done.state is JobState.CANCELLED
    assert done.exit_code == -signal.SIGKILL
    assert done.reason == "cancelled on request; terminated on request; killed by signal " \
                          "SIGKILL (9)"
    with pytest.raises(Conflict):
        manager.cancel(job.id)


def test_preempted_job_is_requeued_and_resumes(data: Path, tmp_path: Path,
                                               make_manager: MakeManager,
                                               storage: Storage) -> None:
    manager = make_manager()
    manager.start()
    job = manager.submit(principal=ALICE, name="long", spec=_slow(data, tmp_path, epochs=5))
    job_dir = storage.job_dir(job.id)
    wait_for(lambda: progress_epoch(job_dir) >= 1, 120, "the first epoch")
    manager.preempt(job.id)
    done = manager.wait(job.id, timeout=180)
    assert done.state is JobState.SUCCEEDED, done.reason
    assert done.attempts == 2
    log = (job_dir / "job.log").read_text()
    assert "exited with code 75 (preempted: checkpoint written)" in log
    assert "resuming from" in log
    history = json.loads((job_dir / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]  # as many as without preemption


def test_dead_process_and_wall_time_fail_with_reasons(data: Path, tmp_path: Path,
                                                      make_manager: MakeManager,
                                                      storage: Storage) -> None:
    manager = make_manager()
    manager.start()
    victim = manager.submit(principal=ALICE, name="victim", spec=_slow(data, tmp_path))
    timed = manager.submit(principal=ALICE, name="timed", spec=_slow(data, tmp_path),
                           resources={"max_time_s": 1.0})
    victim_dir = storage.job_dir(victim.id)
    wait_for(lambda: progress_epoch(victim_dir) >= 1, 120, "the victim's first epoch")
    pid = manager.executor.pid(victim.id)  # type: ignore[attr-defined]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    dead = manager.wait(victim.id, timeout=60)
    assert dead.state is JobState.FAILED and dead.exit_code == -9
    assert dead.reason.startswith("killed by signal SIGKILL (9)\n--- last lines of job.log ---")
    assert "[mlaas] starting" in dead.reason  # the log tail
    assert dead.progress.get("epoch", 0) >= 1

    over = manager.wait(timed.id, timeout=60)
    assert over.state is JobState.FAILED  # not requeued, although it exited 75 on SIGTERM
    assert over.reason.startswith("wall time exceeded (limit 1 s)")


def test_recover_resumes_a_job_of_a_dead_server(data: Path, tmp_path: Path,
                                                make_manager: MakeManager,
                                                storage: Storage) -> None:
    """Server 1 stops watching (as if killed); its job ends with the server. Server 2 resumes it."""
    first = make_manager()
    first.start()
    job = first.submit(principal=ALICE, name="durable", spec=_slow(data, tmp_path, epochs=4))
    job_dir = storage.job_dir(job.id)
    wait_for(lambda: progress_epoch(job_dir) >= 1, 120, "the first epoch")
    first.stop()  # the loop is gone: nobody records what happens next
    first.executor.shutdown(grace_s=10.0)  # the job sees SIGTERM, as when its server dies
    assert json.loads((job_dir / "exit.json").read_text())["exit_code"] == 75
    assert first.store.get_job(job.id).state is JobState.RUNNING  # what the store still says

    second = make_manager()
    assert [j.id for j in second.recover()] == [job.id]
    assert second.store.get_job(job.id).state is JobState.QUEUED
    done = second.wait(job.id, timeout=180)  # ticks here: admits, runs, finishes
    assert done.state is JobState.SUCCEEDED, done.reason
    assert done.attempts == 2 and done.model_version == 1
    assert "resuming from" in (job_dir / "job.log").read_text()
    history = json.loads((job_dir / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_recover_registers_a_job_that_succeeded_while_the_server_was_down(
        data: Path, make_manager: MakeManager, storage: Storage) -> None:
    manager = make_manager()
    job = manager.submit(principal=ALICE, name="finished", spec=pipeline(data, name="offline"))
    manager.store.transition(job.id, {JobState.QUEUED}, JobState.RUNNING, attempts=1)
    job_dir = storage.job_dir(job.id)
    proc = subprocess.run([sys.executable, "-m", "mlaas.platform.jobrun", str(job_dir)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=180)  # the job ran on while no server watched
    assert proc.returncode == 0, proc.stderr
    [changed] = manager.recover()
    assert changed.state is JobState.SUCCEEDED and changed.model_version == 1
    assert changed.progress["phase"] == "done"
    assert Registry(storage.models_dir).version("offline", 1)["metadata"]["job_id"] == job.id


def test_defaults_fill_missing_resources_and_a_bad_spec_fails_with_its_message(
        sqlite_store: object, storage: Storage) -> None:
    manager = JobManager(sqlite_store, storage, LocalExecutor(cpus=1),
                         Registry(storage.models_dir), poll_interval=0.1,
                         defaults={"cpus": 3, "threads": 2, "queue_name": "ignored"})
    try:
        wide = manager.submit(principal=ALICE, name="wide", spec={})
        narrow = manager.submit(principal=ALICE, name="narrow", spec={"data": {"sources": []}},
                                resources={"cpus": 1})
        manager.tick()
        assert manager.store.get_job(wide.id).reason.startswith("cannot run: asks for 3 CPU(s)")
        assert manager.executor.running() == {narrow.id}
        done = manager.wait(narrow.id, timeout=120)
        assert done.state is JobState.FAILED and done.exit_code == 1
        assert done.reason.startswith("exited with code 1\n--- last lines of job.log ---")
        assert "SpecError" in done.reason and "data.sources" in done.reason
    finally:
        manager.stop(terminate_jobs=True)


def test_an_exit_is_not_lost_when_the_store_fails_once(sqlite_store: object,
                                                       storage: Storage,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A database hiccup while recording an exit: the next cycle records it."""
    manager = JobManager(sqlite_store, storage, LocalExecutor(cpus=1),
                         Registry(storage.models_dir), poll_interval=0.1)
    try:
        job = manager.submit(principal=ALICE, name="bad", spec={"data": {"sources": []}})
        manager.tick()
        assert manager.executor.running() == {job.id}
        real = manager.store.transition
        calls = {"n": 0}

        def flaky(*args: object, **kwargs: object) -> object:
            if args[2] is JobState.FAILED and calls["n"] == 0:
                calls["n"] += 1
                raise OSError("database went away")
            return real(*args, **kwargs)

        monkeypatch.setattr(manager.store, "transition", flaky)
        wait_for(lambda: (manager.tick() or True) and calls["n"] == 1, 120,
                 "the failed attempt to record the exit")
        assert manager.store.get_job(job.id).state is JobState.RUNNING
        manager.tick()
        assert manager.store.get_job(job.id).state is JobState.FAILED
    finally:
        manager.stop(terminate_jobs=True)
