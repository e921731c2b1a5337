"""Evaluation: metrics against scikit-learn, the files evaluate() writes, and the AUC benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import uproot
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import (
    accuracy_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
)

from mlaas.data import RootDataset
from mlaas.data.synth import generate
from mlaas.spec import Pipeline, load
from mlaas.train.evaluate import evaluate, metrics_for, predict
from mlaas.train.models import InputLayout, build_model
from mlaas.train.plots import roc_auc
from mlaas.train.trainer import n_outputs, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- metrics against scikit-learn ----------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_binary_metrics_match_sklearn(seed: int, weighted: bool) -> None:
    rng = np.random.default_rng(seed)
    n = 2000
    y = rng.integers(0, 2, n).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-rng.normal(1.2 * (2 * y - 1), 1.5)))
    w = rng.uniform(0.2, 3.0, n) if weighted else None
    m = metrics_for("binary", y, p, w)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert m["roc_auc_unweighted"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p > 0.5, sample_weight=w))
    assert m["loss"] == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-9)
    assert m["n_events"] == n
    assert m["sum_weights"] == pytest.approx(n if w is None else w.sum())
    assert m["class_counts"] == {"0": int((y == 0).sum()), "1": int((y == 1).sum())}
    if weighted:
        assert m["roc_auc"] != m["roc_auc_unweighted"]


@pytest.mark.parametrize("weighted", [False, True])
def test_multiclass_metrics_match_sklearn(weighted: bool) -> None:
    rng = np.random.default_rng(3)
    n, k = 3000, 4
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    w = rng.uniform(0.2, 3.0, n) if weighted else None
    m = metrics_for("multiclass", y.astype(np.float64), p, w)
    assert m["loss"] == pytest.approx(log_loss(y, p, sample_weight=w, labels=range(k)), rel=1e-9)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1), sample_weight=w))
    assert m["roc_auc"] == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro", sample_weight=w), abs=1e-12)
    for c in range(k):
        assert m["roc_auc_per_class"][str(c)] == pytest.approx(
            roc_auc_score(y == c, p[:, c], sample_weight=w), abs=1e-12)
    assert m["n_classes"] == k
    with pytest.raises(ValueError, match="integers in"):
        metrics_for("multiclass", np.r_[y[:-1], 7.0], p)


@pytest.mark.parametrize("weighted", [False, True])
def test_regression_metrics_match_sklearn(weighted: bool) -> None:
    rng = np.random.default_rng(4)
    n = 20000
    true = rng.uniform(50.0, 150.0, n)
    pred = true * (1.0 + 0.1 * rng.normal(0, 1, n)) + 2.0  # 10% resolution, +2 bias
    w = rng.uniform(0.5, 2.0, n) if weighted else None
    m = metrics_for("regression", true, pred, w)
    mse = mean_squared_error(true, pred, sample_weight=w)
    assert m["loss"] == pytest.approx(mse, rel=1e-9)
    assert m["rmse"] == pytest.approx(np.sqrt(mse), rel=1e-9)
    assert m["mae"] == pytest.approx(mean_absolute_error(true, pred, sample_weight=w), rel=1e-9)
    assert m["bias"] == pytest.approx(np.average(pred - true, weights=w), rel=1e-9)
    assert m["resolution"] == pytest.approx(0.1, abs=0.005)  # the Gaussian's sigma
    if not weighted:  # unit weights: numpy's hazen quantiles
        lo, hi = np.quantile(pred - true, [0.16, 0.84], method="hazen")
        assert m["resolution_abs"] == pytest.approx((hi - lo) / 2, rel=1e-12)
    # true == 0 is left out of the relative resolution only
    m0 = metrics_for("regression", np.r_[true, 0.0], np.r_[pred, 1.0])
    assert m0["n_resolution"] == n and m0["n_events"] == n + 1


def test_undefined_metrics_are_none() -> None:
    one_class = metrics_for("binary", np.ones(5), np.full(5, 0.7))
    assert one_class["roc_auc"] is None and one_class["accuracy"] == 1.0
    empty = metrics_for("binary", np.zeros(0), np.zeros(0))
    assert empty["n_events"] == 0 and empty["loss"] is None and empty["roc_auc"] is None
    clipped = metrics_for("binary", np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert np.isfinite(clipped["loss"])  # probabilities clipped, no inf
    with pytest.raises(ValueError, match="unknown task"):
        metrics_for("ranking", np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="one entry per event"):
        metrics_for("binary", np.ones(3), np.ones(2))


# -- on synthetic ROOT files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    generate(d, 20000, seed=5)
    return d


def spec_for(d: Path, **top: Any) -> dict[str, Any]:
    """The datagen example's features, padded (as examples/datagen-mlp.yaml)."""
    spec: dict[str, Any] = {
        "data": {
            "tree": "Events",
            "sources": [{"files": [str(d / "signal.root")], "label": 1},
                        {"files": [str(d / "background.root")], "label": 0}],
            "derived": {"HT": "sum(Jet_pt)", "nBJet": "sum(Jet_btagDeepB > 0.5)"},
            "features": [
                "MET_pt", "MET_phi", "PV_npvs", "HT", "nBJet",
                {"branch": "Jet_pt", "max_len": 6, "sort_by": "Jet_pt"},
                {"branch": "Jet_eta", "max_len": 6},
                {"branch": "Jet_btagDeepB", "max_len": 6},
                {"branch": "Muon_pt", "max_len": 2},
                {"branch": "Electron_pt", "max_len": 2},
            ],
            "split": {"validation": 0.2, "test": 0.2, "seed": 42},
            "cache": "memory",
            "step_size": 20000,
        },
        "model": {"builtin": "mlp", "hidden": [64, 64]},
        "train": {"epochs": 10, "batch_size": 256, "lr": 0.003, "lr_schedule": "cosine",
                  "seed": 0, "device": "cpu"},
    }
    spec.update(top)
    return spec


