"""Fluent-ish builders for scheduler tests (Kueue's test wrappers, in small)."""

from __future__ import annotations

from mlaas.platform.scheduler import Node, Queue, Quota, Snapshot, Workload

A100 = "nvidia-a100"
MIG = "nvidia-a100-mig-1g.10gb"
T4 = "nvidia-t4"


def queue(name: str, cohort: str | None = "farm", *, strategy: str = "BestEffortFIFO",
          preempt_within_queue: bool = False, **quotas: tuple[int, int | None] | int) -> Queue:
    """``queue("a", a100=(4, 2))``: nominal 4, borrowing limit 2; ``a100=4``: no limit."""
    names = {"a100": A100, "mig": MIG, "t4": T4}
    qs = {}
    for key, val in quotas.items():
        nominal, limit = val if isinstance(val, tuple) else (val, None)
        qs[names[key]] = Quota(nominal, limit)
    return Queue(name, name, qs, cohort=cohort, strategy=strategy,  # type: ignore[arg-type]
                 preempt_within_queue=preempt_within_queue)


def wl(id: str, q: str, user: str = "u", *, t: float = 0.0, prio: int = 0, cpus: float = 1.0,
       memory: float = 0.0, ci: float = 0.0, **gpus: int) -> Workload:
    names = {"a100": A100, "mig": MIG, "t4": T4}
    return Workload(id, q, user, {names[k]: v for k, v in gpus.items()}, submitted_at=t,
                    cpus=cpus, memory=memory, priority=prio, checkpoint_interval=ci)


def snap(nodes: list[Node], queues: list[Queue], pending: list[Workload] = (),  # type: ignore[assignment]
         running: list[tuple[Workload, str, float]] = (),  # type: ignore[assignment]
         half_life: float = 86_400.0) -> Snapshot:
    """A snapshot; ``running`` entries ``(workload, node, started_at)`` take the lowest devices."""
    s = Snapshot(nodes, queues, half_life=half_life)
    for w, node, started in running:
        s.add_pending(w)
        free = s.nodes[node].free
        s.start(w.id, node, {f: tuple(free[f][:n]) for f, n in w.gpus.items()}, started)
    for w in pending:
        s.add_pending(w)
    return s


def admitted(decisions: list) -> dict[str, str]:
    """``{job: node}`` of the Admit decisions."""
    from mlaas.platform.scheduler import Admit

    return {d.workload.id: d.node for d in decisions if isinstance(d, Admit)}


def preempted(decisions: list) -> list[str]:
    from mlaas.platform.scheduler import Preempt

    return sorted(d.workload.id for d in decisions if isinstance(d, Preempt))
