#!/usr/bin/env python
"""Benchmark of ``mlaas serve`` (issue 4): single-event predict, a naive reference, v2 batches.

Model: the predecessor's benchmark network, an MLP 42 -> 128 -> 128 -> 128 ->
64 -> 64 -> 1, trained for one epoch by ``mlaas.train.run`` on a small
``mlaas datagen`` pair (42 features: 8 scalars, 4 jets x 5, 2 muons x 4,
2 electrons x 3, no cut) and exported as a bundle (``bundle.tar.gz``), which
is uploaded to a fresh registry.

Load: ``wrk`` (Debian package ``wrk``) on 127.0.0.1, with a Lua script that
sets the POST body and prints the summary, against uvicorn servers started
as subprocesses on free 127.0.0.1 ports (same uvicorn options for both:
``access_log=False``, log level warning, uvicorn's default ``auto`` loop and
HTTP implementation):

(a) ``mlaas serve`` (``mlaas.serve.server.create_server``): single-event JSON
    (``[{...one event...}]``) to ``POST /api/models/{name}/predict`` at 32
    connections: req/s, p50, p99.
(b) the same load on ``bench/naive_serve.py`` (FastAPI, pydantic request
    model, one ``InferenceSession.run`` per request, no batching).
(c) ``mlaas serve``: KServe v2 binary requests (binary tensor extension in
    and out) of 1024 events each: events/s, at 1 connection (one stream, as
    (d); the ratio c/d uses this) and at ``--v2-connections`` (default 4).
(d) ONNX Runtime alone, in a fresh Python process (as the server is), on
    the same 1024-event batch with the bundle's session (``bundle.session.run``)
    and the server's settings (1 intra-op thread, ``create_server``'s default):
    events/s; also with the bundle's default (2 threads) for reference.

Prints the ratios a/b and c/d and the server's RSS (VmRSS and the peak
VmHWM, from /proc). Targets (issue 4): a >= 2 b; a >= 3000 req/s; p99 < 25 ms
at 32 connections; c >= 0.7 d.

Usage::

    .venv/bin/python bench/serve.py                    # 10 s per load
    .venv/bin/python bench/serve.py --duration 3       # a quick look
    .venv/bin/python bench/serve.py --json bench/out/serve.json
    .venv/bin/python bench/serve.py --only v2 --duration 5   # (c) and (d) only, ~30 s
    .venv/bin/python bench/serve.py --only v2 --ort-threads 2  # server and (d) at 2 threads

(c) is preceded by a 2 s warm-up load of the same requests at 1 connection, as
(a) and (b) are by theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL = "mlp42"
HIDDEN = [128, 128, 128, 64, 64]
BATCH = 1024
HEADER = "Inference-Header-Content-Length"
ORT_THREADS = 1  # create_server's default ort_threads; (d) uses the same session settings

FEATURES: list[Any] = [
    "MET_pt", "MET_phi", "PV_npvs", "nJet", "nMuon", "nElectron", "HT", "nBJet",
    {"branch": "Jet_pt", "max_len": 4, "sort_by": "Jet_pt"},
    {"branch": "Jet_eta", "max_len": 4},
    {"branch": "Jet_phi", "max_len": 4},
    {"branch": "Jet_mass", "max_len": 4},
    {"branch": "Jet_btagDeepB", "max_len": 4},
    {"branch": "Muon_pt", "max_len": 2, "sort_by": "Muon_pt"},
    {"branch": "Muon_eta", "max_len": 2},
    {"branch": "Muon_phi", "max_len": 2},
    {"branch": "Muon_charge", "max_len": 2},
    {"branch": "Electron_pt", "max_len": 2, "sort_by": "Electron_pt"},
    {"branch": "Electron_eta", "max_len": 2},
    {"branch": "Electron_phi", "max_len": 2},
]

LUA = """\
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d mean_us=%.1f "
    .. "status_errors=%d socket_errors=%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


