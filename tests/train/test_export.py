"""Export of a model to a bundle: ONNX parity with torch, spec.json, archive, provenance.

No trainer is needed: random weights exercise the export as well as trained
ones. The torch side always goes through the loader's normalised ``x``
(RootDataset), the ONNX side through raw features, so agreement also checks
the normalisation folded into the graph.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from mlaas.bundle import Bundle
from mlaas.data import RootDataset, synth
from mlaas.data.layout import Layout
from mlaas.errors import BundleError
from mlaas.train import export
from mlaas.train.models import InputLayout, UserModel, build_builtin, load_user_model
from mlaas.train.provenance import provenance
from train_support import EXPORT_ONLY_FAILURE


def make_spec(files: dict[str, str], **data: Any) -> dict[str, Any]:
    return {"data": {
        "sources": [{"files": [files["signal"]], "label": 1, "name": "ttH"},
                    {"files": [files["background"]], "label": 0}],
        "derived": {"HT": "sum(Jet_pt)"},
        "cut": "MET_pt > 15",
        "features": ["MET_pt", "HT", {"branch": "Jet_pt", "max_len": 4, "sort_by": "Jet_pt"},
                     {"branch": "Jet_eta", "max_len": 4}],
        "step_size": 700,
        **data,
    }}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return synth.generate(tmp_path_factory.mktemp("synth"), 2000, seed=1)["files"]


@pytest.fixture(scope="module")
def ds(files: dict[str, str]) -> RootDataset:
    return RootDataset(make_spec(files), "train", shuffle=False)


def model_for(ds: RootDataset, kind: str, n_outputs: int = 1) -> nn.Module:
    torch.manual_seed(3)
    return build_builtin(kind, InputLayout.from_layout(ds.layout), n_outputs).eval()


def do_export(ds: RootDataset, model: nn.Module, out: Path, plots: Path | None = None) -> Path:
    info = provenance(ds.pipeline, ds, 1_700_000_000.0, 1_700_000_060.5)
    return export.export_bundle(ds.pipeline, model, ds, {"auc": np.float64(0.5)}, out,
                                provenance=info, plots_dir=plots)


def torch_scores(ds: RootDataset, model: nn.Module, split: str) -> np.ndarray:
    test = RootDataset(ds.pipeline, split, shuffle=False, stats=ds.stats)
    cols = test.columns()
    with torch.no_grad():
        out = model(torch.from_numpy(cols.x), torch.from_numpy(cols.mask))
    return torch.sigmoid(out).numpy()


@pytest.mark.parametrize("kind", ["mlp", "deepsets"])
def test_onnx_matches_torch_on_the_test_split(ds: RootDataset, kind: str, tmp_path: Path) -> None:
    model = model_for(ds, kind)
    bundle_dir = do_export(ds, model, tmp_path)
    bundle = Bundle.load(bundle_dir)
    x, mask = zip(*export.raw_batches(ds.pipeline, ds, "test"), strict=True)
    got = bundle.run(np.concatenate(x), np.concatenate(mask))
    want = torch_scores(ds, model, "test")
    assert got.shape == want.shape == (ds.stats.splits["test"], 1)
    assert np.abs(got - want).max() <= 1e-5
    spec = json.loads((bundle_dir / "spec.json").read_text())
    assert spec["parity"]["events"] == len(want)
    assert spec["parity"]["max_abs_diff"] <= 1e-5
    assert spec["parity"]["measure"] == "|onnx - torch|"  # absolute: probabilities
    assert spec["inputs"][0] == {"name": "x", "shape": ["batch", 10], "dtype": "float32"}
    assert [i["name"] for i in spec["inputs"]] == (["x"] if kind == "mlp" else ["x", "mask"])
    assert [i.name for i in onnx.load(bundle_dir / "model.onnx").graph.input] == \
        [i["name"] for i in spec["inputs"]]


def test_dynamic_batch_axis(ds: RootDataset, tmp_path: Path) -> None:
    bundle = Bundle.load(do_export(ds, model_for(ds, "deepsets"), tmp_path))
    for n in (1, 3, 1000):
        x = np.random.default_rng(n).normal(size=(n, 10)).astype(np.float32) * 30
        mask = np.ones((n, 4), dtype=np.float32)
        assert bundle.run(x, mask).shape == (n, 1)


def perturbed(original: Any) -> Any:
    """export_onnx, then one weight of the written graph changed: a broken exporter."""
    def wrapper(module: Any, path: Path, *args: Any) -> Any:
        names = original(module, path, *args)
        model = onnx.load(path)
        init = next(i for i in model.graph.initializer if i.dims and len(i.dims) == 2)
        w = numpy_helper.to_array(init).copy()
        w[0, 0] += 0.5
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        onnx.save(model, path)
        return names
    return wrapper


def test_export_refuses_an_onnx_model_that_differs(ds: RootDataset, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "export_onnx", perturbed(export.export_onnx))
    with pytest.raises(BundleError, match=r"max \|onnx - torch\| [0-9.e-]+ .* above the tolerance"):
        do_export(ds, model_for(ds, "mlp"), tmp_path)
    assert not (tmp_path / "bundle").exists()
    assert not (tmp_path / "bundle.tar.gz").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_an_earlier_bundle_alone(ds: RootDataset, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    do_export(ds, model_for(ds, "mlp"), tmp_path)
    before = (tmp_path / "bundle" / "model.onnx").read_bytes()
    monkeypatch.setattr(export, "export_onnx", perturbed(export.export_onnx))
    with pytest.raises(BundleError):
        do_export(ds, model_for(ds, "deepsets"), tmp_path)
    assert (tmp_path / "bundle" / "model.onnx").read_bytes() == before


def test_bundle_files_spec_and_archive(ds: RootDataset, tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "roc.png").write_bytes(b"\x89PNG fake")
    out = tmp_path / "run"
    bundle_dir = do_export(ds, model_for(ds, "mlp"), out, plots)
    assert bundle_dir == out / "bundle"
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "metrics.json", "model.onnx", "plots", "provenance.json", "spec.json"]
    assert (bundle_dir / "plots" / "roc.png").read_bytes() == b"\x89PNG fake"
    assert json.loads((bundle_dir / "metrics.json").read_text()) == {"auc": 0.5}
    spec = json.loads((bundle_dir / "spec.json").read_text())
    assert spec["format_version"] == 1
    assert spec["task"] == "binary"
    assert spec["label_names"] == ["background", "ttH"]
    assert spec["feature_names"] == ["MET_pt", "HT"] + [f"Jet_pt_{i}" for i in range(4)] + \
        [f"Jet_eta_{i}" for i in range(4)]
    assert spec["mask_names"] == [f"Jet_{i}" for i in range(4)]
    assert spec["outputs"] == [{"name": "score", "shape": ["batch", 1], "dtype": "float32"}]
    assert spec["tree"] == "Events"
    assert spec["nan"] == {"policy": "error", "value": 0.0}
    lay = spec["layout"]
    assert lay["derived"] == [["HT", "sum(Jet_pt)"]]
    assert lay["cut"] == "MET_pt > 15"
    assert lay["branch_types"] == {"Jet_eta": {"kind": "jagged", "dtype": "float32"},
                                   "Jet_pt": {"kind": "jagged", "dtype": "float32"},
                                   "MET_pt": {"kind": "flat", "dtype": "float32"}}
    rebuilt = Layout.from_dict(lay)
    assert rebuilt.column_names() == spec["feature_names"]
    assert rebuilt.mask_names() == spec["mask_names"]
    assert rebuilt.collections["Jet"].sort_by == "Jet_pt"
    with tarfile.open(out / "bundle.tar.gz") as tar:
        names = tar.getnames()
        assert all(m.isreg() or m.isdir() for m in tar.getmembers())
    assert "bundle/model.onnx" in names and "bundle/plots/roc.png" in names
    assert all(n == "bundle" or n.startswith("bundle/") for n in names)
    assert not any(n.startswith("/") or ".." in n.split("/") for n in names)


def test_provenance_record(ds: RootDataset, files: dict[str, str]) -> None:
    info = provenance(ds.pipeline, ds, 1_700_000_000.0, 1_700_000_060.5)
    by_url = {f["url"]: f for f in info["files"]}
    sig = Path(files["signal"])
    assert by_url[str(sig)]["sha256"] == hashlib.sha256(sig.read_bytes()).hexdigest()
    assert by_url[str(sig)]["size"] == sig.stat().st_size
    assert by_url[str(sig)]["remote"] is False
    assert info["spec_digest"] == ds.pipeline.digest()
    assert info["spec"]["data"]["cut"] == "MET_pt > 15"
    assert {"python", "mlaas", "numpy", "awkward", "uproot", "torch", "onnx",
            "onnxruntime"} <= set(info["packages"])
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or \
        info["packages"]["torch"] == torch.__version__
    assert datetime.fromisoformat(info["started"]).utcoffset().total_seconds() == 0
    assert info["started"] == "2023-11-14T22:13:20+00:00"
    assert info["duration_seconds"] == 60.5
    assert info["hostname"]
    json.dumps(info)  # JSON-able


def test_multiclass_exports_softmax(files: dict[str, str], tmp_path: Path) -> None:
    spec = make_spec(files, label="where(nJet > 6, 2, where(nJet > 4, 1, 0))")
    spec["task"] = "multiclass"
    for s in spec["data"]["sources"]:
        s.pop("label")
    ds = RootDataset(spec, "train", shuffle=False)
    model = model_for(ds, "deepsets", 3)
    bundle = Bundle.load(do_export(ds, model, tmp_path))
    x, mask = zip(*export.raw_batches(ds.pipeline, ds, "test"), strict=True)
    got = bundle.run(np.concatenate(x), np.concatenate(mask))
    test = RootDataset(ds.pipeline, "test", shuffle=False, stats=ds.stats).columns()
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(test.x), torch.from_numpy(test.mask)), 1)
    assert np.abs(got - want.numpy()).max() <= 1e-5
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert bundle.label_names == ["0", "1", "2"]
    assert bundle.column_names() == ["score_0", "score_1", "score_2"]
    assert bundle.layout.branches == ["Jet_eta", "Jet_pt", "MET_pt"]  # not nJet: label only


class XOnly(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)


def test_user_model_without_mask_exports_x_only(ds: RootDataset, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UserModel(XOnly(10))
    bundle = Bundle.load(do_export(ds, model, tmp_path))
    assert bundle.input_names == ["x"]
    assert bundle.n_outputs == 1




def user_model_dataset(files: dict[str, str], tmp_path: Path, source: str
                       ) -> tuple[RootDataset, nn.Module]:
    path = tmp_path / "model.py"
    path.write_text(source)
    spec = {**make_spec(files), "model": {"file": str(path)}}
    ds = RootDataset(spec, "train", shuffle=False)
    return ds, load_user_model(path, ds.n_features, {**spec, "n_outputs": 1})


def test_a_user_model_failing_in_the_onnx_export_is_one_bundle_error(
        files: dict[str, str], tmp_path: Path) -> None:
    ds, model = user_model_dataset(files, tmp_path, EXPORT_ONLY_FAILURE)
    model(torch.zeros(3, ds.n_features), torch.ones(3, 4))  # fine outside the export
    with pytest.raises(BundleError) as info:
        do_export(ds, model, tmp_path / "out")
    first, *rest = str(info.value).splitlines()
    assert first.startswith("cannot export user model 'model.py' to ONNX: torch.onnx.export "
                            "raised NotImplementedError: no ONNX for this layer (line 12 of "
                            "model.py: 'raise NotImplementedError(")
    assert rest == [f"in file {tmp_path / 'model.py'}"]  # the message's second line is left out
    assert info.value.file_path == str(tmp_path / "model.py")
    assert not (tmp_path / "out" / "bundle").exists()


def test_a_model_raising_on_the_probe_batch_is_one_bundle_error(
        files: dict[str, str], tmp_path: Path) -> None:
    ds, model = user_model_dataset(files, tmp_path, EXPORT_ONLY_FAILURE.replace(
        "if torch.onnx.is_in_onnx_export():", "if x.shape[0] == 2:"))
    with pytest.raises(BundleError, match=r"^cannot export user model 'model.py' to ONNX: "
                       r"forward on a probe batch of 2 events raised NotImplementedError"):
        do_export(ds, model, tmp_path / "out")


def shifted_bias_onnx(tmp_path: Path, task: str, bias: float, shift: float) -> tuple[Path, Any]:
    """A constant network (output ``bias``) exported, then its ONNX bias moved by ``shift``."""
    net = nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.fill_(bias)
    module = export.ExportModule(UserModel(net, takes_mask=False), np.zeros(3), np.ones(3), task,
                                 False).eval()
    path = tmp_path / f"{task}.onnx"
    export.export_onnx(module, path, 3, 0)
    model = onnx.load(path)
    init = next(i for i in model.graph.initializer if list(i.dims) == [1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(shift),
                                          init.name))
    onnx.save(model, path)
    return path, module


def test_parity_is_relative_for_regression_and_absolute_for_probabilities(
        tmp_path: Path) -> None:
    batches = [(np.ones((5, 3), np.float32), np.ones((5, 0), np.float32))]
    # a 1000 GeV target: 0.005 off is 5e-6 relative (float32 spacing there is 6e-5)
    path, module = shifted_bias_onnx(tmp_path, "regression", 1000.0, 0.005)
    worst, count = export.check_parity(path, module, batches)
    assert count == 5 and worst == pytest.approx(0.005 / 1000, rel=0.02)
    path, module = shifted_bias_onnx(tmp_path, "regression", 1000.0, 0.05)
    with pytest.raises(BundleError, match=r"max \|onnx - torch\| / max\(1, \|torch\|\) "
                       r"5(\.\d+)?e-05 .* over 5 events"):
        export.check_parity(path, module, batches)
    # a probability is held to 1e-5 absolute: the logit 1e-4 off at 0 moves it by 2.5e-5
    path, module = shifted_bias_onnx(tmp_path, "binary", 0.0, 1e-4)
    with pytest.raises(BundleError, match=r"max \|onnx - torch\| 2\.5\d*e-05 "):
        export.check_parity(path, module, batches)
    assert export.parity_measure("multiclass") == "|onnx - torch|"
