"""Prometheus metrics of the job farm: queues, quota use, running jobs, preemptions, waits.

Layer: platform (observability). One :class:`PlatformMetrics` per app,
registered on the app's existing metrics registry (the model server's, so
``GET /metrics`` shows both). Two kinds of series:

- events, counted as they happen (:class:`PlatformMetrics` is the
  :class:`~mlaas.platform.accounting.Accounting` observer):
  ``mlaas_job_wait_seconds{queue}`` (histogram, observed when an attempt
  starts: how long it waited in its queue), ``mlaas_preemptions_total{queue}``
  and ``mlaas_job_attempts_ended_total{queue,outcome}``;
- state, read at scrape time: ``mlaas_queue_pending_jobs{queue}``,
  ``mlaas_queue_running_jobs{queue}``, ``mlaas_group_jobs{group,state}``
  (queued and running jobs), ``mlaas_queue_devices_in_use{queue,flavor}``
  (devices held by running attempts) and, when the manager exposes the
  scheduler's snapshot, ``mlaas_queue_nominal_quota{queue,flavor}`` (queues
  without a limit on a flavor have no sample for it).

Pending and running counts and quota use come from the scheduler's snapshot
(``manager.snapshot``, a :class:`mlaas.platform.scheduler.Snapshot`) when
there is one, else from the store (queued and running jobs only, never the
history) and the accounting table. Jobs without a queue are labelled
:data:`NO_QUEUE`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mlaas.platform.records import JobState

__all__ = ["PlatformMetrics", "NO_QUEUE", "WAIT_BUCKETS"]

log = logging.getLogger("mlaas.platform.metrics")

NO_QUEUE = "default"
"""The ``queue`` label of jobs submitted without a queue."""

WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400,
                float("inf"))
"""Queue waits from a second to a day, in seconds."""


_UNLIMITED = 10**9
"""Quotas this large stand for "no limit" (:data:`mlaas.platform.farm.UNLIMITED`)."""


def _queue(name: str | None) -> str:
    return name or NO_QUEUE


class PlatformMetrics:
    """The farm's metrics on ``registry``; ``context`` returns the live
    :class:`~mlaas.platform.deps.PlatformContext` (None outside the lifespan).

    Args:
        registry (CollectorRegistry): the app's registry (one per app).
        context (callable): the platform context now, or None.
    """

    def __init__(self, registry: CollectorRegistry, context: Callable[[], Any]) -> None:
        self.wait = Histogram("mlaas_job_wait_seconds",
                              "Seconds a job attempt waited in its queue before it started.",
                              ["queue"], buckets=WAIT_BUCKETS, registry=registry)
        self.preemptions = PromCounter("mlaas_preemptions",
                                       "Job attempts that ended preempted (requeued to resume).",
                                       ["queue"], registry=registry)
        self.ended = PromCounter("mlaas_job_attempts_ended",
                                 "Job attempts that ended, by outcome.",
                                 ["queue", "outcome"], registry=registry)
        registry.register(_StateGauges(context))

    # -- the accounting observer --------------------------------------------------------

    def attempt_started(self, *, queue: str, wait_s: float) -> None:
        self.wait.labels(_queue(queue)).observe(max(0.0, wait_s))

    def attempt_ended(self, *, queue: str, outcome: str) -> None:
        self.ended.labels(_queue(queue), outcome).inc()
        if outcome == "preempted":
            self.preemptions.labels(_queue(queue)).inc()


class _StateGauges(Collector):
    """Queue lengths, running jobs and quota use, read when Prometheus scrapes."""

    def __init__(self, context: Callable[[], Any]) -> None:
        self.context = context

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending = GaugeMetricFamily("mlaas_queue_pending_jobs", "Jobs waiting in each queue.",
                                    labels=["queue"])
        running = GaugeMetricFamily("mlaas_queue_running_jobs", "Running jobs of each queue.",
                                    labels=["queue"])
        groups = GaugeMetricFamily("mlaas_group_jobs", "Queued and running jobs per group.",
                                   labels=["group", "state"])
        in_use = GaugeMetricFamily("mlaas_queue_devices_in_use",
                                   "Devices held by running jobs, per queue and flavor.",
                                   labels=["queue", "flavor"])
        nominal = GaugeMetricFamily("mlaas_queue_nominal_quota",
                                    "Nominal quota of each queue per flavor (devices).",
                                    labels=["queue", "flavor"])
        ctx = self.context()
        if ctx is not None:
            try:
                self._fill(ctx, pending, running, groups, in_use, nominal)
            except Exception:  # noqa: BLE001 - a scrape must answer even if the store fails
                log.exception("reading the farm's state for /metrics failed")
        yield from (pending, running, groups, in_use, nominal)

    @staticmethod
    def _fill(ctx: Any, pending: GaugeMetricFamily, running: GaugeMetricFamily,
              groups: GaugeMetricFamily, in_use: GaugeMetricFamily,
              nominal: GaugeMetricFamily) -> None:
        store = ctx.store
        queued_jobs = store.queued_jobs()
        running_jobs = store.list_jobs(state=JobState.RUNNING)
        per_group = Counter((j.group, j.state.value) for j in [*queued_jobs, *running_jobs])
        for (group, state), n in sorted(per_group.items()):
            groups.add_metric([group, state], n)
        run_count = Counter(_queue(j.queue) for j in running_jobs)
        snapshot = _snapshot(ctx.manager)
        if snapshot is not None:
            for name, qs in sorted(snapshot.queues.items()):
                pending.add_metric([name], qs.pending_count)
                for flavor, used in sorted(qs.usage.items()):
                    in_use.add_metric([name, flavor], used)
                for flavor, quota in sorted(qs.queue.quotas.items()):
                    if quota.nominal < _UNLIMITED:  # "no limit" has no number to plot
                        nominal.add_metric([name, flavor], quota.nominal)
                run_count.setdefault(name, 0)
        else:
            for name, n in sorted(Counter(_queue(j.queue) for j in queued_jobs).items()):
                pending.add_metric([name], n)
            accounting = getattr(ctx, "accounting", None)
            if accounting is not None:
                for queue, flavor, n in accounting.in_use():
                    in_use.add_metric([_queue(queue), flavor], n)
        for name, n in sorted(run_count.items()):
            running.add_metric([name], n)


def _snapshot(manager: Any) -> Any:
    """The scheduler's snapshot if the manager keeps one (``manager.snapshot``), else None."""
    snap = getattr(manager, "snapshot", None)
    if callable(snap):
        snap = snap()
    return snap if snap is not None and isinstance(getattr(snap, "queues", None), dict) else None
