"""Preemption: whom to stop so a workload that is owed devices can start.

Layer: platform, pure policy. Two kinds, as Kueue's ClusterQueue
``preemption`` settings:

- reclaim (``reclaimWithinCohort``): a workload that fits inside its queue's
  unused nominal quota but finds no room evicts workloads of other queues in
  the cohort that are borrowing the flavor it needs. A queue is a candidate
  only while it is still above its nominal quota, counting the victims
  already chosen, so reclaim never pushes a lender below its own guarantee
  for long.
- priority (``withinClusterQueue: LowerPriority``): in a queue that allows
  it, a workload evicts lower-priority workloads of the same queue, when it
  then fits inside the queue's nominal quota (room freed above nominal quota
  would go to other queues' guaranteed requests first).

Victims are chosen on one node (a request must fit on one node): candidates
sorted by priority, then by the work they would lose (seconds since their
last checkpoint times their devices), then latest start first; the node
whose victims lose the least work in total wins. Devices held by workloads
already terminating count as coming free, so a workload waiting for its
victims to exit does not evict more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .admission import Work
from .model import Running, Workload
from .snapshot import Snapshot

__all__ = ["Plan", "terminating_free", "plan_preemption", "reclaim_candidates",
           "priority_candidates"]


_EMPTY: Counter[str] = Counter()


@dataclass(frozen=True)
class Plan:
    """Stop ``victims`` on ``node`` (none: only wait for terminating ones)."""

    node: str
    victims: tuple[Running, ...]
    lost_gpu_seconds: float


def terminating_free(snap: Snapshot) -> tuple[dict[str, Counter[str]], dict[str, Counter[str]]]:
    """Devices held by workloads already told to stop: per node, and per queue."""
    by_node: dict[str, Counter[str]] = {}
    by_queue: dict[str, Counter[str]] = {}
    for r in snap.running.values():
        if r.terminating:
            c = by_node.setdefault(r.node, Counter())
            q = by_queue.setdefault(r.workload.queue, Counter())
            for f, idx in r.devices.items():
                c[f] += len(idx)
                q[f] += len(idx)
    return by_node, by_queue


def reclaim_candidates(w: Workload, snap: Snapshot, chosen: set[str]) -> dict[str, list[Running]]:
    """Running workloads of other queues in ``w``'s cohort holding a flavor ``w`` needs."""
    cohort = snap.queues[w.queue].queue.cohort
    if cohort is None:
        return {}
    members = set(snap.cohorts[cohort].members) - {w.queue}
    out: dict[str, list[Running]] = {}
    for r in snap.running.values():
        if (r.workload.queue in members and not r.terminating and r.workload.id not in chosen
                and any(f in w.gpus for f in r.devices)):
            out.setdefault(r.node, []).append(r)
    return out


def priority_candidates(w: Workload, snap: Snapshot, chosen: set[str]) -> dict[str, list[Running]]:
    """Running lower-priority workloads of ``w``'s own queue holding a flavor ``w`` needs."""
    out: dict[str, list[Running]] = {}
    for r in snap.running.values():
        if (r.workload.queue == w.queue and r.workload.priority < w.priority
                and not r.terminating and r.workload.id not in chosen
                and any(f in w.gpus for f in r.devices)):
            out.setdefault(r.node, []).append(r)
    return out


def plan_preemption(w: Workload, work: Work, term: dict[str, Counter[str]], now: float,
                    candidates: dict[str, list[Running]],
                    eligible: Callable[[Running, Counter[str]], bool]) -> Plan | None:
    """The cheapest way to make room for ``w`` on one node, or ``None``.

    ``eligible(victim, released)`` says whether a candidate may still be
    taken, given the devices per queue-and-flavor already released on this
    node (``released`` is keyed ``"queue/flavor"``).
    """
    best: Plan | None = None
    nodes: Iterable[str] = work.node_free
    for node in nodes:
        free = work.node_free[node]
        coming = term.get(node, _EMPTY)
        total = work.snap.nodes[node].node.gpus
        if any(total.get(f, 0) < n for f, n in w.gpus.items()):
            continue
        short = {f: n - free[f] - coming[f] for f, n in w.gpus.items()}
        cpus_short = w.cpus - work.node_cpus[node]
        mem_short = w.memory - work.node_memory[node]
        if all(s <= 0 for s in short.values()) and cpus_short <= 0 and mem_short <= 0:
            plan = Plan(node, (), 0.0)
            if best is None or (plan.lost_gpu_seconds, len(plan.victims), node) < (
                    best.lost_gpu_seconds, len(best.victims), best.node):
                best = plan
            continue
        cands = candidates.get(node)
        if not cands:
            continue
        cands = sorted(cands, key=lambda r: (r.workload.priority, r.lost_gpu_seconds(now),
                                             -r.started_at, r.workload.id))
        released: Counter[str] = Counter()
        victims: list[Running] = []
        lost = 0.0
        for r in cands:
            if all(s <= 0 for s in short.values()) and cpus_short <= 0 and mem_short <= 0:
                break
            helps = any(short.get(f, 0) > 0 for f in r.devices)
            if not helps or not eligible(r, released):
                continue
            victims.append(r)
            lost += r.lost_gpu_seconds(now)
            for f, idx in r.devices.items():
                if f in short:
                    short[f] -= len(idx)
                released[f"{r.workload.queue}/{f}"] += len(idx)
            cpus_short -= r.workload.cpus
            mem_short -= r.workload.memory
        if any(s > 0 for s in short.values()) or cpus_short > 0 or mem_short > 0:
            continue
        plan = Plan(node, tuple(victims), lost)
        if best is None or (lost, len(victims), node) < (
                best.lost_gpu_seconds, len(best.victims), best.node):
            best = plan
    return best
