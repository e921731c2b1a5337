"""The example pipelines in examples/: every spec loads, model.py builds, and the real-file
one reads and runs end to end (run, bundle, predict)."""

from __future__ import annotations

import json
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import torch
import uproot
import yaml
from typer.testing import CliRunner

from mlaas.cli import app
from mlaas.data import RootDataset
from mlaas.spec import load
from mlaas.train.models import UserModel, load_user_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPECS = sorted(EXAMPLES.glob("*.yaml"))
HZZ = EXAMPLES.parent / "tests" / "files" / "uproot-HZZ.root"
runner = CliRunner()


def test_the_examples_are_there() -> None:
    names = {p.name for p in SPECS}
    assert {"datagen-mlp.yaml", "datagen-deepsets.yaml", "hzz-zmumu.yaml",
            "user-model.yaml"} <= names
    assert (EXAMPLES / "model.py").is_file() and (EXAMPLES / "README.md").is_file()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_loads(path: Path) -> None:
    pipeline = load(path)
    assert pipeline.base_dir == EXAMPLES
    assert pipeline.name
    text = (EXAMPLES / "README.md").read_text()
    assert path.name in text  # every example is described


def test_datagen_specs_agree_on_the_data() -> None:
    mlp = load(EXAMPLES / "datagen-mlp.yaml")
    deepsets = load(EXAMPLES / "datagen-deepsets.yaml")
    assert mlp.model.builtin == "mlp" and deepsets.model.builtin == "deepsets"
    for p in (mlp, deepsets):
        assert [s.files for s in p.data.sources] == [["data/signal.root"],
                                                      ["data/background.root"]]
        assert p.train.early_stopping is not None
    assert load(EXAMPLES / "user-model.yaml").model.file == "model.py"


def test_hzz_example_reads_the_real_file() -> None:
    pipeline = load(EXAMPLES / "hzz-zmumu.yaml")
    ds = RootDataset(pipeline, "train", batch_size=256, shuffle=False)
    assert ds.num_events > 500
    assert "Muon_pt_0" in ds.feature_names and ds.mask_names == ["Muon_0", "Muon_1"]
    seen, labels = 0, []
    for batch in ds.iter_epoch(0):
        assert batch["x"].shape == (len(batch["y"]), ds.n_features)
        assert np.isfinite(batch["x"]).all()
        assert (batch["w"] >= 0).all() and batch["w"].max() < 0.1  # EventWeight
        labels.append(batch["y"])
        seen += len(batch["y"])
    assert seen == ds.num_events
    y = np.concatenate(labels)
    assert set(np.unique(y).tolist()) == {0.0, 1.0}  # both classes: a real task
    # sorted by the derived pT, descending, where both muons are present
    cols = ds.columns()
    i0, i1 = ds.feature_names.index("Muon_pt_0"), ds.feature_names.index("Muon_pt_1")
    raw = cols.x / ds.transform.scale + ds.transform.shift
    assert (raw[:, i0] >= raw[:, i1] - 1e-3).all()


def test_user_model_file_builds() -> None:
    pipeline = load(EXAMPLES / "user-model.yaml")
    spec = {**pipeline.model_dump(mode="json"), "n_outputs": 1}
    model = load_user_model(EXAMPLES / "model.py", 27, spec)
    assert isinstance(model, UserModel) and not model.takes_mask
    torch.manual_seed(0)
    x = torch.randn(5, 27)
    out = model(x, torch.ones(5, 4))
    assert out.shape == (5, 1) and torch.isfinite(out).all()
    three = load_user_model(EXAMPLES / "model.py", 27, {**spec, "n_outputs": 3})
    assert three(x, torch.ones(5, 4)).shape == (5, 3)


def test_hzz_example_runs_end_to_end_and_predicts(tmp_path: Path) -> None:
    spec = yaml.safe_load((EXAMPLES / "hzz-zmumu.yaml").read_text())
    spec["train"]["epochs"] = 2  # the example trains 60; the mechanics need 2
    (source,) = spec["data"]["sources"]
    source["files"] = [str(HZZ)]
    path = tmp_path / "hzz.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "hzz"
    result = runner.invoke(app, ["run", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and summary["stopped"] == "completed"
    bundle = out / "bundle"
    for name in ("model.onnx", "spec.json", "metrics.json", "provenance.json",
                 "plots/loss.png", "plots/roc.png", "plots/scores.png"):
        assert (bundle / name).is_file(), name
    assert (out / "bundle.tar.gz").is_file()
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["test"]["n_events"] > 100 and metrics["test"]["roc_auc"] is not None
    assert metrics["test"]["sum_weights"] < metrics["test"]["n_events"]  # EventWeight < 1

    branches = json.loads((bundle / "spec.json").read_text())["layout"]["branches"]
    assert "NMuon" in branches and "Muon_Px" in branches
    arrays = uproot.open(HZZ)["events"].arrays(branches, entry_stop=40)
    rows = ak.to_list(arrays)
    two = [r for r in rows if r["NMuon"] == 2][:2]
    other = next(r for r in rows if r["NMuon"] != 2)  # fails the cut: null
    (tmp_path / "events.json").write_text(json.dumps([*two, other]))
    result = runner.invoke(app, ["predict", str(bundle), "--input",
                                 str(tmp_path / "events.json")])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert len(scores) == 3 and scores[2] is None
    assert all(0.0 < s < 1.0 for s in scores[:2])
