"""The training loop of ``mlaas run``: losses, optimisers, checkpoints, preemption.

Layer: train. :func:`train` takes the training and validation
:class:`mlaas.data.RootDataset` (built by the caller with
``batch_size=pipeline.train.batch_size``; they batch and shuffle themselves)
and returns the model with its best weights. Everything it keeps between runs
is ``OUTDIR/checkpoint.pt``.

Loss
----
``binary``: binary cross-entropy on the logit ``output[:, 0]`` (labels in
[0, 1]). ``multiclass``: cross-entropy on ``K`` logits, labels the integers
``0..K-1`` (``K`` from pass 1, see :func:`n_outputs`). ``regression``: squared
error on ``output[:, 0]``. Each event's loss is multiplied by its weight ``w``
(``data.weight``, else 1) and, under ``class_weights: balanced``, by
``N / (K * N_k)`` for its class (``N_k`` events of class ``k`` in the training
split, counted by pass 1);
the loss of a batch, an epoch or the validation split is the weighted mean
``sum(w * l) / sum(w)``. Class weights apply to the validation loss too,
so early stopping watches the quantity being minimised.

The validation loss decides the best weights, early stopping and the
``plateau`` schedule. With an empty validation split the training loss is
used instead (and ``val_loss`` is ``None`` in the history).

Checkpoints and resuming
------------------------
``OUTDIR/checkpoint.pt`` (written atomically: temporary file, then
``os.replace``) holds the state *at the end of a completed epoch*: weights,
optimiser and schedule state, the RNG states (torch CPU and CUDA, numpy's
global generator, Python's ``random``), the epoch count (which also selects
the datasets' shuffle), the history, the best validation loss and weights and
the early-stopping counter. It is written every ``train.checkpoint_every``
epochs, at the end, and when training is interrupted (SIGTERM or
``train.max_time``). An interruption in the middle of an epoch saves the state
from the start of that epoch (kept in memory), so a resumed run redoes that
epoch from its beginning: **a run that is interrupted and resumed, any number
of times, ends with the same weights as one that was not** (same seed, same
device; on CPU bit for bit).

``resume=True`` continues from the checkpoint when there is one (and starts
afresh when there is none, so a platform can always pass it). The spec must be
the same as when the checkpoint was written, except for the fields in
:data:`RESUMABLE_FIELDS` (``train.epochs``, to train longer;
``train.max_time``, ``train.checkpoint_every``, ``train.num_workers``,
``train.device``, and ``name``, which do not define the training trajectory).
Anything else raises :class:`TrainingError` listing the changed fields. A
checkpoint of a run that stopped early is final: resuming it returns its best
model without training. ``max_time`` is counted afresh in every run.

Learning-rate schedules
-----------------------
``cosine``: epoch ``e`` (1-based) of ``E = train.epochs`` trains at
``lr * (1 + cos(pi * (e - 1) / E)) / 2``, set from this closed form at the start
of every epoch, never derived from the previous epoch's lr (torch's
``CosineAnnealingLR`` steps recursively, scaling the current lr, so a resumed
run whose ``T_max`` was raised after the lr had reached 0 stayed at 0). The
lr therefore depends only on the epoch count and ``E``: an interrupted and
resumed run follows the same curve as an uninterrupted one. Raising
``train.epochs`` on resume *changes the curve*: the epochs already trained
followed the old ``E``, the rest follow the new one from the point it gives
for the epochs done (2 epochs of ``E = 2`` then 2 more with ``E = 4``: lr,
lr/2, then lr/2 and ``lr * (1 + cos(3 pi / 4)) / 2``), which is not the
curve of a run started with ``E = 4``. ``plateau``: ``ReduceLROnPlateau``
(factor 0.1, patience 2) on the monitored loss, its state in the checkpoint.

Preemption
----------
While :func:`train` runs in the main thread, SIGTERM sets a flag (the previous
handler is restored on exit); DataLoader workers (``train.num_workers > 0``)
ignore SIGTERM, so a signal to the whole process group is handled the same
way. At the next batch boundary the trainer writes the
checkpoint and raises :class:`Preempted`; the CLI exits with
:data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL`` of sysexits.h: a temporary
failure, retry later), so a batch system or the platform can tell a
preemption from a failure and rerun the job with ``--resume``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mlaas._stop import PREEMPTED_EXIT_CODE  # 75, EX_TEMPFAIL: re-exported here
from mlaas.errors import MlaasError
from mlaas.spec import Pipeline, canonical_data
from mlaas.train.models import InputLayout, build_model, select_device, user_frame

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "RESUMABLE_FIELDS",
    "CHECKPOINT_NAME",
    "PROGRESS_EVERY_S",
    "Preempted",
    "TrainingError",
    "TrainResult",
    "n_outputs",
    "cosine_lr",
    "train",
    "load_checkpoint",
    "check_resumable",
]

#: Spec fields that may change between a checkpoint and ``resume=True``.
RESUMABLE_FIELDS = ("name", "train.epochs", "train.max_time", "train.checkpoint_every",
                    "train.num_workers", "train.device")

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = 1

#: Seconds between two ``on_progress`` reports inside an epoch.
PROGRESS_EVERY_S = 2.0

ProgressCallback = Callable[[dict[str, Any]], None]


class TrainingError(MlaasError, RuntimeError):
    """Training cannot go on: NaN loss, a user model that fails, wrong outputs or labels."""


class Preempted(MlaasError):
    """SIGTERM arrived; the checkpoint is written and ``--resume`` continues the run."""

    exit_code = PREEMPTED_EXIT_CODE


@dataclass
class TrainResult:
    """The trained model (best weights, on the training device) and how training went.

    ``stopped`` is ``completed``, ``early_stopping`` or ``max_time``;
    ``epochs_run`` counts completed epochs, including those of earlier runs
    when resuming (it equals ``len(history)``).
    """

    model: nn.Module
    history: list[dict[str, Any]]
    stopped: str
    epochs_run: int
    input_layout: InputLayout
    best_epoch: int | None = None
    checkpoint: Path | None = None
    device: str = "cpu"


# -- labels and outputs ------------------------------------------------------------------


def _label_info(stats: Any) -> dict[str, Any]:
    label = stats.label if hasattr(stats, "label") else stats["label"]
    return dict(label or {})


def _sources(stats: Any) -> list[dict[str, Any]]:
    return list(stats.sources if hasattr(stats, "sources") else stats["sources"])


def _fmt_labels(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values[:20]) + (" ..." if len(values) > 20 else "")


def n_outputs(pipeline: Pipeline, stats: Any) -> int:
    """Outputs of the network: 1 for binary and regression, ``K`` for multiclass.

    ``K`` is the number of distinct labels pass 1 found (``stats.label["counts"]``),
    which must be exactly the integers ``0..K-1``. A binary task must have labels
    in [0, 1]. Raises :class:`TrainingError` naming the labels found otherwise.
    """
    counts = _label_info(stats).get("counts")
    values = sorted(float(k) for k in counts) if counts is not None else None
    if pipeline.task == "regression":
        return 1
    if pipeline.task == "binary":
        if values is not None and any(v < 0.0 or v > 1.0 for v in values):
            raise TrainingError(
                f"task binary needs labels in [0, 1], but the data has labels "
                f"{_fmt_labels(values)}; use task: multiclass for integer classes 0..K-1, "
                "or task: regression", field_path="task")
        return 1
    if values is None:
        raise TrainingError(
            "task multiclass needs integer labels 0..K-1, but pass 1 saw more than 64 "
            "distinct label values (a continuous label?); use task: regression",
            field_path="task")
    k = len(values)
    if k < 2 or values != [float(i) for i in range(k)]:
        raise TrainingError(
            f"task multiclass needs the integer labels 0..K-1 (at least two classes), but "
            f"the data has labels {_fmt_labels(values)}; map them with data.label "
            "(e.g. a label expression) or use task: binary", field_path="task")
    return k


def _class_counts(pipeline: Pipeline, train_ds: Any) -> dict[float, float]:
    """Training events per label value, from pass 1: per source and split when the
    sources carry the labels, else the training split's label counts."""
    stats = train_ds.stats
    if pipeline.data.label is None:
        counts: dict[float, float] = {}
        for s in _sources(stats):
            lab = float(s["label"])
            counts[lab] = counts.get(lab, 0.0) + float(s["splits"]["train"])
        return counts
    found = _label_info(stats).get("train_counts")
    if found is None:
        raise TrainingError("class_weights: balanced needs discrete labels, but pass 1 saw "
                            "more than 64 distinct label values", field_path="train.class_weights")
    return {float(k): float(v) for k, v in found.items()}


