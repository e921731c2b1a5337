"""Decayed usage accounting, as HTCondor's user priorities.

Layer: platform, pure policy. A user's usage is the GPU-seconds they used,
each second weighted by ``2 ** (-age / half_life)``: yesterday's burst counts
half as much with a one-day half-life, last week's almost nothing. Fair share
orders users by this number, lowest first.

The ledger keeps, per key, the decayed value at one instant and the number of
devices held since then, so reading the value at any later time is O(1)::

    value(now) = v * d + rate * h/ln2 * (1 - d),   d = 2 ** (-(now - t0) / h)

(the second term is the integral of a constant rate under the decay). Times
come from the caller; the ledger never reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["DecayedUsage"]


class DecayedUsage:
    """GPU-seconds per key (user or group), decayed with a half-life."""

    __slots__ = ("half_life", "_state")

    def __init__(self, half_life: float) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 seconds, got {half_life!r}")
        self.half_life = float(half_life)
        self._state: dict[str, tuple[float, float, float]] = {}  # key -> (value, at, rate)

    def _decay(self, dt: float) -> float:
        return 2.0 ** (-max(0.0, dt) / self.half_life)

    def value(self, key: str, now: float) -> float:
        """Decayed GPU-seconds of ``key`` at ``now`` (0 for a key never seen)."""
        st = self._state.get(key)
        if st is None:
            return 0.0
        v, at, rate = st
        d = self._decay(now - at)
        return v * d + (rate * self.half_life / math.log(2) * (1.0 - d) if rate else 0.0)

    def rate(self, key: str) -> float:
        st = self._state.get(key)
        return st[2] if st else 0.0

    def add_rate(self, key: str, delta: float, now: float) -> None:
        """Devices held by ``key`` change by ``delta`` at ``now`` (a start or a stop)."""
        v = self.value(key, now)
        self._state[key] = (v, now, max(0.0, self.rate(key) + delta))

    def charge(self, key: str, gpu_seconds: float, now: float) -> None:
        """Add usage at once (for history loaded from accounting records)."""
        v = self.value(key, now)
        self._state[key] = (v + gpu_seconds, now, self.rate(key))

    def snapshot(self, now: float, keys: Iterable[str] | None = None) -> Mapping[str, float]:
        """Values at ``now`` for ``keys`` (default: every key seen)."""
        return {k: self.value(k, now) for k in (self._state if keys is None else keys)}
