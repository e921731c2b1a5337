"""Ordering: which pending workload of a queue is offered next.

Layer: platform, pure policy. Inside one queue, with the ``fair`` policy:

1. by priority, highest first (a priority preemption's room then goes to
   the workload that made it);
2. within a priority, workloads waiting longer than ``age_boost_s`` since
   they entered the queue first, longest waiting first, so no user's heavy
   usage can starve a workload (a preempted workload's wait restarts at its
   requeue, so it cannot come back boosted and evict its preemptor);
3. then users by fair share: lowest decayed usage first, where a user's key
   is ``decayed GPU-seconds + devices held (or given this cycle) *
   fair_share_charge_s`` (HTCondor's user priority, with the devices in use as
   a look-ahead so users alternate when several devices free at once);
4. one user's workloads in submission order.

The ``quota`` policy uses 1 then 4 (Kueue's priority then creation time);
``fifo`` uses the time a workload entered the queue alone.

:class:`QueueOrder` is lazy and only walks request shapes that could start
now (``feasible(shape, priority)``, asked again whenever a head is taken,
since room only shrinks during a cycle): the snapshot keeps pending work per
(priority, shape) in queue order and per (priority, user, shape) in
submission order, so a backlog of 4-GPU requests is never walked while only
one device is free. Cost per workload offered: O(log users + shapes).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from .config import PolicyConfig
from .model import Shape, Workload
from .snapshot import QueueState, Snapshot

__all__ = ["QueueOrder", "user_key"]

_Key = tuple[float, str]


def user_key(snap: Snapshot, user: str, now: float, extra_gpus: float,
             config: PolicyConfig) -> float:
    """A user's fair-share key: decayed usage plus a charge for devices held now."""
    return (snap.usage.value(user, now)
            + (snap.usage.rate(user) + extra_gpus) * config.fair_share_charge_s)


class QueueOrder:
    """The pending workloads of one queue, in policy order, offered one at a time.

    ``extra_of(user)`` returns the devices given to that user so far in this
    cycle (read when a user is put back on the heap, so a user who was just
    given devices moves behind the others); ``feasible(shape, priority)`` says
    whether a request of that shape and priority could start now; others are
    not offered.
    """

    def __init__(self, qs: QueueState, snap: Snapshot, now: float, config: PolicyConfig,
                 extra_of: Callable[[str], float],
                 feasible: Callable[[Shape, int], bool] = lambda s, p: True) -> None:
        self.qs = qs
        self.snap = snap
        self.now = now
        self.config = config
        self.extra_of = extra_of
        self.feasible = feasible
        self.scanned = 0
        self._head: tuple[Workload, bool] | None = None
        self._pending_push: tuple[str, _Key] | None = None
        # next index per list: (priority, user, shape) or (priority, shape)
        self._pos: dict[tuple, int] = {}
        self.cutoff = (now - config.age_boost_s) if config.age_boost_s is not None else None
        self._prios = sorted(qs.by_prio_user, reverse=True)
        self._cur_prio = 0
        self._boosting = False
        self._heap: list[tuple[float, _Key, str]] = []
        self._fifo = config.global_fifo
        if not self._fifo:
            self._load_next_prio()

    # helpers -------------------------------------------------------------
    def _boosted(self, jid: str) -> bool:
        return self.cutoff is not None and self.snap.pending[jid].enqueued <= self.cutoff

    def _next_in(self, user: str, shape: Shape, lst: list[_Key]) -> _Key | None:
        """The next entry of a user's list, skipping boosted ones (offered before)."""
        pos = (self._cur_prio, user, shape)
        i = self._pos.get(pos, 0)
        if self.cutoff is not None:
            while i < len(lst) and self._boosted(lst[i][1]):
                i += 1
            self._pos[pos] = i
        return lst[i] if i < len(lst) else None

    def _user_head(self, user: str) -> tuple[_Key, Shape] | None:
        """The user's earliest workload among the shapes that could start now."""
        shapes = self.qs.by_prio_user[self._cur_prio].get(user, {})
        best: tuple[_Key, Shape] | None = None
        for shape, lst in shapes.items():
            if not self.feasible(shape, self._cur_prio):
                continue
            key = self._next_in(user, shape, lst)
            if key is not None and (best is None or key < best[0]):
                best = (key, shape)
        return best

    def _merged_head(self, prio: int | None, *, boosted: bool) -> tuple[_Key, tuple] | None:
        """The earliest entry over the (priority, shape) lists of feasible shapes.

        These lists are in queue-entry order, so the boosted entries of one
        are a prefix of it.
        """
        best: tuple[_Key, tuple] | None = None
        for pkey, lst in self.qs.by_shape.items():
            p, shape = pkey
            if (prio is not None and p != prio) or not self.feasible(shape, p):
                continue
            i = self._pos.get(pkey, 0)
            if i >= len(lst):
                continue
            key = lst[i]
            if boosted and (self.cutoff is None or key[0] > self.cutoff):
                continue
            if best is None or key < best[0]:
                best = (key, pkey)
        return best

    def _ukey(self, user: str) -> float:
        if not self.config.fair_share:
            return 0.0
        return user_key(self.snap, user, self.now, self.extra_of(user), self.config)

    def _load_next_prio(self) -> None:
        while self._prios and not self._heap and not self._boosting:
            self._cur_prio = self._prios.pop(0)
            self._boosting = self.cutoff is not None
            for user in self.qs.by_prio_user[self._cur_prio]:
                head = self._user_head(user)
                if head is not None:
                    self._heap.append((self._ukey(user), head[0], user))
            heapq.heapify(self._heap)

    # the walk --------------------------------------------------------------
    def _advance(self) -> tuple[Workload, bool] | None:
        if self._fifo:
            found = self._merged_head(None, boosted=False)
            if found is None:
                return None
            key, pkey = found
            self._pos[pkey] = self._pos.get(pkey, 0) + 1
            return self.snap.pending[key[1]], False
        while True:
            if self._boosting:  # boosted of this priority first, longest waiting first
                found = self._merged_head(self._cur_prio, boosted=True)
                if found is not None:
                    key, pkey = found
                    self._pos[pkey] = self._pos.get(pkey, 0) + 1
                    return self.snap.pending[key[1]], True
                self._boosting = False
            if not self._heap:
                self._load_next_prio()
                if self._boosting:
                    continue
                if not self._heap:
                    return None
            _, key, user = heapq.heappop(self._heap)
            head = self._user_head(user)  # room may have shrunk since it was pushed
            if head is None:
                continue
            if head[0] != key:
                heapq.heappush(self._heap, (self._ukey(user), head[0], user))
                continue
            pos = (self._cur_prio, user, head[1])
            self._pos[pos] = self._pos.get(pos, 0) + 1
            nxt = self._user_head(user)
            if nxt is not None:  # pushed back with its key read after the caller charged
                self._pending_push = (user, nxt[0])
            return self.snap.pending[key[1]], False

    # public ------------------------------------------------------------
    def peek(self) -> tuple[Workload, bool] | None:
        """The next workload and whether it is age-boosted, without taking it."""
        if self._head is None:
            if self._pending_push is not None:
                user, key = self._pending_push
                self._pending_push = None
                heapq.heappush(self._heap, (self._ukey(user), key, user))
            self._head = self._advance()
            if self._head is not None:
                self.scanned += 1
        return self._head

    def pop(self) -> tuple[Workload, bool] | None:
        head = self.peek()
        self._head = None
        return head
