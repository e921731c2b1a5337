"""The scheduler's vocabulary: flavors, nodes, queues, workloads and decisions.

Layer: platform, pure policy. Plain frozen dataclasses in Kueue's words
(ResourceFlavor, ClusterQueue with a cohort, Workload, Admission), so the
policy, the simulator and later the manager speak one language and none of
them holds a database row or a process handle.

Times are seconds on one clock chosen by the caller (the manager's UTC
epoch, or the simulator's virtual time); the policy never reads a clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Flavor", "Node", "Quota", "Queue", "Workload", "Running",
    "Admit", "Preempt", "Decision", "EntryStatus", "Entry", "Shape",
    "STRICT_FIFO", "BEST_EFFORT_FIFO",
]

STRICT_FIFO = "StrictFIFO"
BEST_EFFORT_FIFO = "BestEffortFIFO"

Shape = tuple[tuple[tuple[str, int], ...], float, float]
"""What a workload asks for, hashable: ``((flavor, count), ...), cpus, memory``."""


@dataclass(frozen=True)
class Flavor:
    """One kind of accelerator (Kueue's ResourceFlavor).

    A MIG slice is its own flavor (``nvidia-a100-mig-1g.10gb``) with
    ``parent`` naming the whole-GPU model it is cut from: slices and whole
    GPUs are never interchangeable, so they are admitted and charged apart.
    """

    name: str
    parent: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Node:
    """A machine in the pool: its CPUs, memory (GiB) and devices per flavor.

    Devices of a flavor are numbered ``0..count-1``; an admission names the
    indices it takes, as ``CUDA_VISIBLE_DEVICES`` or a Ray resource would.
    """

    name: str
    gpus: Mapping[str, int]
    cpus: float = 64.0
    memory: float = 512.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", dict(self.gpus))


@dataclass(frozen=True)
class Quota:
    """A queue's guaranteed share of one flavor, and how far it may go beyond.

    ``nominal`` devices are guaranteed: a queue waiting inside its nominal
    quota takes them back from borrowers (reclaim). ``borrowing_limit`` caps
    what it may borrow from its cohort on top (``None``: up to whatever the
    cohort has unused).
    """

    nominal: int
    borrowing_limit: int | None = None


@dataclass(frozen=True)
class Queue:
    """A group's queue (Kueue's ClusterQueue and LocalQueue in one).

    ``quotas`` lists the flavors the queue may use; a request for any other
    flavor is inadmissible. Queues with the same ``cohort`` lend each other
    unused nominal quota. ``strategy``: ``StrictFIFO`` (an inadmissible head
    blocks those behind it) or ``BestEffortFIFO`` (later workloads that fit
    may pass). ``priority_classes`` names priorities (``{"high": 100}``);
    ``preempt_within_queue`` lets a higher-priority workload evict lower ones
    of the same queue when the policy allows priority preemption.
    """

    name: str
    group: str
    quotas: Mapping[str, Quota]
    cohort: str | None = None
    strategy: Literal["StrictFIFO", "BestEffortFIFO"] = "BestEffortFIFO"
    priority_classes: Mapping[str, int] = field(default_factory=dict)
    preempt_within_queue: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "quotas", dict(self.quotas))
        object.__setattr__(self, "priority_classes", dict(self.priority_classes))

    def nominal(self, flavor: str) -> int:
        q = self.quotas.get(flavor)
        return q.nominal if q else 0


@dataclass(frozen=True)
class Workload:
    """One job's request: the unit of admission.

    ``gpus`` maps flavor to device count, all on one node. ``submitted_at``
    is kept across preemptions, so a requeued job keeps its place among its
    user's jobs; ``queued_at`` is set when it is requeued.
    ``checkpoint_interval`` (seconds, 0 = none) is what the simulator uses to
    model lost work; the policy only reads ``Running.checkpoint_at``.
    """

    id: str
    queue: str
    user: str
    gpus: Mapping[str, int]
    submitted_at: float
    cpus: float = 1.0
    memory: float = 0.0
    priority: int = 0
    checkpoint_interval: float = 0.0
    queued_at: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", {f: int(n) for f, n in self.gpus.items() if n})
        object.__setattr__(self, "_shape", (tuple(sorted(self.gpus.items())), self.cpus,
                                            self.memory))

    @property
    def enqueued(self) -> float:
        """When it last entered its queue: submission, or its requeue after preemption.

        The age boost counts from here (Kueue's eviction timestamp), so a
        preempted workload does not come back boosted and evict its preemptor.
        """
        return self.submitted_at if self.queued_at is None else self.queued_at

    @property
    def shape(self) -> Shape:
        return self._shape  # type: ignore[attr-defined,no-any-return]

    @property
    def gpu_count(self) -> int:
        return sum(self.gpus.values())


@dataclass(frozen=True)
class Running:
    """A workload holding devices on a node.

    ``checkpoint_at`` is when it last saved a checkpoint (its start if it
    never did): evicting it now loses ``now - checkpoint_at`` seconds on
    each of its devices. ``terminating`` is set once it was told to stop;
    its devices stay taken until it exits.
    """

    workload: Workload
    node: str
    devices: Mapping[str, tuple[int, ...]]
    started_at: float
    checkpoint_at: float
    terminating: bool = False

    def last_checkpoint(self, now: float) -> float:
        """The latest checkpoint at ``now``: the reported one, or the periodic one.

        A workload with ``checkpoint_interval`` saves every that many seconds
        after its start (the simulator's model); otherwise the caller keeps
        ``checkpoint_at`` current from the job's progress reports.
        """
        ci = self.workload.checkpoint_interval
        if ci > 0 and now > self.started_at:
            periodic = self.started_at + ((now - self.started_at) // ci) * ci
            return max(self.checkpoint_at, periodic)
        return self.checkpoint_at

    def lost_seconds(self, now: float) -> float:
        """Work lost if stopped at ``now``: seconds since the last checkpoint."""
        return max(0.0, now - self.last_checkpoint(now))

    def lost_gpu_seconds(self, now: float) -> float:
        return self.lost_seconds(now) * self.workload.gpu_count


@dataclass(frozen=True)
class Admit:
    """Start ``workload`` on ``node`` with these device indices per flavor."""

    workload: Workload
    node: str
    devices: Mapping[str, tuple[int, ...]]
    borrowing: bool = False


@dataclass(frozen=True)
class Preempt:
    """Stop ``workload`` (SIGTERM, checkpoint, requeue); ``reason`` says for whom and why."""

    workload: Workload
    reason: str
    kind: Literal["reclaim", "priority"] = "reclaim"
    for_job: str | None = None


Decision = Admit | Preempt


class EntryStatus(str, enum.Enum):
    """What happened to one pending workload the cycle looked at."""

    ADMITTED = "admitted"
    PREEMPTING = "preempting"  # victims told to stop; admitted when they have exited
    WAITING = "waiting"  # fits its quota, but no node has room now
    INADMISSIBLE = "inadmissible"  # quota or flavor says no


@dataclass(frozen=True)
class Entry:
    """A pending workload with its outcome of this cycle and a stable reason."""

    workload: Workload
    status: EntryStatus
    reason: str = ""