def _class_table(pipeline: Pipeline, train_ds: Any, k: int) -> Tensor | None:
    """Per class index, the factor N / (K * N_k) of ``class_weights: balanced``."""
    if pipeline.train.class_weights != "balanced":
        return None
    if pipeline.task == "regression":
        raise TrainingError("class_weights: balanced needs classes; task regression has none",
                            field_path="train.class_weights")
    counts = _class_counts(pipeline, train_ds)
    size = 2 if pipeline.task == "binary" else k
    bad = sorted(v for v in counts if not (v.is_integer() and 0 <= v < size))
    if bad:
        raise TrainingError(f"class_weights: balanced needs integer labels 0..{size - 1}, "
                            f"found {_fmt_labels(bad)}", field_path="train.class_weights")
    present = {int(v): n for v, n in counts.items() if n > 0}
    total = sum(present.values())
    table = torch.zeros(size, dtype=torch.float32)
    for c, n in present.items():
        table[c] = total / (len(present) * n)
    return table


# -- the loss ------------------------------------------------------------------------------


class _Loss:
    """Per-event losses times weights; returns (sum(w*l), sum(w)) for a batch."""

    def __init__(self, task: str, k: int, table: Tensor | None, device: str) -> None:
        self.task = task
        self.k = k
        self.table = table.to(device) if table is not None else None

    def __call__(self, out: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        if self.task == "multiclass":
            labels = y.long()
            if bool(((labels.to(y.dtype) != y) | (labels < 0) | (labels >= self.k)).any()):
                bad = torch.unique(y[(labels.to(y.dtype) != y) | (labels < 0)
                                     | (labels >= self.k)])[:10].tolist()
                raise TrainingError(f"multiclass labels must be integers in [0, {self.k}), "
                                    f"found {_fmt_labels(bad)} in a batch")
            per = nn.functional.cross_entropy(out, labels, reduction="none")
        elif self.task == "binary":
            per = nn.functional.binary_cross_entropy_with_logits(out[:, 0], y, reduction="none")
        else:
            per = nn.functional.mse_loss(out[:, 0], y, reduction="none")
        if self.table is not None:
            w = w * self.table[y.long().clamp(0, self.table.numel() - 1)]
        return (w * per).sum(), w.sum()


def _mean(total: Tensor, weight: Tensor) -> Tensor:
    """sum(w*l) / sum(w); sum(w*l) alone when the weights sum to zero (negative weights)."""
    safe = torch.where(weight.abs() > 1e-12, weight, torch.ones_like(weight))
    return total / safe


# -- checkpoints ------------------------------------------------------------------------------


def _spec_view(pipeline: Pipeline) -> dict[str, Any]:
    """The spec without :data:`RESUMABLE_FIELDS`: what a checkpoint must match."""
    d = pipeline.model_dump(mode="json")
    d["data"] = canonical_data(d["data"])  # derived in its order: another order is another spec
    for dotted in RESUMABLE_FIELDS:
        node = d
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return d


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(sub)
            else:
                out.extend(_diff(a[key], b[key], sub))
        return out
    return [] if a == b else [path or "(top)"]


def _rng_state(device: str) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """Python's random state back to nested tuples (a round trip may give lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU (a snapshot later training cannot change)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _write_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (tensors and plain data only)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
        raise TrainingError(f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: "
                            f"{exc}; delete it or run without --resume",
                            file_path=str(path)) from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise TrainingError(f"{str(path)!r} is not an mlaas checkpoint (format {_FORMAT})",
                            file_path=str(path))
    return state


def check_resumable(pipeline: Pipeline, outdir: str | os.PathLike[str]) -> None:
    """Refuse at once a resume whose checkpoint was written for another spec.

    :func:`train` refuses it too, but only after pass 1, which on a large
    dataset is hours of reading for nothing; ``mlaas run --resume`` asks first.
    No checkpoint: nothing to refuse (the run starts afresh).
    """
    path = Path(outdir) / CHECKPOINT_NAME
    if path.exists():
        _check_spec(load_checkpoint(path), pipeline, path)


def _check_spec(state: dict[str, Any], pipeline: Pipeline, path: Path) -> None:
    old, new = json.loads(state["spec"]), _spec_view(pipeline)
    if isinstance(old.get("data", {}).get("derived"), dict):
        # written before derived kept its order (sort_keys sorted it): compare as a set,
        # and without the features' unset collection, which it did not have either
        old["data"] = canonical_data(old["data"])
        new["data"]["derived"] = dict(new["data"]["derived"])
        old["data"]["derived"] = dict(old["data"]["derived"])
    changed = _diff(old, new)
    if changed:
        raise TrainingError(
            f"cannot resume from {str(path)!r}: the spec changed since it was written "
            f"({', '.join(changed[:10])}{' ...' if len(changed) > 10 else ''}); only "
            f"{', '.join(RESUMABLE_FIELDS)} may change. Run without --resume (or use "
            "another output directory) to start afresh", file_path=str(path))


# -- signals, progress ---------------------------------------------------------------------------


class _Flag:
    """SIGTERM seen during training: acted upon at the next batch boundary.

    The handler only sets an attribute, so it is safe wherever the main
    thread is when it runs (an exception raised there is not: see
    :mod:`mlaas._stop`).
    """

    def __init__(self) -> None:
        self.raised = False

    def set(self, signum: int, frame: Any) -> None:
        self.raised = True


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[_Flag]:
    """Set a flag on SIGTERM while training (main thread only); restore the old handler."""
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, flag.set)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_ignores_sigterm(worker_id: int) -> None:
    """DataLoader worker start: ignore SIGTERM.

    A batch system (or ``kill -TERM -PGID``) signals the whole process group.
    A worker that died of it made the main process fail at its next batch
    ("DataLoader worker ... is killed by signal: Terminated", exit 1) before
    its SIGTERM flag was seen, so no checkpoint and no exit 75. Ignoring it
    leaves the decision to the main process, which checkpoints and stops; the
    workers still end when it shuts its loaders down (their queue says so)
    or dies (torch's watchdog in each worker sees the parent gone).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Bars:
    """An epoch bar and a batch bar on stderr; does nothing when disabled."""

    def __init__(self, enabled: bool, epochs: int, done: int, events: int | None) -> None:
        self.enabled = enabled
        self.events = events
        self._stack = contextlib.ExitStack()
        if not enabled:
            return
        from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        from mlaas._progress import err_console

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                            TaskProgressColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err_console)
        self._stack.enter_context(self.bar)
        self.epoch_task = self.bar.add_task("epochs", total=epochs, completed=done, info="")
        self.batch_task = self.bar.add_task("batches", total=events, info="")

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if self.enabled:
            self.bar.reset(self.batch_task, total=self.events, info="",
                           description=f"epoch {epoch}/{epochs}")

    def batch(self, events: int, seen: int, seconds: float, loss: float) -> None:
        if self.enabled:
            rate = seen / seconds if seconds > 0 else 0.0
            self.bar.update(self.batch_task, advance=events,
                            info=f"{rate:,.0f} ev/s  loss {loss:.4g}")

    def end_epoch(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            val = entry["val_loss"]
            info = (f"train {entry['train_loss']:.4g}  val "
                    f"{'-' if val is None else format(val, '.4g')}  lr {entry['lr']:.3g}")
            self.bar.update(self.epoch_task, advance=1, info=info)

    def close(self) -> None:
        self._stack.close()


# -- the loop ------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """Internal: SIGTERM or max_time at a batch boundary."""


def _optimizer(pipeline: Pipeline, model: nn.Module) -> torch.optim.Optimizer:
    t = pipeline.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters", field_path="model")
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def _scheduler(pipeline: Pipeline, opt: torch.optim.Optimizer) -> Any:
    """The stateful schedule (``plateau``); None otherwise (``cosine`` is :func:`cosine_lr`)."""
    t = pipeline.train
    if t.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1,
                                                          patience=2)
    return None


def cosine_lr(base: float, done: int, total: int) -> float:
    """The ``cosine`` schedule's lr for the epoch after ``done`` of ``total`` epochs.

    A closed form of the epoch count, so resuming (with the same or a larger
    ``total``) lands on the curve instead of scaling whatever lr the
    checkpoint held; see "Learning-rate schedules" in the module docstring.
    """
    if total <= 0:
        return base
    return base * (1.0 + math.cos(math.pi * min(done, total) / total)) / 2.0


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Trainer:
    """One call of :func:`train`; the state lives here so the loop reads plainly."""

    def __init__(self, pipeline: Pipeline, train_ds: Any, val_ds: Any, outdir: Path,
                 progress: bool, on_progress: ProgressCallback | None = None) -> None:
        self.on_progress = on_progress
        self.p = pipeline
        self.t = pipeline.train
        self.train_ds, self.val_ds = train_ds, val_ds
        self.path = outdir / CHECKPOINT_NAME
        self.progress = progress
        try:
            self.device = select_device(self.t.device)
        except ValueError as exc:
            raise TrainingError(str(exc), field_path="train.device") from exc
        self.layout = InputLayout.from_layout(train_ds.layout)
        self.k = n_outputs(pipeline, train_ds.stats)
        self.loss = _Loss(pipeline.task, self.k,
                          _class_table(pipeline, train_ds, self.k), self.device)
        self.user_file = (Path(pipeline.base_dir) / pipeline.model.file).resolve() \
            if pipeline.model.file else None
        _seed(self.t.seed)
        self.model = build_model(pipeline, self.layout, self.k).to(self.device)
        self.opt = _optimizer(pipeline, self.model)
        self.sched = _scheduler(pipeline, self.opt)
        self.epoch = 0  # completed epochs
        self.history: list[dict[str, Any]] = []
        self.best_loss = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0
        self.stopped: str | None = None
        self.has_val = val_ds is not None and int(getattr(val_ds, "num_events", 1)) > 0
        self.started = time.monotonic()
        self.flag = _Flag()
        self.batches = 0
        # with workers: split -> (persistent DataLoader, the epoch its next pass uses)
        self.loaders: dict[str, tuple[DataLoader, int]] = {}  # type: ignore[type-arg]

    # -- checkpoint state ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue from now: a CPU copy later steps cannot alter."""
        return {
            "format": _FORMAT,
            "spec": json.dumps(_spec_view(self.p), sort_keys=True),
            "digest": self.p.digest(),
            "input_layout": json.dumps(self.layout.to_dict(), sort_keys=True),
            "n_outputs": self.k,
            "epoch": self.epoch,
            "data_epoch": self.epoch,
            "model": _cpu_copy(self.model.state_dict()),
            "optimizer": _cpu_copy(self.opt.state_dict()),
            "scheduler": _cpu_copy(self.sched.state_dict()) if self.sched is not None else None,
            "rng": _cpu_copy(_rng_state(self.device)),
            "history": copy.deepcopy(self.history),
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,  # already a CPU copy, never modified in place
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
        }

    def restore(self, state: dict[str, Any]) -> None:
        _check_spec(state, self.p, self.path)
        if json.loads(state["input_layout"]) != self.layout.to_dict() or state["n_outputs"] != self.k:
            raise TrainingError(
                f"cannot resume from {str(self.path)!r}: the input data changed (columns, "
                "jagged lengths or classes differ from the checkpoint); run without --resume",
                file_path=str(self.path))
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state["scheduler"] is not None:
            self.sched.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_loss = float(state["best_loss"])
        self.best_epoch = state["best_epoch"]
        self.best_state = state["best_state"]
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped = state["stopped"] if state["stopped"] == "early_stopping" else None
        _set_rng_state(state["rng"])

    # -- progress reports ----------------------------------------------------------

    def report(self, epoch: int, batches: int, events: int, seconds: float,
               metrics: dict[str, Any]) -> None:
        """Tell ``on_progress`` where training is (a platform writes it for its API)."""
        if self.on_progress is not None:
            self.on_progress({"phase": "training", "epoch": epoch, "epochs": self.t.epochs,
                              "batches": batches,
                              "events_per_s": events / seconds if seconds > 0 else None,
                              "metrics": metrics})

    # -- batches -------------------------------------------------------------------

    def boundary(self) -> None:
        if self.flag.raised:
            raise _Interrupted("sigterm")
        if self.t.max_time is not None and time.monotonic() - self.started > self.t.max_time:
            raise _Interrupted("max_time")

    def forward(self, batch: Mapping[str, Tensor], epoch: int, index: int,
                phase: str) -> tuple[Tensor, Tensor]:
        x = batch["x"].to(self.device)
        mask = batch["mask"].to(self.device)
        y = batch["y"].to(self.device)
        w = batch["w"].to(self.device)
        try:
            out = self.model(x, mask)
        except Exception as exc:
            if self.user_file is None:
                raise
            raise TrainingError(
                f"user model {str(self.user_file)!r} raised in forward ({phase}, epoch {epoch}, "
                f"batch {index}): {type(exc).__name__}: {exc}{user_frame(exc, self.user_file)}",
                file_path=str(self.user_file)) from exc
        if not isinstance(out, Tensor) or out.dim() != 2 or tuple(out.shape) != (len(x), self.k):
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TrainingError(
                f"model output has shape {got}, expected [{len(x)}, {self.k}] "
                f"([batch, n_outputs] for task {self.p.task}"
                f"{', K = number of classes' if self.p.task == 'multiclass' else ''})",
                **({"file_path": str(self.user_file)} if self.user_file else {}))
        if out.dtype != torch.float32:
            out = out.float()
        return self.loss(out, y, w)

    def nonfinite(self, value: float, epoch: int, index: int, phase: str) -> TrainingError:
        return TrainingError(
            f"the {phase} loss is {value} at epoch {epoch}, batch {index}; lower train.lr "
            f"(now {self.t.lr:g}) or check the inputs for extreme or invalid values "
            "(normalisation, data.nan, data.weight)", field_path="train.lr")

    def loader(self, which: str, ds: Any, epoch: int) -> DataLoader:  # type: ignore[type-arg]
        """The DataLoader for one pass over ``ds`` with the shuffle of ``epoch`` (0-based).

        With workers, one loader per split lives for the whole run
        (``persistent_workers``), so each worker keeps its open files, its
        buffers and a memory cache between epochs; each worker's dataset
        advances its own epoch after every pass (validation always uses epoch
        0). A loader whose next epoch is not ``epoch`` is replaced.
        """
        if self.t.num_workers == 0:
            ds.set_epoch(epoch)
            return DataLoader(ds.torch(), batch_size=None, num_workers=0)
        held = self.loaders.get(which)
        if held is None or held[1] != epoch:
            ds.set_epoch(epoch)
            advance = which == "train"
            held = (DataLoader(ds.torch(advance=advance), batch_size=None,
                               num_workers=self.t.num_workers, persistent_workers=True,
                               worker_init_fn=_worker_ignores_sigterm), epoch)
        self.loaders[which] = (held[0], epoch + 1 if which == "train" else epoch)
        return held[0]

    def train_epoch(self, epoch: int, bars: _Bars) -> tuple[float, int, float]:
        """One pass over the training split: (mean loss, events, seconds)."""
        loader = self.loader("train", self.train_ds, epoch - 1)
        self.model.train()
        total = weight = 0.0
        events = 0
        start = last_report = time.perf_counter()
        index = 0
        for index, batch in enumerate(loader, start=1):
            self.boundary()
            self.opt.zero_grad(set_to_none=True)
            lw, ww = self.forward(batch, epoch, index, "training")
            loss = _mean(lw, ww)
            value = float(loss.item())
            if not math.isfinite(value):
                raise self.nonfinite(value, epoch, index, "training")
            loss.backward()
            self.opt.step()
            total += float(lw.item())
            weight += float(ww.item())
            n = int(batch["x"].shape[0])
            events += n
            now = time.perf_counter()
            bars.batch(n, events, now - start, total / weight if weight else value)
            if self.on_progress is not None and now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                self.report(epoch, index, events, now - start,
                            {"train_loss": total / weight if weight else value})
        if events == 0:
            raise TrainingError("the training split yielded no events (check data.cut, "
                                "data.split and the sources)")
        self.batches = index
        return (total / weight if weight else total), events, time.perf_counter() - start

    @torch.no_grad()
    def validate(self, epoch: int) -> float | None:
        if not self.has_val:
            return None
        loader = self.loader("validation", self.val_ds, 0)
        self.model.eval()
        total = weight = 0.0
        for index, batch in enumerate(loader, start=1):
            self.boundary()
            lw, ww = self.forward(batch, epoch, index, "validation")
            total += float(lw.item())
            weight += float(ww.item())
        value = total / weight if weight else total
        if not math.isfinite(value):
            raise self.nonfinite(value, epoch, 0, "validation")
        return value

    # -- epochs --------------------------------------------------------------------

    def set_cosine_lr(self, epochs: int) -> None:
        """Under ``lr_schedule: cosine``, put the closed-form lr of the coming epoch in place."""
        if self.t.lr_schedule != "cosine":
            return
        for group in self.opt.param_groups:
            group["lr"] = cosine_lr(self.t.lr, self.epoch, epochs)

    def end_epoch(self, monitored: float) -> None:
        es = self.t.early_stopping
        min_delta = es.min_delta if es is not None else 0.0
        if monitored < self.best_loss - min_delta:
            self.best_loss = monitored
            self.best_epoch = self.epoch
            self.best_state = _cpu_copy(self.model.state_dict())
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if es is not None and self.bad_epochs >= es.patience:
            self.stopped = "early_stopping"

    def run(self, resume: bool) -> TrainResult:
        if resume and self.path.exists():
            self.restore(load_checkpoint(self.path))
        epochs = self.t.epochs
        last = self.snapshot()  # the state at the start of the current epoch
        bars = _Bars(self.progress, epochs, min(self.epoch, epochs),
                     None if self.p.data.balance == "equal"
                     else int(getattr(self.train_ds, "num_events", 0)) or None)
        reason = "completed"
        try:
            with _sigterm_flag() as flag:
                self.flag = flag
                try:
                    while self.stopped is None and self.epoch < epochs:
                        epoch = self.epoch + 1
                        bars.start_epoch(epoch, epochs)
                        self.set_cosine_lr(epochs)
                        lr = float(self.opt.param_groups[0]["lr"])
                        train_loss, events, seconds = self.train_epoch(epoch, bars)
                        val_loss = self.validate(epoch)
                        monitored = val_loss if val_loss is not None else train_loss
                        if self.sched is not None:
                            self.sched.step(monitored)
                        self.epoch = epoch
                        entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                 "lr": lr, "seconds": seconds, "events": events,
                                 "events_per_s": events / seconds if seconds > 0 else None}
                        self.history.append(entry)
                        self.end_epoch(monitored)
                        bars.end_epoch(entry)
                        self.report(epoch, self.batches, events, seconds,
                                    {"train_loss": train_loss, "val_loss": val_loss, "lr": lr})
                        last = self.snapshot()
                        if epoch % self.t.checkpoint_every == 0:
                            _write_atomic(last, self.path)
                    if self.stopped is None:
                        self.stopped = "completed"
                    reason = self.stopped
                    last = self.snapshot()
                    _write_atomic(last, self.path)
                    if flag.raised:  # SIGTERM during the last epoch's bookkeeping
                        raise _Interrupted("sigterm")
                except _Interrupted as stop:
                    _write_atomic(last, self.path)
                    if str(stop) == "sigterm":
                        raise Preempted(
                            f"received SIGTERM after {self.epoch} completed epoch(s); "
                            f"checkpoint written to {str(self.path)!r}; run again with "
                            "--resume to continue", file_path=str(self.path)) from None
                    reason = "max_time"
        finally:
            bars.close()
            self.loaders.clear()  # persistent workers end with their loaders
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return TrainResult(model=self.model, history=self.history, stopped=reason,
                           epochs_run=len(self.history), input_layout=self.layout,
                           best_epoch=self.best_epoch, checkpoint=self.path, device=self.device)


