"""The snapshot: the state one scheduling cycle reads, kept up to date incrementally.

Layer: platform, pure policy. Kueue copies its cache into a ``Snapshot`` for
each cycle; here the owner (the manager, or the simulator) keeps ONE snapshot
and applies each change as it happens (a job arrives, starts, stops; a node
joins or leaves), so a cycle never rebuilds indices over every job. The cycle
only reads the snapshot; its "what if" bookkeeping lives in a small working
copy of the counters (:mod:`mlaas.platform.scheduler.cycle`).

Indices kept per queue, so ordering and early exits cost O(users) and
O(shapes), not O(pending):

- pending jobs by the time they entered the queue (for FIFO and the age boost),
- pending jobs by priority, then user, then request shape, each list in
  submission order, and by shape in queue order: a cycle walks only the
  shapes that could start now, never the backlog that cannot,
- how many pending jobs have each request shape.

Quota usage counts every running workload, terminating ones too: they hold
their devices until they exit.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from mlaas.errors import Conflict, NotFound, SpecError, close_names

from .model import Flavor, Node, Queue, Running, Shape, Workload
from .usage import DecayedUsage

__all__ = ["Snapshot", "NodeState", "QueueState", "CohortState"]

_Key = tuple[float, str]  # (submitted_at, id): the order inside one list


@dataclass
class NodeState:
    """A node and what is free on it now."""

    node: Node
    free: dict[str, list[int]]  # flavor -> free device indices, ascending
    free_cpus: float
    free_memory: float
    running: set[str] = field(default_factory=set)
    free_count: dict[str, int] = field(default_factory=dict)  # flavor -> len(free[flavor])

    def __post_init__(self) -> None:
        self.free_count = {f: len(d) for f, d in self.free.items()}


@dataclass
class QueueState:
    """A queue, what it uses now and its pending jobs, indexed."""

    queue: Queue
    usage: Counter[str] = field(default_factory=Counter)
    by_queued: list[_Key] = field(default_factory=list)
    by_prio_user: dict[int, dict[str, dict[Shape, list[_Key]]]] = field(default_factory=dict)
    # (priority, shape) -> [(enqueued, id)], for FIFO and the age boost
    by_shape: dict[tuple[int, Shape], list[_Key]] = field(default_factory=dict)
    shapes: Counter[Shape] = field(default_factory=Counter)

    @property
    def pending_count(self) -> int:
        return len(self.by_queued)


@dataclass
class CohortState:
    """Queues lending each other unused quota: their summed nominal quota and usage."""

    name: str
    members: list[str] = field(default_factory=list)
    nominal: Counter[str] = field(default_factory=Counter)
    usage: Counter[str] = field(default_factory=Counter)


class Snapshot:
    """Nodes, queues, pending and running workloads, and users' decayed usage.

    Mutated only through its methods, each O(log n) or O(devices); a cycle
    reads it and returns decisions, and the owner applies those decisions
    back with :meth:`start` and :meth:`mark_terminating`.
    """

    def __init__(self, nodes: Iterable[Node] = (), queues: Iterable[Queue] = (),
                 *, flavors: Iterable[Flavor] | None = None, usage: DecayedUsage | None = None,
                 half_life: float = 86_400.0) -> None:
        self.nodes: dict[str, NodeState] = {}
        self.queues: dict[str, QueueState] = {}
        self.cohorts: dict[str, CohortState] = {}
        self.pending: dict[str, Workload] = {}
        self.running: dict[str, Running] = {}
        self.usage = usage if usage is not None else DecayedUsage(half_life)
        self.capacity: Counter[str] = Counter()  # devices per flavor on nodes that are up
        self.free_total: Counter[str] = Counter()
        # the known flavors; None: any name goes (the simulator); the manager
        # passes the configured ones so a typo in a queue or node is refused
        self.flavors: dict[str, Flavor] | None = (
            None if flavors is None else {f.name: f for f in flavors})
        for q in queues:
            self.add_queue(q)
        for n in nodes:
            self.add_node(n)

    # -- queues ---------------------------------------------------------
    def _check_flavors(self, names: Iterable[str], where: str, field_path: str) -> None:
        if self.flavors is None:
            return
        for name in names:
            if name not in self.flavors:
                near = close_names(name, self.flavors)
                hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
                raise SpecError(f"{where} names unknown flavor {name!r}{hint}",
                                field_path=field_path)

    def add_queue(self, queue: Queue) -> None:
        if queue.name in self.queues:
            raise Conflict(f"queue {queue.name!r} is already in the snapshot")
        self._check_flavors(queue.quotas, f"queue {queue.name!r}", f"queues.{queue.name}.quotas")
        self.queues[queue.name] = QueueState(queue)
        if queue.cohort is not None:
            c = self.cohorts.setdefault(queue.cohort, CohortState(queue.cohort))
            c.members.append(queue.name)
            for flavor, quota in queue.quotas.items():
                c.nominal[flavor] += quota.nominal

    def cohort_of(self, queue: str) -> CohortState | None:
        c = self.queues[queue].queue.cohort
        return self.cohorts[c] if c is not None else None

    # -- nodes ----------------------------------------------------------
    def add_node(self, node: Node) -> None:
        """A node joins with everything free."""
        if node.name in self.nodes:
            raise Conflict(f"node {node.name!r} is already in the pool")
        self._check_flavors(node.gpus, f"node {node.name!r}", f"nodes.{node.name}.gpus")
        self.nodes[node.name] = NodeState(
            node, {f: list(range(n)) for f, n in node.gpus.items() if n > 0},
            node.cpus, node.memory)
        for f, n in node.gpus.items():
            self.capacity[f] += n
            self.free_total[f] += n

    def remove_node(self, name: str) -> list[Running]:
        """A node leaves (failure or drain); returns the workloads it was running.

        Their quota is released; the caller requeues them (:meth:`add_pending`)
        after accounting the lost work.
        """
        ns = self._node(name)
        lost = [self._release(rid) for rid in sorted(ns.running)]
        for f, n in ns.node.gpus.items():
            self.capacity[f] -= n
            self.free_total[f] -= n
        del self.nodes[name]
        return lost

    def _node(self, name: str) -> NodeState:
        try:
            return self.nodes[name]
        except KeyError:
            raise NotFound(f"node {name!r} is not in the pool") from None

    # -- pending --------------------------------------------------------
    def add_pending(self, w: Workload) -> None:
        """A workload joins its queue (new, or requeued after preemption)."""
        qs = self.queues.get(w.queue)
        if qs is None:
            raise SpecError(f"workload {w.id!r} names unknown queue {w.queue!r}",
                            field_path="resources.queue", job_id=w.id)
        if w.id in self.pending or w.id in self.running:
            raise Conflict(f"workload {w.id!r} is already pending or running", job_id=w.id)
        self._check_flavors(w.gpus, f"workload {w.id!r}", "resources.gpus")
        self.pending[w.id] = w
        key = (w.submitted_at, w.id)
        bisect.insort(qs.by_queued, (w.enqueued, w.id))
        shape = w.shape
        bisect.insort(qs.by_shape.setdefault((w.priority, shape), []), (w.enqueued, w.id))
        bisect.insort(qs.by_prio_user.setdefault(w.priority, {}).setdefault(w.user, {})
                      .setdefault(shape, []), key)
        qs.shapes[w.shape] += 1

    def remove_pending(self, job_id: str) -> Workload:
        """A pending workload leaves its queue (admitted or cancelled)."""
        w = self.pending.pop(job_id, None)
        if w is None:
            raise NotFound(f"workload {job_id!r} is not pending", job_id=job_id)
        qs = self.queues[w.queue]
        key = (w.submitted_at, w.id)
        _remove_sorted(qs.by_queued, (w.enqueued, w.id))
        shape = w.shape
        lst = qs.by_shape[(w.priority, shape)]
        _remove_sorted(lst, (w.enqueued, w.id))
        if not lst:
            del qs.by_shape[(w.priority, shape)]
        users = qs.by_prio_user[w.priority]
        shapes = users[w.user]
        lst = shapes[shape]
        _remove_sorted(lst, key)
        if not lst:
            del shapes[shape]
            if not shapes:
                del users[w.user]
                if not users:
                    del qs.by_prio_user[w.priority]
        qs.shapes[w.shape] -= 1
        if not qs.shapes[w.shape]:
            del qs.shapes[w.shape]
        return w

    # -- running --------------------------------------------------------
    def start(self, job_id: str, node: str, devices: dict[str, tuple[int, ...]], now: float,
              *, checkpoint_at: float | None = None) -> Running:
        """Move a pending workload onto ``node``, taking exactly ``devices``."""
        ns = self._node(node)
        w = self.pending.get(job_id)
        if w is None:
            raise NotFound(f"workload {job_id!r} is not pending", job_id=job_id)
        for f, idx in devices.items():
            free = ns.free.get(f, [])
            if len(idx) != w.gpus.get(f, 0) or any(i not in free for i in idx):
                raise Conflict(f"devices {f}={list(idx)} are not free on node {node!r} "
                               f"for workload {job_id!r}", job_id=job_id)
        if set(devices) != set(w.gpus):
            raise Conflict(f"devices {sorted(devices)} do not match the request "
                           f"{sorted(w.gpus)} of workload {job_id!r}", job_id=job_id)
        self.remove_pending(job_id)
        for f, idx in devices.items():
            taken = set(idx)
            ns.free[f] = [i for i in ns.free[f] if i not in taken]
            ns.free_count[f] = len(ns.free[f])
            self.free_total[f] -= len(idx)
        ns.free_cpus -= w.cpus
        ns.free_memory -= w.memory
        ns.running.add(job_id)
        r = Running(w, node, dict(devices), now, now if checkpoint_at is None else checkpoint_at)
        self.running[job_id] = r
        self._charge(w, +1)
        self.usage.add_rate(w.user, w.gpu_count, now)
        return r

    def mark_terminating(self, job_id: str) -> Running:
        """The workload was told to stop; it keeps its devices until :meth:`stop`."""
        r = self._running(job_id)
        r = replace(r, terminating=True)
        self.running[job_id] = r
        return r

    def update_checkpoint(self, job_id: str, at: float) -> None:
        """The job reported a checkpoint saved at ``at``."""
        r = self._running(job_id)
        self.running[job_id] = replace(r, checkpoint_at=max(r.checkpoint_at, at))

    def stop(self, job_id: str, now: float) -> Running:
        """A running workload exited (finished, failed or preempted); its devices are free."""
        r = self._release(job_id)
        self.usage.add_rate(r.workload.user, -r.workload.gpu_count, now)
        return r

    def _running(self, job_id: str) -> Running:
        try:
            return self.running[job_id]
        except KeyError:
            raise NotFound(f"workload {job_id!r} is not running", job_id=job_id) from None

    def _release(self, job_id: str) -> Running:
        r = self.running.pop(job_id, None)
        if r is None:
            raise NotFound(f"workload {job_id!r} is not running", job_id=job_id)
        ns = self.nodes[r.node]
        ns.running.discard(job_id)
        for f, idx in r.devices.items():
            ns.free[f] = sorted(ns.free[f] + list(idx))
            ns.free_count[f] = len(ns.free[f])
            self.free_total[f] += len(idx)
        ns.free_cpus += r.workload.cpus
        ns.free_memory += r.workload.memory
        self._charge(r.workload, -1)
        return r

    def _charge(self, w: Workload, sign: int) -> None:
        qs = self.queues[w.queue]
        cohort = self.cohort_of(w.queue)
        for f, n in w.gpus.items():
            qs.usage[f] += sign * n
            if cohort is not None:
                cohort.usage[f] += sign * n

    # -- reading --------------------------------------------------------
    def pending_in(self, queue: str) -> Iterator[Workload]:
        """Pending workloads of ``queue`` in the order they entered it."""
        for _, jid in self.queues[queue].by_queued:
            yield self.pending[jid]

    def running_on(self, node: str) -> list[Running]:
        return [self.running[j] for j in sorted(self._node(node).running)]


def _remove_sorted(lst: list[_Key], key: _Key) -> None:
    i = bisect.bisect_left(lst, key)
    if i < len(lst) and lst[i] == key:
        del lst[i]
    else:  # pragma: no cover - the indices are kept in step by the methods above
        lst.remove(key)
