"""The farm simulator: the pure scheduling policy on a synthetic GPU farm.

Layer: platform. A discrete-event simulation in virtual seconds: jobs arrive
(steadily and in bursts), run for log-normal durations, checkpoint every so
often, finish; nodes fail and come back, elastic nodes join and leave;
preempted jobs get a grace period to exit and are requeued, resuming from
their last checkpoint (the work since then is lost). After the events of
one instant the scheduling cycle runs on ONE snapshot kept up to date
incrementally (:class:`mlaas.platform.scheduler.Snapshot`), exactly the code
the manager calls, and its decisions are applied.

Metrics (docs/scheduler.md defines each precisely):

- ``utilisation``: busy GPU-time / the work-conserving ideal, the integral of
  ``min(capacity, demand)`` per flavor (demand: devices asked for by jobs
  submitted and not finished).
- ``jain_fairness``: Jain's index over groups of ``x_g = received / fair``,
  where ``fair`` integrates, per flavor and instant, the weighted max-min
  fair share (weights: nominal quotas) of the capacity given each group's
  demand.
- ``wait_p50_s`` / ``wait_p95_s``: submission to first start, all jobs and per group.
- ``quota_violations``: admissions that put a queue above nominal + borrowing
  limit, plus episodes where a queue had a request fitting its unused
  nominal quota pending for longer than ``reclaim_window_s`` while other
  queues of its cohort borrowed every flavor it asked for, enough (with the
  free devices) to cover it.
- ``preemptions``, ``lost_gpu_hours`` (preemption and failure), ``sim_seconds``.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlaas.errors import SpecError

from .scheduler import (Admit, Node, PolicyConfig, Preempt, Queue, Quota, Snapshot, Workload,
                        policy, run_cycle)

__all__ = ["Scenario", "load_scenario", "simulate", "SimResult", "default_scenario"]


# -- scenario ----------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Window(_Model):
    """A time window ``[from_s, to_s)`` during which a node pool is absent."""

    from_s: float = Field(ge=0)
    to_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _order(self) -> Window:
        if self.to_s <= self.from_s:
            raise ValueError(f"to_s ({self.to_s}) must be after from_s ({self.from_s})")
        return self


class NodePool(_Model):
    """``count`` identical nodes named ``{name}-{i}``."""

    name: str = Field(min_length=1)
    count: int = Field(ge=1)
    gpus: dict[str, int]
    cpus: float = Field(default=64.0, gt=0)
    memory: float = Field(default=512.0, gt=0)
    absent: list[Window] = []


class QuotaSpec(_Model):
    nominal: int = Field(ge=0)
    borrowing_limit: int | None = Field(default=None, ge=0)


class GroupSpec(_Model):
    """A group: its queue (same name), users, quotas, and its share of the jobs."""

    name: str = Field(min_length=1)
    users: int = Field(default=8, ge=1)
    quotas: dict[str, QuotaSpec]
    cohort: str | None = "farm"
    strategy: Literal["StrictFIFO", "BestEffortFIFO"] = "BestEffortFIFO"
    preempt_within_queue: bool = False
    load: float = Field(default=1.0, gt=0)


class FlavorMix(_Model):
    """How often jobs ask for this flavor, and how many devices (count -> probability)."""

    weight: float = Field(gt=0)
    gpus: dict[int, float] = {1: 1.0}

    @model_validator(mode="after")
    def _counts(self) -> FlavorMix:
        if any(k < 1 for k in self.gpus) or any(p <= 0 for p in self.gpus.values()):
            raise ValueError("gpus maps a device count >= 1 to a probability > 0")
        return self


class JobsSpec(_Model):
    count: int = Field(default=10_000, ge=1)
    span_s: float = Field(default=7 * 86_400.0, gt=0)
    duration_median_s: float = Field(default=2_400.0, gt=0)
    duration_sigma: float = Field(default=1.0, ge=0)
    max_duration_s: float = Field(default=86_400.0, gt=0)
    burst_fraction: float = Field(default=0.5, ge=0, le=1)
    burst_size_mean: float = Field(default=40.0, ge=1)
    burst_spread_s: float = Field(default=120.0, ge=0)
    flavors: dict[str, FlavorMix] = {
        "nvidia-a100": FlavorMix(weight=0.34, gpus={1: 0.5, 2: 0.25, 4: 0.25}),
        "nvidia-a100-mig-1g.10gb": FlavorMix(weight=0.40, gpus={1: 1.0}),
        "nvidia-t4": FlavorMix(weight=0.26, gpus={1: 0.7, 2: 0.3}),
    }
    checkpoint_intervals_s: list[float] = [600.0, 1_200.0, 1_800.0, 3_600.0]
    high_priority_fraction: float = Field(default=0.05, ge=0, le=1)
    high_priority: int = 100
    cpus_per_gpu: float = Field(default=4.0, ge=0)
    memory_per_gpu: float = Field(default=16.0, ge=0)


class FailureSpec(_Model):
    """Random node failures: exponential time between failures per node, fixed repair time."""

    mtbf_s: float | None = Field(default=10 * 86_400.0, gt=0)
    repair_s: float = Field(default=4 * 3_600.0, gt=0)


def _default_nodes() -> list[NodePool]:
    return [
        NodePool(name="a100", count=6, gpus={"nvidia-a100": 8}, cpus=128, memory=1024,
                 absent=[Window(from_s=3 * 86_400, to_s=3 * 86_400 + 6 * 3_600)]),
        NodePool(name="mig", count=2, gpus={"nvidia-a100-mig-1g.10gb": 14}, cpus=64, memory=512),
        NodePool(name="t4", count=4, gpus={"nvidia-t4": 4}, cpus=32, memory=256),
        NodePool(name="t4-cloud", count=2, gpus={"nvidia-t4": 4}, cpus=32, memory=256,
                 absent=[Window(from_s=0, to_s=86_400)]),
    ]


def _default_groups() -> list[GroupSpec]:
    loads = [2.0, 1.5, 1.0, 0.8, 0.4, 0.3]
    mig = [5, 5, 5, 5, 4, 4]
    return [GroupSpec(
        name=f"g{i}", users=8, load=loads[i], preempt_within_queue=i < 2,
        quotas={"nvidia-a100": QuotaSpec(nominal=8, borrowing_limit=32),
                "nvidia-a100-mig-1g.10gb": QuotaSpec(nominal=mig[i], borrowing_limit=18),
                "nvidia-t4": QuotaSpec(nominal=4, borrowing_limit=16)})
        for i in range(6)]


class Scenario(_Model):
    """A synthetic farm and workload; the defaults are the default scenario."""

    seed: int = 0
    nodes: list[NodePool] = Field(default_factory=_default_nodes, min_length=1)
    groups: list[GroupSpec] = Field(default_factory=_default_groups, min_length=1)
    jobs: JobsSpec = JobsSpec()
    failures: FailureSpec = FailureSpec()
    preemption_grace_s: float = Field(default=30.0, ge=0)
    reclaim_window_s: float = Field(default=900.0, gt=0)
    sample_s: float = Field(default=1_800.0, gt=0)
    policy: dict[str, float | int | None] = {}
    max_time_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        offered = {f for pool in self.nodes for f in pool.gpus}
        for f in self.jobs.flavors:
            if f not in offered:
                raise ValueError(f"jobs.flavors names {f!r}, which no node pool offers "
                                 f"(offered: {sorted(offered)})")
        for g in self.groups:
            for f in g.quotas:
                if f not in offered:
                    raise ValueError(f"groups[{g.name}].quotas names {f!r}, which no node pool "
                                     f"offers (offered: {sorted(offered)})")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        pools = [p.name for p in self.nodes]
        if len(set(pools)) != len(pools):
            raise ValueError(f"node pool names must be unique, got {pools}")
        allowed = set(PolicyConfig.__dataclass_fields__) - {"name", "quotas", "global_fifo"}
        for key in self.policy:
            if key not in allowed:
                raise ValueError(f"policy override {key!r} is not one of {sorted(allowed)}")
        # every job must be able to start somewhere, or the run could never end
        for f, mix in self.jobs.flavors.items():
            biggest = max(p.gpus.get(f, 0) for p in self.nodes)
            if max(mix.gpus) > biggest:
                raise ValueError(f"jobs.flavors.{f} asks for {max(mix.gpus)} devices, but the "
                                 f"largest node has {biggest}")
            for g in self.groups:
                if f not in g.quotas:
                    raise ValueError(f"groups[{g.name}].quotas has no {f!r}, which jobs ask "
                                     f"for: its jobs could never start")
        return self

    @property
    def horizon_s(self) -> float:
        """When the run stops even with jobs left: ``max_time_s``, or 4 spans + 10 days."""
        return self.max_time_s or 4 * self.jobs.span_s + 10 * 86_400.0


def default_scenario() -> Scenario:
    return Scenario()


def load_scenario(path: str | Path | None) -> Scenario:
    """The scenario in a YAML file (``None``: the default); errors name the field."""
    if path is None:
        return Scenario()
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read scenario file {str(p)!r}: {exc.strerror}",
                        file_path=str(p)) from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"scenario file {str(p)!r} is not valid YAML: {exc}",
                        file_path=str(p)) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"scenario file {str(p)!r} must hold a mapping at the top, "
                        f"not {type(raw).__name__}", file_path=str(p))
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        problems = [(".".join(str(x) for x in e["loc"]) or "(top)",
                     e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        raise SpecError(f"invalid scenario {str(p)!r}", problems, file_path=str(p)) from None


# -- workload generation ---------------------------------------------------------------
@dataclass
class _Job:
    w: Workload
    group: str
    duration: float
    done: float = 0.0  # seconds of work checkpointed
    first_start: float | None = None
    token: int = 0  # invalidates stale finish/exit events
    run_start: float = 0.0
    finished_at: float | None = None


def _generate_jobs(sc: Scenario, rng: np.random.Generator) -> list[_Job]:
    js = sc.jobs
    flavors = list(js.flavors)
    fw = np.array([js.flavors[f].weight for f in flavors], float)
    fw /= fw.sum()
    gw = np.array([g.load for g in sc.groups], float)
    gw /= gw.sum()
    n = js.count
    n_burst = int(round(n * js.burst_fraction))
    # arrivals: steady ones uniform over the span, bursts at uniform instants
    times: list[float] = list(rng.uniform(0, js.span_s, n - n_burst))
    who: list[int] = list(rng.choice(len(sc.groups), size=n - n_burst, p=gw))
    users: list[int] = [int(rng.integers(sc.groups[g].users)) for g in who]
    shape_of: list[tuple[int, int] | None] = [None] * (n - n_burst)
    while len(times) < n:
        size = min(n - len(times), 1 + int(rng.poisson(js.burst_size_mean - 1)))
        t0 = float(rng.uniform(0, js.span_s))
        g = int(rng.choice(len(sc.groups), p=gw))
        u = int(rng.integers(sc.groups[g].users))
        fi = int(rng.choice(len(flavors), p=fw))
        mix = js.flavors[flavors[fi]].gpus
        counts = list(mix)
        cp = np.array([mix[c] for c in counts], float)
        k = counts[int(rng.choice(len(counts), p=cp / cp.sum()))]
        for i in range(size):
            times.append(t0 + (js.burst_spread_s * i / max(1, size - 1) if size > 1 else 0.0))
            who.append(g)
            users.append(u)
            shape_of.append((fi, k))
    order = np.argsort(np.array(times), kind="stable")
    durations = np.minimum(js.max_duration_s, np.maximum(
        1.0, rng.lognormal(math.log(js.duration_median_s), js.duration_sigma, n)))
    jobs = []
    for rank, i in enumerate(order):
        shape = shape_of[i]
        if shape is None:
            fi = int(rng.choice(len(flavors), p=fw))
            mix = js.flavors[flavors[fi]].gpus
            counts = list(mix)
            cp = np.array([mix[c] for c in counts], float)
            shape = (fi, counts[int(rng.choice(len(counts), p=cp / cp.sum()))])
        fi, k = shape
        g = sc.groups[who[i]]
        high = rng.random() < js.high_priority_fraction
        ci = float(js.checkpoint_intervals_s[int(rng.integers(len(js.checkpoint_intervals_s)))]
                   ) if js.checkpoint_intervals_s else 0.0
        w = Workload(
            id=f"j{rank:05d}", queue=g.name, user=f"{g.name}-u{users[i]}",
            gpus={flavors[fi]: k}, submitted_at=round(float(times[i]), 3),
            cpus=js.cpus_per_gpu * k, memory=js.memory_per_gpu * k,
            priority=js.high_priority if high else 0, checkpoint_interval=ci)
        jobs.append(_Job(w, g.name, float(durations[rank])))
    return jobs


# -- metrics helpers -------------------------------------------------------------------
def water_fill(capacity: float, demand: dict[str, float], weight: dict[str, float]
               ) -> dict[str, float]:
    """Weighted max-min fair shares of ``capacity`` given each key's demand.

    Keys whose demand is below their weighted level get their demand; the
    rest split what remains in proportion to their weights (weight 0 counts
    as a tiny weight, so a group without quota still gets leftovers).
    Progressive filling in order of demand per weight: O(n log n).
    """
    out = {k: 0.0 for k in demand}
    items = sorted(((d / max(weight.get(k, 0.0), 1e-6), k) for k, d in demand.items() if d > 0))
    wsum = sum(max(weight.get(k, 0.0), 1e-6) for _, k in items)
    left = float(capacity)
    for i, (ratio, k) in enumerate(items):
        if wsum <= 0 or left <= 1e-12:
            break
        level = left / wsum
        w = max(weight.get(k, 0.0), 1e-6)
        if ratio <= level:  # sated: gets its whole demand
            out[k] = demand[k]
            left -= demand[k]
            wsum -= w
            continue
        for _, rest in items[i:]:  # everyone left shares at the same level
            out[rest] = level * max(weight.get(rest, 0.0), 1e-6)
        break
    return out


def jain(xs: list[float]) -> float:
    """Jain's index ``(sum x)^2 / (n * sum x^2)``: 1 when all equal, 1/n when one has all."""
    if not xs:
        return 1.0
    s2 = sum(x * x for x in xs)
    return (sum(xs) ** 2) / (len(xs) * s2) if s2 > 0 else 1.0


