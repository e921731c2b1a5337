"""Evaluation plots as PNG files, and the weighted ROC they need.

Layer: train. Needs matplotlib and mplhep. Figures are made with
``matplotlib.figure.Figure`` (no pyplot, so no global figure state and no GUI
backend: PNGs are rendered with Agg) under the mplhep CMS-like style, applied
in a ``matplotlib.style.context`` so it never leaks into the caller's rcParams.

ROC convention (HEP): signal efficiency (true positive rate) on x, background
rejection ``1 / background efficiency`` (``1 / FPR``) on a log y axis; points
with zero background efficiency (infinite rejection) are not drawn. The AUC is
the usual area under TPR versus FPR. A multiclass classifier gets one curve
per class, one versus the rest (:func:`roc_curves_ovr`).

The Kolmogorov-Smirnov test of the overtraining plot is computed here with
numpy (weighted empirical CDFs, effective entries ``(sum w)^2 / sum w^2``,
asymptotic Kolmogorov distribution), so scipy is not needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.style
import mplhep
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

__all__ = [
    "roc_points",
    "roc_auc",
    "ks_test",
    "loss_curves",
    "roc_curve",
    "roc_curves_ovr",
    "score_distributions",
    "regression_scatter",
]

DPI = 100
PathLike = str | os.PathLike[str]
Sample = tuple[Any, Any, Any]  # (y, score, w or None)


# -- numbers -------------------------------------------------------------------------------


def _weights(w: Any, n: int) -> np.ndarray:
    if w is None:
        return np.ones(n, dtype=np.float64)
    arr = np.asarray(w, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"weights have {arr.shape[0]} entries, scores {n}")
    return arr


def roc_points(y: Any, score: Any, w: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted ROC: ``(fpr, tpr, thresholds)``, one point per unique score, from (0, 0).

    ``y`` > 0.5 is signal. Point ``k`` selects ``score >= thresholds[k]``;
    the first point (threshold +inf) selects nothing. Tied scores move
    together, so the curve is a straight segment across a tie.
    """
    y = np.asarray(y).reshape(-1) > 0.5
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {s.shape[0]} scores")
    ww = _weights(w, s.shape[0])
    order = np.argsort(-s, kind="mergesort")
    s, y, ww = s[order], y[order], ww[order]
    tp = np.cumsum(np.where(y, ww, 0.0))
    fp = np.cumsum(np.where(y, 0.0, ww))
    last = np.r_[np.flatnonzero(np.diff(s)), s.shape[0] - 1] if s.size else np.array([], int)
    total_s, total_b = (tp[-1], fp[-1]) if s.size else (0.0, 0.0)
    if total_s <= 0 or total_b <= 0:
        raise ValueError("the ROC needs a positive total weight of both signal and background")
    tpr = np.r_[0.0, tp[last] / total_s]
    fpr = np.r_[0.0, fp[last] / total_b]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(y: Any, score: Any, w: Any = None) -> float:
    """Weighted area under the ROC (TPR versus FPR); ties count one half.

    Equal to ``sum_{s,b} w_s w_b [score_s > score_b] + 0.5 [score_s == score_b]``
    over signal-background pairs, divided by ``W_s W_b``.
    """
    fpr, tpr, _ = roc_points(y, score, w)
    return _area(fpr, tpr)


def _area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under the points of :func:`roc_points`, so one sort serves both."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution."""
    if lam <= 0:
        return 1.0
    if lam < 1.0:  # the theta-function form converges fast for small lam
        k = np.arange(1, 20)
        cdf = np.sqrt(2 * np.pi) / lam * np.sum(np.exp(-((2 * k - 1) ** 2) * np.pi**2
                                                       / (8 * lam**2)))
        return float(min(1.0, max(0.0, 1.0 - cdf)))
    k = np.arange(1, 101)
    p = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * lam**2))
    return float(min(1.0, max(0.0, p)))


