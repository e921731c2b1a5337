#!/usr/bin/env python
"""Benchmark of training from ROOT against the same model on the same events held in memory.

On a datagen pair (signal.root + background.root, zlib, ``--events`` per file)
and the specs of ``examples/datagen-mlp.yaml`` / ``examples/datagen-deepsets.yaml``
(file names pointed at the pair, ``epochs: 3``, no early stopping, batch 1024,
``device: cpu``, ``num_workers: 0``), for each of ``deepsets`` and ``mlp``:

(m) in memory: the training split read once with ``RootDataset.columns()`` into
    torch tensors ``x, mask, y, w``; the same ``build_model``, optimiser, cosine
    schedule, weighted loss (the trainer's own ``_Loss``) and batch size; a
    ``torch.randperm`` shuffle per epoch. The reference epoch is the median of
    its 3 epochs.
(s) streaming: ``mlaas.train.trainer.train`` on ``RootDataset`` splits (pass 1
    run once and shared) with ``data.cache: none`` (epoch 1 = the first epoch
    from ROOT), then ``cache: memory`` and ``cache: {disk: ...}`` (epochs 2..3
    read the cache). Epoch seconds are the trainer's ``history[i]["seconds"]``
    (training pass only, validation excluded).

Then, for the mlp: where the time of a streamed epoch goes (cProfile of one
epoch with the read done in the main thread, plus CPU cores used with the
prefetch thread on); ``mlaas apply`` (``apply_files``) events/s against
``uproot.iterate`` of the bundle's branches with the bundle's step size; the
peak RSS (``VmHWM``, reset between phases) of each phase.

Usage::

    .venv/bin/python bench/train.py                  # 500k events per file
    .venv/bin/python bench/train.py --quick          # 50k per file, smoke run
    .venv/bin/python bench/train.py --json bench/out/train.json --md bench/out/train-results.md
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import json
import math
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

EPOCHS = 3
BATCH = 1024
TARGETS = {"first": 1.15, "cached": 1.05}  # streamed / in-memory epoch seconds


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- machine state ----------------------------------------------------------------------


def other_benchmarks() -> list[str]:
    out = subprocess.run(["pgrep", "-af", "bench/loader.py"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if str(os.getpid()) != line.split()[0]]


def wait_quiet() -> None:
    """Before a timed measurement: no bench/loader.py may be running (poll every 30 s)."""
    while busy := other_benchmarks():
        log(f"bench/loader.py is running ({busy[0][:80]}); waiting 30 s")
        time.sleep(30)


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_time() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy() -> float:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _io, irq, softirq = (int(v) for v in f[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    from loader import machine as loader_machine

    import torch

    info = loader_machine()
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["command"] = " ".join([".venv/bin/python", "bench/train.py", *sys.argv[1:]])
    return info


# -- inputs -------------------------------------------------------------------------------


def ensure_pair(workdir: Path, per_file: int) -> dict[str, Any]:
    import uproot

    from mlaas.data import synth

    d = workdir / f"train-data-{per_file}"
    files = [d / "signal.root", d / "background.root"]

    def complete() -> bool:
        try:
            return all(uproot.open(p)["Events"].num_entries == per_file for p in files)
        except Exception:  # noqa: BLE001 - missing or unreadable: regenerate
            return False

    if not complete():
        log(f"generating {per_file:,} events per file (zlib) in {d} ...")
        synth.generate(d, per_file, compression="zlib", seed=0)
    return {"dir": str(d), "files": [str(f) for f in files], "per_file": per_file,
            "bytes": sum(f.stat().st_size for f in files)}


def make_spec(model: str, pair: dict[str, Any], cache: Any = "none") -> dict[str, Any]:
    import yaml

    spec = yaml.safe_load((ROOT / "examples" / f"datagen-{model}.yaml").read_text())
    spec["name"] = f"bench-{model}"
    for src, path in zip(spec["data"]["sources"], pair["files"], strict=True):
        src["files"] = [path]
    spec["data"]["cache"] = cache
    spec["train"].update(epochs=EPOCHS, batch_size=BATCH, device="cpu", num_workers=0)
    spec["train"].pop("early_stopping", None)
    return spec


class Shared:
    """Pass 1 and the chunk plan, once per model spec (the cache setting does not change them)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from mlaas.data import stats as pass1
        from mlaas.data.loader import prepare
        from mlaas.spec import load

        pipeline = load(spec)
        self.prepared = prepare(pipeline)
        t0 = time.perf_counter()
        self.stats = pass1.compute(pipeline, *self.prepared)
        self.pass1_seconds = time.perf_counter() - t0

    def dataset(self, spec: dict[str, Any], split: str, shuffle: bool, prefetch: bool = True) -> Any:
        from mlaas.data.loader import RootDataset
        from mlaas.spec import load

        pipeline = load(spec)
        return RootDataset(pipeline, split, batch_size=pipeline.train.batch_size, shuffle=shuffle,
                           seed=pipeline.train.seed, stats=self.stats, prepared=self.prepared,
                           prefetch=prefetch)