def splits(pipeline: Pipeline, **data: Any) -> dict[str, RootDataset]:
    bs = pipeline.train.batch_size
    first = RootDataset(pipeline, "train", batch_size=bs, seed=0, shuffle=True)
    shared = {"stats": first.stats, "prepared": (first.layout, first.files, first.chunks)}
    return {
        "train": first,
        "validation": RootDataset(pipeline, "validation", batch_size=bs, shuffle=False, **shared),
        "train_eval": RootDataset(pipeline, "train", batch_size=4096, shuffle=False, **shared),
        "test": RootDataset(pipeline, "test", batch_size=4096, shuffle=False, **shared),
    }


def untrained(pipeline: Pipeline, ds: RootDataset) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(pipeline, InputLayout.from_layout(ds.layout), n_outputs(pipeline, ds.stats))


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path} is only {len(data)} bytes"


def test_predict_shapes_and_order(synth: Path) -> None:
    p = load(spec_for(synth, data={**spec_for(synth)["data"], "max_events": 2000}))
    ds = splits(p)["test"]
    model = untrained(p, ds)
    model.train()
    y, s, w = predict(model, ds, "binary")
    assert model.training  # the mode is restored
    cols = ds.columns()
    assert y.shape == s.shape == w.shape == (ds.num_events,)
    np.testing.assert_array_equal(y, cols.y)  # same order as columns()
    assert ((s > 0) & (s < 1)).all()
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(cols.x), torch.from_numpy(cols.mask))[:, 0]
    np.testing.assert_allclose(s, torch.sigmoid(logits.double()).numpy(), rtol=1e-6)