def ks_test(a: Any, b: Any, wa: Any = None, wb: Any = None) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov ``(D, p)`` with optional weights (asymptotic p-value).

    With weights the entries are the effective numbers ``(sum w)^2 / sum w^2``.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    wa, wb = _weights(wa, a.size), _weights(wb, b.size)
    if a.size == 0 or b.size == 0:
        raise ValueError("the KS test needs two non-empty samples")
    grid = np.union1d(a, b)

    def ecdf(v: np.ndarray, w: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        cw = np.cumsum(w[order])
        idx = np.searchsorted(v[order], grid, side="right")
        return np.where(idx > 0, cw[np.maximum(idx - 1, 0)], 0.0) / cw[-1]

    d = float(np.max(np.abs(ecdf(a, wa) - ecdf(b, wb))))
    na = wa.sum() ** 2 / np.sum(wa**2)
    nb = wb.sum() ** 2 / np.sum(wb**2)
    n = na * nb / (na + nb)
    return d, _kolmogorov_sf((np.sqrt(n) + 0.12 + 0.11 / np.sqrt(n)) * d)


# -- figures -----------------------------------------------------------------------------------


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", bbox_inches="tight")
    return out


def _style() -> Any:
    return matplotlib.style.context(mplhep.style.CMS)


def loss_curves(history: Sequence[dict[str, Any]], path: PathLike) -> Path:
    """Train and validation loss per epoch (keys ``epoch``, ``train_loss``, ``val_loss``).

    A missing or None ``val_loss`` is left out; the y axis turns logarithmic
    when every loss is positive and they span more than a factor of 20.
    """
    epochs = np.array([h["epoch"] for h in history], dtype=np.float64)
    train = np.array([h.get("train_loss", np.nan) for h in history], dtype=np.float64)
    val = np.array([np.nan if h.get("val_loss") is None else h["val_loss"] for h in history],
                   dtype=np.float64)
    with _style():
        fig = Figure(figsize=(8, 6))
        ax = fig.add_subplot()
        ax.plot(epochs, train, "o-", label="training")
        if np.isfinite(val).any():
            ax.plot(epochs, val, "s--", label="validation")
            best = int(np.nanargmin(val))
            ax.axvline(epochs[best], color="grey", lw=1, ls=":",
                       label=f"best validation (epoch {epochs[best]:g})")
        both = np.r_[train, val]
        both = both[np.isfinite(both)]
        if both.size and (both > 0).all() and both.max() / both.min() > 20:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend()
        return _save(fig, path)


def roc_curve(y: Any, score: Any, w: Any = None, path: PathLike | None = None) -> Path:
    """Background rejection (1 / background efficiency, log) versus signal efficiency.

    The legend gives the weighted AUC; the dashed line is a random classifier.
    """
    if path is None:
        raise TypeError("roc_curve needs a path")
    return _roc_figure([("classifier", roc_points(y, score, w))], path, "signal efficiency",
                       "background rejection (1 / efficiency)")


def roc_curves_ovr(y: Any, scores: Any, w: Any, names: Sequence[str], path: PathLike) -> Path:
    """One-vs-rest ROC of each class of a multiclass classifier, in one figure.

    Class ``c`` is the signal (events with ``y == c``, scored by ``scores[:, c]``)
    and every other class the background, as in the per-class AUCs of
    ``metrics.json``; a class with no events or no positive total weight is
    left out. Axes as :func:`roc_curve`. Raises ValueError when no class has a curve.
    Each class's scores are sorted once: its points give the curve and the AUC.
    """
    labels = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(scores, dtype=np.float64)
    curves = []
    for c, name in enumerate(names):
        try:
            points = roc_points((labels == c).astype(np.float64), p[:, c], w)
        except ValueError:
            continue
        curves.append((name, points))
    if not curves:
        raise ValueError("no class has both events of its own and of other classes")
    return _roc_figure(curves, path, "class efficiency (one vs rest)",
                       "rejection of the other classes (1 / efficiency)")


RocPoints = tuple[np.ndarray, np.ndarray, np.ndarray]  # (fpr, tpr, thresholds)


def _roc_figure(curves: Sequence[tuple[str, RocPoints]], path: PathLike, xlabel: str,
                ylabel: str) -> Path:
    """ROC curves ``(name, roc_points(...))`` as rejection (log) against efficiency, with AUCs.

    Taking the points, not the samples, lets callers sort each sample once.
    """
    with _style():
        fig = Figure(figsize=(8, 7))
        ax = fig.add_subplot()
        for name, (fpr, tpr, _) in curves:
            keep = (fpr > 0) & (tpr > 0)
            ax.plot(tpr[keep], 1.0 / fpr[keep], lw=2,
                    label=f"{name} (AUC = {_area(fpr, tpr):.4f})")
        eff = np.linspace(0.01, 1.0, 200)
        ax.plot(eff, 1.0 / eff, "k--", lw=1, label="random (AUC = 0.5)")
        ax.set_yscale("log")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper right")
        return _save(fig, path)


def _class_names(labels: np.ndarray) -> dict[float, str]:
    if set(labels.tolist()) <= {0.0, 1.0}:
        return {0.0: "background", 1.0: "signal"}
    return {v: f"class {v:g}" for v in labels.tolist()}


def score_distributions(train: Sample, test: Sample, path: PathLike, bins: int = 40) -> Path:
    """The overtraining check: per class, train as filled histograms, test as points.

    ``train`` and ``test`` are ``(y, score, w)`` with ``w`` possibly None;
    ``score`` is one value per event (for several classes, pass one class's
    score). Histograms are normalised to unit area; test error bars are
    ``sqrt(sum w^2)``. Each class's legend entry gives the KS p-value of
    train against test (see :func:`ks_test`; computed with numpy, no scipy).
    """
    prepared = []
    for y, s, w in (train, test):
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        prepared.append((y, s, _weights(w, s.size)))
    (ytr, str_, wtr), (yte, ste, wte) = prepared
    lo = min(str_.min(initial=np.inf), ste.min(initial=np.inf))
    hi = max(str_.max(initial=-np.inf), ste.max(initial=-np.inf))
    if not np.isfinite([lo, hi]).all():
        raise ValueError("score_distributions needs finite scores")
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    centers = (edges[1:] + edges[:-1]) / 2
    widths = np.diff(edges)
    labels = np.unique(np.r_[ytr, yte])
    names = _class_names(labels)
    with _style():
        fig = Figure(figsize=(9, 7))
        ax = fig.add_subplot()
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, label in enumerate(labels.tolist()):
            color = colors[i % len(colors)]
            a, b = ytr == label, yte == label
            text = names[label]
            if a.any():
                h, _ = np.histogram(str_[a], edges, weights=wtr[a])
                area = np.sum(h * widths)
                ax.hist(edges[:-1], edges, weights=h / area if area > 0 else h, histtype=
                        "stepfilled", alpha=0.35, color=color, label=f"{text} (train)")
            if b.any():
                h, _ = np.histogram(ste[b], edges, weights=wte[b])
                err = np.sqrt(np.histogram(ste[b], edges, weights=wte[b] ** 2)[0])
                area = np.sum(h * widths)
                norm = area if area > 0 else 1.0
                ks = ""
                if a.any():
                    _, p = ks_test(str_[a], ste[b], wtr[a], wte[b])
                    ks = f", KS p = {p:.3f}"
                ax.errorbar(centers, h / norm, yerr=err / norm, fmt="o", ms=4, color=color,
                            label=f"{text} (test{ks})")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("classifier output")
        ax.set_ylabel("normalised entries")
        ax.legend(loc="upper center", fontsize="small")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
        return _save(fig, path)


def regression_scatter(y_true: Any, y_pred: Any, path: PathLike, bins: int = 60) -> Path:
    """A 2D histogram of predicted versus true values (log colour scale) and the diagonal."""
    t = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if t.size != p.size:
        raise ValueError(f"{t.size} true values but {p.size} predictions")
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok], p[ok]
    if t.size == 0:
        raise ValueError("regression_scatter needs finite values")
    lo = float(min(t.min(), p.min()))
    hi = float(max(t.max(), p.max()))
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    with _style():
        fig = Figure(figsize=(9, 8))
        ax = fig.add_subplot()
        *_, image = ax.hist2d(t, p, bins=bins, range=[[lo, hi], [lo, hi]], cmin=1,
                              norm=LogNorm(), cmap="viridis")
        fig.colorbar(image, ax=ax, label="events")
        ax.plot([lo, hi], [lo, hi], "r--", lw=1.5, label="prediction = truth")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("true value")
        ax.set_ylabel("predicted value")
        ax.legend(loc="upper left")
        return _save(fig, path)
