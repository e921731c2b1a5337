"""The cycle and the snapshot: strategies, node changes, bad input."""

from __future__ import annotations

import pytest
from sched_builders import A100, T4, admitted, queue, snap, wl

from mlaas.errors import Conflict, NotFound, SpecError
from mlaas.platform.scheduler import (Admit, EntryStatus, Flavor, Node, PolicyConfig, Preempt,
                                      Queue, Quota, Snapshot, Workload, explain, policy,
                                      run_cycle, schedule)

STRATEGY = {
    "StrictFIFO: a head that does not fit blocks the queue": dict(strategy="StrictFIFO", want={}),
    "BestEffortFIFO: a later workload that fits may pass": dict(strategy="BestEffortFIFO",
                                                                want={"small": "n1"}),
}


@pytest.mark.parametrize("case", list(STRATEGY), ids=list(STRATEGY))
def test_queueing_strategy(case: str) -> None:
    c = STRATEGY[case]
    s = snap([Node("n1", {A100: 2})], [queue("a", None, strategy=c["strategy"], a100=8)],
             [wl("big", "a", t=0, a100=4), wl("small", "a", t=1, a100=1)])
    result = run_cycle(s, now=5.0, config=policy("quota"))
    assert admitted(result.decisions) == c["want"]
    big = {e.workload.id: e for e in result.entries}.get("big")
    if c["strategy"] == "StrictFIFO":
        assert big is not None and "blocks queue 'a'" in big.reason
    else:  # a shape that cannot start is skipped unexamined
        assert big is None


def test_schedule_returns_only_admit_and_preempt() -> None:
    s = snap([Node("n1", {A100: 2})], [queue("a", a100=2)], [wl("j", "a", a100=1)])
    decisions = schedule(s, now=1.0, config=policy("fair"))
    assert [type(d) for d in decisions] == [Admit]
    assert all(isinstance(d, (Admit, Preempt)) for d in decisions)


def test_a_node_leaving_releases_quota_and_returns_its_jobs() -> None:
    s = snap([Node("n1", {A100: 4}), Node("n2", {A100: 4})], [queue("a", a100=8)],
             running=[(wl("r1", "a", a100=3), "n1", 0.0), (wl("r2", "a", a100=1), "n2", 0.0)])
    lost = s.remove_node("n1")
    assert [r.workload.id for r in lost] == ["r1"]
    assert s.queues["a"].usage[A100] == 1 and s.capacity[A100] == 4 and s.free_total[A100] == 3
    s.add_pending(lost[0].workload)
    assert admitted(run_cycle(s, now=1.0, config=policy("fair")).decisions) == {"r1": "n2"}


def test_a_node_joining_lets_a_waiting_job_start() -> None:
    s = snap([Node("n1", {T4: 1})], [queue("a", a100=4, t4=1)], [wl("j", "a", a100=4)])
    assert run_cycle(s, now=1.0, config=policy("fair")).decisions == []
    s.add_node(Node("n2", {A100: 4}))
    assert admitted(run_cycle(s, now=2.0, config=policy("fair")).decisions) == {"j": "n2"}


def test_bad_input_names_what_is_wrong() -> None:
    s = snap([Node("n1", {A100: 2})], [queue("a", a100=2)], [wl("j", "a", a100=1)])
    with pytest.raises(SpecError, match="unknown queue 'nope'") as exc:
        s.add_pending(wl("x", "nope", a100=1))
    assert exc.value.field_path == "resources.queue"
    with pytest.raises(Conflict, match="'j' is already pending"):
        s.add_pending(wl("j", "a", a100=1))
    with pytest.raises(Conflict, match="not free on node 'n1'"):
        s.start("j", "n1", {A100: (7,)}, 0.0)
    with pytest.raises(NotFound, match="node 'gone'"):
        s.remove_node("gone")
    with pytest.raises(NotFound, match="'zzz' is not running"):
        s.stop("zzz", 0.0)
    with pytest.raises(Conflict, match="queue 'a' is already"):
        s.add_queue(queue("a", a100=1))
    with pytest.raises(Conflict, match="node 'n1' is already"):
        s.add_node(Node("n1", {A100: 1}))


POLICY_ERRORS = {
    "an unknown policy name": (lambda: policy("lottery"), "unknown policy 'lottery'"),
    "a half-life of zero": (lambda: PolicyConfig(half_life_s=0), "half_life_s"),
    "a negative age boost": (lambda: PolicyConfig(age_boost_s=-1), "age_boost_s"),
    "a scan limit of zero": (lambda: PolicyConfig(max_scan=0), "max_scan"),
}


@pytest.mark.parametrize("case", list(POLICY_ERRORS), ids=list(POLICY_ERRORS))
def test_policy_errors(case: str) -> None:
    fn, match = POLICY_ERRORS[case]
    with pytest.raises(SpecError, match=match):
        fn()


def test_a_backlog_that_cannot_start_costs_no_entries_but_can_be_explained() -> None:
    s = snap([Node("n1", {A100: 1})], [queue("a", None, a100=1)],
             running=[(wl("r", "a", a100=1), "n1", 0.0)],
             pending=[wl(f"j{i}", "a", f"u{i}", t=i, a100=1) for i in range(50)])
    result = run_cycle(s, now=1.0, config=policy("fair"))
    assert result.decisions == [] and result.entries == []
    entry = explain(s, "j7", config=policy("fair"))
    assert entry.status is EntryStatus.INADMISSIBLE and "nominal quota 1" in entry.reason
    with pytest.raises(NotFound, match="'r' is not pending"):
        explain(s, "r", config=policy("fair"))


def test_known_flavors_refuse_a_typo_with_a_hint() -> None:
    flavors = [Flavor(A100), Flavor("nvidia-a100-mig-1g.10gb", parent=A100), Flavor(T4)]
    s = Snapshot([Node("n1", {A100: 2})], [queue("a", a100=2)], flavors=flavors)
    with pytest.raises(SpecError, match="unknown flavor 'nvidia-a10'; did you mean 'nvidia-a100'") as exc:
        s.add_node(Node("n2", {"nvidia-a10": 1}))
    assert exc.value.field_path == "nodes.n2.gpus"
    with pytest.raises(SpecError, match="queue 'b' names unknown flavor"):
        s.add_queue(Queue("b", "b", {"nvidia-t5": Quota(1)}))
    with pytest.raises(SpecError, match="workload 'x' names unknown flavor") as exc:
        s.add_pending(Workload("x", "a", "u", {"h100": 1}, 0.0))
    assert exc.value.field_path == "resources.gpus"