def _cap(limit: int | None) -> float:
    return float("inf") if limit is None else float(limit)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else 0.0


# -- the simulation --------------------------------------------------------------------
ARRIVE, FINISH, EXIT, DOWN, UP, FAIL = range(6)


@dataclass
class SimResult:
    """What :func:`simulate` measured; :meth:`summary` is the ``--json`` object."""

    policy: str
    seed: int
    jobs: int
    finished: int
    makespan_s: float
    utilisation: float
    goodput: float
    jain_fairness: float
    wait_p50_s: float
    wait_p95_s: float
    per_group: dict[str, dict[str, float]]
    quota_violations: int
    limit_violations: int
    guarantee_violations: int
    preemptions: int
    lost_gpu_hours: float
    lost_gpu_hours_failures: float
    node_failures: int
    cycles: int
    events: int
    sim_seconds: float
    cpu_seconds: float
    series: dict[str, list[float]] = field(default_factory=dict)
    queue_series: dict[str, list[int]] = field(default_factory=dict)
    violations: list[dict[str, Any]] = field(default_factory=list)  # the first 50

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "seed": self.seed, "jobs": self.jobs,
            "finished": self.finished, "makespan_s": round(self.makespan_s, 1),
            "utilisation": round(self.utilisation, 4), "goodput": round(self.goodput, 4),
            "jain_fairness": round(self.jain_fairness, 4),
            "wait_p50_s": round(self.wait_p50_s, 1), "wait_p95_s": round(self.wait_p95_s, 1),
            "per_group": self.per_group,
            "quota_violations": self.quota_violations,
            "quota_violation_detail": {"limit": self.limit_violations,
                                       "guarantee": self.guarantee_violations},
            "preemptions": self.preemptions,
            "lost_gpu_hours": round(self.lost_gpu_hours, 2),
            "lost_gpu_hours_failures": round(self.lost_gpu_hours_failures, 2),
            "node_failures": self.node_failures, "cycles": self.cycles, "events": self.events,
            "sim_seconds": round(self.sim_seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


def _nodes_of(pool: NodePool) -> list[Node]:
    return [Node(f"{pool.name}-{i}", pool.gpus, pool.cpus, pool.memory) for i in range(pool.count)]


def simulate(scenario: Scenario, policy_name: str = "fair", *, seed: int | None = None,
             clock: Callable[[], float] = time.perf_counter) -> SimResult:
    """Run ``scenario`` under the named policy; ``seed`` overrides the scenario's.

    ``clock`` only measures ``sim_seconds`` (the wall time the run took;
    ``cpu_seconds`` is this process's CPU time, which a busy shared machine
    does not inflate); the simulation itself runs on virtual time and is
    deterministic for a seed.
    """
    t_wall = clock()
    t_cpu = time.process_time()
    seed = scenario.seed if seed is None else seed
    rng = np.random.default_rng(seed)
    fail_rng = np.random.default_rng([seed, 1])
    overrides = {k: v for k, v in scenario.policy.items()}
    cfg = policy(policy_name, **overrides)
    jobs = _generate_jobs(scenario, rng)
    by_id = {j.w.id: j for j in jobs}

    queues = [Queue(g.name, g.name, {f: Quota(q.nominal, q.borrowing_limit)
                                     for f, q in g.quotas.items()},
                    cohort=g.cohort, strategy=g.strategy,
                    priority_classes={"normal": 0, "high": scenario.jobs.high_priority},
                    preempt_within_queue=g.preempt_within_queue)
              for g in scenario.groups]
    snap = Snapshot(queues=queues, half_life=cfg.half_life_s)
    flavors = sorted({f for p in scenario.nodes for f in p.gpus})
    weights = {f: {g.name: float(g.quotas[f].nominal) if f in g.quotas else 0.0
                   for g in scenario.groups} for f in flavors}
    limits = {g.name: {f: (q.nominal + q.borrowing_limit if q.borrowing_limit is not None
                           else None) for f, q in g.quotas.items()} for g in scenario.groups}
    groups = [g.name for g in scenario.groups]

    events: list[tuple[float, int, int, Any]] = []
    seq = 0

    def push(t: float, kind: int, payload: Any) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    for j in jobs:
        push(j.w.submitted_at, ARRIVE, j.w.id)
    all_nodes: dict[str, Node] = {}
    for pool in scenario.nodes:
        for node in _nodes_of(pool):
            all_nodes[node.name] = node
            starts_absent = any(win.from_s <= 0 for win in pool.absent)
            if not starts_absent:
                snap.add_node(node)
            for win in pool.absent:
                if win.from_s > 0:
                    push(win.from_s, DOWN, (node.name, "leave"))
                push(win.to_s, UP, node.name)
            if scenario.failures.mtbf_s and not starts_absent:  # else drawn when it joins
                push(float(fail_rng.exponential(scenario.failures.mtbf_s)), FAIL, node.name)

    demand: dict[str, Counter[str]] = {g: Counter() for g in groups}
    alloc_int: dict[str, float] = {g: 0.0 for g in groups}
    fair_int: dict[str, float] = {g: 0.0 for g in groups}
    busy_int = ideal_int = useful = 0.0
    lost_pre = lost_fail = 0.0
    preemptions = limit_viol = guar_viol = failures = cycles = n_events = 0
    finished = 0
    guar_since: dict[str, float | None] = {g: None for g in groups}
    guar_counted: dict[str, bool] = {g: False for g in groups}
    violation_log: list[dict[str, Any]] = []
    series: dict[str, list[float]] = {"t_h": [], "busy": [], "ideal": [], "capacity": []}
    qseries: dict[str, list[int]] = {g: [] for g in groups}
    next_sample = 0.0
    down: set[str] = set()
    t_prev = 0.0

    def accumulate(t_now: float) -> None:
        nonlocal busy_int, ideal_int
        dt = t_now - t_prev
        if dt <= 0:
            return
        for f in flavors:
            cap = snap.capacity[f]
            dem = {g: float(demand[g][f]) for g in groups}
            total_dem = sum(dem.values())
            busy = cap - snap.free_total[f]
            busy_int += busy * dt
            ideal_int += min(cap, total_dem) * dt
            if total_dem > 0 and cap > 0:
                shares = water_fill(cap, dem, weights[f]) if total_dem > cap else dem
                for g in groups:
                    fair_int[g] += shares[g] * dt
                    alloc_int[g] += snap.queues[g].usage[f] * dt

    def check_guarantees(t_now: float) -> None:
        nonlocal guar_viol
        # first the queues with a pending request inside their unused nominal quota
        inside: dict[str, list[tuple[tuple[str, int], ...]]] = {}
        for g in groups:
            qs = snap.queues[g]
            if qs.pending_count and qs.queue.cohort is not None:
                fits = [shape[0] for shape in qs.shapes
                        if all(qs.usage[f] + n <= qs.queue.nominal(f) for f, n in shape[0])]
                if fits:
                    inside[g] = fits
        over: dict[str, dict[str, int]] = {}
        by_cohort: dict[str, Counter[str]] = {}
        if inside:
            for g in groups:
                q = snap.queues[g]
                over[g] = {f: max(0, q.usage[f] - q.queue.nominal(f)) for f in flavors}
                if q.queue.cohort is not None:
                    by_cohort.setdefault(q.queue.cohort, Counter()).update(over[g])
        for g in groups:
            cond = False
            if g in inside:
                total = by_cohort[snap.queues[g].queue.cohort]  # type: ignore[index]
                for gpus in inside[g]:
                    # what the others borrow (plus what is free) would cover it
                    if all(0 < total[f] - over[g][f]
                           and n <= total[f] - over[g][f] + snap.free_total[f]
                           for f, n in gpus):
                        cond = True
                        break
            since = guar_since[g]
            if not cond:
                guar_since[g] = None
                guar_counted[g] = False
            elif since is None:
                guar_since[g] = t_now
            elif not guar_counted[g] and t_now - since > scenario.reclaim_window_s:
                guar_viol += 1
                guar_counted[g] = True
                if len(violation_log) < 50:
                    violation_log.append({"kind": "guarantee", "queue": g, "since_s": since,
                                          "at_s": t_now})

    def requeue(job: _Job, t_now: float) -> None:
        job.token += 1
        job.w = replace(job.w, queued_at=t_now)
        snap.add_pending(job.w)

    def stop_running(jid: str, t_now: float, *, at: float) -> float:
        """Account a stopped run at logical stop time ``at``; return the GPU-seconds lost."""
        job = by_id[jid]
        r = snap.running[jid]
        ck = r.last_checkpoint(at)
        job.done += ck - r.started_at
        return (at - ck) * job.w.gpu_count

    horizon = scenario.horizon_s
    while events:
        t = events[0][0]
        if t > horizon:  # jobs left that could not finish: reported as finished < jobs
            break
        accumulate(t)
        t_prev = t
        check_guarantees(t)
        while t >= next_sample:
            series["t_h"].append(next_sample / 3600)
            series["busy"].append(float(sum(snap.capacity[f] - snap.free_total[f] for f in flavors)))
            series["ideal"].append(float(sum(min(snap.capacity[f], sum(demand[g][f] for g in groups))
                                             for f in flavors)))
            series["capacity"].append(float(sum(snap.capacity.values())))
            for g in groups:
                qseries[g].append(snap.queues[g].pending_count)
            next_sample += scenario.sample_s
        dirty = False
        while events and events[0][0] == t:
            _, _, kind, payload = heapq.heappop(events)
            n_events += 1
            if kind == ARRIVE:
                job = by_id[payload]
                snap.add_pending(job.w)
                for f, n in job.w.gpus.items():
                    demand[job.group][f] += n
                dirty = True
            elif kind == FINISH:
                jid, token = payload
                job = by_id[jid]
                if token != job.token or jid not in snap.running:
                    continue
                snap.stop(jid, t)
                useful += job.duration * job.w.gpu_count
                job.done = job.duration
                job.finished_at = t
                finished += 1
                for f, n in job.w.gpus.items():
                    demand[job.group][f] -= n
                dirty = True
            elif kind == EXIT:
                jid, token, sigterm_at = payload
                job = by_id[jid]
                if token != job.token or jid not in snap.running:
                    continue
                lost_pre += stop_running(jid, t, at=sigterm_at)
                snap.stop(jid, t)
                requeue(job, t)
                dirty = True
            elif kind in (DOWN, FAIL):
                name = payload[0] if kind == DOWN else payload
                if name in down or name not in snap.nodes:
                    continue  # away already; a failure's next one is drawn when it is back
                for jid in sorted(snap.nodes[name].running):
                    lost = stop_running(jid, t, at=t)
                    if kind == FAIL:
                        lost_fail += lost
                    else:
                        lost_pre += lost
                lost_runs = snap.remove_node(name)
                for r in lost_runs:
                    requeue(by_id[r.workload.id], t)
                down.add(name)
                if kind == FAIL:
                    failures += 1
                    push(t + scenario.failures.repair_s, UP, name)
                dirty = True
            elif kind == UP:
                name = payload
                if name not in down and name in snap.nodes:
                    continue
                if name in down:
                    down.discard(name)
                snap.add_node(all_nodes[name])
                if scenario.failures.mtbf_s and finished < len(jobs):
                    push(t + float(fail_rng.exponential(scenario.failures.mtbf_s)), FAIL, name)
                dirty = True
        if finished == len(jobs):
            break
        if not dirty:
            continue
        cycles += 1
        result = run_cycle(snap, now=t, config=cfg)
        for d in result.decisions:
            if isinstance(d, Preempt):
                jid = d.workload.id
                job = by_id[jid]
                snap.mark_terminating(jid)
                job.token += 1
                preemptions += 1
                push(t + scenario.preemption_grace_s, EXIT, (jid, job.token, t))
        for d in result.decisions:
            if isinstance(d, Admit):
                jid = d.workload.id
                job = by_id[jid]
                snap.start(jid, d.node, dict(d.devices), t)
                if job.first_start is None:
                    job.first_start = t
                job.token += 1
                push(t + (job.duration - job.done), FINISH, (jid, job.token))
                lim = limits[job.group]
                usage = snap.queues[job.group].usage
                over = [f for f in d.workload.gpus if f not in lim or usage[f] > _cap(lim[f])]
                if over:
                    limit_viol += 1
                    if len(violation_log) < 50:
                        violation_log.append({"kind": "limit", "queue": job.group, "job": jid,
                                              "flavors": over, "at_s": t})

    makespan = t_prev
    waits: dict[str, list[float]] = {g: [] for g in groups}
    for j in jobs:
        if j.first_start is not None:
            waits[j.group].append(j.first_start - j.w.submitted_at)
    all_waits = [x for g in groups for x in waits[g]]
    ratios = [alloc_int[g] / fair_int[g] for g in groups if fair_int[g] > 0]
    per_group = {g: {"wait_p50_s": round(_pct(waits[g], 50), 1),
                     "wait_p95_s": round(_pct(waits[g], 95), 1),
                     "gpu_hours": round(alloc_int[g] / 3600, 1),
                     "fair_gpu_hours": round(fair_int[g] / 3600, 1),
                     "ratio": round(alloc_int[g] / fair_int[g], 4) if fair_int[g] else 0.0,
                     "jobs": len(waits[g])} for g in groups}
    return SimResult(
        policy=cfg.name, seed=seed, jobs=len(jobs), finished=finished, makespan_s=makespan,
        utilisation=busy_int / ideal_int if ideal_int else 1.0,
        goodput=useful / ideal_int if ideal_int else 1.0,
        jain_fairness=jain(ratios), wait_p50_s=_pct(all_waits, 50),
        wait_p95_s=_pct(all_waits, 95), per_group=per_group,
        quota_violations=limit_viol + guar_viol, limit_violations=limit_viol,
        guarantee_violations=guar_viol, preemptions=preemptions,
        lost_gpu_hours=(lost_pre + lost_fail) / 3600, lost_gpu_hours_failures=lost_fail / 3600,
        node_failures=failures, cycles=cycles, events=n_events,
        sim_seconds=clock() - t_wall, cpu_seconds=time.process_time() - t_cpu, series=series, queue_series=qseries,
        violations=violation_log)


def scenario_yaml(sc: Scenario) -> str:
    """The scenario as YAML, for ``mlaas simulate --show-scenario`` to edit from."""
    return yaml.safe_dump(json.loads(sc.model_dump_json()), sort_keys=False)


def write_plots(results: list[SimResult], outdir: str | Path) -> list[Path]:
    """Utilisation and queue lengths over time, one PNG each, all policies overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(10, 4))
    if results:
        s = results[0].series
        ax.plot(s["t_h"], s["capacity"], color="grey", lw=1, label="capacity")
    for r in results:
        ax.plot(r.series["t_h"], r.series["busy"], lw=1, label=f"busy ({r.policy})")
        ax.plot(r.series["t_h"], r.series["ideal"], lw=0.8, ls=":", label=f"ideal ({r.policy})")
    ax.set_xlabel("time [h]")
    ax.set_ylabel("GPUs")
    ax.set_title("Busy GPUs vs work-conserving ideal")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = out / "utilisation.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    fig, axes = plt.subplots(len(results) or 1, 1, figsize=(10, 3 * max(1, len(results))),
                             sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        for g, ys in r.queue_series.items():
            ax.plot(r.series["t_h"], ys, lw=1, label=g)
        ax.set_ylabel("pending jobs")
        ax.set_title(f"Queue lengths ({r.policy})")
        ax.legend(fontsize=7, ncol=6)
    axes[-1, 0].set_xlabel("time [h]")
    fig.tight_layout()
    p = out / "queues.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
