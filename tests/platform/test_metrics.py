"""The farm's Prometheus metrics (mlaas.platform.metrics) on a registry of their own.

State gauges are read from a real SQLite store and a real scheduler
snapshot (one queue with a nominal quota, one node, one job running and one
pending); without a snapshot they come from the store and the accounting
table. Event series are fed through the accounting observer interface.
"""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mlaas.platform.accounting import Accounting
from mlaas.platform.metrics import NO_QUEUE, PlatformMetrics
from mlaas.platform.records import JobState
from mlaas.platform.scheduler import Node, Queue, Quota, Snapshot, Workload
from mlaas.platform.store import SqlStore


def _jobs(store: SqlStore) -> tuple[Any, Any]:
    """One running and one queued job of group cms in queue cms-q, plus one of atlas."""
    run = store.create_job(name="r", owner="alice", group="cms", spec={}, model_name="m",
                           queue="cms-q", resources={"gpus": {"a100": 2}})
    running = store.transition(run.id, {JobState.QUEUED}, JobState.RUNNING, attempts=1,
                               started_at=datetime(2026, 11, 1, tzinfo=timezone.utc))
    waiting = store.create_job(name="w", owner="bob", group="cms", spec={}, model_name="m",
                               queue="cms-q")
    store.create_job(name="x", owner="carol", group="atlas", spec={}, model_name="m")
    return running, waiting


def _snapshot(running: Any, waiting: Any) -> Snapshot:
    snap = Snapshot([Node("n1", {"a100": 4})],
                    [Queue("cms-q", "cms", {"a100": Quota(4)}),
                     Queue("open", "*", {"a100": Quota(10**9)})])
    snap.add_pending(Workload(running.id, "cms-q", "alice", {"a100": 2}, submitted_at=0.0))
    snap.start(running.id, "n1", {"a100": (0, 1)}, now=1.0)
    snap.add_pending(Workload(waiting.id, "cms-q", "bob", {"a100": 4}, submitted_at=2.0))
    return snap


def test_gauges_from_the_snapshot_and_the_store(sqlite_store: SqlStore) -> None:
    running, waiting = _jobs(sqlite_store)
    registry = CollectorRegistry()
    ctx = SimpleNamespace(store=sqlite_store, accounting=None,
                          manager=SimpleNamespace(snapshot=_snapshot(running, waiting)))
    PlatformMetrics(registry, lambda: ctx)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("mlaas_queue_pending_jobs", queue="cms-q") == 1
    assert value("mlaas_queue_pending_jobs", queue="open") == 0
    assert value("mlaas_queue_running_jobs", queue="cms-q") == 1
    assert value("mlaas_queue_running_jobs", queue="open") == 0
    assert value("mlaas_queue_devices_in_use", queue="cms-q", flavor="a100") == 2
    assert value("mlaas_queue_nominal_quota", queue="cms-q", flavor="a100") == 4
    assert value("mlaas_queue_nominal_quota", queue="open", flavor="a100") is None  # no limit
    assert value("mlaas_group_jobs", group="cms", state="running") == 1
    assert value("mlaas_group_jobs", group="cms", state="queued") == 1
    assert value("mlaas_group_jobs", group="atlas", state="queued") == 1


def test_gauges_without_a_snapshot_come_from_store_and_accounting(
        sqlite_store: SqlStore) -> None:
    running, _ = _jobs(sqlite_store)
    acct = Accounting(sqlite_store.db)
    acct.attempt_started(running, node="n1", devices={"a100": 2})
    registry = CollectorRegistry()
    ctx = SimpleNamespace(store=sqlite_store, accounting=acct, manager=SimpleNamespace())
    PlatformMetrics(registry, lambda: ctx)
    assert registry.get_sample_value("mlaas_queue_pending_jobs", {"queue": "cms-q"}) == 1
    assert registry.get_sample_value("mlaas_queue_pending_jobs", {"queue": NO_QUEUE}) == 1
    assert registry.get_sample_value("mlaas_queue_running_jobs", {"queue": "cms-q"}) == 1
    assert registry.get_sample_value("mlaas_queue_devices_in_use",
                                     {"queue": "cms-q", "flavor": "a100"}) == 2


def test_events_feed_the_histogram_and_counters() -> None:
    registry = CollectorRegistry()
    metrics = PlatformMetrics(registry, lambda: None)  # outside the lifespan: no state gauges
    metrics.attempt_started(queue="cms-q", wait_s=42.0)
    metrics.attempt_started(queue="", wait_s=-1.0)  # a clock step back counts as no wait
    metrics.attempt_ended(queue="cms-q", outcome="preempted")
    metrics.attempt_ended(queue="cms-q", outcome="succeeded")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("mlaas_job_wait_seconds_count", queue="cms-q") == 1
    assert value("mlaas_job_wait_seconds_sum", queue="cms-q") == 42
    assert value("mlaas_job_wait_seconds_bucket", queue="cms-q", le="30.0") == 0
    assert value("mlaas_job_wait_seconds_bucket", queue="cms-q", le="60.0") == 1
    assert value("mlaas_job_wait_seconds_sum", queue=NO_QUEUE) == 0
    assert value("mlaas_preemptions_total", queue="cms-q") == 1
    assert value("mlaas_job_attempts_ended_total", queue="cms-q", outcome="succeeded") == 1
    assert value("mlaas_queue_pending_jobs", queue="cms-q") is None


def test_a_failing_store_leaves_the_scrape_answering(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def queued_jobs(self) -> list[Any]:
            raise RuntimeError("database is gone")

    registry = CollectorRegistry()
    ctx = SimpleNamespace(store=Broken(), accounting=None, manager=SimpleNamespace())
    PlatformMetrics(registry, lambda: ctx)
    assert registry.get_sample_value("mlaas_queue_pending_jobs", {"queue": NO_QUEUE}) is None
    assert "reading the farm's state for /metrics failed" in caplog.text