def test_evaluate_writes_metrics_history_and_plots(synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth, train={"epochs": 2, "batch_size": 512, "seed": 0, "device": "cpu"})
    spec["data"]["max_events"] = 4000
    p = load(spec)
    ds = splits(p)
    result = train(p, ds["train"], ds["validation"], tmp_path, progress=False)
    metrics = evaluate(p, result.model, ds["train_eval"], ds["test"], result.history, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    assert json.loads((tmp_path / "history.json").read_text()) == json.loads(
        json.dumps(result.history))
    assert metrics["task"] == "binary"
    assert metrics["test"]["n_events"] == ds["test"].num_events
    assert metrics["train"]["n_events"] == ds["train"].num_events
    assert 0.75 < metrics["test"]["roc_auc"] <= 1.0
    assert set(metrics["overtraining"]) == {"signal", "background"}
    assert metrics["plots"] == ["plots/loss.png", "plots/roc.png", "plots/scores.png"]
    for name in metrics["plots"]:
        check_png(tmp_path / name)


def test_evaluate_multiclass_and_regression(synth: Path, tmp_path: Path) -> None:
    base = spec_for(synth)
    data = {**base["data"], "max_events": 2000, "sources": [
        {"files": [str(synth / "signal.root")]}, {"files": [str(synth / "background.root")]}]}
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1},
               {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9}]

    multi = load({**base, "task": "multiclass", "data": {**data, "label": "minimum(nBJet, 2)"}})
    ds = splits(multi)
    m = evaluate(multi, untrained(multi, ds["test"]), ds["train_eval"], ds["test"], history,
                 tmp_path / "multi")
    assert m["test"]["n_classes"] == 3 and set(m["test"]["roc_auc_per_class"]) == {"0", "1", "2"}
    assert m["plots"] == ["plots/loss.png", "plots/roc.png"] + [
        f"plots/scores_class_{c}.png" for c in range(3)]
    for name in m["plots"]:
        check_png(tmp_path / "multi" / name)

    reg = load({**base, "task": "regression", "data": {**data, "label": "HT"}})
    ds = splits(reg)
    r = evaluate(reg, untrained(reg, ds["test"]), ds["train_eval"], ds["test"], history,
                 tmp_path / "reg")
    assert r["plots"] == ["plots/loss.png", "plots/regression.png"]
    assert r["test"]["rmse"] > 0 and r["test"]["resolution"] is not None
    for name in r["plots"]:
        check_png(tmp_path / "reg" / name)
    assert json.loads((tmp_path / "reg" / "metrics.json").read_text()) == r


def test_evaluate_weights_the_auc_with_data_weight(synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth)
    spec["data"].update(max_events=3000, weight="where(MET_pt > 40, 3.0, 0.5)")
    p = load(spec)
    ds = splits(p)
    model = untrained(p, ds["test"])
    m = evaluate(p, model, ds["train_eval"], ds["test"], [], tmp_path)
    cols = ds["test"].columns()
    met = {i: uproot.open(f.ref.url)["Events"]["MET_pt"].array(library="np")
           for i, f in enumerate(ds["test"].files)}
    raw = np.array([met[int(f)][int(e)] for f, e in zip(cols.file, cols.entry, strict=True)])
    want_w = np.where(raw > 40, 3.0, 0.5)  # from the file, not from the loader
    y, score, w = predict(model, ds["test"], "binary")
    np.testing.assert_array_equal(w, want_w)
    assert m["test"]["sum_weights"] == pytest.approx(want_w.sum())
    assert m["test"]["roc_auc"] == pytest.approx(roc_auc_score(y, score, sample_weight=want_w),
                                                 abs=1e-12)
    assert m["test"]["roc_auc_unweighted"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert abs(m["test"]["roc_auc"] - m["test"]["roc_auc_unweighted"]) > 1e-3


@pytest.mark.slow
def test_network_reaches_gbdt_auc(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The MLP trained by mlaas matches a gradient-boosted tree on the same padded features."""
    p = load(spec_for(synth))
    ds = splits(p)
    train_cols, test_cols = ds["train_eval"].columns(), ds["test"].columns()
    gbdt = HistGradientBoostingClassifier(random_state=0).fit(train_cols.x, train_cols.y)
    gbdt_auc = roc_auc(test_cols.y, gbdt.predict_proba(test_cols.x)[:, 1])

    result = train(p, ds["train"], ds["validation"], tmp_path, progress=False)
    y, score, w = predict(result.model, ds["test"], "binary")
    np.testing.assert_array_equal(y, test_cols.y)
    nn_auc = roc_auc(y, score, w)
    with capsys.disabled():
        print(f"\ntest AUC: network {nn_auc:.4f}, HistGradientBoosting {gbdt_auc:.4f} "
              f"({ds['train'].num_events} training, {len(y)} test events)")
    assert gbdt_auc > 0.85  # the data is separable but not trivially
    assert nn_auc >= gbdt_auc - 0.02
