"""Why "2 DataLoader workers >= 1.6x one" cannot show on two cores: the ceiling, measured.

For k = 1 and 2 workers, with the dataset's own threads (``prefetch=True``,
the default) and without them (``prefetch=False``: each worker reads, pads
and batches on one thread, torch's convention for workers), a few rounds of
one epoch each over the 2M-event zlib pair of bench/loader.py (made there
if missing, reused here). Prints every round, the best of each setting, and
2/1 for both. Two workers on two cores cannot beat the CPU the epoch needs
spread over both cores; a single threaded worker comes close to that already.

    .venv/bin/python bench/workers_ceiling.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loader as bench  # noqa: E402  (bench/loader.py: the pair, the spec, the timing)


def cpu_seconds() -> float:
    """This process's CPU and its reaped children's (DataLoader workers end with the epoch)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    from mlaas.data.loader import RootDataset

    pair = bench.ensure_pair(bench.BENCH_DIR / "out", 2_000_000, "zlib", print)
    spec = bench.make_spec(pair)
    stats = RootDataset(spec, split="all").stats
    best: dict[tuple[bool, int], float] = {}
    cpu: dict[tuple[bool, int], float] = {}
    cores = len(os.sched_getaffinity(0))
    for round_ in range(args.rounds):
        for prefetch in (True, False):
            for k in (1, 2):
                ds = RootDataset(spec, split="all", batch_size=bench.BATCH_SIZE, shuffle=True,
                                 stats=stats, prefetch=prefetch)
                before = cpu_seconds()
                n, s = bench.timed(lambda ds=ds, k=k: bench.loader_epoch(ds, k))
                used = cpu_seconds() - before
                assert n == pair["events"], (n, pair["events"])
                best[prefetch, k] = min(s, best.get((prefetch, k), s))
                cpu[prefetch, k] = min(used, cpu.get((prefetch, k), used))
                print(f"round {round_ + 1}: {'threads' if prefetch else 'serial '} "
                      f"num_workers={k}: {s:.3f} s wall, {used:.2f} s CPU", flush=True)
    for (prefetch, k), s in sorted(best.items()):
        print(f"best {'threads' if prefetch else 'serial '} num_workers={k}: {s:.3f} s, "
              f"{n / s:,.0f} events/s; least CPU {cpu[prefetch, k]:.2f} s, which {cores} "
              f"cores need at least {cpu[prefetch, k] / cores:.3f} s for")
    for prefetch in (True, False):
        print(f"{'threads' if prefetch else 'serial '}: 2 workers / 1 = "
              f"{best[prefetch, 1] / best[prefetch, 2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
