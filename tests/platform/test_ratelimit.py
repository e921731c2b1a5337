"""Per-principal token buckets, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import threading

import pytest

from mlaas.errors import ConfigError, RateLimited
from mlaas.platform.auth.ratelimit import RateLimiter


class FakeClock:
    """Monotonic seconds that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refused_with_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=0.5, burst=3, name="inference", clock=clock)
    for _ in range(3):
        limiter.check("alice")
    with pytest.raises(RateLimited, match="too many inference for 'alice'") as info:
        limiter.check("alice")
    assert info.value.retry_after == 2  # one token at 0.5/s
    assert info.value.to_dict()["retry_after"] == 2


def test_refill_at_the_configured_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=2, burst=2, clock=clock)
    limiter.check("a")
    limiter.check("a")
    clock.now += 0.25  # half a token back
    with pytest.raises(RateLimited) as info:
        limiter.check("a")
    assert info.value.retry_after == 1  # 0.25 s rounds up to a whole second
    clock.now += 0.25
    limiter.check("a")
    clock.now += 100  # refills to the burst, never beyond
    assert limiter.remaining("a") == 2
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(RateLimited):
        limiter.check("a")


def test_refused_requests_do_not_consume() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1, burst=1, clock=clock)
    limiter.check("a")
    for _ in range(10):
        with pytest.raises(RateLimited):
            limiter.check("a")
    clock.now += 1
    limiter.check("a")


def test_buckets_are_per_principal() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1, burst=1, clock=clock)
    limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")
    limiter.check("bob")


def test_cost_larger_than_one() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1, burst=10, clock=clock)
    limiter.check("a", cost=8)
    with pytest.raises(RateLimited) as info:
        limiter.check("a", cost=5)
    assert info.value.retry_after == 3
    with pytest.raises(ConfigError, match="never fit"):
        limiter.check("a", cost=11)


def test_thread_safe_exactly_burst_requests_pass() -> None:
    clock = FakeClock()  # frozen: no refill while the threads race
    limiter = RateLimiter(rate_per_s=1, burst=100, clock=clock)
    passed: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(50):
            try:
                limiter.check("shared")
            except RateLimited:
                continue
            with lock:
                passed.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(passed) == 100


def test_idle_full_buckets_are_pruned_without_changing_answers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=1, burst=2, clock=clock, max_keys=10)
    for i in range(10):
        limiter.check(f"user{i}")
    clock.now += 10  # every one of them is full again
    limiter.check("busy")
    limiter.check("busy")  # busy is empty now; the 11th key triggers the pruning
    assert set(limiter._buckets) == {"busy"}
    with pytest.raises(RateLimited):  # the bucket that was not full is kept
        limiter.check("busy")
    assert limiter.remaining("user3") == 2


def test_per_minute_from_the_setting() -> None:
    clock = FakeClock()
    assert RateLimiter.per_minute(None) is None
    limiter = RateLimiter.per_minute(6, name="submissions", clock=clock)
    assert limiter is not None
    for _ in range(6):
        limiter.check("alice")
    with pytest.raises(RateLimited, match="submissions") as info:
        limiter.check("alice")
    assert info.value.retry_after == 10  # one more every 10 s
    with pytest.raises(ConfigError):
        RateLimiter.per_minute(0)


@pytest.mark.parametrize("rate, burst, match", [
    (0, 1, "positive"), (-1, 1, "positive"), (float("inf"), 1, "positive"),
    (float("nan"), 1, "positive"), (1, 0, "at least 1"), (1, float("inf"), "at least 1"),
])
def test_bad_configuration(rate: float, burst: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RateLimiter(rate_per_s=rate, burst=burst)
