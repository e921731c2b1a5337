"""(a) and (b) of bench/loader.py, epoch after epoch, with wall and CPU time: for A/B runs.

This VM's speed drifts by tens of percent within minutes, so two versions of
the data layer are compared by running this script for each in turn, in fresh
processes, several times (the other version from a ``git worktree`` put first
on ``PYTHONPATH``)::

    git worktree add /tmp/old <commit>
    for i in 1 2 3; do
        .venv/bin/python bench/epochs.py --compression none
        PYTHONPATH=/tmp/old/src .venv/bin/python bench/epochs.py --compression none
    done

Each round builds a new ``RootDataset`` (as loader.py's (b) does) unless
``--reuse``, which keeps one dataset and so its shuffle buffer (the steady
state of a training run). The pair comes from bench/out, made by loader.py.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loader as bench  # noqa: E402  (bench/loader.py: the pair, the spec, (a) and (b))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compression", default="none", choices=["zlib", "none"])
    ap.add_argument("--events", type=int, default=2_000_000, help="events of the pair in total")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-raw", action="store_true", help="leave out (a)")
    ap.add_argument("--reuse", action="store_true", help="one dataset for every round")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    from mlaas.data.loader import RootDataset

    pair = bench.ensure_pair(bench.BENCH_DIR / "out", args.events, args.compression,
                             lambda msg: print(msg, file=sys.stderr))
    spec = bench.make_spec(pair)
    stats = RootDataset(spec, split="all", batch_size=bench.BATCH_SIZE).stats
    kept = RootDataset(spec, split="all", batch_size=bench.BATCH_SIZE, stats=stats)
    import mlaas

    print(f"code: {Path(mlaas.__file__).parent}; {args.compression}, {pair['events']:,} events")
    for _ in range(args.rounds):
        line = []
        if not args.no_raw:
            gc.collect()
            c0, t0 = cpu(), time.perf_counter()
            bench.raw_iterate(pair)
            a = time.perf_counter() - t0
            line.append(f"(a) {a:.3f} s, CPU {cpu() - c0:.3f} s")
        ds = kept if args.reuse else RootDataset(spec, split="all",
                                                 batch_size=bench.BATCH_SIZE, stats=stats)
        gc.collect()
        c0, t0 = cpu(), time.perf_counter()
        n = bench.epoch(ds)
        b = time.perf_counter() - t0
        assert n == pair["events"], (n, pair["events"])
        line.append(f"(b) {b:.3f} s, CPU {cpu() - c0:.3f} s")
        if not args.no_raw:
            line.append(f"b/a {a / b:.2f}")
        print(" | ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