# -- (m) in memory ------------------------------------------------------------------------------


def in_memory(spec: dict[str, Any], shared: Shared) -> dict[str, Any]:
    import torch

    from mlaas.spec import load
    from mlaas.train import trainer as tr
    from mlaas.train.models import InputLayout, build_model

    pipeline = load(spec)
    ds = shared.dataset(spec, "train", shuffle=False)
    reset_peak()
    t0 = time.perf_counter()
    cols = ds.columns()
    load_seconds = time.perf_counter() - t0
    x, mask = torch.from_numpy(cols.x), torch.from_numpy(cols.mask)
    y, w = torch.from_numpy(cols.y), torch.from_numpy(cols.w)
    n = len(y)
    tr._seed(pipeline.train.seed)
    layout = InputLayout.from_layout(ds.layout)
    k = tr.n_outputs(pipeline, ds.stats)
    model = build_model(pipeline, layout, k)
    opt = tr._optimizer(pipeline, model)
    sched = tr._scheduler(pipeline, opt)
    loss_fn = tr._Loss(pipeline.task, k, tr._class_table(pipeline, ds.stats, k), "cpu")
    gen = torch.Generator().manual_seed(pipeline.train.seed)
    seconds, losses = [], []
    wait_quiet()
    c0, b0, t_all = cpu_time(), machine_busy(), time.perf_counter()
    for _epoch in range(pipeline.train.epochs):
        wait_quiet()
        gc.collect()
        model.train()
        total = weight = 0.0
        start = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad(set_to_none=True)
            out = model(x[idx], mask[idx])
            lw, ww = loss_fn(out, y[idx], w[idx])
            loss = tr._mean(lw, ww)
            value = float(loss.item())
            if not math.isfinite(value):
                raise RuntimeError(f"loss {value}")
            loss.backward()
            opt.step()
            total += float(lw.item())
            weight += float(ww.item())
        seconds.append(time.perf_counter() - start)
        losses.append(total / weight)
        if sched is not None:
            sched.step()
    wall = time.perf_counter() - t_all
    other = max(0.0, (machine_busy() - b0 - (cpu_time() - c0)) / wall)
    return {"events": n, "load_seconds": load_seconds, "seconds": seconds,
            "other_cores": other, "train_loss": losses,
            "peak_rss": peak_rss(), "tensor_bytes": sum(int(t.nbytes) for t in (x, mask, y, w))}


# -- (s) streaming ----------------------------------------------------------------------------


