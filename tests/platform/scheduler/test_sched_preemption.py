"""Preemption: reclaim of borrowed quota with the least work lost, priority within a queue."""

from __future__ import annotations

import pytest
from sched_builders import A100, admitted, preempted, queue, snap, wl

from mlaas.platform.scheduler import EntryStatus, Node, Preempt, policy, run_cycle

NOW = 1_000.0


def borrowing_b(extra_pending: list, *, a_running: int = 1, b_running: int = 5,
                checkpoints: dict[str, float] | None = None, config: str = "fair") -> tuple:
    """Node of 8 A100; queues a and b with nominal 4 each; b runs 1-GPU jobs b0..bN."""
    running = ([(wl(f"a{i}", "a", a100=1), "n1", 0.0) for i in range(a_running)]
               + [(wl(f"b{i}", "b", a100=1), "n1", float(i)) for i in range(b_running)])
    s = snap([Node("n1", {A100: 8})], [queue("a", a100=4), queue("b", a100=4)],
             extra_pending, running)
    for jid, at in (checkpoints or {}).items():
        s.update_checkpoint(jid, at)
    return s, run_cycle(s, now=NOW, config=policy(config))


CASES = {
    "reclaim stops the borrower's job that loses the least work": dict(
        pending=[wl("want", "a", a100=3)], b_running=5,
        checkpoints={"b0": 100.0, "b1": 900.0, "b2": 500.0, "b3": 200.0, "b4": 300.0},
        want_preempted=["b1"], want_admitted=[]),
    "reclaim takes only what was borrowed": dict(
        pending=[wl("want", "a", a100=3)], a_running=1, b_running=5,
        checkpoints={"b0": 999.0, "b1": 999.0, "b2": 999.0, "b3": 999.0, "b4": 998.0},
        want_preempted=["b3"], want_admitted=[]),  # one victim; ties: the latest started
    "no preemption when the waiting request is beyond its nominal quota": dict(
        pending=[wl("want", "a", a100=4)], a_running=1, b_running=5,
        want_preempted=[], want_admitted=[]),
    "no preemption when no queue borrows": dict(
        pending=[wl("want", "a", a100=1)], a_running=4, b_running=4,
        want_preempted=[], want_admitted=[]),
    "the quota-only policy never reclaims": dict(
        pending=[wl("want", "a", a100=3)], b_running=5, config="quota",
        want_preempted=[], want_admitted=[]),
    "free room is used before anyone is stopped": dict(
        pending=[wl("want", "a", a100=2)], b_running=5,
        want_preempted=[], want_admitted=["want"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reclaim(case: str) -> None:
    c = CASES[case]
    s, result = borrowing_b(c["pending"], a_running=c.get("a_running", 1),
                            b_running=c.get("b_running", 5),
                            checkpoints=c.get("checkpoints"), config=c.get("config", "fair"))
    assert preempted(result.decisions) == c["want_preempted"]
    assert sorted(admitted(result.decisions)) == c["want_admitted"]
    for d in result.decisions:
        if isinstance(d, Preempt):
            assert d.kind == "reclaim" and d.for_job == "want" and "'a'" in d.reason


def test_reclaim_waits_for_its_victims_and_then_admits_the_preemptor_first() -> None:
    s, result = borrowing_b([wl("want", "a", a100=3)], checkpoints={"b4": 999.0})
    assert preempted(result.decisions) == ["b4"]
    s.mark_terminating("b4")
    again = run_cycle(s, now=NOW + 10, config=policy("fair"))
    assert again.decisions == []  # no second victim while the first one exits
    entry = {e.workload.id: e for e in again.entries}["want"]
    assert entry.status is EntryStatus.PREEMPTING and "waiting" in entry.reason
    # the victim exits and is requeued; the preemptor, inside nominal quota, goes first
    s.stop("b4", NOW + 30)
    s.add_pending(wl("b4", "b", a100=1))
    third = run_cycle(s, now=NOW + 30, config=policy("fair"))
    assert admitted(third.decisions) == {"want": "n1"}


def test_victims_with_periodic_checkpoints_lose_the_time_since_the_last_one() -> None:
    running = [(wl("b0", "b", ci=300.0, a100=1), "n1", 0.0),   # last checkpoint 900: loses 100
               (wl("b1", "b", ci=400.0, a100=1), "n1", 0.0),   # last checkpoint 800: loses 200
               (wl("b2", "b", ci=0.0, a100=1), "n1", 950.0)]   # started at 950: loses 50
    s = snap([Node("n1", {A100: 3})], [queue("a", a100=2), queue("b", a100=1)],
             [wl("want", "a", a100=1)], running)
    result = run_cycle(s, now=NOW, config=policy("fair"))
    assert preempted(result.decisions) == ["b2"]
    assert s.running["b1"].lost_seconds(NOW) == 200.0


PRIORITY = {
    "a high-priority workload evicts the cheapest lower-priority one of its queue": dict(
        allow=True, want=["low1"]),
    "without preempt_within_queue nothing is evicted": dict(allow=False, want=[]),
}


@pytest.mark.parametrize("case", list(PRIORITY), ids=list(PRIORITY))
def test_priority_preemption(case: str) -> None:
    c = PRIORITY[case]
    running = [(wl("low0", "a", a100=1), "n1", 0.0), (wl("low1", "a", a100=1), "n1", 990.0)]
    s = snap([Node("n1", {A100: 2})], [queue("a", None, preempt_within_queue=c["allow"], a100=2)],
             [wl("urgent", "a", prio=100, a100=1)], running)
    result = run_cycle(s, now=NOW, config=policy("fair"))
    assert preempted(result.decisions) == c["want"]
    assert all(d.kind == "priority" for d in result.decisions if isinstance(d, Preempt))


def test_equal_priority_never_evicts() -> None:
    running = [(wl("r0", "a", a100=1), "n1", 0.0)]
    s = snap([Node("n1", {A100: 1})], [queue("a", None, preempt_within_queue=True, a100=1)],
             [wl("same", "a", a100=1)], running)
    assert run_cycle(s, now=NOW, config=policy("fair")).decisions == []