# -- the bundle ---------------------------------------------------------------------------------


def build_bundle(workdir: Path, events: int) -> tuple[Path, Path, Path]:
    """Train and export the benchmark MLP once; returns (archive, bundle dir, signal.root)."""
    from mlaas.data import synth
    from mlaas.train.run import run

    data = workdir / "data"
    archive = workdir / "run" / "bundle.tar.gz"
    signal = data / "signal.root"
    if archive.exists() and signal.exists():
        return archive, workdir / "run" / "bundle", signal
    shutil.rmtree(workdir / "run", ignore_errors=True)
    files = synth.generate(data, events, seed=1)["files"]
    spec = {
        "name": MODEL,
        "task": "binary",
        "data": {
            "tree": "Events",
            "sources": [{"files": [files["signal"]], "label": 1},
                        {"files": [files["background"]], "label": 0}],
            "derived": {"HT": "sum(Jet_pt)", "nBJet": "sum(Jet_btagDeepB > 0.5)"},
            "features": FEATURES,
            "normalize": "standard",
        },
        "model": {"builtin": "mlp", "hidden": HIDDEN},
        "train": {"epochs": 1, "batch_size": 1024, "device": "cpu"},
    }
    result = run(spec, workdir / "run", progress=False)
    assert archive.exists(), f"no {archive} after training"
    return archive, Path(result.bundle), Path(files["signal"])