def streamed(spec: dict[str, Any], shared: Shared, outdir: Path, with_val: bool = True,
             prefetch: bool = True) -> dict[str, Any]:
    from mlaas.spec import load
    from mlaas.train.trainer import train

    pipeline = load(spec)
    train_ds = shared.dataset(spec, "train", shuffle=True, prefetch=prefetch)
    val_ds = shared.dataset(spec, "validation", shuffle=False, prefetch=prefetch) if with_val else None
    shutil.rmtree(outdir, ignore_errors=True)
    waits = wait_timer(train_ds)
    wait_quiet()
    gc.collect()
    reset_peak()
    c0, b0, t0 = cpu_time(), machine_busy(), time.perf_counter()
    result = train(pipeline, train_ds, val_ds, outdir, progress=False)
    wall = time.perf_counter() - t0
    return {"seconds": [h["seconds"] for h in result.history], "wait_seconds": waits,
            "events": [h["events"] for h in result.history],
            "train_loss": [h["train_loss"] for h in result.history],
            "wall": wall, "cpu_cores": (cpu_time() - c0) / wall,
            "other_cores": max(0.0, (machine_busy() - b0 - (cpu_time() - c0)) / wall),
            "peak_rss": peak_rss(), "model": result.model, "train_ds": train_ds}


def wait_timer(ds: Any) -> list[float]:
    """Per training epoch, the seconds the training thread spent waiting for its next batch.

    With the loader's threads this is the time blocked on the batch queue;
    without them, all the loader's work. Robust to a shared machine in a way
    epoch times are not: it says whether the loader starved training. (Wraps
    the instance's ``iter_epoch``, which the torch dataset calls.)
    """
    waits: list[float] = []
    original = ds.iter_epoch

    def timed(*args: Any, **kwargs: Any) -> Any:
        it = iter(original(*args, **kwargs))
        waited = 0.0
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                waited += time.perf_counter() - t0
                yield batch
        finally:
            waits.append(waited)

    ds.iter_epoch = timed
    return waits


def loader_only(ds: Any, epoch: int) -> float:
    """One epoch of the training split's batches through the trainer's DataLoader, no model."""
    from torch.utils.data import DataLoader

    wait_quiet()
    gc.collect()
    ds.set_epoch(epoch)
    t0 = time.perf_counter()
    n = 0
    for batch in DataLoader(ds.torch(), batch_size=None, num_workers=0):
        n += int(batch["x"].shape[0])
    return time.perf_counter() - t0


def bench_model(name: str, pair: dict[str, Any], workdir: Path) -> dict[str, Any]:
    spec = make_spec(name, pair)
    log(f"[{name}] pass 1 ...")
    shared = Shared(spec)
    log(f"[{name}] pass 1 {shared.pass1_seconds:.1f} s; in-memory baseline ...")
    mem = in_memory(spec, shared)
    mem["reference"] = statistics.median(mem["seconds"])
    log(f"[{name}] in memory: {mem['events']:,} events, epochs "
        f"{', '.join(f'{s:.2f}' for s in mem['seconds'])} s")
    res: dict[str, Any] = {"pass1_seconds": shared.pass1_seconds, "memory": mem, "stream": {}}
    cache_dir = workdir / "train-cache"
    for label, cache in (("none", "none"), ("memory", "memory"),
                         ("disk", {"disk": str(cache_dir)})):
        shutil.rmtree(cache_dir, ignore_errors=True)
        log(f"[{name}] streaming, cache {label} ...")
        s = streamed(make_spec(name, pair, cache), shared, workdir / f"train-run-{name}-{label}")
        keep = s.pop("model"), s.pop("train_ds")
        if label in ("none", "memory"):  # the loader alone, no training: one more epoch
            s["loader_only_seconds"] = loader_only(keep[1], EPOCHS)
            log(f"[{name}] cache {label}: loader alone {s['loader_only_seconds']:.2f} s")
        if label == "memory":
            res["trained"] = keep  # for the apply benchmark
        del keep
        assert s["events"][0] == mem["events"], (s["events"], mem["events"])
        s["ratio"] = [sec / mem["reference"] for sec in s["seconds"]]
        log(f"[{name}] cache {label}: epochs {', '.join(f'{x:.2f}' for x in s['seconds'])} s, "
            f"ratios {', '.join(f'{r:.3f}' for r in s['ratio'])}")
        res["stream"][label] = s
    shutil.rmtree(cache_dir, ignore_errors=True)
    log(f"[{name}] in-memory baseline again, after the streamed runs ...")
    again = in_memory(spec, shared)
    mem["runs"] = [{"seconds": mem["seconds"], "other_cores": mem["other_cores"]},
                   {"seconds": again["seconds"], "other_cores": again["other_cores"]}]
    mem["seconds"] = mem["seconds"] + again["seconds"]
    mem["reference"] = statistics.median(mem["seconds"])
    mem["peak_rss"] = max(mem["peak_rss"], again["peak_rss"])
    for s in res["stream"].values():
        s["ratio"] = [sec / mem["reference"] for sec in s["seconds"]]
    log(f"[{name}] in memory again: {', '.join(f'{x:.2f}' for x in again['seconds'])} s; "
        f"reference (median of 6) {mem['reference']:.2f} s")
    res["spec"] = spec
    res["shared"] = shared
    return res


