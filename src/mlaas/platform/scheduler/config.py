"""Policy knobs, and the three named policies the simulator compares.

Layer: platform, pure policy. One frozen dataclass so a cycle's behaviour is
fully given by ``(snapshot, now, config)``:

- ``fair`` (ours): quotas and cohort borrowing, fair share among users with
  decayed usage, an age boost, queues served lowest share first, reclaim of
  borrowed quota and priority preemption where a queue allows it.
- ``quota``: Kueue without fair sharing, as the AI_INFN farm runs it: nominal
  quotas and cohort borrowing, each queue BestEffortFIFO/StrictFIFO by
  priority then submission time, no reclaim, no priority preemption.
- ``fifo``: one first-come first-served line over all queues, quotas ignored
  (later jobs that fit may start: best-effort backfill), no preemption.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mlaas.errors import SpecError

__all__ = ["PolicyConfig", "POLICIES", "policy"]


@dataclass(frozen=True)
class PolicyConfig:
    """How a cycle decides.

    Attributes:
        name: ``fifo``, ``quota`` or ``fair`` (or any label for a custom mix).
        quotas: enforce nominal quotas and borrowing limits.
        global_fifo: order all queues as one line by submission time.
        fair_share: order users inside a queue by decayed usage.
        half_life_s: half-life of the usage decay (HTCondor's
            ``PRIORITY_HALFLIFE``, default one day).
        fair_share_charge_s: GPU-seconds charged per device a user holds or
            is given in this cycle, so users alternate when devices free up at
            once rather than the least-used user taking them all.
        age_boost_s: a job pending longer than this goes first (``None``: never).
        queue_share_order: offer candidates from the queue using least of its
            nominal quota first (Kueue fair sharing); otherwise Kueue's
            classic order (not borrowing first, then priority, then time).
        reclaim: a queue waiting inside its nominal quota evicts borrowers.
        priority_preemption: higher priority evicts lower in the same queue
            (only in queues with ``preempt_within_queue``).
        max_scan: at most this many pending entries looked at per queue per
            cycle, so one cycle stays cheap under a long backlog.
    """

    name: str = "fair"
    quotas: bool = True
    global_fifo: bool = False
    fair_share: bool = True
    half_life_s: float = 86_400.0
    fair_share_charge_s: float = 3_600.0
    age_boost_s: float | None = 6 * 3_600.0
    queue_share_order: bool = True
    reclaim: bool = True
    priority_preemption: bool = True
    max_scan: int = 2_000

    def __post_init__(self) -> None:
        if self.half_life_s <= 0:
            raise SpecError(f"policy half_life_s must be > 0, got {self.half_life_s!r}",
                            field_path="policy.half_life_s")
        if self.age_boost_s is not None and self.age_boost_s < 0:
            raise SpecError(f"policy age_boost_s must be >= 0, got {self.age_boost_s!r}",
                            field_path="policy.age_boost_s")
        if self.max_scan < 1:
            raise SpecError(f"policy max_scan must be >= 1, got {self.max_scan!r}",
                            field_path="policy.max_scan")

    def with_(self, **changes: Any) -> PolicyConfig:
        return replace(self, **changes)


POLICIES: dict[str, PolicyConfig] = {
    "fair": PolicyConfig(),
    "quota": PolicyConfig(name="quota", fair_share=False, age_boost_s=None,
                          queue_share_order=False, reclaim=False, priority_preemption=False),
    "fifo": PolicyConfig(name="fifo", quotas=False, global_fifo=True, fair_share=False,
                         age_boost_s=None, queue_share_order=False, reclaim=False,
                         priority_preemption=False),
}


def policy(name: str, **changes: Any) -> PolicyConfig:
    """The named policy, with optional overrides; unknown names raise naming the choices."""
    try:
        base = POLICIES[name]
    except KeyError:
        raise SpecError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}",
                        field_path="policy") from None
    return base.with_(**changes) if changes else base
