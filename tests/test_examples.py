"""The example pipelines in examples/: every spec loads, the real-file one reads, model.py builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlaas.data import RootDataset
from mlaas.spec import load
from mlaas.train.models import UserModel, load_user_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPECS = sorted(EXAMPLES.glob("*.yaml"))


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
