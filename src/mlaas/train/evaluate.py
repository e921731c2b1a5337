"""Evaluation after training: predictions, metrics per split, metrics.json and plots.

Layer: train. :func:`predict` runs a model over a :class:`mlaas.data.RootDataset`
(built by the caller with ``shuffle=False``) and turns raw outputs into scores;
:func:`metrics_for` computes the numbers of one split; :func:`evaluate` does
both for the test and the training split and writes, under ``OUTDIR``::

    metrics.json   {"task", "test": {...}, "train": {...}, "overtraining": {...}, "plots": [...]}
    history.json   the trainer's per-epoch list of dicts
    plots/         loss.png; roc.png and scores.png (binary); roc.png (one curve per
                   class, one vs rest) and scores_class_<k>.png (multiclass, K <= 10);
                   regression.png

Every number is weighted by the event weights ``w`` (``data.weight``, else 1);
non-finite values are written as ``null`` so the files are strict JSON.

Metrics
-------
``binary`` (``score`` = sigmoid of the logit, the signal probability):
  ``loss`` weighted binary cross-entropy ``sum w l / sum w`` with the
  probabilities clipped to ``[1e-7, 1 - 1e-7]`` (so one confident mistake
  cannot make it infinite); ``accuracy`` weighted fraction with
  ``(score > 0.5) == (y > 0.5)``; ``roc_auc`` the weighted AUC and
  ``roc_auc_unweighted`` the same with unit weights (both always given; equal
  when all weights are 1; ``null`` when a class is missing or a class's total
  weight is not positive); ``n_events``, ``sum_weights``, and
  ``class_counts`` (events per class).
``multiclass`` (``score`` = softmax, ``[N, K]``):
  ``loss`` weighted cross-entropy ``-log p[y]`` (clipped at 1e-7);
  ``accuracy`` of the arg-max; ``roc_auc_per_class`` the weighted one-vs-rest
  AUC of each class (key: the class index as a string), ``roc_auc`` their
  mean over the classes that have one (sklearn's ``multi_class="ovr",
  average="macro"``) and ``roc_auc_unweighted`` the same mean without weights.
``regression`` (``score`` = the output):
  ``loss`` weighted mean squared error, ``rmse`` its root, ``mae`` weighted
  mean absolute error, ``bias`` weighted mean of ``pred - true``;
  ``resolution`` half the central 68% interval, ``(q84 - q16) / 2``, of the
  relative residual ``(pred - true) / true`` over events with ``true != 0``
  (``n_resolution`` of them), and ``resolution_abs`` the same for the absolute
  residual ``pred - true`` over all events. The quantiles are weighted (events
  with a positive weight; interpolated on the mid-points of the cumulative
  weight), which for unit weights is numpy's ``method="hazen"``. Half the
  68% interval is a Gaussian's sigma, and unlike the RMS it ignores tails.

The ``train`` entry is computed on the whole training split in evaluation
mode (no dropout), so comparing it with ``test`` shows overtraining; for
``binary`` ``overtraining`` also has the Kolmogorov-Smirnov test of the train
against the test score distribution per class (``ks_d``, ``ks_p``; see
:func:`mlaas.train.plots.ks_test`), the numbers shown on scores.png.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["predict", "metrics_for", "evaluate", "EPS", "MAX_CLASS_PLOTS"]

#: Probabilities are clipped to [EPS, 1 - EPS] in the cross-entropy losses.
EPS = 1e-7
#: Multiclass score plots (one per class) are drawn only up to this many classes.
MAX_CLASS_PLOTS = 10
_TASKS = ("binary", "multiclass", "regression")


# -- predictions ------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def predict(model: nn.Module, ds: Any, task: str,
            device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` over every batch of ``ds`` (one epoch); return ``(y, score, w)``.

    ``ds`` is a :class:`mlaas.data.RootDataset` built with ``shuffle=False``
    (its epoch 0 is read, so the order is the file order). The model is moved
    to ``device``, called as ``model(x, mask)`` in evaluation mode without
    gradients, and left in the mode it was in. Scores are float64:
    ``binary`` the sigmoid of output 0, ``[N]``; ``multiclass`` the softmax,
    ``[N, K]``; ``regression`` output 0, ``[N]``. ``y`` and ``w`` are float64 ``[N]``.
    """
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(_TASKS)}")
    dev = torch.device(device)
    was_training = model.training
    model.to(dev)
    model.eval()
    ys: list[np.ndarray] = []
    ws: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for batch in ds.iter_epoch(0):
                x = torch.from_numpy(batch["x"]).to(dev)
                mask = torch.from_numpy(batch["mask"]).to(dev)
                out = model(x, mask)
                if out.dim() == 1:
                    out = out.unsqueeze(-1)
                if out.dim() != 2 or out.shape[0] != x.shape[0]:
                    raise ValueError(f"the model returned shape {tuple(out.shape)} for a batch "
                                     f"of {x.shape[0]} events; expected [B, n_outputs]")
                out = out.double()  # float64 before the sigmoid: fewer ties at 0 and 1
                if task == "binary":
                    s = torch.sigmoid(out[:, 0])
                elif task == "multiclass":
                    s = torch.softmax(out, dim=1)
                else:
                    s = out[:, 0]
                scores.append(s.cpu().numpy())
                ys.append(np.asarray(batch["y"], dtype=np.float64))
                ws.append(np.asarray(batch["w"], dtype=np.float64))
    finally:
        model.train(was_training)
    if not scores:
        empty = np.zeros(0, dtype=np.float64)
        return empty, (np.zeros((0, 0)) if task == "multiclass" else empty), empty
    return np.concatenate(ys), np.concatenate(scores), np.concatenate(ws)


