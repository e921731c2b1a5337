"""Preemption end to end with real job processes: a group reclaims its quota.

Layer: platform (manager + scheduler + local executor + job processes). The
local executor is one node with 2 CPU slots and ONE device of the fake flavor
``test-gpu`` (there is no GPU here: the device id "0" is only a slot name; the
jobs train on the CPU). Queues ``a-q`` (group ``a``, nominal quota 1 device)
and ``b-q`` (group ``b``, nominal 0) share the cohort ``farm``, so:

1. B's job borrows A's idle quota and runs (it is alone);
2. A submits: its request fits inside A's nominal quota but no node has room,
   so the scheduler reclaims: B's job gets SIGTERM, checkpoints, exits 75,
   goes preempted -> queued;
3. A's job runs and succeeds;
4. B's job is admitted again, resumes from its checkpoint ("resuming from" in
   its log, attempt 2) and finishes with as many epochs as an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from job_pipelines import SLOW_MODEL, make_data, model_file, pipeline, progress_epoch, wait_for

from mlaas.platform.config import QueueConfig
from mlaas.platform.executors import LocalExecutor
from mlaas.platform.manager import JobManager
from mlaas.platform.principal import Principal
from mlaas.platform.records import JobState
from mlaas.platform.storage import Storage
from mlaas.serve.registry import Registry

pytestmark = pytest.mark.slow

ANNA = Principal(user="anna", groups=("a",))
BEN = Principal(user="ben", groups=("b",))
QUEUES = [
    QueueConfig(name="a-q", group="a", cohort="farm", quotas={"test-gpu": {"nominal": 1}}),
    QueueConfig(name="b-q", group="b", cohort="farm", quotas={"test-gpu": {"nominal": 0}}),
]
GPU = {"gpus": {"test-gpu": 1}}


@pytest.fixture
def manager(sqlite_store: object, storage: Storage) -> Iterator[JobManager]:
    made = JobManager(sqlite_store, storage, LocalExecutor(cpus=2, gpu_devices=["0"]),
                      Registry(storage.models_dir), poll_interval=0.1, grace_s=30,
                      queues=QUEUES, gpu_flavor="test-gpu")
    yield made
    made.stop(terminate_jobs=True, timeout=30)


def test_a_reclaims_its_quota_from_b_which_resumes_and_finishes(
        tmp_path: Path, manager: JobManager, storage: Storage) -> None:
    data = make_data(tmp_path / "data")
    slow = model_file(tmp_path, SLOW_MODEL, "slow", SLEEP=0.02)
    manager.start()
    b_job = manager.submit(principal=BEN, name="borrower", resources=GPU,
                           spec=pipeline(data, epochs=4, batch_size=128, model=slow,
                                         name="b-model"))
    assert b_job.queue == "b-q"
    b_dir = storage.job_dir(b_job.id)
    wait_for(lambda: progress_epoch(b_dir) >= 1, 120, "B's first epoch")
    assert manager.store.get_job(b_job.id).state is JobState.RUNNING
    assert manager.queues_view()[1]["usage"] == {"cpu": 1, "test-gpu": 1}  # borrowing

    a_job = manager.submit(principal=ANNA, name="owner", resources=GPU,
                           spec=pipeline(data, epochs=1, name="a-model"))
    assert a_job.queue == "a-q"
    a_done = manager.wait(a_job.id, timeout=180)
    assert a_done.state is JobState.SUCCEEDED, a_done.reason
    assert a_done.attempts == 1

    b_done = manager.wait(b_job.id, timeout=240)
    assert b_done.state is JobState.SUCCEEDED, b_done.reason
    assert b_done.attempts == 2
    log = (b_dir / "job.log").read_text()
    assert "exited with code 75 (preempted: checkpoint written)" in log
    assert "resuming from" in log
    assert "preempted by the scheduler: reclaim: queue 'a-q' needs" in log
    history = json.loads((b_dir / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # as many as without preemption
    # B was stopped before A started: A's start is after B's first attempt ended
    assert a_done.started_at is not None and b_done.started_at is not None
    assert b_done.started_at > a_done.started_at  # B's second attempt came after A's
    assert manager.scaling_view()["pending"] == {}
    assert all(q["running"] == 0 and q["pending"] == 0 for q in manager.queues_view())


def test_a_high_priority_job_evicts_a_low_one_of_its_queue(
        tmp_path: Path, sqlite_store: object, storage: Storage) -> None:
    """Priority preemption inside one queue (preempt_within_queue) on one CPU slot."""
    queue = QueueConfig(name="p-q", group="a", priority_classes={"high": 100},
                        preempt_within_queue=True)
    manager = JobManager(sqlite_store, storage, LocalExecutor(cpus=1),
                         Registry(storage.models_dir), poll_interval=0.1, grace_s=30,
                         queues=[queue])
    try:
        data = make_data(tmp_path / "data")
        slow = model_file(tmp_path, SLOW_MODEL, "slow", SLEEP=0.02)
        manager.start()
        low = manager.submit(principal=ANNA, name="low", spec=pipeline(
            data, epochs=3, batch_size=128, model=slow, name="low-model"))
        low_dir = storage.job_dir(low.id)
        wait_for(lambda: progress_epoch(low_dir) >= 1, 120, "the low job's first epoch")
        high = manager.submit(principal=ANNA, name="high", priority="high",
                              spec=pipeline(data, epochs=1, name="high-model"))
        assert high.priority == 100
        assert manager.wait(high.id, timeout=180).state is JobState.SUCCEEDED
        done = manager.wait(low.id, timeout=240)
        assert done.state is JobState.SUCCEEDED, done.reason
        assert done.attempts == 2
        log = (low_dir / "job.log").read_text()
        assert "preempted by the scheduler: priority: queue 'p-q'" in log
        assert "resuming from" in log
        history = json.loads((low_dir / "run" / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2, 3]
    finally:
        manager.stop(terminate_jobs=True, timeout=30)