def sample_events(bundle: Any, signal: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` events of ``signal.root`` as JSON rows of the branches the bundle reads."""
    import uproot

    with uproot.open(signal) as f:
        arrays = f["Events"].arrays(list(bundle.branch_types), entry_stop=n, library="ak")
    rows = arrays.to_list()
    assert len(rows) == n, f"{signal} has fewer than {n} events"
    return rows


# -- servers and load ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(argv: list[str], port: int, ready_path: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess on 127.0.0.1:``port``, up once ``ready_path`` answers 200."""
    import httpx

    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server {argv} exited with {proc.returncode}:\n"
                                   f"{log.read().decode(errors='replace')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {argv} not ready after 60 s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def cpu_seconds(pids: int | list[int]) -> float:
    """User + system CPU time of processes so far (all their threads), from /proc."""
    total = 0
    for pid in [pids] if isinstance(pids, int) else pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def thread_cpu(pids: int | list[int]) -> dict[str, float]:
    """CPU seconds so far per thread name (``comm``: MainThread is the process name,
    ``mlaas-ort_0``...), summed over ``pids``: which thread does the work."""
    out: dict[str, float] = {}
    for pid in [pids] if isinstance(pids, int) else pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            key = "main" if task.name == str(pid) else name
            if pid != (pids if isinstance(pids, int) else pids[0]):
                key = f"worker process {key}"
            out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK")
    return out


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (the server's worker processes)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def wrk(url: str, body: Path, headers: dict[str, str], *, connections: int, threads: int,
        duration: float, tmp: Path, pid: int | list[int] | None = None) -> dict[str, float]:
    """One wrk run; req/s, p50/p99/mean latency (ms), error counts and, given the server's
    ``pid`` (or pids), its CPU time per request (ms; robust to other load on the machine)."""
    lua = tmp / f"load-{body.stem}.lua"
    header_lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    lua.write_text(LUA.format(body=str(body), headers=header_lines))
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
           "--timeout", "10s", "-s", str(lua), url]
    cpu_before = cpu_seconds(pid) if pid is not None else 0.0
    threads_before = thread_cpu(pid) if pid is not None else {}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    cpu = cpu_seconds(pid) - cpu_before if pid is not None else float("nan")
    threads_after = thread_cpu(pid) if pid is not None else {}
    match = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    got = {k: float(v) for k, v in (kv.split("=") for kv in match.group(1).split())}
    seconds = got["duration_us"] / 1e6
    return {"requests": got["requests"], "seconds": seconds,
            "req_per_s": got["requests"] / seconds, "p50_ms": got["p50_us"] / 1e3,
            "p99_ms": got["p99_us"] / 1e3, "mean_ms": got["mean_us"] / 1e3,
            "status_errors": got["status_errors"], "socket_errors": got["socket_errors"],
            "server_cpu_s": cpu, "server_cpu_ms_per_request": 1e3 * cpu / max(1, got["requests"]),
            "thread_cpu_ms_per_request": {
                k: round(1e3 * (v - threads_before.get(k, 0.0)) / max(1, got["requests"]), 4)
                for k, v in sorted(threads_after.items())
                if v - threads_before.get(k, 0.0) > 0}}


def check_answer(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One request with httpx before the load: the route must answer 200 (also warms up)."""
    import httpx

    r = httpx.post(url, content=body, headers=headers, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:500]}")
    return r.content


def v2_binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 request with ``x`` as binary tensor data and the output asked in binary."""
    header = json.dumps({
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "score", "parameters": {"binary_data": True}}],
    }).encode()
    return header + x.astype("<f4").tobytes(), {
        HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def ort_alone(bundle: Any, x: np.ndarray, duration: float) -> dict[str, float]:
    """(d): ``bundle.session.run`` on the same batch in a loop for ``duration`` seconds."""
    session = bundle.session
    feeds = {"x": np.ascontiguousarray(x, dtype=np.float32)}
    for _ in range(20):
        session.run(["score"], feeds)
    calls = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration:
        session.run(["score"], feeds)
        calls += 1
    return {"calls": calls, "seconds": elapsed, "events_per_s": calls * len(x) / elapsed,
            "ms_per_batch": 1e3 * elapsed / calls}


# -- the run ------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from mlaas.bundle import Bundle, events_to_arrays
    from mlaas.serve.registry import Registry

    if shutil.which("wrk") is None:
        sys.exit("bench/serve.py needs the wrk load generator: apt-get install -y wrk "
                 "(Debian/Ubuntu package 'wrk'), then run again")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    archive, bundle_dir, signal = build_bundle(workdir, args.train_events)
    bundle = Bundle.load(bundle_dir)
    n_features = len(bundle.spec["feature_names"])
    assert n_features == 42, f"the bundle has {n_features} features, not 42"
    rows = sample_events(bundle, signal, BATCH)
    x = bundle.preprocessor(events_to_arrays(rows, bundle.branch_types)).x
    assert x.shape == (BATCH, 42), x.shape

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-", dir=workdir))
    only_v2 = args.only == "v2"
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "duration_s": args.duration, "connections": args.connections,
        "wrk_threads": args.wrk_threads, "v2_connections": args.v2_connections,
        "ort_threads": args.ort_threads,
        "model": f"MLP 42 -> {' -> '.join(map(str, HIDDEN))} -> 1",
    }
    try:
        models = tmp / "models"
        Registry(models).upload(MODEL, archive)
        single = tmp / "single.json"
        single.write_text(json.dumps([rows[0]]))
        v2_body, v2_headers = v2_binary_body(x)
        v2_file = tmp / "v2.bin"
        v2_file.write_bytes(v2_body)
        json_headers = {"Content-Type": "application/json"}
        load = dict(connections=args.connections, threads=args.wrk_threads,
                    duration=args.duration, tmp=tmp)

        # (a') mlaas serve with raw-event preprocessing in worker processes
        if args.event_workers > 0 and not only_v2:
            port = free_port()
            argv = [sys.executable, str(Path(__file__).resolve()), "_serve", "--models",
                    str(models), "--port", str(port), "--event-workers", str(args.event_workers)]
            with server(argv, port, "/v2/health/ready") as proc:
                predict = f"http://127.0.0.1:{port}/api/models/{MODEL}/predict"
                check_answer(predict, single.read_bytes(), json_headers)  # starts the worker
                pids = [proc.pid, *children(proc.pid)]
                wrk(predict, single, json_headers, **{**load, "duration": 2})  # warm-up
                results["a_workers"] = wrk(predict, single, json_headers, **load, pid=pids)
                results["a_workers"]["event_workers"] = args.event_workers
                results["a_workers"]["rss_mb"] = {str(p): rss_mb(p) for p in pids}

        # (a) and (c): mlaas serve
        port = free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "_serve", "--models",
                str(models), "--port", str(port), "--ort-threads", str(args.ort_threads)]
        with server(argv, port, "/v2/health/ready") as proc:
            base = f"http://127.0.0.1:{port}"
            predict = f"{base}/api/models/{MODEL}/predict"
            first = json.loads(check_answer(predict, single.read_bytes(), json_headers))
            check_answer(f"{base}/v2/models/{MODEL}/infer", v2_body, v2_headers)
            if not only_v2:
                wrk(predict, single, json_headers, **{**load, "duration": 2})  # warm-up
                results["a"] = wrk(predict, single, json_headers, **load, pid=proc.pid)
                results["a"]["rss_mb"] = rss_mb(proc.pid)
            infer = f"{base}/v2/models/{MODEL}/infer"
            wrk(infer, v2_file, v2_headers, **{**load, "connections": 1, "threads": 1,
                                               "duration": 2})  # warm-up
            results["c"] = wrk(infer, v2_file, v2_headers,
                               **{**load, "connections": 1, "threads": 1}, pid=proc.pid)
            results["c"]["events_per_s"] = results["c"]["req_per_s"] * BATCH
            results["c_parallel"] = wrk(infer, v2_file, v2_headers,
                                        **{**load, "connections": args.v2_connections},
                                        pid=proc.pid)
            results["c_parallel"]["events_per_s"] = results["c_parallel"]["req_per_s"] * BATCH
            results["c"]["rss_mb"] = rss_mb(proc.pid)
            results["server_rss_mb"] = rss_mb(proc.pid)
            # (d): ONNX Runtime alone, right after (c) so both see the same machine, in a
            # fresh process like the server's (this one has torch and awkward loaded)
            np.save(tmp / "x.npy", x)
            for key, threads in (("d", args.ort_threads), ("d_default_threads", 0)):
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_ort",
                                      str(bundle_dir), str(tmp / "x.npy"), str(args.duration),
                                      str(threads)],
                                     capture_output=True, text=True, check=True,
                                     timeout=args.duration + 120)
                results[key] = json.loads(out.stdout.strip().splitlines()[-1])

        # (b): the naive reference (skipped by --only v2)
        if not only_v2:
            port = free_port()
            argv = [sys.executable, str(HERE / "naive_serve.py"), "--bundle", str(bundle_dir),
                    "--name", MODEL, "--port", str(port)]
            with server(argv, port, "/openapi.json") as proc:
                predict = f"http://127.0.0.1:{port}/api/models/{MODEL}/predict"
                naive_first = json.loads(check_answer(predict, single.read_bytes(), json_headers))
                wrk(predict, single, json_headers, **{**load, "duration": 2})
                results["b"] = wrk(predict, single, json_headers, **load, pid=proc.pid)
                results["b"]["rss_mb"] = rss_mb(proc.pid)
            if not np.isclose(first["outputs"][0], naive_first["outputs"][0], atol=1e-5):
                raise RuntimeError(f"the two servers disagree: {first} vs {naive_first}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_after"] = os.getloadavg()
    if only_v2:
        results["ratios"] = {"c_over_d": results["c"]["events_per_s"]
                             / results["d"]["events_per_s"]}
        return results
    a, b, c, d = results["a"], results["b"], results["c"], results["d"]
    results["ratios"] = {"a_over_b": a["req_per_s"] / b["req_per_s"],
                         "c_over_d": c["events_per_s"] / d["events_per_s"],
                         "cpu_per_request_b_over_a": (b["server_cpu_ms_per_request"]
                                                      / a["server_cpu_ms_per_request"])}
    if "a_workers" in results:
        results["ratios"]["a_workers_over_b"] = results["a_workers"]["req_per_s"] / b["req_per_s"]
    results["targets"] = {
        "a >= 2 b": results["ratios"]["a_over_b"] >= 2,
        "a >= 3000 req/s": a["req_per_s"] >= 3000,
        "p99 < 25 ms": a["p99_ms"] < 25,
        "c >= 0.7 d": results["ratios"]["c_over_d"] >= 0.7,
    }
    return results


def report(r: dict[str, Any]) -> str:
    a, b, c, d = r["a"], r["b"], r["c"], r["d"]
    cp = r["c_parallel"]
    rss = r["server_rss_mb"]
    aw = r.get("a_workers")
    workers_line = [] if aw is None else [
        f"(a') same as (a), {aw['event_workers']} event worker process(es): "
        f"{aw['req_per_s']:.0f} req/s, p50 {aw['p50_ms']:.2f} ms, p99 {aw['p99_ms']:.2f} ms "
        f"(errors: {aw['status_errors']:.0f} status, {aw['socket_errors']:.0f} socket); "
        f"server+workers CPU {aw['server_cpu_ms_per_request']:.3f} ms/request; a'/b = "
        f"{r['ratios']['a_workers_over_b']:.2f}"]
    lines = [
        f"serve benchmark, {r['when']}, {r['cpus']} CPUs, load average before "
        f"{r['loadavg_before'][0]:.2f}, after {r['loadavg_after'][0]:.2f}",
        f"model {r['model']}; wrk -t{r['wrk_threads']} -d{r['duration_s']}s",
        f"(a) mlaas serve, single-event predict, {r['connections']} conn: "
        f"{a['req_per_s']:.0f} req/s, p50 {a['p50_ms']:.2f} ms, p99 {a['p99_ms']:.2f} ms "
        f"(errors: {a['status_errors']:.0f} status, {a['socket_errors']:.0f} socket); "
        f"server CPU {a['server_cpu_ms_per_request']:.3f} ms/request",
        *workers_line,
        f"(b) naive FastAPI, same load:                  "
        f"{b['req_per_s']:.0f} req/s, p50 {b['p50_ms']:.2f} ms, p99 {b['p99_ms']:.2f} ms "
        f"(errors: {b['status_errors']:.0f} status, {b['socket_errors']:.0f} socket); "
        f"server CPU {b['server_cpu_ms_per_request']:.3f} ms/request",
        f"(c) mlaas serve, v2 binary, {BATCH} events/request, 1 conn: "
        f"{c['events_per_s']:.0f} events/s ({c['req_per_s']:.1f} req/s, "
        f"p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms; server CPU "
        f"{c['server_cpu_ms_per_request']:.3f} ms/request)",
        f"    same, {r['v2_connections']} conn: {cp['events_per_s']:.0f} events/s "
        f"(p50 {cp['p50_ms']:.2f} ms, p99 {cp['p99_ms']:.2f} ms; server CPU "
        f"{cp['server_cpu_ms_per_request']:.3f} ms/request)",
        f"(d) ONNX Runtime alone, same batch, 1 thread: {d['events_per_s']:.0f} events/s "
        f"({d['ms_per_batch']:.3f} ms per batch); bundle default (2 threads): "
        f"{r['d_default_threads']['events_per_s']:.0f} events/s",
        f"a/b = {r['ratios']['a_over_b']:.2f}   c/d = {r['ratios']['c_over_d']:.2f}   "
        f"server CPU per request b/a = {r['ratios']['cpu_per_request_b_over_a']:.2f}",
        "server CPU ms/request by thread: (a) " + ", ".join(
            f"{k} {v:.3f}" for k, v in a["thread_cpu_ms_per_request"].items())
        + ("" if aw is None else "; (a') " + ", ".join(
            f"{k} {v:.3f}" for k, v in aw["thread_cpu_ms_per_request"].items()))
        + "; (b) " + ", ".join(f"{k} {v:.3f}" for k, v in b["thread_cpu_ms_per_request"].items()),
        f"server RSS {rss['VmRSS']:.0f} MB (peak {rss['VmHWM']:.0f} MB); naive server RSS "
        f"{b['rss_mb']['VmRSS']:.0f} MB",
        "targets: " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}"
                                for k, ok in r["targets"].items()),
    ]
    return "\n".join(lines)


def report_v2(r: dict[str, Any]) -> str:
    """The (c) and (d) lines of :func:`report`, for ``--only v2``."""
    c, cp, d = r["c"], r["c_parallel"], r["d"]
    return "\n".join([
        f"v2 only, {r['when']}, load average before {r['loadavg_before'][0]:.2f}, after "
        f"{r['loadavg_after'][0]:.2f}",
        f"(c) 1 conn: {c['events_per_s']:.0f} events/s (p50 {c['p50_ms']:.3f} ms, mean "
        f"{c['mean_ms']:.3f} ms; server CPU {c['server_cpu_ms_per_request']:.3f} ms/request: "
        + ", ".join(f"{k} {v:.3f}" for k, v in c["thread_cpu_ms_per_request"].items()) + ")",
        f"(c) {r['v2_connections']} conn: {cp['events_per_s']:.0f} events/s (server CPU "
        f"{cp['server_cpu_ms_per_request']:.3f} ms/request)",
        f"(d) {r['ort_threads']} thread(s): {d['events_per_s']:.0f} events/s "
        f"({d['ms_per_batch']:.3f} ms per batch); default threads "
        f"{r['d_default_threads']['events_per_s']:.0f}",
        f"c/d = {r['ratios']['c_over_d']:.3f}",
    ])


def serve_main(argv: list[str]) -> None:
    """``bench/serve.py _serve``: the mlaas server under test, with the naive server's options."""
    import uvicorn

    from mlaas.serve.server import create_server

    parser = argparse.ArgumentParser(prog="bench/serve.py _serve")
    parser.add_argument("--models", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--event-workers", type=int, default=0)
    parser.add_argument("--ort-threads", type=int, default=ORT_THREADS,
                        help="0: the bundle's default")
    parser.add_argument("--max-delay-ms", type=float, default=None,
                        help="the batch wait (default: create_server's)")
    args = parser.parse_args(argv)
    extra = {} if args.max_delay_ms is None else {"max_delay_ms": args.max_delay_ms}
    app = create_server(args.models, event_workers=args.event_workers,
                        ort_threads=args.ort_threads or None, **extra)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def ort_main(argv: list[str]) -> None:
    """``bench/serve.py _ort BUNDLE X.npy SECONDS THREADS``: (d) in a fresh process (THREADS
    0: the bundle's default), JSON on stdout."""
    from mlaas.bundle import Bundle

    bundle_dir, x_path, seconds, threads = argv
    bundle = Bundle.load(bundle_dir, threads=int(threads) or None)
    print(json.dumps(ort_alone(bundle, np.load(x_path), float(seconds))))


def main() -> None:
    if sys.argv[1:2] == ["_serve"]:
        serve_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["_ort"]:
        ort_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--v2-connections", type=int, default=4,
                        help="connections for the parallel 1024-event v2 load (c)")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--event-workers", type=int, default=1,
                        help="also run (a) with this many event worker processes (0: skip)")
    parser.add_argument("--train-events", type=int, default=20000, help="events per file")
    parser.add_argument("--workdir", default=str(HERE / "out" / "serve"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--only", choices=["all", "v2"], default="all",
                        help="v2: only (c) and (d), for a quick look at the v2 path")
    parser.add_argument("--ort-threads", type=int, default=ORT_THREADS,
                        help="ONNX Runtime intra-op threads of the server and of (d)")
    args = parser.parse_args()
    results = run_bench(args)
    print(report(results) if args.only == "all" else report_v2(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