# -- numbers ------------------------------------------------------------------------------------


def _wmean(values: np.ndarray, w: np.ndarray) -> float | None:
    total = float(np.sum(w))
    if values.size == 0 or abs(total) < 1e-12:
        return None
    return float(np.sum(w * values) / total)


def _auc(y: np.ndarray, score: np.ndarray, w: np.ndarray | None) -> float | None:
    from mlaas.train.plots import roc_auc

    try:
        return roc_auc(y, score, w)
    except ValueError:  # one class missing, or a class with no positive total weight
        return None


def _weighted_quantiles(values: np.ndarray, w: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Quantiles with weights: linear in the mid-points of the cumulative weight (hazen)."""
    keep = w > 0
    v, ww = values[keep], w[keep]
    if v.size == 0:
        return [math.nan] * len(qs)
    order = np.argsort(v, kind="mergesort")
    v, ww = v[order], ww[order]
    cum = (np.cumsum(ww) - 0.5 * ww) / np.sum(ww)
    return [float(np.interp(q, cum, v)) for q in qs]


def _half_width(values: np.ndarray, w: np.ndarray) -> float | None:
    lo, hi = _weighted_quantiles(values, w, (0.16, 0.84))
    return (hi - lo) / 2.0 if math.isfinite(lo) and math.isfinite(hi) else None


def _check(y: np.ndarray, score: np.ndarray, w: np.ndarray, task: str) -> None:
    n = y.shape[0]
    if w.shape[0] != n or score.shape[0] != n:
        raise ValueError(f"y, score and w must have one entry per event: {n}, "
                         f"{score.shape[0]} and {w.shape[0]}")
    if task == "multiclass" and score.ndim != 2:
        raise ValueError(f"multiclass scores must be [N, K], not shape {score.shape}")
    if task != "multiclass" and score.ndim != 1:
        raise ValueError(f"{task} scores must be [N], not shape {score.shape}")


def metrics_for(task: str, y: Any, score: Any, w: Any = None) -> dict[str, Any]:
    """The metrics of one split (see the module docstring for the definitions).

    ``y`` [N] labels or targets, ``score`` as returned by :func:`predict`,
    ``w`` [N] weights or None (all 1). Undefined values (an empty split, one
    class only) are None.
    """
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(_TASKS)}")
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    s = np.asarray(score, dtype=np.float64)
    if task != "multiclass":
        s = s.reshape(-1)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64).reshape(-1)
    _check(y, s, w, task)
    out: dict[str, Any] = {"n_events": int(y.shape[0]), "sum_weights": float(np.sum(w))}
    if task == "binary":
        out.update(_binary(y, s, w))
    elif task == "multiclass":
        out.update(_multiclass(y, s, w))
    else:
        out.update(_regression(y, s, w))
    return out


def _class_counts(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {f"{v:g}": int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


def _binary(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    pc = np.clip(p, EPS, 1.0 - EPS)
    per_event = -(y * np.log(pc) + (1.0 - y) * np.log1p(-pc))
    correct = ((p > 0.5) == (y > 0.5)).astype(np.float64)
    return {
        "loss": _wmean(per_event, w),
        "accuracy": _wmean(correct, w),
        "roc_auc": _auc(y, p, w),
        "roc_auc_unweighted": _auc(y, p, None),
        "class_counts": _class_counts((y > 0.5).astype(np.float64)),
    }


def _multiclass(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    k = p.shape[1]
    labels = y.astype(np.int64)
    bad = (labels != y) | (labels < 0) | (labels >= k)
    if bad.any():
        raise ValueError(f"multiclass labels must be integers in [0, {k}); found "
                         f"{', '.join(f'{v:g}' for v in np.unique(y[bad])[:10])}")
    if y.size:
        picked = p[np.arange(y.size), labels]
        per_event = -np.log(np.clip(picked, EPS, 1.0))
        correct = (np.argmax(p, axis=1) == labels).astype(np.float64)
    else:
        per_event = correct = np.zeros(0)
    per_class = {str(c): _auc((labels == c).astype(np.float64), p[:, c], w) for c in range(k)}
    unweighted = [_auc((labels == c).astype(np.float64), p[:, c], None) for c in range(k)]
    defined = [a for a in per_class.values() if a is not None]
    defined_u = [a for a in unweighted if a is not None]
    return {
        "loss": _wmean(per_event, w),
        "accuracy": _wmean(correct, w),
        "roc_auc": float(np.mean(defined)) if defined else None,
        "roc_auc_unweighted": float(np.mean(defined_u)) if defined_u else None,
        "roc_auc_per_class": per_class,
        "n_classes": int(k),
        "class_counts": _class_counts(y),
    }


def _regression(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    residual = pred - y
    mse = _wmean(residual**2, w)
    nonzero = y != 0
    relative = residual[nonzero] / y[nonzero]
    return {
        "loss": mse,
        "rmse": math.sqrt(mse) if mse is not None and mse >= 0 else None,
        "mae": _wmean(np.abs(residual), w),
        "bias": _wmean(residual, w),
        "resolution": _half_width(relative, w[nonzero]),
        "resolution_abs": _half_width(residual, w),
        "n_resolution": int(np.count_nonzero(nonzero)),
    }


# -- files --------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become None (strict JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _overtraining(train: tuple[np.ndarray, ...], test: tuple[np.ndarray, ...]) -> dict[str, Any]:
    from mlaas.train.plots import ks_test

    (ytr, str_, wtr), (yte, ste, wte) = train, test
    result: dict[str, Any] = {}
    for name, cls in (("signal", True), ("background", False)):
        a, b = (ytr > 0.5) == cls, (yte > 0.5) == cls
        if a.any() and b.any():
            try:
                d, p = ks_test(str_[a], ste[b], wtr[a], wte[b])
            except (ValueError, ZeroDivisionError, FloatingPointError):
                continue
            result[name] = {"ks_d": d, "ks_p": p}
    return result


def evaluate(pipeline: Any, model: nn.Module, train_ds: Any, test_ds: Any,
             history: Sequence[Mapping[str, Any]], outdir: str | os.PathLike[str]) -> dict[str, Any]:
    """Metrics on the test and training splits, ``metrics.json``, ``history.json`` and plots.

    ``train_ds`` and ``test_ds`` are RootDatasets built with ``shuffle=False``;
    the model runs on the device it is on. Plots that cannot be drawn (an
    empty split, a single class) are left out; ``metrics["plots"]`` lists the
    ones written, relative to ``outdir``. Returns the dict written to
    ``metrics.json``.
    """
    from mlaas.train import plots

    task = pipeline.task
    out = Path(outdir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    device = _device_of(model)
    test = predict(model, test_ds, task, device)
    train = predict(model, train_ds, task, device)
    metrics: dict[str, Any] = {
        "task": task,
        "test": metrics_for(task, *test),
        "train": metrics_for(task, *train),
    }
    written: list[Path] = []
    history = list(history)
    if history:
        written.append(plots.loss_curves(history, plot_dir / "loss.png"))
    if task == "binary":
        metrics["overtraining"] = _overtraining(train, test)
        y_te, s_te, w_te = test
        if metrics["test"]["roc_auc"] is not None:
            written.append(plots.roc_curve(y_te, s_te, w_te, plot_dir / "roc.png"))
        if train[0].size and y_te.size:
            written.append(plots.score_distributions(
                ((train[0] > 0.5).astype(np.float64), train[1], train[2]),
                ((y_te > 0.5).astype(np.float64), s_te, w_te), plot_dir / "scores.png"))
    elif task == "multiclass":
        k = test[1].shape[1] if test[1].ndim == 2 else 0
        if any(a is not None for a in metrics["test"]["roc_auc_per_class"].values()):
            written.append(plots.roc_curves_ovr(test[0], test[1], test[2],
                                                [f"class {c}" for c in range(k)],
                                                plot_dir / "roc.png"))
        if train[0].size and test[0].size and k <= MAX_CLASS_PLOTS:
            for c in range(k):  # class c's score, for events of every class
                written.append(plots.score_distributions(
                    (train[0], train[1][:, c], train[2]), (test[0], test[1][:, c], test[2]),
                    plot_dir / f"scores_class_{c}.png"))
    elif test[0].size and np.isfinite(test[1]).any():
        written.append(plots.regression_scatter(test[0], test[1], plot_dir / "regression.png"))
    metrics["plots"] = [p.relative_to(out).as_posix() for p in written]
    _write_json(out / "history.json", history)
    _write_json(out / "metrics.json", metrics)
    return _jsonable(metrics)
