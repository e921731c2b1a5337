"""Weighted ROC/AUC against brute force, the KS test, and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
from matplotlib.axes import Axes

from mlaas.train import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray | None = None) -> float:
    """Pairwise: P(score_signal > score_background) + 0.5 P(equal), weighted."""
    w = np.ones_like(s) if w is None else w
    sig, bkg = y > 0.5, y <= 0.5
    ss, sb = s[sig][:, None], s[bkg][None, :]
    pair_w = w[sig][:, None] * w[bkg][None, :]
    wins = (ss > sb) + 0.5 * (ss == sb)
    return float(np.sum(pair_w * wins) / np.sum(pair_w))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("weighted", [False, True])
def test_roc_auc_matches_pairwise(seed: int, weighted: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    y = rng.integers(0, 2, n).astype(np.float32)
    y[:2] = [0, 1]
    score = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounding makes many ties
    w = rng.uniform(0.1, 3.0, n) if weighted else None
    assert plots.roc_auc(y, score, w) == pytest.approx(brute_auc(y, score, w), abs=1e-12)


def test_roc_auc_edge_cases() -> None:
    assert plots.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert plots.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert plots.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # a weight scales an event like repeating it
    assert plots.roc_auc([0, 1, 1], [0.3, 0.2, 0.9], [1.0, 2.0, 1.0]) == pytest.approx(
        plots.roc_auc([0, 1, 1, 1], [0.3, 0.2, 0.2, 0.9]))
    with pytest.raises(ValueError, match="both signal and background"):
        plots.roc_auc([1, 1], [0.1, 0.2])


def test_roc_points_are_monotone_and_end_at_one() -> None:
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 2)
    fpr, tpr, thr = plots.roc_points(y, s, rng.random(500))
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == pytest.approx(1.0) and tpr[-1] == pytest.approx(1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert len(thr) == len(np.unique(s)) + 1 and (np.diff(thr[1:]) < 0).all()


def test_ks_test() -> None:
    assert plots._kolmogorov_sf(1.0) == pytest.approx(0.26999967, abs=1e-7)
    assert plots._kolmogorov_sf(0.5) == pytest.approx(0.96394524, abs=1e-7)
    assert plots._kolmogorov_sf(3.0) < 1e-6
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=2000), rng.normal(size=1500)
    d, p = plots.ks_test(a, b)
    assert 0 < d < 0.1 and p > 0.01
    d, p = plots.ks_test(a, b + 0.5)
    assert d > 0.15 and p < 1e-6
    # integer weights act like repeated entries for D
    d_w, _ = plots.ks_test([1.0, 2.0, 3.0], [1.5, 2.5], [1, 2, 1], None)
    d_r, _ = plots.ks_test([1.0, 2.0, 2.0, 3.0], [1.5, 2.5])
    assert d_w == pytest.approx(d_r)


def check_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000


def test_plots_do_not_change_global_style(tmp_path: Path) -> None:
    before = dict(matplotlib.rcParams)
    plots.loss_curves([{"epoch": 0, "train_loss": 1.0, "val_loss": 1.1}], tmp_path / "l.png")
    assert dict(matplotlib.rcParams) == before


def test_loss_curves(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 0.7 * 0.9**e, "val_loss": 0.72 * 0.92**e + 0.01 * e}
               for e in range(20)]
    out = plots.loss_curves(history, tmp_path / "sub" / "loss.png")
    assert out == tmp_path / "sub" / "loss.png"
    check_png(out)
    no_val = plots.loss_curves([{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5,
                                                                  "val_loss": None}],
                               tmp_path / "loss2.png")
    check_png(no_val)


def test_roc_curve(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 5000)
    score = 1 / (1 + np.exp(-rng.normal(2.0 * y - 1.0, 1.2)))
    out = plots.roc_curve(y, score, rng.uniform(0.5, 1.5, 5000), path=tmp_path / "roc.png")
    check_png(out)


def test_score_distributions(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n).astype(np.float32)
        s = 1 / (1 + np.exp(-rng.normal(2.5 * y - 1.25, 1.0)))
        return y, s, rng.uniform(0.5, 1.5, n)

    out = plots.score_distributions(sample(8000), sample(3000), tmp_path / "scores.png")
    check_png(out)
    y, s, _ = sample(500)
    unweighted = plots.score_distributions((y, s, None), (y, s, None), tmp_path / "s2.png")
    check_png(unweighted)


def test_score_distributions_multiclass_and_unbounded_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 3000).astype(np.float64)
    s = rng.normal(y, 1.0)  # logits, not in [0, 1]
    out = plots.score_distributions((y, s, None), (y[:1000], s[:1000], None),
                                    tmp_path / "multi.png")
    check_png(out)


def test_regression_scatter(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    truth = rng.gamma(3.0, 20.0, 20000)
    pred = truth * rng.normal(1.0, 0.1, truth.size) + rng.normal(0, 3, truth.size)
    out = plots.regression_scatter(truth, pred, tmp_path / "reg.png")
    check_png(out)
    with pytest.raises(ValueError, match="3 true values but 2 predictions"):
        plots.regression_scatter([1, 2, 3], [1, 2], tmp_path / "bad.png")


def test_roc_curves_one_vs_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 3000).astype(np.float64)
    logits = rng.normal(0, 1, (3000, 3)) + 1.5 * np.eye(3)[y.astype(int)]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    w = rng.uniform(0.5, 2.0, 3000)
    drawn: list[str] = []
    original = Axes.plot

    def spy(self: Axes, *args: Any, **kwargs: Any) -> Any:
        drawn.append(str(kwargs.get("label")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    out = plots.roc_curves_ovr(y, p, w, ["a", "b", "c"], tmp_path / "roc.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    for c, name in enumerate("abc"):
        auc = plots.roc_auc(y == c, p[:, c], w)
        assert f"{name} (AUC = {auc:.4f})" in drawn
    drawn.clear()
    plots.roc_curves_ovr(np.where(y == 2, 0.0, y), p, w, ["a", "b", "c"], tmp_path / "two.png")
    assert [d.split(" ")[0] for d in drawn] == ["a", "b", "random"]  # class c has no events
    with pytest.raises(ValueError, match="no class"):
        plots.roc_curves_ovr(np.zeros(3000), p, w, ["a", "b", "c"], tmp_path / "none.png")


def test_roc_curves_sort_each_sample_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``roc_points`` (one sort) per curve gives both the curve and its AUC."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 2000).astype(np.float64)
    p = rng.dirichlet(np.ones(4), 2000)
    calls: list[int] = []
    original = plots.roc_points

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(plots, "roc_points", counted)
    plots.roc_curves_ovr(y, p, None, ["a", "b", "c", "d"], tmp_path / "ovr.png")
    assert len(calls) == 4  # once per class, not three times
    calls.clear()
    plots.roc_curve(y == 0, p[:, 0], None, path=tmp_path / "roc.png")
    assert len(calls) == 1
