"""The job manager's farm side without job processes: queues, requests, usage history.

Layer: platform (manager + scheduler + real SQLite store). Nothing is started
here (the local executor has no room for what is asked, or the jobs are
cancelled first), so these run in milliseconds.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mlaas.errors import Conflict, Forbidden, SpecError
from mlaas.platform.config import QueueConfig
from mlaas.platform.executors import LocalExecutor
from mlaas.platform.farm import choose_queue, parse_request, resolve_priority
from mlaas.platform.manager import JobManager
from mlaas.platform.principal import ADMIN_ROLE, Principal
from mlaas.platform.records import JobState
from mlaas.platform.scheduler import Queue, Quota
from mlaas.platform.storage import Storage
from mlaas.serve.registry import Registry

ANNA = Principal(user="anna", groups=("a", "shared"))
BEN = Principal(user="ben", groups=("b",))
ROOT = Principal(user="root", groups=("ops",), roles=frozenset({ADMIN_ROLE}))
QUEUES = [QueueConfig(name="a-q", group="a", quotas={"test-gpu": {"nominal": 1}},
                      priority_classes={"high": 50}),
          QueueConfig(name="shared-q", group="shared"),
          QueueConfig(name="b-q", group="b")]


def _manager(store: object, storage: Storage, **kwargs: object) -> JobManager:
    return JobManager(store, storage, LocalExecutor(cpus=1, gpu_devices=["0"]),
                      Registry(storage.models_dir), gpu_flavor="test-gpu",
                      **{"queues": QUEUES, **kwargs})  # type: ignore[arg-type]


def test_queue_choice_membership_and_priorities() -> None:
    queues = {q.name: q for q in (Queue("a-q", "a", {}, priority_classes={"high": 50}),
                                  Queue("shared-q", "shared", {}), Queue("all", "*", {}))}
    assert choose_queue(ANNA, None, queues).name == "a-q"  # the primary group's first
    assert choose_queue(Principal("c", ("shared",)), None, queues).name == "shared-q"
    assert choose_queue(Principal("d", ("x",)), None, queues).name == "all"
    assert choose_queue(ROOT, "a-q", queues).name == "a-q"  # admins: any queue
    with pytest.raises(Forbidden, match="belongs to group 'a'") as info:
        choose_queue(BEN, "a-q", queues)
    assert info.value.field_path == "resources.queue"
    with pytest.raises(SpecError, match="unknown queue 'z'"):
        choose_queue(BEN, "z", queues)
    with pytest.raises(Forbidden, match="in no group with a queue"):
        choose_queue(Principal("e", ("x",)), None, {"a-q": queues["a-q"]})
    assert resolve_priority("high", queues["a-q"]) == 50
    assert resolve_priority(7, queues["a-q"]) == 7 and resolve_priority(None, queues["a-q"]) == 0
    with pytest.raises(SpecError) as bad:
        resolve_priority("low", queues["a-q"])
    assert bad.value.problems[0][0] == "resources.priority"


@pytest.mark.parametrize("resources, message", [
    ({"cpus": 0}, "cpus and threads must be >= 1"),
    ({"cpus": 1, "gpus": {"x": "two"}}, "invalid resources"),
    ({"cpus": 1, "memory": -1}, "memory >= 0"),
    ({"cpus": 1, "gpus": -1}, "gpus >= 0"),
    ({}, "invalid resources"),
])
def test_bad_requests_name_what_is_wrong(resources: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_request(resources, "gpu")


def test_requests_count_cpu_slots_as_a_flavor() -> None:
    r = parse_request({"cpus": 2, "gpus": 1, "memory": 4}, "nvidia-t4")
    assert r.flavors == {"cpu": 2, "nvidia-t4": 1} and r.memory_gib == 4.0
    assert parse_request({"cpus": 1, "gpus": {"a": 2, "b": 0}}, "t4").gpus == {"a": 2}


def test_submit_checks_queue_priority_and_flavor(sqlite_store: object,
                                                 storage: Storage) -> None:
    manager = _manager(sqlite_store, storage)
    job = manager.submit(principal=ANNA, name="x", spec={}, priority="high",
                         resources={"gpus": {"test-gpu": 1}})
    assert (job.queue, job.priority) == ("a-q", 50)
    with pytest.raises(SpecError) as info:  # shared-q has no test-gpu quota
        manager.submit(principal=ANNA, name="y", spec={}, queue="shared-q",
                       resources={"gpus": 1})
    assert info.value.problems[0][0] == "resources.gpus"
    with pytest.raises(Forbidden):
        manager.submit(principal=BEN, name="z", spec={}, queue="a-q")
    assert sqlite_store.list_jobs(owner="ben") == []  # type: ignore[attr-defined]
    manager.cancel(job.id)


def test_jobs_without_a_queue_or_with_an_unknown_one(sqlite_store: object,
                                                     storage: Storage) -> None:
    manager = _manager(sqlite_store, storage)
    old = sqlite_store.create_job(  # type: ignore[attr-defined]
        name="old", owner="ben", group="b", spec={}, model_name="m", resources={"cpus": 1},
        queue=None)
    gone = sqlite_store.create_job(  # type: ignore[attr-defined]
        name="gone", owner="ben", group="b", spec={}, model_name="m", resources={},
        queue="nowhere")
    for record in (old, gone):
        (storage.job_dir(record.id) / "pipeline.json").write_text("{}")
    manager.snapshot.remove_node("local")  # no room: nothing starts, jobs just queue
    manager._sync_nodes = lambda: None  # type: ignore[method-assign]
    manager.tick()
    assert sqlite_store.get_job(old.id).queue == "b-q"  # type: ignore[attr-defined]
    assert old.id in manager.snapshot.pending
    failed = sqlite_store.get_job(gone.id)  # type: ignore[attr-defined]
    assert failed.state is JobState.FAILED
    assert failed.reason.startswith("cannot run: queue 'nowhere' is not configured")
    manager.cancel(old.id)
    assert old.id not in manager.snapshot.pending


def test_set_queues_keeps_jobs_and_refuses_to_drop_a_busy_queue(sqlite_store: object,
                                                                storage: Storage) -> None:
    manager = _manager(sqlite_store, storage)
    manager.snapshot.remove_node("local")
    manager._sync_nodes = lambda: None  # type: ignore[method-assign]
    job = manager.submit(principal=BEN, name="w", spec={})
    manager.tick()
    assert job.id in manager.snapshot.pending
    with pytest.raises(Conflict, match=r"b-q \(1 job\(s\)\)"):
        manager.set_queues(QUEUES[:2])
    manager.set_queues([QueueConfig(name="b-q", group="b", cohort="c"),
                        QueueConfig(name="new", group="*")])
    assert set(manager.snapshot.queues) == {"b-q", "new"}
    assert job.id in manager.snapshot.pending  # still waiting, in the new snapshot
    assert manager.snapshot.queues["b-q"].queue.cohort == "c"
    manager.cancel(job.id)


def test_usage_history_is_loaded_at_recover(sqlite_store: object, storage: Storage) -> None:
    now = datetime.now(timezone.utc)

    def finished(owner: str, hours: float, cpus: int, ago_h: float = 1.0) -> None:
        job = sqlite_store.create_job(  # type: ignore[attr-defined]
            name=owner, owner=owner, group="g", spec={}, model_name="m",
            resources={"cpus": cpus}, queue="b-q")
        end = now - timedelta(hours=ago_h)
        sqlite_store.transition(job.id, {JobState.QUEUED},  # type: ignore[attr-defined]
                                JobState.RUNNING, started_at=end - timedelta(hours=hours))
        sqlite_store.transition(job.id, {JobState.RUNNING},  # type: ignore[attr-defined]
                                JobState.SUCCEEDED, finished_at=end)

    finished("heavy", 4.0, 2)
    finished("light", 1.0, 1)
    finished("ancient", 100.0, 8, ago_h=24 * 30)  # ten half-lives ago: nothing left
    manager = _manager(sqlite_store, storage)
    manager.recover()
    usage = manager.snapshot.usage
    t = time.time()
    assert usage.value("heavy", t) > 7 * usage.value("light", t) > 0
    assert usage.value("ancient", t) == 0.0
    manager.recover()  # once only: not charged twice
    assert usage.value("heavy", time.time()) <= usage.value("heavy", t)


def test_a_request_larger_than_the_local_node_fails_with_the_flavor(
        sqlite_store: object, storage: Storage, tmp_path: Path) -> None:
    manager = _manager(sqlite_store, storage, queues=[QueueConfig(
        name="a-q", group="a", quotas={"test-gpu": {"nominal": 4}})])
    job = manager.submit(principal=ANNA, name="wide", spec={}, resources={"gpus": 2})
    manager.tick()
    failed = sqlite_store.get_job(job.id)  # type: ignore[attr-defined]
    assert failed.state is JobState.FAILED
    assert failed.reason == ("cannot run: asks for 1 CPU(s) and 2 GPU(s); this executor has "
                             "1 CPU(s) and 1 GPU(s) (test-gpu)")


def test_a_failed_reclaim_does_not_stop_priority_preemption() -> None:
    """A request inside its (unlimited) nominal quota finds no borrower to reclaim from;
    the same cycle must still try priority preemption (a bug the farm tests found)."""
    from mlaas.platform.farm import scheduler_queues
    from mlaas.platform.scheduler import Node, Preempt, Snapshot, Workload, policy, run_cycle

    queues = scheduler_queues([QueueConfig(name="p-q", group="a", preempt_within_queue=True)],
                              ["cpu"])
    snap = Snapshot([Node("local", {"cpu": 1}, cpus=1, memory=8)], queues)
    snap.add_pending(Workload("low", "p-q", "anna", {"cpu": 1}, 0.0))
    snap.start("low", "local", {"cpu": (0,)}, 1.0)
    snap.add_pending(Workload("high", "p-q", "anna", {"cpu": 1}, 2.0, priority=100))
    [decision] = run_cycle(snap, now=10.0, config=policy("fair")).decisions
    assert isinstance(decision, Preempt) and decision.kind == "priority"
    assert decision.workload.id == "low" and decision.for_job == "high"
