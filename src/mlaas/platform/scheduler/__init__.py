"""The scheduling policy of the GPU farm: pure, in Kueue's vocabulary.

Layer: platform. A cycle takes a :class:`Snapshot` (nodes and what is free,
queues with quotas and cohorts, pending and running workloads, users'
decayed usage) and returns decisions (:class:`Admit`, :class:`Preempt`).
No I/O, no processes, no database, no clock: the manager and the farm
simulator (:mod:`mlaas.platform.simulate`) drive the same code.

Modules, one job each:

- :mod:`.model`       flavors, nodes, queues, workloads, decisions, entry outcomes
- :mod:`.config`      policy knobs and the named policies ``fifo``, ``quota``, ``fair``
- :mod:`.usage`       decayed usage accounting (HTCondor-style half-life)
- :mod:`.snapshot`    the state a cycle reads, updated incrementally
- :mod:`.admission`   quota and cohort borrowing, node fit with best-fit packing
- :mod:`.ordering`    priority, fair share, age boost, submission time
- :mod:`.preemption`  reclaim and priority preemption, least work lost
- :mod:`.cycle`       :func:`schedule`: the cycle in numbered steps
"""

from .config import POLICIES, PolicyConfig, policy
from .cycle import CycleResult, explain, run_cycle, schedule
from .model import (Admit, Decision, Entry, EntryStatus, Flavor, Node, Preempt, Queue, Quota,
                    Running, Workload)
from .snapshot import Snapshot
from .usage import DecayedUsage

__all__ = [
    "Admit", "CycleResult", "DecayedUsage", "Decision", "Entry", "EntryStatus", "Flavor",
    "Node", "POLICIES", "PolicyConfig", "Preempt", "Queue", "Quota", "Running", "Snapshot",
    "Workload", "explain", "policy", "run_cycle", "schedule",
]
