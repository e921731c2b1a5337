"""Ordering: priority, fair share with decayed usage, age boost, and across queues."""

from __future__ import annotations

import math

import pytest
from sched_builders import A100, admitted, queue, snap, wl

from mlaas.platform.scheduler import DecayedUsage, Node, policy, run_cycle

HOUR = 3_600.0


def first_admitted(case: dict, config_name: str = "fair") -> list[str]:
    s = snap(case["nodes"], case["queues"], case["pending"], case.get("running", []),
             half_life=case.get("half_life", 86_400.0))
    for user, gpu_s, at in case.get("usage", []):
        s.usage.charge(user, gpu_s, at)
    result = run_cycle(s, now=case.get("now", 10.0), config=policy(config_name))
    return sorted(admitted(result.decisions))


ONE_FREE = [Node("n1", {A100: 1})]

CASES = {
    "a higher priority goes before an earlier submission": dict(
        nodes=ONE_FREE, queues=[queue("a", a100=4)],
        pending=[wl("low", "a", "u1", t=0, a100=1), wl("high", "a", "u2", t=5, prio=100, a100=1)],
        want=["high"]),
    "the user with less decayed usage goes first": dict(
        nodes=ONE_FREE, queues=[queue("a", a100=4)],
        usage=[("heavy", 100 * HOUR, 0.0)],
        pending=[wl("h1", "a", "heavy", t=0, a100=1), wl("l1", "a", "light", t=5, a100=1)],
        want=["l1"]),
    "old usage counts less than recent usage (half-life)": dict(
        nodes=ONE_FREE, queues=[queue("a", a100=4)], half_life=HOUR, now=4 * HOUR,
        usage=[("old", 100 * HOUR, 0.0), ("recent", 20 * HOUR, 4 * HOUR - 1)],
        pending=[wl("r1", "a", "recent", t=0, a100=1), wl("o1", "a", "old", t=5, a100=1)],
        want=["o1"]),
    "a workload waiting past the age boost goes before a lighter user's": dict(
        nodes=ONE_FREE, queues=[queue("a", a100=4)], now=7 * HOUR,
        usage=[("heavy", 1000 * HOUR, 0.0)],
        pending=[wl("old", "a", "heavy", t=0, a100=1),
                 wl("new", "a", "light", t=7 * HOUR - 60, a100=1)],
        want=["old"]),
    "users alternate when several devices free at once": dict(
        nodes=[Node("n1", {A100: 4})], queues=[queue("a", a100=4)],
        pending=[wl(f"u1-{i}", "a", "u1", t=i, a100=1) for i in range(4)]
        + [wl(f"u2-{i}", "a", "u2", t=10 + i, a100=1) for i in range(4)],
        want=["u1-0", "u1-1", "u2-0", "u2-1"]),
    "a request inside its nominal quota goes before a borrowing one": dict(
        nodes=[Node("n1", {A100: 4})], queues=[queue("a", a100=2), queue("b", a100=2)],
        running=[(wl("ra", "a", a100=3), "n1", 0.0)],
        pending=[wl("borrow", "a", t=0, a100=1), wl("guaranteed", "b", t=9, a100=1)],
        want=["guaranteed"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fair_ordering(case: str) -> None:
    assert first_admitted(CASES[case]) == CASES[case]["want"]


def test_quota_policy_ignores_usage_and_age() -> None:
    case = dict(CASES["the user with less decayed usage goes first"])
    assert first_admitted(case, "quota") == ["h1"]
    case = dict(CASES["users alternate when several devices free at once"])
    assert first_admitted(case, "quota") == ["u1-0", "u1-1", "u1-2", "u1-3"]


def test_fifo_is_one_line_over_all_queues() -> None:
    case = dict(nodes=ONE_FREE, queues=[queue("a", a100=1), queue("b", a100=1)],
                pending=[wl("b-late", "b", t=5, prio=100, a100=1), wl("a-early", "a", t=1, a100=1)])
    assert first_admitted(case, "fifo") == ["a-early"]
    # fair: both queues at the same share of their quota, so priority decides
    assert first_admitted(case, "fair") == ["b-late"]


USAGE = {
    "a charge halves after one half-life": (lambda u: (u.charge("x", 100.0, 0.0), u.value("x", 10.0))[1], 50.0),
    "and quarters after two": (lambda u: (u.charge("x", 100.0, 0.0), u.value("x", 20.0))[1], 25.0),
    "one device held for a half-life accrues h/ln2 * (1 - 1/2)": (
        lambda u: (u.add_rate("x", 1, 0.0), u.value("x", 10.0))[1], 10 / math.log(2) * 0.5),
    "a stop freezes the accrual, which then decays": (
        lambda u: (u.add_rate("x", 1, 0.0), u.add_rate("x", -1, 10.0), u.value("x", 20.0))[2],
        10 / math.log(2) * 0.5 * 0.5),
    "an unknown key has no usage": (lambda u: u.value("nobody", 5.0), 0.0),
}


@pytest.mark.parametrize("case", list(USAGE), ids=list(USAGE))
def test_decayed_usage(case: str) -> None:
    fn, want = USAGE[case]
    assert fn(DecayedUsage(half_life=10.0)) == pytest.approx(want)


def test_decayed_usage_rejects_a_bad_half_life() -> None:
    with pytest.raises(ValueError, match="half_life"):
        DecayedUsage(0)