def train(pipeline: Pipeline, train_ds: Any, val_ds: Any, outdir: str | os.PathLike[str], *,
          resume: bool = False, progress: bool = True,
          on_progress: ProgressCallback | None = None) -> TrainResult:
    """Train ``pipeline.model`` on ``train_ds``, validating on ``val_ds``; checkpoint to ``outdir``.

    Args:
        pipeline (Pipeline): the spec (``task``, ``model``, ``train``).
        train_ds (RootDataset): the training split, shuffled, batched with
            ``pipeline.train.batch_size``.
        val_ds (RootDataset or None): the validation split (``shuffle=False``,
            same ``stats``); None or empty: the training loss is monitored.
        outdir (path): where ``checkpoint.pt`` goes (created).
        resume (bool): continue from ``outdir/checkpoint.pt`` when it exists.
        progress (bool): draw epoch and batch bars on stderr.
        on_progress (callable or None): called with a dict (``phase``, ``epoch``,
            ``epochs``, ``batches``, ``events_per_s``, ``metrics``) at the end of
            every epoch and every :data:`PROGRESS_EVERY_S` seconds within one; it
            runs in the training loop, so it must be quick.

    Returns a :class:`TrainResult` whose model holds the best weights (lowest
    validation loss). Raises :class:`TrainingError` (NaN/inf loss, a user model
    raising in ``forward``, outputs not ``[B, n_outputs]``, bad labels, a
    checkpoint that does not fit) and :class:`Preempted` after SIGTERM.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    return _Trainer(pipeline, train_ds, val_ds, out, progress, on_progress).run(resume)

