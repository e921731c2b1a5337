"""Admission: does the quota allow a workload, and which node and devices take it.

Layer: platform, pure policy. Two checks, in Kueue's order:

1. Quota (:func:`check_quota`): every flavor asked for must be in the
   queue's quotas; usage plus the request within ``nominal`` is a plain
   admission; above it the queue borrows, which needs a cohort, stays within
   ``borrowing_limit`` and within the cohort's unused nominal quota.
2. Node fit (:func:`best_node`): a node with enough free devices of every
   flavor, CPUs and memory. Best fit: the node left with the fewest free
   devices of the requested flavors wins, so small requests fill partly used
   nodes and whole nodes stay free for large requests. MIG slices are their own
   flavors, so a slice request never breaks a whole GPU.

Both read :class:`Work`, the cycle's working copy of the snapshot's counters,
charged as the cycle admits, so the snapshot itself is never mutated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .model import Queue, Shape, Workload
from .snapshot import Snapshot

__all__ = ["Work", "QuotaVerdict", "check_quota", "best_node", "pick_devices"]


@dataclass
class Work:
    """The cycle's working counters, copied from the snapshot at the start.

    ``reserved`` holds devices on a node promised to a workload whose victims
    are still exiting; ``version`` changes whenever anything is charged, so
    per-shape feasibility answers can be cached between changes.
    """

    snap: Snapshot
    node_free: dict[str, Zero]
    node_cpus: dict[str, float]
    node_memory: dict[str, float]
    queue_usage: dict[str, Zero]
    cohort_usage: dict[str, Zero]
    free_total: Zero
    taken: dict[str, dict[str, set[int]]] = field(default_factory=dict)
    user_extra: Counter[str] = field(default_factory=Counter)
    version: int = 0

    @classmethod
    def of(cls, snap: Snapshot) -> Work:
        return cls(
            snap,
            {n: Zero(ns.free_count) for n, ns in snap.nodes.items()},
            {n: ns.free_cpus for n, ns in snap.nodes.items()},
            {n: ns.free_memory for n, ns in snap.nodes.items()},
            {q: Zero(qs.usage) for q, qs in snap.queues.items()},
            {c: Zero(cs.usage) for c, cs in snap.cohorts.items()},
            Zero(snap.free_total),
        )

    def charge(self, w: Workload, node: str | None, devices: dict[str, tuple[int, ...]] | None,
               *, quota: bool = True, user: bool = True) -> None:
        """Count ``w`` as admitted: quota always, node resources when ``node`` is given."""
        if quota:
            self._quota(w, +1)
        if node is not None:
            free = self.node_free[node]
            for f, n in w.gpus.items():
                free[f] -= n
                self.free_total[f] -= n
            self.node_cpus[node] -= w.cpus
            self.node_memory[node] -= w.memory
            if devices:
                taken = self.taken.setdefault(node, {})
                for f, idx in devices.items():
                    taken.setdefault(f, set()).update(idx)
        if user:
            self.user_extra[w.user] += w.gpu_count
        self.version += 1

    def release_quota(self, w: Workload) -> None:
        """A victim's quota is counted as given back (it exits before the preemptor starts)."""
        self._quota(w, -1)
        self.version += 1

    def _quota(self, w: Workload, sign: int) -> None:
        usage = self.queue_usage[w.queue]
        cohort = self.snap.queues[w.queue].queue.cohort
        for f, n in w.gpus.items():
            usage[f] += sign * n
            if cohort is not None:
                self.cohort_usage[cohort][f] += sign * n


class Zero(dict[str, int]):
    """A dict whose missing keys read as 0: a Counter without its slow constructor."""

    __slots__ = ()

    def __missing__(self, key: str) -> int:
        return 0


@dataclass(frozen=True)
class QuotaVerdict:
    ok: bool
    borrowing: bool = False
    within_nominal: bool = True
    reason: str = ""


def check_quota(queue: Queue, w: Workload, work: Work, *, enforce: bool = True) -> QuotaVerdict:
    """May ``queue`` take ``w`` now, inside its nominal quota or by borrowing?"""
    usage = work.queue_usage[queue.name]
    borrowing = False
    for f, n in sorted(w.gpus.items()):
        quota = queue.quotas.get(f)
        if quota is None:
            if enforce:
                return QuotaVerdict(False, reason=f"queue {queue.name!r} has no quota for "
                                    f"flavor {f!r} (it has {sorted(queue.quotas)})",
                                    within_nominal=False)
            borrowing = True
            continue
        after = usage[f] + n
        if after <= quota.nominal:
            continue
        borrowing = True
        if not enforce:
            continue
        if queue.cohort is None:
            return QuotaVerdict(False, True, False, f"{f}: {after} > nominal quota "
                                f"{quota.nominal} of queue {queue.name!r}, which has no cohort "
                                f"to borrow from")
        if quota.borrowing_limit is not None and after > quota.nominal + quota.borrowing_limit:
            return QuotaVerdict(False, True, False, f"{f}: {after} > nominal {quota.nominal} + "
                                f"borrowing limit {quota.borrowing_limit} of queue {queue.name!r}")
        c_used = work.cohort_usage[queue.cohort][f] + n
        c_nominal = work.snap.cohorts[queue.cohort].nominal[f]
        if c_used > c_nominal:
            return QuotaVerdict(False, True, False, f"{f}: cohort {queue.cohort!r} has no unused "
                                f"quota ({c_used} > {c_nominal})")
    return QuotaVerdict(True, borrowing, not borrowing)


def fits_on(node: str, gpus: dict[str, int] | tuple[tuple[str, int], ...], cpus: float,
            memory: float, work: Work, extra: dict[str, int] | None = None) -> bool:
    """Whether ``node`` has room now (plus ``extra`` devices about to be freed)."""
    free = work.node_free[node]
    items = gpus.items() if isinstance(gpus, dict) else gpus
    for f, n in items:
        if free[f] + (extra.get(f, 0) if extra else 0) < n:
            return False
    return work.node_cpus[node] >= cpus and work.node_memory[node] >= memory


def best_node(gpus: tuple[tuple[str, int], ...], cpus: float, memory: float,
              work: Work) -> str | None:
    """The best-fit node for a request shape, or ``None`` if no node has room.

    Score: free devices of the requested flavors left after placing it
    (fewest wins), then all free devices on the node, then the name (stable).
    """
    best: tuple[int, int, str] | None = None
    for node, free in work.node_free.items():
        left = 0
        ok = True
        for f, n in gpus:
            have = free[f]
            if have < n:
                ok = False
                break
            left += have - n
        if not ok or work.node_cpus[node] < cpus or work.node_memory[node] < memory:
            continue
        score = (left, sum(free.values()), node)
        if best is None or score < best:
            best = score
    return best[2] if best else None


def shape_fits(shape: Shape, work: Work) -> bool:
    gpus, cpus, memory = shape
    for f, n in gpus:
        if work.free_total[f] < n:
            return False
    return best_node(gpus, cpus, memory, work) is not None


def pick_devices(w: Workload, node: str, work: Work) -> dict[str, tuple[int, ...]]:
    """The lowest free device indices on ``node`` not already taken in this cycle."""
    ns = work.snap.nodes[node]
    taken = work.taken.get(node, {})
    out = {}
    for f, n in sorted(w.gpus.items()):
        used = taken.get(f, set())
        out[f] = tuple([i for i in ns.free[f] if i not in used][:n])
    return out
