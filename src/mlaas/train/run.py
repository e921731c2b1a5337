"""``mlaas run``: one pipeline end to end on this machine.

Layer: train, orchestration only. Pass 1, training, evaluation and export
each live in their own module; this one opens the files once, shares the
plan and statistics between the splits, and writes everything under OUTDIR
in the fixed layout below, so a later ``--resume`` (or the platform, after a
preemption) finds it again::

    OUTDIR/stats.json  checkpoint.pt  history.json  metrics.json  plots/
    OUTDIR/bundle/  bundle.tar.gz
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlaas import _stop
from mlaas._progress import event_progress
from mlaas.data import stats as pass1
from mlaas.data.loader import Prepared, RootDataset, prepare
from mlaas.spec import Pipeline, load

__all__ = ["RunResult", "run"]


@dataclass
class RunResult:
    """Where things went and how training ended."""

    outdir: Path
    bundle: Path
    metrics: dict[str, Any]
    stopped: str
    epochs_run: int


def _stats(pipeline: Pipeline, prepared: Prepared, outdir: Path, resume: bool,
           progress: bool) -> pass1.Stats:
    """Pass 1, or its saved result when resuming on the same data.

    A run directory moved with its data (or to another node, by the
    platform) still finds its files by content (:meth:`Stats.misfit`).
    """
    path = outdir / "stats.json"
    layout, files, plan = prepared
    if resume and path.exists():
        saved = _saved_stats(outdir, pipeline, prepared)
        if saved is not None:
            return saved
    with event_progress("pass 1", sum(c.entries for c in plan), progress) as advance:
        stats = pass1.compute(pipeline, layout, files, plan, advance)
    path.write_text(json.dumps({**stats.to_dict(), "data_digest": pipeline.data_digest()},
                               indent=2) + "\n")
    return stats


def _saved_stats(outdir: Path, pipeline: Pipeline, prepared: Prepared) -> pass1.Stats | None:
    """The stats.json of an earlier run of this spec, or None when pass 1 must run again.

    Files that changed since (a glob that now finds one more, a file written
    anew) refuse the resume once a checkpoint exists: its model learnt on
    the old normalisation constants, and a new pass 1 would export it with
    others. Before the first checkpoint nothing learnt depends on them.
    """
    path = outdir / "stats.json"
    saved = json.loads(path.read_text())
    label = saved.get("label") or {}
    # a stats.json from before pass 1 counted the training split's labels is redone
    digests = {pipeline.data_digest(), pipeline.legacy_data_digest()}
    if saved.get("data_digest") not in digests or (
            "counts" in label and "train_counts" not in label):
        return None
    stats = pass1.Stats.from_dict(saved)
    layout, files, _ = prepared
    misfit = stats.misfit(pipeline, layout, files)
    if misfit is None:
        return stats
    from mlaas.train import trainer  # torch: not before it is needed

    checkpoint = outdir / trainer.CHECKPOINT_NAME
    if checkpoint.exists():
        raise trainer.TrainingError(
            f"cannot resume from {str(checkpoint)!r}: the input files changed since the run "
            f"began ({path.name} {misfit[0]}); restore them, or run without --resume (or in "
            "another output directory) to start afresh", file_path=str(path))
    print(f"{path} {misfit[0]}: running pass 1 again", file=sys.stderr)
    return None


@contextlib.contextmanager
def _preemptible() -> Iterator[None]:
    """Outside the training loop a SIGTERM has nothing to save: end the run at once, as preempted.

    The trainer installs its own handler while it trains (it checkpoints
    first); this one covers pass 1, evaluation and export, which a resumed
    run simply redoes. It ends the process with exit code 75 without raising
    (:mod:`mlaas._stop` says why an exception is not safe there).
    """
    try:
        previous = signal.signal(signal.SIGTERM, _stop.handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(spec: str | Path | dict[str, Any] | Pipeline, outdir: str | Path, *,
        resume: bool = False, progress: bool = True,
        on_progress: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Run pass 1, training, evaluation and export for ``spec`` into ``outdir``.

    Args:
        spec (path, dict or Pipeline): the pipeline.
        outdir (path): the run directory (created).
        resume (bool): continue from ``outdir/checkpoint.pt``.
        progress (bool): draw progress bars on stderr.
        on_progress (callable or None): called with ``{"phase": ...}`` as each stage
            starts (``pass1``, ``training``, ``evaluation``, ``export``) and, while
            training, with the trainer's reports (see :func:`mlaas.train.trainer.train`).
    """
    from mlaas.train import evaluate, export, trainer
    from mlaas.train.provenance import provenance

    started = time.time()

    def phase(name: str) -> None:
        if on_progress is not None:
            on_progress({"phase": name})

    pipeline = load(spec)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    if resume:  # before pass 1: a checkpoint of another spec is refused anyway
        trainer.check_resumable(pipeline, out)
    with _preemptible():
        phase("pass1")
        prepared = prepare(pipeline)
        stats = _stats(pipeline, prepared, out, resume, progress)
        t = pipeline.train

        def split(name: str, shuffle: bool) -> RootDataset:
            return RootDataset(pipeline, name, batch_size=t.batch_size, shuffle=shuffle,
                               seed=t.seed, stats=stats, prepared=prepared)

        train_ds, val_ds = split("train", True), split("validation", False)
        phase("training")
        result = trainer.train(pipeline, train_ds, val_ds, out, resume=resume, progress=progress,
                               on_progress=on_progress)
        phase("evaluation")
        metrics = evaluate.evaluate(pipeline, result.model, split("train", False),
                                    split("test", False), result.history, out)
        phase("export")
        info = provenance(pipeline, train_ds, started, time.time())
        bundle = export.export_bundle(pipeline, result.model, train_ds, metrics, out,
                                      provenance=info, plots_dir=out / "plots")
    return RunResult(out, bundle, metrics, result.stopped, result.epochs_run)
