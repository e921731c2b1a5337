"""Accounting (mlaas.platform.accounting) on a real database, SQLite and PostgreSQL.

Attempts are recorded with explicit times (the clock is injected), so hours,
wait times and windows are exact numbers. The last tests drive the job
manager's two call sites (attempt start, attempt end) with real job
processes, and through a restart (``recover``).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from job_pipelines import SLOW_MODEL, make_data, model_file, pipeline, progress_epoch, wait_for

from mlaas.platform.accounting import DEFAULT_GPU_FLAVOR, Accounting, gpu_request
from mlaas.platform.db import Database
from mlaas.platform.executors import LocalExecutor
from mlaas.platform.manager import JobManager
from mlaas.platform.principal import Principal
from mlaas.platform.records import JobRecord, JobState
from mlaas.platform.storage import Storage
from mlaas.platform.store import SqlStore
from mlaas.serve.registry import Registry

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Recorder:
    """An observer that writes down what it was told (the metrics' interface)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def attempt_started(self, **kw: Any) -> None:
        self.events.append(("started", kw))

    def attempt_ended(self, **kw: Any) -> None:
        self.events.append(("ended", kw))


def _job(store: SqlStore, owner: str, group: str, *, created: datetime, queue: str | None = None,
         resources: dict[str, Any] | None = None) -> JobRecord:
    job = store.create_job(name=f"{owner}-job", owner=owner, group=group, spec={},
                           model_name="m", resources=resources or {}, queue=queue)
    return store.update_job(job.id, created_at=created)


def _start(store: SqlStore, job: JobRecord, when: datetime) -> JobRecord:
    current = store.get_job(job.id)
    running = store.transition(job.id, {JobState.QUEUED}, JobState.RUNNING, started_at=when,
                               attempts=current.attempts + 1)
    assert running is not None
    return running


@pytest.fixture
def clock() -> Clock:
    return Clock(at(600))


@pytest.fixture
def acct(database: Database, clock: Clock) -> Accounting:
    return Accounting(database, clock=clock)


def test_hours_by_flavor_jobs_preemptions_and_waits(database: Database, acct: Accounting) -> None:
    store = SqlStore(database)
    recorder = Recorder()
    acct.observer = recorder
    # alice (cms): a 2-GPU a100 job, preempted after 60 min, requeued, then 30 more min
    a = _job(store, "alice", "cms", created=at(0), queue="cms-q",
             resources={"cpus": 4, "gpus": {"nvidia-a100": 2}})
    acct.attempt_started(_start(store, a, at(10)), node="n1", devices=["0", "1"])
    assert acct.attempt_ended(a.id, "preempted", at(70))
    store.transition(a.id, {JobState.RUNNING}, JobState.QUEUED)
    acct.attempt_started(_start(store, a, at(100)), node="n2", devices={"nvidia-a100": 2})
    assert acct.attempt_ended(a.id, "succeeded", at(130))
    # bob (atlas): a CPU-only job of 2 slots, 120 min, failed; waited 5 min
    b = _job(store, "bob", "atlas", created=at(0), resources={"cpus": 2})
    acct.attempt_started(_start(store, b, at(5)), node="n1", devices=[])
    acct.attempt_ended(b.id, "failed", at(125))
    # carol (cms): a plain "gpus: 1" job, still running at now (600)
    c = _job(store, "carol", "cms", created=at(500), resources={"gpus": 1})
    acct.attempt_started(_start(store, c, at(540)), node="n3", devices=["3"])

    usage = acct.usage()
    total = usage["total"]
    assert total["gpu_hours"] == {DEFAULT_GPU_FLAVOR: 1.0, "nvidia-a100": 3.0}
    assert total["gpu_hours_total"] == 4.0
    assert total["cpu_hours"] == pytest.approx(4 * 1.5 + 2 * 2 + 1 * 1)
    assert (total["jobs"], total["attempts"], total["running"]) == (3, 4, 1)
    assert total["outcomes"] == {"succeeded": 1, "failed": 1, "cancelled": 0, "preempted": 1,
                                 "lost": 0}
    assert total["preemptions"] == 1
    # waits: alice 10 then 30 (requeued at the end of the first attempt), bob 5, carol 40
    assert total["wait_s"] == {"count": 4, "mean": 21.25 * 60, "p50": 20 * 60,
                               "p95": pytest.approx(38.5 * 60)}
    assert set(usage["users"]) == {"alice", "bob", "carol"}
    assert set(usage["groups"]) == {"cms", "atlas"}
    cms = usage["groups"]["cms"]
    assert cms["gpu_hours"] == {DEFAULT_GPU_FLAVOR: 1.0, "nvidia-a100": 3.0}
    assert cms["jobs"] == 2 and cms["preemptions"] == 1
    assert usage["users"]["bob"]["gpu_hours"] == {} and usage["users"]["bob"]["cpu_hours"] == 4
    assert usage["users"]["bob"]["wait_s"]["p50"] == 300
    # the observer heard every start and end, with the queue ("" for none)
    assert recorder.events[0] == ("started", {"queue": "cms-q", "wait_s": 600.0})
    assert ("ended", {"queue": "cms-q", "outcome": "preempted"}) in recorder.events
    assert [e for e, _ in recorder.events].count("started") == 4
    # attempts are kept per job
    rows = acct.attempts(a.id)
    assert [(r["attempt"], r["node"], r["outcome"]) for r in rows] == [
        (1, "n1", "preempted"), (2, "n2", "succeeded")]
    assert rows[1]["queued_at"] == at(70)
    assert acct.in_use() == [("", DEFAULT_GPU_FLAVOR, 1)]


def test_filters_and_window_clip_hours(database: Database, acct: Accounting) -> None:
    store = SqlStore(database)
    a = _job(store, "alice", "cms", created=at(0), resources={"gpus": {"t4": 1}})
    acct.attempt_started(_start(store, a, at(0)), node="n1", devices=["0"])
    acct.attempt_ended(a.id, "succeeded", at(120))
    b = _job(store, "bob", "atlas", created=at(0), resources={"gpus": {"t4": 1}})
    acct.attempt_started(_start(store, b, at(200)), node="n1", devices=["0"])
    acct.attempt_ended(b.id, "cancelled", at(260))

    only_alice = acct.usage(user="alice")
    assert set(only_alice["users"]) == {"alice"} and only_alice["total"]["jobs"] == 1
    assert only_alice["user"] == "alice"
    assert acct.usage(group="atlas")["total"]["outcomes"]["cancelled"] == 1
    assert acct.usage(user="alice", group="atlas")["total"]["jobs"] == 0
    # a window over the second half of alice's job: 1 h, no wait inside, outcome inside
    half = acct.usage(since=at(60), until=at(180))
    assert half["total"]["gpu_hours"] == {"t4": 1.0}
    assert half["total"]["wait_s"]["count"] == 0 and half["total"]["wait_s"]["p50"] is None
    assert half["total"]["outcomes"]["succeeded"] == 1
    assert half["since"] == at(60).isoformat() and half["until"] == at(180).isoformat()
    # a window that ends before the job does: its outcome is outside
    early = acct.usage(until=at(30))
    assert early["total"]["gpu_hours"] == {"t4": 0.5}
    assert early["total"]["outcomes"]["succeeded"] == 0
    # nothing in the window
    empty = acct.usage(since=at(300), until=at(400))
    assert empty["total"]["jobs"] == 0 and empty["users"] == {} and empty["groups"] == {}


def test_restart_of_an_open_attempt_marks_it_lost(database: Database, acct: Accounting) -> None:
    store = SqlStore(database)
    a = _job(store, "alice", "cms", created=at(0))
    acct.attempt_started(_start(store, a, at(1)), node="n1")
    # the server died: the job is started again without its end being recorded
    store.transition(a.id, {JobState.RUNNING}, JobState.QUEUED)
    second = _start(store, a, at(31))
    acct.attempt_started(second, node="n2")
    # the same start reported twice is one row
    acct.attempt_started(second, node="n2")
    rows = acct.attempts(a.id)
    assert [(r["attempt"], r["outcome"], r["ended_at"]) for r in rows] == [
        (1, "lost", at(31)), (2, None, None)]
    assert acct.attempt_ended(a.id, "lost", at(40))
    assert not acct.attempt_ended(a.id, "lost", at(41))  # nothing open any more
    assert not acct.attempt_ended("nosuchjob", "succeeded")
    assert acct.usage()["total"]["outcomes"]["lost"] == 2


def test_observer_errors_are_logged_not_raised(database: Database, acct: Accounting,
                                               caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def attempt_started(self, **kw: Any) -> None:
            raise RuntimeError("metrics down")

        def attempt_ended(self, **kw: Any) -> None:
            raise RuntimeError("metrics down")

    acct.observer = Broken()
    store = SqlStore(database)
    a = _job(store, "alice", "cms", created=at(0))
    acct.attempt_started(_start(store, a, at(1)), node="n1")
    assert acct.attempt_ended(a.id, "succeeded", at(2))
    assert "accounting observer failed" in caplog.text
    assert acct.attempts(a.id)[0]["outcome"] == "succeeded"


@pytest.mark.parametrize("call, message", [
    (lambda acct, job: acct.attempt_ended(job.id, "exploded"), "outcome 'exploded'"),
    (lambda acct, job: acct.attempt_ended(job.id, "lost", datetime(2026, 1, 1)), "naive"),
    (lambda acct, job: acct.attempt_started(job, node="n", cpus=-1), "cpus of job"),
    (lambda acct, job: acct.attempt_started(job, node="n", queued_at=datetime(2026, 1, 1)),
     "queued_at"),
    (lambda acct, job: acct.usage(since=at(10), until=at(5)), "must be before until"),
    (lambda acct, job: acct.usage(since=datetime(2026, 1, 1)), "since"),
], ids=["unknown outcome", "naive end", "negative cpus", "naive queued_at", "empty window",
        "naive since"])
def test_bad_input_is_refused(database: Database, acct: Accounting, call: Any,
                              message: str) -> None:
    store = SqlStore(database)
    job = _start(store, _job(store, "alice", "cms", created=at(0)), at(1))
    with pytest.raises(ValueError, match=message):
        call(acct, job)
    assert acct.attempts(job.id) == []


@pytest.mark.parametrize("resources, devices, want", [
    ({}, [], {}),
    ({"gpus": 0}, [], {}),
    ({"gpus": 2}, [], {DEFAULT_GPU_FLAVOR: 2}),
    ({"gpus": 2}, ["0"], {DEFAULT_GPU_FLAVOR: 1}),
    ({"gpus": {"a100": 2, "t4": 0}}, [], {"a100": 2}),
    ({"gpus": {"a100": 2}}, ["0", "1", "2"], {"a100": 3}),
    ({"gpus": {"a100": 1}}, {"a100-mig": 1}, {"a100-mig": 1}),
    ({"gpus": True}, [], {}),
], ids=["none", "zero", "count", "devices win", "flavors", "flavor with devices",
        "executor flavors", "bool is not a count"])
def test_gpu_request(resources: dict[str, Any], devices: Any, want: dict[str, int]) -> None:
    assert gpu_request(resources, devices) == want


# -- the job manager's two call sites, with real job processes ------------------------------

ALICE = Principal(user="alice", groups=("cms",))


def _manager(store: SqlStore, storage: Storage, accounting: Any) -> JobManager:
    manager = JobManager(store, storage, LocalExecutor(cpus=2), Registry(storage.models_dir),
                         poll_interval=0.1)
    manager.accounting = accounting
    return manager


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("accounting"))


@pytest.mark.slow
def test_manager_accounts_a_preempted_job_that_resumes(data: Path, tmp_path: Path,
                                                       sqlite_store: SqlStore,
                                                       storage: Storage) -> None:
    recorder = Recorder()
    acct = Accounting(sqlite_store.db, observer=recorder)
    manager = _manager(sqlite_store, storage, acct)
    manager.start()
    try:
        spec = pipeline(data, epochs=4, batch_size=128,
                        model=model_file(tmp_path, SLOW_MODEL, "slow", SLEEP=0.02))
        job = manager.submit(principal=ALICE, name="long", spec=spec)
        wait_for(lambda: progress_epoch(storage.job_dir(job.id)) >= 1, 120, "the first epoch")
        manager.preempt(job.id)
        done = manager.wait(job.id, timeout=180)
    finally:
        manager.stop(terminate_jobs=True, timeout=30)
    assert done.state is JobState.SUCCEEDED and done.attempts == 2, done.reason
    rows = acct.attempts(job.id)
    assert [(r["attempt"], r["outcome"], r["user"], r["group"], r["queue"]) for r in rows] == [
        (1, "preempted", "alice", "cms", done.queue), (2, "succeeded", "alice", "cms", done.queue)]
    assert all(r["node"] and r["cpus"] == 1 and r["gpus"] == {} for r in rows)
    assert rows[1]["queued_at"] == rows[0]["ended_at"] <= rows[1]["started_at"]
    usage = acct.usage(user="alice")["total"]
    assert usage["preemptions"] == 1 and usage["jobs"] == 1 and usage["attempts"] == 2
    assert [e for e, _ in recorder.events] == ["started", "ended", "started", "ended"]


@pytest.mark.slow
def test_a_failing_accounting_never_breaks_a_job(data: Path, sqlite_store: SqlStore,
                                                 storage: Storage,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    class Down:
        def attempt_started(self, *a: Any, **kw: Any) -> None:
            raise RuntimeError("accounting database is down")

        def attempt_ended(self, *a: Any, **kw: Any) -> None:
            raise RuntimeError("accounting database is down")

    manager = _manager(sqlite_store, storage, Down())
    try:
        job = manager.submit(principal=ALICE, name="quick", spec=pipeline(data, epochs=1))
        done = manager.wait(job.id, timeout=180)
    finally:
        manager.stop(terminate_jobs=True, timeout=30)
    assert done.state is JobState.SUCCEEDED, done.reason
    assert f"accounting the start of job {job.id} failed" in caplog.text
    assert f"accounting the end of job {job.id} failed" in caplog.text


def test_recover_ends_attempts_of_a_dead_server(database: Database, storage: Storage) -> None:
    """Jobs running when the server died: no exit.json is 'lost', 75 'preempted', 1 'failed'."""
    store = SqlStore(database)
    acct = Accounting(database)
    manager = _manager(store, storage, acct)
    jobs = {}
    for name, code in (("vanished", None), ("preempted", 75), ("crashed", 1)):
        job = manager.submit(principal=ALICE, name=name, spec={})
        running = store.transition(job.id, {JobState.QUEUED}, JobState.RUNNING, attempts=1,
                                   started_at=at(1), node="n1")
        assert running is not None
        acct.attempt_started(running, node="n1")
        if code is not None:
            (storage.job_dir(job.id) / "exit.json").write_text(json.dumps({"exit_code": code}))
        jobs[name] = job.id
    manager.recover()
    outcomes = {name: acct.attempts(job_id)[0]["outcome"] for name, job_id in jobs.items()}
    assert outcomes == {"vanished": "lost", "preempted": "preempted", "crashed": "failed"}
