#!/usr/bin/env python
"""Benchmark of the data layer against its baselines, measured in the same run.

On a datagen pair (signal.root + background.root, tree ``Events``) of
``--events`` events in total, with 3 flat features and the Jet, Muon and
Electron collections padded to 6:

(a) raw ``uproot.iterate`` of the same branches with the same step size: the ceiling,
    uproot as installed (ZLIB inflated by the stdlib's zlib); (a*) the same
    with the ISA-L inflater mlaas uses, a higher ceiling, reported beside it;
(b) ``RootDataset`` end to end to float32 batches (stats of pass 1 precomputed;
    pass 1 is timed on its own); a fresh dataset per round, as the targets
    mean; its second pass is reported beside it (buffers already touched);
(c) the predecessor's per-event Python approach (``bench/predecessor.py``) on 50k events;
(d) (a), (b) and (c) again on the same pair written uncompressed.

Then, on the zlib pair: a torch ``DataLoader`` with 0, 1 and 2 workers (and,
reported beside them, 1 and 2 persistent workers after their first epoch); the
preprocessed-data cache (disk, and memory) second epoch against the first;
and the peak RSS of (b) in a fresh process for several file sizes.

Usage::

    .venv/bin/python bench/loader.py                 # 2M events (1M per file), a few minutes
    .venv/bin/python bench/loader.py --quick         # 200k events, smoke run
    .venv/bin/python bench/loader.py --rss-scaling   # also the 4M-event RSS point
    .venv/bin/python bench/loader.py --json out.json

Generated files are kept in ``--workdir`` (default ``bench/out``, ignored by
git) and reused when they hold the right number of events.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

TREE = "Events"
FLAT = ["MET_pt", "MET_phi", "PV_npvs"]
COLLECTIONS = {
    "Jet": ["pt", "eta", "phi", "mass", "btagDeepB", "jetId"],
    "Muon": ["pt", "eta", "phi", "charge"],
    "Electron": ["pt", "eta", "phi"],
}
JAGGED = [f"{c}_{f}" for c, fields in COLLECTIONS.items() for f in fields]
BRANCHES = FLAT + JAGGED
MAX_LEN = 6
BATCH_SIZE = 1024
STEP_SIZE = "100 MB"  # the spec's default; (a) uses the same
PREDECESSOR_EVENTS = 50_000

TARGETS = {
    "b/a zlib": 0.8,
    "b/a none": 0.8,
    "b/c zlib": 30.0,
    "b/c none": 100.0,
    "workers 2/1": 1.6,
    "cache disk epoch2/epoch1": 5.0,
    "cache memory epoch2/epoch1": 5.0,
    "rss largest/smallest": 1.2,  # "about the same": at most 20% more
}


# -- inputs --------------------------------------------------------------------


def ensure_pair(workdir: Path, events: int, compression: str, log: Callable[[str], None]) -> dict[str, Any]:
    """The datagen pair of ``events`` events in total, generated unless already there."""
    import uproot

    from mlaas.data import synth

    per_file = events // 2
    d = workdir / f"{compression}-{events}"
    files = {name: d / f"{name}.root" for name in ("signal", "background")}

    def complete() -> bool:
        try:
            return all(uproot.open(p)[TREE].num_entries == per_file for p in files.values())
        except Exception:  # noqa: BLE001 - missing or unreadable: regenerate
            return False

    seconds = None
    if not complete():
        log(f"generating {events:,} events ({compression}) in {d} ...")
        t0 = time.perf_counter()
        synth.generate(d, per_file, compression=compression, seed=0)
        seconds = time.perf_counter() - t0
    return {
        "dir": str(d), "events": 2 * per_file, "compression": compression,
        "files": [str(files["signal"]), str(files["background"])],
        "bytes": sum(p.stat().st_size for p in files.values()),
        "generate_seconds": seconds,
    }


def make_spec(pair: dict[str, Any], cache: Any = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tree": TREE,
        "sources": [
            {"name": "signal", "files": [pair["files"][0]], "label": 1},
            {"name": "background", "files": [pair["files"][1]], "label": 0},
        ],
        "features": FLAT + [{"branch": b, "max_len": MAX_LEN} for b in JAGGED],
        "step_size": STEP_SIZE,
    }
    if cache is not None:
        data["cache"] = cache
    return {"version": 1, "name": "bench", "data": data}


# -- measurements ------------------------------------------------------------------


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    gc.collect()
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def raw_iterate(pair: dict[str, Any], inflate: str = "zlib") -> int:
    """(a) the ceiling: uproot reads the same branches, nothing else.

    ``inflate="zlib"`` is uproot as installed (the stdlib's zlib), the
    baseline of the b/a target; ``"isal"`` is uproot with the ISA-L
    inflater that mlaas switches on (``mlaas.data.sources.use_fast_zlib``),
    a higher ceiling reported beside it (a*).
    """
    import uproot
    from uproot.compression import _DecompressZLIB

    from mlaas.data import sources

    _DecompressZLIB.library = inflate
    try:
        n = 0
        for arrays in uproot.iterate([f"{f}:{TREE}" for f in pair["files"]], BRANCHES,
                                     step_size=STEP_SIZE, library="ak"):
            n += len(arrays)
    finally:
        _DecompressZLIB.library = sources.ZLIB_LIBRARY
    return n


def epoch(ds: Any) -> int:
    """(b) one epoch of RootDataset: every float32 batch."""
    n = 0
    for batch in ds:
        n += len(batch["y"])
    return n


def loader_epoch(ds: Any, workers: int) -> int:
    from torch.utils.data import DataLoader

    dl = DataLoader(ds.torch(), batch_size=None, num_workers=workers)
    return loader_pass(dl)


def loader_pass(dl: Any) -> int:
    n = 0
    for batch in dl:
        n += int(batch["y"].shape[0])
    return n


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_pair(pair: dict[str, Any], repeat: int, predecessor_events: int,
               log: Callable[[str], None]) -> tuple[dict[str, Any], Any]:
    """Pass 1, (a), (b) and (c) on one pair; returns results and the stats of pass 1."""
    import predecessor

    from mlaas.data.loader import RootDataset

    spec = make_spec(pair)
    out: dict[str, Any] = {"events": pair["events"], "bytes": pair["bytes"]}

    log(f"[{pair['compression']}] pass 1 ...")
    gc.collect()
    t0 = time.perf_counter()
    ds = RootDataset(spec, split="all", batch_size=BATCH_SIZE, shuffle=True)
    out["construct_with_pass1_s"] = time.perf_counter() - t0
    stats = ds.stats
    out["pass1_s"] = stats.seconds
    out["pass1_evps"] = rate(stats.entries, stats.seconds)
    out["chunks"] = len(ds.chunks)
    out["chunk_entries"] = sorted({c.entries for c in ds.chunks}, reverse=True)[:3]
    out["n_features"] = ds.n_features
    del ds

    raw_s: list[float] = []
    fast_s: list[float] = []
    ds_s: list[float] = []
    for r in range(repeat):
        log(f"[{pair['compression']}] (a) raw uproot.iterate, round {r + 1}/{repeat} ...")
        n_a, s = timed(lambda: raw_iterate(pair))
        assert n_a == pair["events"], (n_a, pair["events"])
        raw_s.append(s)
        if pair["compression"] == "zlib":
            log(f"[{pair['compression']}] (a*) raw uproot.iterate with ISA-L, round "
                f"{r + 1}/{repeat} ...")
            n_a, s = timed(lambda: raw_iterate(pair, "isal"))
            assert n_a == pair["events"], (n_a, pair["events"])
            fast_s.append(s)
        log(f"[{pair['compression']}] (b) RootDataset epoch, round {r + 1}/{repeat} ...")
        ds = RootDataset(spec, split="all", batch_size=BATCH_SIZE, shuffle=True, stats=stats)
        n_b, s = timed(lambda ds=ds: epoch(ds))
        assert n_b == pair["events"], (n_b, pair["events"])
        ds_s.append(s)
        if r + 1 == repeat:  # a second pass of the same dataset: its buffers already touched
            log(f"[{pair['compression']}] (b) the same RootDataset's second epoch ...")
            n_b, s = timed(lambda ds=ds: epoch(ds))
            assert n_b == pair["events"], (n_b, pair["events"])
            out["b_second_pass_s"] = s
        del ds
    out["a_s"] = raw_s
    out["b_s"] = ds_s
    out["a_evps"] = rate(pair["events"], min(raw_s))
    out["a_isal_s"] = fast_s
    out["a_isal_evps"] = rate(pair["events"], min(fast_s)) if fast_s else float("nan")
    out["b_evps"] = rate(pair["events"], min(ds_s))
    out["b_second_pass_evps"] = rate(pair["events"], out["b_second_pass_s"])

    runs = []
    for r in range(repeat):
        log(f"[{pair['compression']}] (c) predecessor on {predecessor_events:,} events, "
            f"round {r + 1}/{repeat} ...")
        gc.collect()
        runs.append(predecessor.run(pair["files"], [1, 0], events=predecessor_events, tree=TREE,
                                    flat=FLAT, jagged=JAGGED, batch_size=BATCH_SIZE))
    c = min(runs, key=lambda run: run["convert_seconds"])
    out["c"] = c
    out["c_convert_s"] = [run["convert_seconds"] for run in runs]
    out["c_evps"] = rate(c["events"], c["convert_seconds"])
    out["c_with_specs_evps"] = rate(c["events"], c["convert_seconds"] + c["specs_seconds"])
    out["b/a"] = out["b_evps"] / out["a_evps"]
    out["b/a*"] = out["b_evps"] / out["a_isal_evps"] if fast_s else float("nan")
    out["b/c"] = out["b_evps"] / out["c_evps"]
    return out, stats


def bench_workers(pair: dict[str, Any], stats: Any, log: Callable[[str], None]) -> dict[str, Any]:
    from torch.utils.data import DataLoader  # imported before timing, not during

    from mlaas.data.loader import RootDataset

    out: dict[str, Any] = {}
    for k in (0, 1, 2):
        log(f"[workers] DataLoader num_workers={k} ...")
        ds = RootDataset(make_spec(pair), split="all", batch_size=BATCH_SIZE, shuffle=True,
                         stats=stats)
        n, s = timed(lambda ds=ds, k=k: loader_epoch(ds, k))
        assert n == pair["events"], (n, pair["events"])
        out[f"w{k}_s"] = s
        out[f"w{k}_evps"] = rate(n, s)
        del ds
    out["2/1"] = out["w2_evps"] / out["w1_evps"]
    # Beside the target (one epoch, new worker processes, as DataLoader does by
    # default): persistent workers, the best of epochs 2-4, where no process
    # starts and no buffer is touched for the first time. Reported, not a target.
    for k in (1, 2):
        log(f"[workers] DataLoader num_workers={k}, persistent_workers=True, 4 epochs ...")
        ds = RootDataset(make_spec(pair), split="all", batch_size=BATCH_SIZE, shuffle=True,
                         stats=stats)
        dl = DataLoader(ds.torch(), batch_size=None, num_workers=k, persistent_workers=True)
        times = []
        for _ in range(4):
            n, s = timed(lambda dl=dl: loader_pass(dl))
            assert n == pair["events"], (n, pair["events"])
            times.append(s)
        out[f"p{k}_s"] = times
        out[f"p{k}_evps"] = rate(n, min(times[1:]))
        del dl, ds
    out["persistent 2/1"] = out["p2_evps"] / out["p1_evps"]
    return out


def bench_cache(pair: dict[str, Any], stats: Any, workdir: Path,
                log: Callable[[str], None]) -> dict[str, Any]:
    from mlaas.data.loader import RootDataset

    out: dict[str, Any] = {}
    cache_dir = workdir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    for kind, cache in (("disk", {"disk": str(cache_dir)}), ("memory", "memory")):
        ds = RootDataset(make_spec(pair, cache=cache), split="all", batch_size=BATCH_SIZE,
                         shuffle=True, stats=stats)
        for e in (1, 2):
            log(f"[cache {kind}] epoch {e} ...")
            n, s = timed(lambda ds=ds: epoch(ds))
            assert n == pair["events"], (n, pair["events"])
            out[f"{kind}_epoch{e}_s"] = s
            out[f"{kind}_epoch{e}_evps"] = rate(n, s)
        out[f"{kind} epoch2/epoch1"] = out[f"{kind}_epoch2_evps"] / out[f"{kind}_epoch1_evps"]
        del ds
        gc.collect()
    out["disk_bytes"] = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def peak_rss() -> int:
    """This process's peak resident set, bytes.

    ``VmHWM`` rather than ``getrusage(...).ru_maxrss``: Linux carries
    ``ru_maxrss`` across fork and exec, so a child started from this (large)
    benchmark process would report the parent's size, not its own. ``VmHWM``
    belongs to the address space, which exec replaces.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_child(pair_dir: str) -> None:
    """In a fresh process: pass 1 then one epoch of (b); print peak RSS as JSON.

    Then, in another fresh process (``--rss-raw``), the same for (a) alone: uproot's
    own peak for the same pair, the floor that (b)'s peak is read against.
    """
    from mlaas.data.loader import RootDataset

    peak = peak_rss

    files = [str(Path(pair_dir) / "signal.root"), str(Path(pair_dir) / "background.root")]
    after_import = peak()
    t0 = time.perf_counter()
    ds = RootDataset(make_spec({"files": files}), split="all", batch_size=BATCH_SIZE,
                     shuffle=True)
    after_pass1 = peak()
    n = epoch(ds)
    seconds = time.perf_counter() - t0
    print(json.dumps({"events": n, "seconds": seconds, "after_import": after_import,
                      "after_pass1": after_pass1, "after_epoch": peak()}))


def rss_raw_child(pair_dir: str) -> None:
    """In a fresh process: (a), ``uproot.iterate`` of the same branches; print peak RSS."""
    import mlaas.data.loader  # noqa: F401  - the same libraries imported as for (b)

    files = [str(Path(pair_dir) / "signal.root"), str(Path(pair_dir) / "background.root")]
    n = raw_iterate({"files": files})
    print(json.dumps({"events": n, "after_epoch": peak_rss()}))


def bench_rss(workdir: Path, sizes: list[int], log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for events in sizes:
        pair = ensure_pair(workdir, events, "zlib", log)
        log(f"[rss] fresh process, pass 1 + epoch over {events:,} events ...")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-child",
                               pair["dir"]], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child failed:\n{proc.stderr[-4000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert res["events"] == pair["events"], res
        raw = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--rss-raw",
                              pair["dir"]], capture_output=True, text=True, check=False)
        if raw.returncode != 0:
            raise RuntimeError(f"RSS child (raw) failed:\n{raw.stderr[-4000:]}")
        res["raw_peak"] = json.loads(raw.stdout.strip().splitlines()[-1])["after_epoch"]
        out[str(events)] = res
    peaks = [out[str(e)]["after_epoch"] for e in sizes]
    out["largest/smallest"] = peaks[-1] / peaks[0] if len(peaks) > 1 else float("nan")
    raw = [out[str(e)]["raw_peak"] for e in sizes]
    out["raw largest/smallest"] = raw[-1] / raw[0] if len(raw) > 1 else float("nan")
    out["sizes"] = sizes
    return out


# -- report ---------------------------------------------------------------------


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds used by the whole machine, by this process and its children) so far."""
    busy = float("nan")
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        own += r.ru_utime + r.ru_stime
    return busy, own


def first_touch_rate(mb: int = 256) -> float:
    """MB/s writing memory this process has not touched before.

    On VMs whose balloon driver hands freed guest pages back to the host
    (free page reporting), touching "new" memory costs far more than on bare
    metal; every large fresh allocation of the data layer pays this rate.
    """
    import numpy as np

    t0 = time.perf_counter()
    a = np.empty(mb * 2**20, dtype=np.uint8)
    a.fill(1)
    seconds = time.perf_counter() - t0
    del a
    return mb / seconds


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, and the files of src/ that differ from it."""
    import hashlib

    root = BENCH_DIR.parent
    out: dict[str, Any] = {}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                       capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        out["src_changes"] = [line[3:] for line in status.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = "?"
    h = hashlib.sha256()
    for path in sorted((root / "src" / "mlaas" / "data").glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    out["data_layer_sha256"] = h.hexdigest()[:12]
    return out


def machine() -> dict[str, Any]:
    import awkward
    import numpy
    import uproot

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        mem = "?"
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg_start": os.getloadavg()[0],
        "first_touch_MBps": first_touch_rate(),
        **source_state(),
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem, "gpu": "none",
        "python": platform.python_version(), "numpy": numpy.__version__,
        "awkward": awkward.__version__, "uproot": uproot.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def verdicts(res: dict[str, Any]) -> list[tuple[str, float, float, bool | None]]:
    """(name, measured, target, passed) for every target; passed None when not measured."""
    rows = []
    for comp in ("zlib", "none"):
        p = res["pairs"].get(comp)
        for key in ("b/a", "b/c"):
            name = f"{key} {comp}"
            v = p[key] if p else float("nan")
            rows.append((name, v, TARGETS[name], None if p is None else v >= TARGETS[name]))
    if "workers" in res:
        v = res["workers"]["2/1"]
        rows.append(("workers 2/1", v, TARGETS["workers 2/1"], v >= TARGETS["workers 2/1"]))
    if "cache" in res:
        for kind in ("disk", "memory"):
            name = f"cache {kind} epoch2/epoch1"
            v = res["cache"][f"{kind} epoch2/epoch1"]
            rows.append((name, v, TARGETS[name], v >= TARGETS[name]))
    if "rss" in res and len(res["rss"]["sizes"]) > 1:
        v = res["rss"]["largest/smallest"]
        sizes = res["rss"]["sizes"]
        name = f"rss {sizes[-1] / 1e6:g}M/{sizes[0] / 1e6:g}M events"
        rows.append((name, v, TARGETS["rss largest/smallest"], v <= TARGETS["rss largest/smallest"]))
    return rows


def report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    m = res["machine"]
    console.print(f"[bold]mlaas data-layer benchmark[/]  {m['date']}  {m['cpu']}, "
                  f"{m['cores']} cores, {m['memory']}, GPU: {m['gpu']}")
    console.print(f"python {m['python']}, numpy {m['numpy']}, awkward {m['awkward']}, "
                  f"uproot {m['uproot']}; command: {m['command']}")
    changed = ", ".join(m.get("src_changes", [])) or "none"
    console.print(f"code: commit {m.get('commit')}, uncommitted src changes: {changed}; "
                  f"src/mlaas/data sha256 {m['data_layer_sha256']}")
    console.print(f"load average (1 min) at start {m['load_avg_start']:.2f}, at end "
                  f"{res.get('load_avg_end', float('nan')):.2f}; first-touch memory write "
                  f"{m['first_touch_MBps']:,.0f} MB/s")
    console.print(f"other processes kept {res.get('other_cores', float('nan')):.2f} cores busy "
                  f"on average during the {res.get('wall_s', 0):.0f} s run")
    if res.get("other_cores", 0.0) > 0.15:
        console.print("[yellow]warning: the machine was shared; throughputs are pessimistic[/]")

    t = Table(title="Throughput (events/s; best of the rounds of (a), (b) and (c))")
    for col in ("pair", "events", "file MB", "pass 1", "(a) raw", "(b) RootDataset",
                "(b) 2nd pass", "(c) predecessor", "b/a", "b/c"):
        t.add_column(col, justify="right")
    for comp, p in res["pairs"].items():
        t.add_row(comp, f"{p['events']:,}", f"{p['bytes'] / 1e6:,.0f}",
                  f"{p['pass1_evps']:,.0f}", f"{p['a_evps']:,.0f}", f"{p['b_evps']:,.0f}",
                  f"{p.get('b_second_pass_evps', float('nan')):,.0f}",
                  f"{p['c_evps']:,.0f} ({p['c']['events'] // 1000}k)",
                  f"{p['b/a']:.2f}", f"{p['b/c']:.1f}")
    console.print(t)
    for comp, p in res["pairs"].items():
        if p.get("a_isal_s"):
            console.print(f"{comp}: (a*) raw uproot.iterate with ISA-L {p['a_isal_evps']:,.0f} "
                          f"events/s; b/a* {p['b/a*']:.2f} (not a target: the issue's (a) is "
                          "uproot as installed)")

    if "workers" in res:
        w = res["workers"]
        t = Table(title="torch DataLoader(ds.torch(), batch_size=None), zlib pair")
        for col in ("num_workers", "events/s", "seconds"):
            t.add_column(col, justify="right")
        for k in (0, 1, 2):
            t.add_row(str(k), f"{w[f'w{k}_evps']:,.0f}", f"{w[f'w{k}_s']:.2f}")
        for k in (1, 2):
            if f"p{k}_evps" in w:
                t.add_row(f"{k}, persistent (best of epochs 2-4)", f"{w[f'p{k}_evps']:,.0f}",
                          f"{min(w[f'p{k}_s'][1:]):.2f}")
        console.print(t)
        if "persistent 2/1" in w:
            console.print(f"persistent workers 2/1: {w['persistent 2/1']:.2f} (not the target, "
                          "which is one epoch of new workers)")
    if "cache" in res:
        c = res["cache"]
        t = Table(title="data.cache, zlib pair, num_workers=0")
        for col in ("cache", "epoch 1 ev/s", "epoch 2 ev/s", "2/1"):
            t.add_column(col, justify="right")
        for kind in ("disk", "memory"):
            t.add_row(kind, f"{c[f'{kind}_epoch1_evps']:,.0f}", f"{c[f'{kind}_epoch2_evps']:,.0f}",
                      f"{c[f'{kind} epoch2/epoch1']:.1f}")
        console.print(t)
    if "rss" in res:
        r = res["rss"]
        t = Table(title="Peak RSS of pass 1 + one epoch of (b) in a fresh process, zlib")
        for col in ("events", "after import MB", "after pass 1 MB", "after epoch MB", "seconds",
                    "(a) alone MB"):
            t.add_column(col, justify="right")
        for e in r["sizes"]:
            x = r[str(e)]
            t.add_row(f"{e:,}", f"{x['after_import'] / 1e6:,.0f}", f"{x['after_pass1'] / 1e6:,.0f}",
                      f"{x['after_epoch'] / 1e6:,.0f}", f"{x['seconds']:.1f}",
                      f"{x.get('raw_peak', float('nan')) / 1e6:,.0f}")
        console.print(t)
        console.print(f"peak RSS largest/smallest: (b) {r['largest/smallest']:.2f}, "
                      f"(a) uproot alone {r.get('raw largest/smallest', float('nan')):.2f}")

    t = Table(title="Targets")
    for col in ("target", "measured", "wanted", "verdict"):
        t.add_column(col, justify="right")
    for name, v, target, ok in verdicts(res):
        op = "<=" if name.startswith("rss") else ">="
        verdict = "NOT RUN" if ok is None else ("[green]PASS[/]" if ok else "[red]MISS[/]")
        t.add_row(name, f"{v:.2f}", f"{op} {target:g}", verdict)
    console.print(t)


# -- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=2_000_000,
                    help="events of each pair in total (half per file); default 2,000,000")
    ap.add_argument("--workdir", type=Path, default=BENCH_DIR / "out",
                    help="where generated files and the cache go (default bench/out)")
    ap.add_argument("--quick", action="store_true", help="200k events: a smoke run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of (a) and (b); best is kept")
    ap.add_argument("--predecessor-events", type=int, default=PREDECESSOR_EVENTS)
    ap.add_argument("--rss-scaling", action="store_true",
                    help="add the 4M-event point to the RSS measurement (generates 4M events)")
    ap.add_argument("--rss-events", type=str, default=None,
                    help="comma-separated pair sizes for the RSS runs (default 1M and --events)")
    ap.add_argument("--skip", type=str, default="",
                    help="comma-separated parts to leave out: none, workers, cache, rss")
    ap.add_argument("--rss-child", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-raw", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.rss_raw:
        rss_raw_child(args.rss_raw)
        return 0
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    if args.quick:
        args.events = 200_000
        args.predecessor_events = min(args.predecessor_events, 20_000)
    if args.rss_events:
        sizes = [int(s) for s in args.rss_events.split(",") if s.strip()]
    elif args.quick:
        sizes = [100_000, args.events]
    else:
        sizes = [1_000_000, args.events]
    if args.rss_scaling:
        sizes.append(4_000_000)
    sizes = sorted(set(sizes))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    import warnings

    warnings.simplefilter("ignore", UserWarning)
    busy0, own0 = cpu_seconds()
    wall0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "pairs": {}}
    res["machine"]["events"] = args.events
    zlib_pair = ensure_pair(workdir, args.events, "zlib", log)
    res["pairs"]["zlib"], stats = bench_pair(zlib_pair, args.repeat, args.predecessor_events, log)
    if "none" not in skip:
        none_pair = ensure_pair(workdir, args.events, "none", log)
        res["pairs"]["none"], _ = bench_pair(none_pair, args.repeat, args.predecessor_events, log)
    if "workers" not in skip:
        res["workers"] = bench_workers(zlib_pair, stats, log)
    if "cache" not in skip:
        res["cache"] = bench_cache(zlib_pair, stats, workdir, log)
    if "rss" not in skip:
        res["rss"] = bench_rss(workdir, sizes, log)
    res["load_avg_end"] = os.getloadavg()[0]
    busy1, own1 = cpu_seconds()
    res["wall_s"] = time.perf_counter() - wall0
    # cores kept busy by other processes during the run, on average: contamination
    res["other_cores"] = max(0.0, ((busy1 - busy0) - (own1 - own0)) / res["wall_s"])
    res["targets"] = [{"name": n, "measured": v, "target": t, "pass": ok}
                      for n, v, t, ok in verdicts(res)]
    report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
