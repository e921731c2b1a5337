#!/usr/bin/env python
"""Load test of the platform API: concurrent simulated users against a real ``mlaas server``.

Starts ``mlaas server`` as a child process on 127.0.0.1 (free port, a temp
data dir, SQLite, the local executor with ``--cpus`` slots), writes one tiny
datagen pair (``--events`` per class) and a tiny pipeline (1 epoch, mlp
[16], batch 256). Then ``--users`` threads, each with its own
:class:`mlaas.client.Client` (its own connection pool), run for
``--duration`` seconds:

- ``--submitters`` of them submit ``--jobs-per-user`` jobs each through
  ``Client.submit`` (which lists the workspace and uploads the two data files
  when missing, then ``POST /api/jobs``), then poll ``GET /api/jobs/{id}`` of
  their own jobs;
- the others only poll: ``GET /api/jobs?limit=20``, then ``GET /api/jobs/{id}``
  of one job from that list (``GET /api/models`` every tenth round).

Every user sleeps ``--poll`` seconds (+-50 % jitter) between rounds. After
the duration, the script waits up to ``--wait`` seconds for every submitted
job to reach a final state (succeeded, failed, cancelled).

Reported: requests, API latency p50/p90/p99/max per kind and overall (as the
client sees it: includes the client threads' own GIL time on a shared
machine), errors (target 0) with the first messages, final states of every
job, seconds until the last job was final, and how many cores this run (the
script, the server, its jobs) and everything else on the machine kept busy
(``/proc/stat`` minus our own CPU time). Exit code 1 if there were
errors or a job did not reach a final state within the wait.

Usage::

    .venv/bin/python bench/platform_load.py                      # 48 users, 60 s
    .venv/bin/python bench/platform_load.py --duration 20 --submitters 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import yaml

from mlaas._local_server import LocalServer
from mlaas.client import FINAL_STATES, Client
from mlaas.data import synth
from mlaas.errors import MlaasError

SPEC = {
    "name": "load-test",
    "data": {
        "tree": "Events",
        "sources": [{"name": "signal", "files": ["data/signal.root"], "label": 1},
                    {"name": "background", "files": ["data/background.root"], "label": 0}],
        "cut": "nJet >= 2",
        "features": ["MET_pt", "PV_npvs", {"branch": "Jet_pt", "max_len": 4}],
        "split": {"validation": 0.2, "test": 0.2, "seed": 1},
    },
    "model": {"builtin": "mlp", "hidden": [16]},
    "train": {"epochs": 1, "batch_size": 256, "device": "cpu"},
}


class Recorder:
    """Latencies and errors of every request, from all user threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.error_kinds: Counter[str] = Counter()

    def call(self, kind: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            result = fn()
        except MlaasError as exc:
            elapsed = time.perf_counter() - start
            with self.lock:
                self.latency[kind].append(elapsed)
                self.error_kinds[f"{kind}: {type(exc).__name__}"] += 1
                if len(self.errors) < 10:
                    self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            return None
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latency[kind].append(elapsed)
        return result


def busy_cpu_seconds() -> float:
    """CPU seconds all processes spent so far (user + nice + system + irq + softirq), /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = sum(int(fields[i]) for i in (0, 1, 2, 5, 6))
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process, plus the reaped server and its job processes."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def user(index: int, url: str, spec_path: Path, args: argparse.Namespace, rec: Recorder,
         stop_at: float, submitted: list[str], lock: threading.Lock) -> None:
    rng = random.Random(index)
    mine: list[str] = []
    submitter = index < args.submitters
    with Client(url, timeout=60) as client:
        while time.monotonic() < stop_at:
            if submitter and len(mine) < args.jobs_per_user:
                job = rec.call("submit", lambda: client.submit(spec_path, name=f"user{index}"))
                if job:
                    mine.append(job["id"])
                    with lock:
                        submitted.append(job["id"])
            elif mine:
                rec.call("job", lambda: client.job(rng.choice(mine)))
            else:
                jobs = rec.call("jobs", lambda: client.jobs(limit=20))
                if jobs:
                    rec.call("job", lambda: client.job(rng.choice(jobs)["id"]))
                if rng.random() < 0.1:
                    rec.call("models", client.models)
            time.sleep(args.poll * rng.uniform(0.5, 1.5))


def wait_all(url: str, ids: list[str], timeout: float, rec: Recorder) -> dict[str, str]:
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with Client(url, timeout=60) as client:
        while True:
            for job_id in ids:
                if states.get(job_id) in FINAL_STATES:
                    continue
                job = rec.call("job (final wait)", lambda: client.job(job_id))
                if job:
                    states[job_id] = job["state"]
            if all(states.get(i) in FINAL_STATES for i in ids) or time.monotonic() > deadline:
                return states
            time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--submitters", type=int, default=16,
                        help="users that submit jobs; the rest only poll")
    parser.add_argument("--jobs-per-user", type=int, default=1)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between a user's rounds")
    parser.add_argument("--wait", type=float, default=600.0,
                        help="seconds to wait after the load for every job to be final")
    parser.add_argument("--events", type=int, default=2000, help="events per class")
    parser.add_argument("--cpus", type=int, default=2, help="server CPU slots (jobs at once)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    args = parser.parse_args()

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="mlaas-load-")
    work = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    synth.generate(work / "data", args.events, seed=3)
    spec_path = work / "pipeline.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC, sort_keys=False))

    rec = Recorder()
    busy0, own0, wall0 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    submitted: list[str] = []
    lock = threading.Lock()
    server = LocalServer(work / "server", log=work / "server.log", args=["--cpus", str(args.cpus)])
    with server:
        started = time.monotonic()
        stop_at = started + args.duration
        threads = [threading.Thread(target=user, args=(i, server.url, spec_path, args, rec,
                                                       stop_at, submitted, lock), daemon=True)
                   for i in range(args.users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration + 300)
        load_seconds = time.monotonic() - started
        states = wait_all(server.url, list(submitted), args.wait, rec)
        all_final_after = time.monotonic() - started
    wall = time.monotonic() - wall0
    ours = own_cpu_seconds() - own0  # the server and its jobs count once it has exited
    others = max(0.0, busy_cpu_seconds() - busy0 - ours) / wall

    kinds = {}
    for kind, values in sorted(rec.latency.items()):
        kinds[kind] = {"n": len(values), "p50_ms": round(1000 * quantile(values, 0.5), 1),
                       "p90_ms": round(1000 * quantile(values, 0.9), 1),
                       "p99_ms": round(1000 * quantile(values, 0.99), 1),
                       "max_ms": round(1000 * max(values), 1)}
    load = [v for k, vs in rec.latency.items() if k != "job (final wait)" for v in vs]
    final_counts = Counter(states.get(i, "unknown") for i in submitted)
    not_final = [i for i in submitted if states.get(i) not in FINAL_STATES]
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "users": args.users, "submitters": args.submitters, "cpus": args.cpus,
        "duration_s": args.duration, "poll_s": args.poll, "events_per_class": args.events,
        "load_seconds": round(load_seconds, 1),
        "requests": len(load), "requests_per_s": round(len(load) / load_seconds, 1),
        "latency_ms": {"p50": round(1000 * quantile(load, 0.5), 1),
                       "p99": round(1000 * quantile(load, 0.99), 1),
                       "max": round(1000 * max(load), 1) if load else None,
                       "mean": round(1000 * statistics.fmean(load), 1) if load else None},
        "per_kind": kinds,
        "errors": sum(rec.error_kinds.values()), "error_kinds": dict(rec.error_kinds),
        "first_errors": rec.errors,
        "jobs_submitted": len(submitted), "job_states": dict(final_counts),
        "jobs_not_final": not_final,
        "all_final_after_s": round(all_final_after, 1),
        "cores": os.cpu_count(), "our_cores": round(ours / wall, 2),
        "other_processes_cores": round(others, 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 1 if result["errors"] or not_final else 0


if __name__ == "__main__":
    sys.exit(main())
