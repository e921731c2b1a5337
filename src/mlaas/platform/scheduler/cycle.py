"""The scheduling cycle: snapshot in, decisions out.

Layer: platform, pure policy. One function, :func:`run_cycle`, written as
Kueue's ``schedule`` is, in numbered steps; :func:`schedule` returns only its
decisions. Nothing here reads a clock, a file, a database or a process: the
caller passes ``now`` and applies the decisions (start the admitted, send
SIGTERM to the preempted) back to its snapshot.

Cost: queues whose backlog has no request shape that could start now (by
quota, node room or preemption) are skipped in O(shapes); the others are
walked lazily in policy order, at most ``config.max_scan`` entries each.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

from .admission import Work, best_node, check_quota, pick_devices, shape_fits
from .config import PolicyConfig
from .model import Admit, Decision, Entry, EntryStatus, Preempt, Running, Shape, Workload
from .ordering import QueueOrder
from .preemption import (Plan, plan_preemption, priority_candidates, reclaim_candidates,
                         terminating_free)
from .snapshot import Snapshot

__all__ = ["schedule", "run_cycle", "explain", "CycleResult"]


@dataclass
class CycleResult:
    """The decisions of one cycle and the outcome of every entry it looked at."""

    decisions: list[Decision] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)

    @property
    def admitted(self) -> list[Admit]:
        return [d for d in self.decisions if isinstance(d, Admit)]

    @property
    def preempted(self) -> list[Preempt]:
        return [d for d in self.decisions if isinstance(d, Preempt)]


def schedule(snapshot: Snapshot, *, now: float, config: PolicyConfig) -> list[Decision]:
    """Admit and preempt decisions for one cycle (see :func:`run_cycle`)."""
    return run_cycle(snapshot, now=now, config=config).decisions


def run_cycle(snapshot: Snapshot, *, now: float, config: PolicyConfig) -> CycleResult:
    """One scheduling cycle over ``snapshot`` at time ``now``.

    1. Take a working copy of the snapshot's counters (the snapshot is not changed).
    2. Heads: each queue with pending work that could start now, with its lazy
       order. Steps 2-6 run twice: first only for requests inside their
       queue's nominal quota, then for all (borrowing), so a guaranteed
       request is never passed by a borrower, whatever the queues' orders.
    3. Order the candidates across queues: by queue entry time (``fifo``);
       inside nominal quota before borrowing, then age-boosted first, then
       least share of nominal quota of the flavors asked for (``fair``); or
       not borrowing first, then priority, then time (``quota``).
    4. Nominate the best head: check its quota, then a node (best fit).
    5. Admit it, charging the working copy; or preempt for it (reclaim,
       priority) and reserve the room; or record why it waits. A
       StrictFIFO queue whose head waits is blocked for this cycle.
    6. Drop a queue when nothing left in it could start, or after
       ``max_scan`` entries; repeat 3-6 until no queue is left.
    """
    result = CycleResult()
    # 1. working copy
    work = Work.of(snapshot)
    state = _CycleState(snapshot, work, now, config)

    for phase in ("nominal", "borrow"):
        # 2. heads (first pass: only requests inside their queue's nominal
        #    quota, so borrowers never take room a guaranteed request needs)
        state.phase = phase
        work.version += 1
        state.remaining = {q: Counter(qs.shapes) for q, qs in snapshot.queues.items()
                           if qs.pending_count}
        orders: dict[str, QueueOrder] = {}
        for name in sorted(snapshot.queues):
            qs = snapshot.queues[name]
            if qs.pending_count and state.queue_may_start(name):
                orders[name] = QueueOrder(
                    qs, snapshot, now, config, work.user_extra.__getitem__,
                    feasible=_always if state.strict(name) else
                    functools.partial(state.shape_may_start, name))

        while orders:
            # 3. order the candidates across queues; each queue offers its first
            #    workload that could start now (BestEffortFIFO skips the others
            #    without ranking them; a StrictFIFO head blocks its queue)
            best: tuple[tuple, str] | None = None
            for name in list(orders):
                head = state.feasible_head(name, orders[name])
                if head is None:
                    del orders[name]
                    continue
                key = state.cross_key(name, *head)
                if best is None or key < best[0]:
                    best = (key, name)
            if best is None:
                break
            qname = best[1]
            order = orders[qname]
            w, _boosted = order.pop()  # type: ignore[misc]
            state.scanned(qname, w.shape)

            # 4-5. nominate, then admit / preempt / wait
            entry = state.try_admit(w, result)
            state.entries[w.id] = entry
            if entry.status in (EntryStatus.ADMITTED, EntryStatus.PREEMPTING):
                state.decided.add(w.id)
            if entry.status is EntryStatus.ADMITTED:
                continue
            if state.strict(qname):
                state.entries[w.id] = Entry(w, entry.status,
                                            entry.reason + f" (StrictFIFO: blocks queue {qname!r})")
                del orders[qname]
                continue
            # 6. drop exhausted queues
            if order.scanned >= config.max_scan or not state.queue_may_start(qname):
                del orders[qname]
    result.entries = list(state.entries.values())
    return result


class _CycleState:
    """Per-cycle helpers around the working copy (caches keyed by its version)."""

    def __init__(self, snap: Snapshot, work: Work, now: float, config: PolicyConfig) -> None:
        self.snap = snap
        self.work = work
        self.now = now
        self.config = config
        self.remaining: dict[str, Counter[Shape]] = {}
        self.phase = "borrow"
        self.entries: dict[str, Entry] = {}
        self.decided: set[str] = set()
        self._fit_cache: dict[Shape, tuple[int, bool]] = {}
        # answers valid while work.version stands (bumped by every charge, a
        # new phase and every no_preempt entry)
        self._may_cache: dict[tuple[str, Shape, int | None], bool] = {}
        self._may_version = -1
        self._term: dict[str, Counter[str]] | None = None
        self._term_queue: dict[str, Counter[str]] = {}
        self.chosen: set[str] = set()
        self.skipped: Counter[str] = Counter()
        self.no_preempt: set[tuple[str, Shape]] = set()  # priority preemption found nothing
        self.no_reclaim: set[tuple[str, Shape]] = set()  # reclaim found nothing (apart, so a
        # failed reclaim does not stop priority preemption for the same shape)
        self._min_running_prio: dict[str, int] | None = None  # "queue/flavor" -> priority
        self._prio_cache: dict[tuple[str, Shape, int | None], bool] = {}

    # feasibility ----------------------------------------------------------
    def fits(self, shape: Shape) -> bool:
        hit = self._fit_cache.get(shape)
        if hit is not None and hit[0] == self.work.version:
            return hit[1]
        ok = shape_fits(shape, self.work)
        self._fit_cache[shape] = (self.work.version, ok)
        return ok

    def quota_room(self, qname: str, shape: Shape, *, nominal_only: bool) -> bool:
        if not self.config.quotas:
            return True
        q = self.snap.queues[qname].queue
        usage = self.work.queue_usage[qname]
        for f, n in shape[0]:
            quota = q.quotas.get(f)
            if quota is None:
                return False
            after = usage[f] + n
            if after <= quota.nominal:
                continue
            if nominal_only or q.cohort is None:
                return False
            if quota.borrowing_limit is not None and after > quota.nominal + quota.borrowing_limit:
                return False
            if self.work.cohort_usage[q.cohort][f] + n > self.snap.cohorts[q.cohort].nominal[f]:
                return False
        return True

    def others_borrow(self, qname: str, shape: Shape) -> bool:
        q = self.snap.queues[qname].queue
        if q.cohort is None:
            return False
        for other in self.snap.cohorts[q.cohort].members:
            if other == qname:
                continue
            oq = self.snap.queues[other].queue
            ou = self.work.queue_usage[other]
            if any(ou[f] > oq.nominal(f) for f, _ in shape[0]):
                return True
        return False

    def priority_possible(self, qname: str, shape: Shape, priority: int | None = None) -> bool:
        """Whether ``priority`` (default: the queue's top pending one) is above a
        running workload of the queue on one of the shape's flavors."""
        if not (self.config.priority_preemption
                and self.snap.queues[qname].queue.preempt_within_queue):
            return False
        key = (qname, shape, priority)
        hit = self._prio_cache.get(key)  # the running set does not change in a cycle
        if hit is None:
            hit = self._prio_cache[key] = self._priority_possible(qname, shape, priority)
        return hit

    def _priority_possible(self, qname: str, shape: Shape, priority: int | None) -> bool:
        if self._min_running_prio is None:
            self._min_running_prio = {}
            for r in self.snap.running.values():
                for f in r.devices:
                    key = f"{r.workload.queue}/{f}"
                    p = self._min_running_prio.get(key)
                    if p is None or r.workload.priority < p:
                        self._min_running_prio[key] = r.workload.priority
        top = priority if priority is not None else max(
            self.snap.queues[qname].by_prio_user, default=None)
        if top is None:
            return False
        for f, _ in shape[0]:
            low = self._min_running_prio.get(f"{qname}/{f}")
            if low is not None and top > low:
                return True
        return False

    def _outranks(self, w: Workload) -> bool:
        """``w`` has a higher priority than some running workload of its queue on its flavors."""
        if not self.priority_possible(w.queue, w.shape, w.priority):
            return False
        assert self._min_running_prio is not None
        return any(w.priority > self._min_running_prio.get(f"{w.queue}/{f}", w.priority)
                   for f in w.gpus)

    def shape_may_start(self, qname: str, shape: Shape, priority: int | None = None) -> bool:
        """Whether a request of this shape (and priority: ``None`` for any) could start now.

        Start means admitted, or preempting so it can be: reclaim inside
        nominal quota, or priority preemption above a running priority.
        """
        if self._may_version != self.work.version:
            self._may_cache.clear()
            self._may_version = self.work.version
        key = (qname, shape, priority)
        hit = self._may_cache.get(key)
        if hit is None:
            hit = self._may_cache[key] = self._shape_may_start(qname, shape, priority)
        return hit

    def _shape_may_start(self, qname: str, shape: Shape, priority: int | None) -> bool:
        if self.phase == "nominal" and not self.quota_room(qname, shape, nominal_only=True):
            return False
        if self.quota_room(qname, shape, nominal_only=False) and self.fits(shape):
            return True
        if (qname, shape) in self.no_preempt:
            return False
        if (self.config.reclaim and (qname, shape) not in self.no_reclaim
                and self.quota_room(qname, shape, nominal_only=True)
                and self.others_borrow(qname, shape)):
            return True
        return self.priority_possible(qname, shape, priority)

    def queue_may_start(self, qname: str) -> bool:
        return any(n > 0 and self.shape_may_start(qname, s)
                   for s, n in self.remaining.get(qname, {}).items())

    def scanned(self, qname: str, shape: Shape) -> None:
        self.remaining[qname][shape] -= 1

    def strict(self, qname: str) -> bool:
        return (self.config.quotas and not self.config.global_fifo
                and self.snap.queues[qname].queue.strategy == "StrictFIFO")

    def feasible_head(self, qname: str, order: QueueOrder) -> tuple[Workload, bool] | None:
        """The queue's next workload that could start now; the ones passed are skipped.

        Skipped workloads are counted in ``skipped`` (by queue), not given an
        entry each, so a long backlog of requests that cannot start costs one
        cheap test apiece. A StrictFIFO queue never skips its head.
        """
        while True:
            head = order.peek()
            if head is None:
                return None
            w = head[0]
            if w.id in self.decided:  # admitted or preempting in the first pass
                order.pop()
                continue
            if self.strict(qname):
                if self.phase == "nominal" and not self.quota_room(qname, w.shape,
                                                                   nominal_only=True):
                    return None  # a borrowing head waits for the second pass
                return head
            if self.shape_may_start(qname, w.shape, w.priority):
                return head
            order.pop()
            self.scanned(qname, w.shape)
            self.skipped[qname] += 1
            if order.scanned >= self.config.max_scan:
                return None

    # ordering across queues -------------------------------------------------
    def cross_key(self, qname: str, w: Workload, boosted: bool) -> tuple:
        if self.config.global_fifo:
            return (w.submitted_at, w.id)
        q = self.snap.queues[qname].queue
        usage = self.work.queue_usage[qname]
        if self.config.queue_share_order:
            # the queue's share of its nominal quota of the flavors asked for,
            # counting this request (Kueue's dominant resource share): a request
            # inside nominal quota (share <= 1) goes before any that borrows, so
            # a borrower never takes the room a reclaim just made
            share = 0.0
            for f, n in w.gpus.items():
                nominal = q.nominal(f)
                share = max(share, (usage[f] + n) / nominal if nominal else float("inf"))
            return (share > 1.0, 0 if boosted else 1, share, -w.priority, w.submitted_at, w.id)
        borrowing = any(usage[f] + n > q.nominal(f) for f, n in w.gpus.items())
        return (borrowing, -w.priority, w.submitted_at, w.id)

    # nominate and admit ---------------------------------------------------------
    def try_admit(self, w: Workload, result: CycleResult) -> Entry:
        work, config = self.work, self.config
        queue = self.snap.queues[w.queue].queue
        verdict = check_quota(queue, w, work, enforce=config.quotas)
        if verdict.ok:
            node = best_node(w.shape[0], w.cpus, w.memory, work) if self.fits(w.shape) else None
            if node is not None:
                devices = pick_devices(w, node, work)
                work.charge(w, node, devices)
                result.decisions.append(Admit(w, node, devices, borrowing=verdict.borrowing))
                return Entry(w, EntryStatus.ADMITTED,
                             f"on node {node!r}" + (" (borrowing)" if verdict.borrowing else ""))
            if (config.reclaim and verdict.within_nominal and config.quotas
                    and (w.queue, w.shape) not in self.no_reclaim
                    and (w.queue, w.shape) not in self.no_preempt):
                entry = self._preempt(w, result, kind="reclaim")
                if entry is not None:
                    return entry
        if (config.priority_preemption and queue.preempt_within_queue
                and (w.queue, w.shape) not in self.no_preempt and self._outranks(w)):
            entry = self._preempt(w, result, kind="priority")
            if entry is not None:
                return entry
        if not verdict.ok:
            return Entry(w, EntryStatus.INADMISSIBLE, verdict.reason)
        return Entry(w, EntryStatus.WAITING, "no node has room for " + _describe(w))

    def _terminating(self) -> dict[str, Counter[str]]:
        if self._term is None:
            self._term, self._term_queue = terminating_free(self.snap)
        return self._term

    def _preempt(self, w: Workload, result: CycleResult, *, kind: str) -> Entry | None:
        work, snap = self.work, self.snap
        if kind == "reclaim":
            cands = reclaim_candidates(w, snap, self.chosen)
            self._terminating()
            leaving = self._term_queue

            def eligible(r: Running, released: Counter[str]) -> bool:
                # still borrowing, not counting workloads already on their way out
                rq = snap.queues[r.workload.queue].queue
                usage = work.queue_usage[r.workload.queue]
                gone = leaving.get(rq.name, _EMPTY)
                return any(usage[f] - gone[f] - released[f"{rq.name}/{f}"] > rq.nominal(f)
                           for f in r.devices if f in w.gpus)
        else:
            cands = priority_candidates(w, snap, self.chosen)

            def eligible(r: Running, released: Counter[str]) -> bool:
                return True
        plan = plan_preemption(w, work, self._terminating(), self.now, cands, eligible)
        if plan is None:
            (self.no_reclaim if kind == "reclaim" else self.no_preempt).add((w.queue, w.shape))
            work.version += 1
            return None
        if kind == "priority":
            # only inside nominal quota once the victims are gone: room freed
            # above nominal quota would go to other queues' guaranteed requests
            # first, and the preemptor would evict again
            for v in plan.victims:
                work.release_quota(v.workload)
            verdict = check_quota(snap.queues[w.queue].queue, w, work, enforce=self.config.quotas)
            for v in plan.victims:  # they hold their quota until they exit
                work.charge(v.workload, None, None, user=False)
            if not (verdict.ok and verdict.within_nominal):
                self.no_preempt.add((w.queue, w.shape))
                work.version += 1
                return None
        self._reserve(w, plan)
        for v in plan.victims:
            self.chosen.add(v.workload.id)
            reason = (f"{kind}: queue {w.queue!r} needs {_describe(w)} for workload {w.id!r}"
                      + (" inside its nominal quota" if kind == "reclaim"
                         else f" at priority {w.priority} > {v.workload.priority}"))
            result.decisions.append(Preempt(v.workload, reason, kind=kind,  # type: ignore[arg-type]
                                            for_job=w.id))
        if plan.victims:
            return Entry(w, EntryStatus.PREEMPTING,
                         f"{kind}: stopping {', '.join(sorted(v.workload.id for v in plan.victims))} "
                         f"on node {plan.node!r}")
        return Entry(w, EntryStatus.PREEMPTING,
                     f"waiting for preempted workloads to exit on node {plan.node!r}")

    def _reserve(self, w: Workload, plan: Plan) -> None:
        """Promise ``plan.node``'s free and coming devices to ``w`` for the rest of the cycle."""
        work = self.work
        term = self._terminating().setdefault(plan.node, Counter())
        for v in plan.victims:
            for f, idx in v.devices.items():
                term[f] += len(idx)
        free = work.node_free[plan.node]
        for f, n in w.gpus.items():
            from_free = min(free[f], n)
            free[f] -= from_free
            work.free_total[f] -= from_free
            term[f] -= n - from_free
        work.node_cpus[plan.node] -= max(0.0, min(work.node_cpus[plan.node], w.cpus))
        work.node_memory[plan.node] -= max(0.0, min(work.node_memory[plan.node], w.memory))
        work.charge(w, None, None)
        work.version += 1


_EMPTY: Counter[str] = Counter()


def _always(shape: Shape, priority: int) -> bool:
    return True


def _describe(w: Workload) -> str:
    return ", ".join(f"{n} x {f}" for f, n in sorted(w.gpus.items())) or "no devices"


def explain(snapshot: Snapshot, job_id: str, *, config: PolicyConfig) -> Entry:
    """Why a pending workload is not running, against the snapshot as it is.

    A cycle gives an entry only to the workloads it nominates; the ones whose
    request shape cannot start are skipped unexamined, so this answers the
    question for any one of them (``GET /api/jobs/{id}`` can show it).
    """
    w = snapshot.pending.get(job_id)
    if w is None:
        from mlaas.errors import NotFound

        raise NotFound(f"workload {job_id!r} is not pending", job_id=job_id)
    work = Work.of(snapshot)
    verdict = check_quota(snapshot.queues[w.queue].queue, w, work, enforce=config.quotas)
    if not verdict.ok:
        return Entry(w, EntryStatus.INADMISSIBLE, verdict.reason)
    if best_node(w.shape[0], w.cpus, w.memory, work) is None:
        return Entry(w, EntryStatus.WAITING, "no node has room for " + _describe(w))
    return Entry(w, EntryStatus.WAITING, "fits now: waiting for the next cycle"
                 + (" (borrowing)" if verdict.borrowing else ""))