# -- where the time goes ------------------------------------------------------------------------


def _ct(stats: pstats.Stats, file_part: str, func: str) -> float:
    return sum(v[3] for (f, _line, fn), v in stats.stats.items()  # type: ignore[attr-defined]
               if fn == func and file_part in f)


def profile_epoch(name: str, res: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One streamed epoch (cache none, no validation): with the prefetch thread, serial, profiled."""
    spec = copy.deepcopy(res["spec"])
    spec["train"]["epochs"] = 1
    shared = res["shared"]
    log(f"[{name}] one epoch with prefetch (CPU use) ...")
    on = streamed(spec, shared, workdir / "train-prof", with_val=False, prefetch=True)
    log(f"[{name}] one epoch serial ...")
    off = streamed(spec, shared, workdir / "train-prof", with_val=False, prefetch=False)
    log(f"[{name}] one epoch serial under cProfile ...")
    prof = cProfile.Profile()
    prof.enable()
    profd = streamed(spec, shared, workdir / "train-prof", with_val=False, prefetch=False)
    prof.disable()
    import torch

    threads = torch.get_num_threads()
    log(f"[{name}] torch with 1 intra-op thread: in memory, then one streamed epoch ...")
    torch.set_num_threads(1)
    try:
        spec3 = copy.deepcopy(spec)
        spec3["train"]["epochs"] = 3
        mem1 = in_memory(spec3, shared)
        on1 = streamed(spec, shared, workdir / "train-prof", with_val=False, prefetch=True)
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(workdir / "train-prof", ignore_errors=True)
    st = pstats.Stats(prof)
    total = _ct(st, "mlaas/train/trainer.py", "train_epoch")
    read = _ct(st, "mlaas/data/chunks.py", "read")
    decompress = sum(v[3] for (f, _l, fn), v in st.stats.items()  # type: ignore[attr-defined]
                     if "decompress" in fn and f == "~")
    transform = _ct(st, "mlaas/data/transform.py", "__call__")
    batching = _ct(st, "mlaas/data/loader.py", "_flush")
    to_tensor = _ct(st, "mlaas/data/torch_dataset.py", "_plain")
    forward = _ct(st, "mlaas/train/trainer.py", "forward")
    backward = _ct(st, "torch/_tensor.py", "backward")
    step = _ct(st, "torch/optim/adam.py", "step")
    parts = {"read (uproot: decompress + interpret)": read, "  of which decompression (built-in)": decompress,
             "transform (cut, derived, pad, sort, normalise)": transform,
             "shuffle buffer + batch gather": batching, "numpy -> torch": to_tensor,
             "forward + loss": forward, "backward": backward, "optimizer step": step}
    accounted = read + transform + batching + to_tensor + forward + backward + step
    parts["other (loop, .item(), DataLoader)"] = total - accounted
    return {
        "prefetch_seconds": on["seconds"][0], "prefetch_cpu_cores": on["cpu_cores"],
        "serial_seconds": off["seconds"][0], "serial_cpu_cores": off["cpu_cores"],
        "profiled_seconds": profd["seconds"][0], "profile_total": total,
        "one_thread": {"memory_seconds": statistics.median(mem1["seconds"]),
                       "stream_seconds": on1["seconds"][0], "stream_cpu_cores": on1["cpu_cores"]},
        "profile": {k: {"seconds": v, "share": v / total if total else float("nan")}
                    for k, v in parts.items()},
    }


def thread_modes(name: str, res: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Where the loader's work runs, one run: serial, a reader thread only, reader + batch thread.

    One epoch each (cache none, no validation), interleaved with an in-memory
    epoch before and after. "reader only" is the previous design (preprocessing
    and batching on the training thread), obtained by bypassing the batch
    thread of ``RootDataset.iter_epoch``.
    """
    from mlaas.data.loader import RootDataset

    spec = copy.deepcopy(res["spec"])
    spec["train"]["epochs"] = 1
    shared = res["shared"]
    out: dict[str, Any] = {"memory": []}
    threaded = RootDataset.iter_epoch

    def reader_only(self: Any, epoch: int, worker: int = 0, num_workers: int = 1) -> Any:
        return self._epoch_batches(epoch, worker, num_workers)

    out["memory"] += in_memory(spec, shared)["seconds"]
    for mode, prefetch, iter_epoch in (("serial", False, threaded),
                                       ("reader thread only", True, reader_only),
                                       ("reader + batch threads", True, threaded)):
        log(f"[{name}] one epoch, loader mode: {mode} ...")
        RootDataset.iter_epoch = iter_epoch  # type: ignore[method-assign]
        try:
            s = streamed(spec, shared, workdir / "train-modes", with_val=False, prefetch=prefetch)
        finally:
            RootDataset.iter_epoch = threaded  # type: ignore[method-assign]
        out[mode] = {"seconds": s["seconds"][0], "cpu_cores": s["cpu_cores"],
                     "other_cores": s["other_cores"], "wait": s["wait_seconds"][0]}
    out["memory"] += in_memory(spec, shared)["seconds"]
    out["reference"] = statistics.median(out["memory"])
    shutil.rmtree(workdir / "train-modes", ignore_errors=True)
    return out


# -- apply ----------------------------------------------------------------------------------------


def bench_apply(name: str, res: dict[str, Any], pair: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import uproot

    from mlaas.apply import apply_files
    from mlaas.bundle import Bundle
    from mlaas.spec import load
    from mlaas.train.export import export_bundle

    model, train_ds = res.pop("trained")
    out = workdir / f"train-bundle-{name}"
    shutil.rmtree(out, ignore_errors=True)
    log(f"[{name}] exporting a bundle ...")
    bundle_dir = export_bundle(load(res["spec"]), model, train_ds, {}, out, provenance={},
                               plots_dir=None)
    bundle = Bundle.load(bundle_dir)
    branches, step = list(bundle.layout.branches), bundle.step_size
    file = pair["files"][0]
    n_entries = pair["per_file"]
    results: dict[str, Any] = {"branches": branches, "step_size": step, "file": file}
    best_apply = best_raw = math.inf
    for _round in range(2):
        wait_quiet()
        gc.collect()
        t0 = time.perf_counter()
        n = 0
        for arrays in uproot.iterate(f"{file}:Events", branches, step_size=step, library="ak"):
            n += len(arrays)
        best_raw = min(best_raw, time.perf_counter() - t0)
        assert n == n_entries
        wait_quiet()
        gc.collect()
        friend_dir = workdir / "train-apply-out"
        shutil.rmtree(friend_dir, ignore_errors=True)
        reset_peak()
        t0 = time.perf_counter()
        apply_files(bundle_dir, [file], friend_dir, progress=False)
        best_apply = min(best_apply, time.perf_counter() - t0)
        results["peak_rss"] = peak_rss()
        shutil.rmtree(friend_dir, ignore_errors=True)
    # where apply's time goes: the same chunks, each stage alone (serial)
    from mlaas.apply import _chunks, _plan
    from mlaas.spec import RetrySpec

    wait_quiet()
    gc.collect()
    item = _plan(bundle, file, workdir, RetrySpec())
    t0 = time.perf_counter()
    chunks = [sources_read(bundle, item, r) for r in ranges(item)]
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    preps = [bundle.preprocessor(a, file) for a in chunks]
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in preps:
        bundle.run(p.x, p.mask)
    t_onnx = time.perf_counter() - t0
    n_pass = sum(len(p.index) for p in preps)
    del chunks, preps
    results["stages"] = {"read": t_read, "preprocess": t_prep, "onnx": t_onnx,
                         "events_scored": n_pass, "chunks": len(ranges(item))}
    results.update(events=n_entries, raw_seconds=best_raw, apply_seconds=best_apply,
                   raw_eps=n_entries / best_raw, apply_eps=n_entries / best_apply,
                   ratio=best_raw / best_apply)
    log(f"[{name}] apply {results['apply_eps']:,.0f} ev/s, raw uproot "
        f"{results['raw_eps']:,.0f} ev/s (ratio {results['ratio']:.2f})")
    return results


def ranges(item: Any) -> list[tuple[int, int]]:
    return list(item.ranges)


def sources_read(bundle: Any, item: Any, r: tuple[int, int]) -> dict[str, Any]:
    from mlaas.data import sources

    return sources.read_range(item.url, bundle.tree, bundle.layout.branches, r[0], r[1])


# -- report ---------------------------------------------------------------------------------------


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in ("deepsets", "mlp"):
        r = res["models"][name]
        ref = r["memory"]["reference"]
        for label, s in r["stream"].items():
            for i, (sec, ratio) in enumerate(zip(s["seconds"], s["ratio"], strict=True), start=1):
                if i == 1 and label != "none":
                    what, target = "first epoch (writes cache)", None
                elif i == 1:
                    what = "first epoch"
                    target = TARGETS["first"] if name == "deepsets" else None
                elif label == "none":
                    what, target = f"epoch {i} (no cache)", None
                else:
                    what, target = f"epoch {i} (cached)", TARGETS["cached"]
                verdict = None if target is None else ratio <= target
                waits = s.get("wait_seconds") or []
                out.append({"model": name, "cache": label, "epoch": i, "what": what,
                            "other_cores": s["other_cores"],
                            "wait": waits[i - 1] if i - 1 < len(waits) else float("nan"),
                            "seconds": sec, "memory_seconds": ref, "ratio": ratio,
                            "target": target, "pass": verdict})
    return out


def print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="streamed epoch / in-memory epoch (same model, same events)")
    for c in ("model", "data.cache", "epoch", "streamed s", "in-memory s", "ratio", "target",
              "verdict", "other cores"):
        t.add_column(c, justify="right" if c not in ("model", "data.cache") else "left")
    for r in res["rows"]:
        v = "-" if r["pass"] is None else ("[green]PASS" if r["pass"] else "[red]MISS")
        t.add_row(r["model"], r["cache"], r["what"], f"{r['seconds']:.2f}",
                  f"{r['memory_seconds']:.2f}", f"{r['ratio']:.3f}",
                  "-" if r["target"] is None else f"<= {r['target']}", v,
                  f"{r['other_cores']:.2f}")
    Console(stderr=False).print(t)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    L: list[str] = []
    L.append("## Training: `bench/train.py`\n")
    L.append(f"- Command: `{m['command']}`")
    L.append(f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, no GPU; Python "
             f"{m['python']}, torch {m['torch']} ({m['torch_threads']} intra-op threads), "
             f"numpy {m['numpy']}, awkward {m['awkward']}, uproot {m['uproot']}.")
    L.append(f"- Code: commit `{m['commit']}`, uncommitted under src/: "
             f"{', '.join(m.get('src_changes') or []) or 'none'}; run {m['date']}; "
             f"other processes used {res['other_cores']:.2f} cores on average.")
    p = res["pair"]
    L.append(f"- Data: datagen pair, zlib, {p['per_file']:,} events per file "
             f"({fmt_bytes(p['bytes'])}); specs `examples/datagen-{{mlp,deepsets}}.yaml` with "
             f"epochs 3, no early stopping, batch {BATCH}, `device: cpu`, `num_workers: 0`.")
    L.append("- In-memory reference: the training split from `RootDataset.columns()` as torch "
             "tensors, same `build_model`, Adam, cosine schedule, weighted BCE (the trainer's "
             "`_Loss`), batch size, a `torch.randperm` per epoch, run 3 epochs before and 3 after "
             "the streamed runs; reference = median of those 6 epochs. Streamed seconds = `train()`'s `history[i]['seconds']` (training pass only).\n")
    for name in ("deepsets", "mlp"):
        r = res["models"][name]
        mem = r["memory"]
        L.append(f"{name}: {mem['events']:,} training events; in-memory epochs "
                 f"{', '.join(f'{s:.2f}' for s in mem['seconds'])} s (3 before and 3 after "
                 f"the streamed runs; other processes "
                 f"{' / '.join(format(x['other_cores'], '.2f') for x in mem['runs'])} cores); "
                 f"reference = median {mem['reference']:.2f} s, {mem['events'] / mem['reference']:,.0f} ev/s); "
                 f"`columns()` load {mem['load_seconds']:.1f} s; pass 1 {r['pass1_seconds']:.1f} s.  ")
    L.append("")
    L.append("| model | data.cache | epoch | streamed s | in-memory s | ratio | target | verdict "
             "| waited for data s | other cores (run) |")
    L.append("|---|---|---|---:|---:|---:|---:|---|---:|---:|")
    for r in res["rows"]:
        v = "-" if r["pass"] is None else ("PASS" if r["pass"] else "**MISS**")
        L.append(f"| {r['model']} | {r['cache']} | {r['what']} | {r['seconds']:.2f} | "
                 f"{r['memory_seconds']:.2f} | {r['ratio']:.3f} | "
                 f"{'-' if r['target'] is None else '<= ' + str(r['target'])} | {v} | "
                 f"{r['wait']:.2f} | {r['other_cores']:.2f} |")
    L.append("")
    L.append("The loader alone (the same `DataLoader(train_ds.torch(), batch_size=None, "
             "num_workers=0)` the trainer uses, one epoch, no model): " + "; ".join(
                 f"{name} split from ROOT {res['models'][name]['stream']['none']['loader_only_seconds']:.2f} s, "
                 f"from the memory cache {res['models'][name]['stream']['memory']['loader_only_seconds']:.2f} s"
                 for name in ("deepsets", "mlp")) + ".\n")
    L.append("Peak RSS (VmHWM, reset before each phase; includes the imported libraries): " + "; ".join(
        f"{name} in-memory {fmt_bytes(res['models'][name]['memory']['peak_rss'])} "
        f"(tensors {fmt_bytes(res['models'][name]['memory']['tensor_bytes'])}), "
        + ", ".join(f"cache {k} {fmt_bytes(s['peak_rss'])}"
                    for k, s in res["models"][name]["stream"].items())
        for name in ("deepsets", "mlp")) + ".\n")
    pr = res["profile"]
    L.append("### mlp: where a streamed epoch's time goes\n")
    L.append(f"One epoch, `cache: none`, no validation: with the prefetch thread "
             f"{pr['prefetch_seconds']:.2f} s using {pr['prefetch_cpu_cores']:.2f} cores; "
             f"serial (`prefetch=False`) {pr['serial_seconds']:.2f} s using "
             f"{pr['serial_cpu_cores']:.2f} cores; in memory "
             f"{res['models']['mlp']['memory']['reference']:.2f} s. cProfile of the serial "
             f"epoch ({pr['profiled_seconds']:.2f} s under the profiler; cumulative times, "
             f"so the Python-heavy parts are inflated by the profiler's overhead):\n")
    L.append("| part | seconds | share |")
    L.append("|---|---:|---:|")
    for k, v in pr["profile"].items():
        L.append(f"| {k} | {v['seconds']:.2f} | {100 * v['share']:.0f}% |")
    L.append("")
    one = pr["one_thread"]
    L.append(f"With `torch.set_num_threads(1)` (torch leaves a core to the reader): in memory "
             f"{one['memory_seconds']:.2f} s (median of 3), streamed with prefetch "
             f"{one['stream_seconds']:.2f} s using {one['stream_cpu_cores']:.2f} cores, ratio "
             f"{one['stream_seconds'] / one['memory_seconds']:.3f}.\n")
    L.append("### Where the loader runs: one run, three ways\n")
    L.append("One epoch each, `cache: none`, no validation; in-memory reference = median of "
             "one in-memory epoch before and one after.\n")
    L.append("| model | in memory s | serial s (ratio) | reader thread only s (ratio) "
             "| reader + batch threads s (ratio) | other cores |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for name, tm in res["thread_modes"].items():
        ref = tm["reference"]
        cells = [f"{tm[m]['seconds']:.2f} ({tm[m]['seconds'] / ref:.2f}; waited "
                 f"{tm[m]['wait']:.2f})"
                 for m in ("serial", "reader thread only", "reader + batch threads")]
        others = "/".join(f"{tm[m]['other_cores']:.2f}"
                          for m in ("serial", "reader thread only", "reader + batch threads"))
        L.append(f"| {name} | {ref:.2f} | {' | '.join(cells)} | {others} |")
    L.append("")
    L.append("### apply\n")
    L.append("| model | events | `apply_files` ev/s | raw `uproot.iterate` ev/s | apply / raw "
             "| stages alone, s: read / preprocess / ONNX run |")
    L.append("|---|---:|---:|---:|---:|---|")
    for name, a in res["apply"].items():
        st = a["stages"]
        L.append(f"| {name} | {a['events']:,} | {a['apply_eps']:,.0f} | {a['raw_eps']:,.0f} | "
                 f"{a['ratio']:.2f} | {st['read']:.2f} / {st['preprocess']:.2f} / {st['onnx']:.2f} "
                 f"({st['events_scored']:,} events pass the cut) |")
    L.append("")
    L.append(f"One file (`signal.root`), best of 2; raw = `uproot.iterate` of the bundle's "
             f"`layout.branches` with its `step_size` ({res['apply'][next(iter(res['apply']))]['step_size']}), "
             "`library=\"ak\"`, nothing else; apply includes the ONNX Runtime scoring and writing "
             "the friend file.\n")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=500_000, help="events per file")
    ap.add_argument("--quick", action="store_true", help="50k events per file: a smoke run")
    ap.add_argument("--workdir", type=Path, default=BENCH_DIR / "out")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--md", type=Path, help="write the markdown section here")
    args = ap.parse_args(argv)
    per_file = 50_000 if args.quick else args.events
    args.workdir.mkdir(parents=True, exist_ok=True)
    wait_quiet()
    res: dict[str, Any] = {"machine": machine()}
    res["pair"] = pair = ensure_pair(args.workdir, per_file)
    b0, c0, t0 = machine_busy(), cpu_time(), time.perf_counter()
    res["models"] = {name: bench_model(name, pair, args.workdir) for name in ("deepsets", "mlp")}
    res["profile"] = profile_epoch("mlp", res["models"]["mlp"], args.workdir)
    res["thread_modes"] = {name: thread_modes(name, res["models"][name], args.workdir)
                           for name in ("deepsets", "mlp")}
    res["apply"] = {name: bench_apply(name, res["models"][name], pair, args.workdir)
                    for name in ("deepsets", "mlp")}
    wall = time.perf_counter() - t0
    res["other_cores"] = max(0.0, (machine_busy() - b0 - (cpu_time() - c0)) / wall)
    res["wall_seconds"] = wall
    for r in res["models"].values():
        r.pop("shared", None)
        r.pop("trained", None)
    res["rows"] = rows(res)
    if args.json:  # first, so a failure below loses no measurement
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print_table(res)
    md = markdown(res)
    print(md)
    if args.md:
        args.md.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
