"""Per-principal rate limits: one token bucket per key.

Layer: platform. A bucket holds at most ``burst`` tokens and refills at
``rate_per_s``; each request takes ``cost`` tokens or is refused with
:class:`mlaas.errors.RateLimited`, whose ``retry_after`` is the whole number
of seconds until enough tokens are back (what the HTTP ``Retry-After``
header wants). Routes call :meth:`RateLimiter.check` with the principal's
user id, one limiter per kind of request (inference, submission), so a
burst of predictions does not block job submission.

The clock is injected (monotonic seconds); tests drive a fake clock instead
of sleeping. In-memory and per process: with several server processes each
has its own buckets, which multiplies the limit by the process count.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from mlaas.errors import ConfigError, RateLimited

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token buckets keyed by principal, safe to share between request threads.

    Args:
        rate_per_s (float): tokens added per second (the sustained rate).
        burst (float): bucket size (how many requests may come at once).
        name (str): what is limited, for messages (``inference``, ``submission``).
        clock (callable): monotonic seconds.
        max_keys (int): buckets kept before full (idle) ones are dropped; a
            full bucket is the same as no bucket, so dropping it changes nothing.
    """

    def __init__(self, rate_per_s: float, burst: float, *, name: str = "requests",
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ConfigError(f"{name} rate limit must be a positive number of requests per "
                              f"second, got {rate_per_s!r}",
                              field_path="auth.rate_limit_per_minute")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ConfigError(f"{name} burst must be at least 1, got {burst!r}",
                              field_path="auth.rate_limit_burst")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.name = name
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    @classmethod
    def per_minute(cls, limit: int | None, *, name: str = "requests",
                   clock: Callable[[], float] = time.monotonic) -> RateLimiter | None:
        """``limit`` requests per minute, all of which may come at once.

        For the ``auth.rate_limit_per_minute`` setting: None (left empty)
        means no limiter at all.
        """
        if limit is None:
            return None
        return cls(rate_per_s=limit / 60.0, burst=limit, name=name, clock=clock)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate_per_s)

    def check(self, key: str, cost: float = 1.0) -> None:
        """Take ``cost`` tokens from ``key``'s bucket or raise RateLimited."""
        if cost > self.burst:
            raise ConfigError(f"a {self.name} request costing {cost} can never fit a burst of "
                              f"{self.burst}", field_path="auth.rate_limit_burst")
        with self._lock:
            now = self._clock()
            level = self._level(key, now)
            if level < cost:
                wait = (cost - level) / self.rate_per_s
                self._buckets[key] = (level, now)
                raise RateLimited(
                    f"too many {self.name} for {key!r}: limit {self.rate_per_s:g}/s, "
                    f"burst {self.burst:g}; retry in {math.ceil(wait)} s",
                    retry_after=max(1, math.ceil(wait)))
            self._buckets[key] = (level - cost, now)
            if len(self._buckets) > self._max_keys:
                self._prune(now)

    def remaining(self, key: str) -> float:
        """Tokens ``key`` could spend right now (for headers and tests)."""
        with self._lock:
            return self._level(key, self._clock())

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._level(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]
