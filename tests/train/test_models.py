"""Builtin models on a layout from a real ROOT file, user model files, device choice."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mlaas.data import RootDataset
from mlaas.errors import SpecError
from mlaas.train.models import (
    MLP,
    DeepSets,
    InputLayout,
    UserModel,
    build_builtin,
    load_user_model,
    select_device,
)

FILES = Path(__file__).resolve().parent.parent / "files"
HZZ = str(FILES / "uproot-HZZ.root")
SPEC = {
    "data": {
        "sources": [{"files": [HZZ]}],
        "label": "triggerIsoMu24",
        "features": [
            "MET_px",
            {"branch": "Muon_Px", "max_len": 3},
            {"branch": "Muon_Py", "max_len": 3},
            {"branch": "Jet_Px", "max_len": 4},
        ],
    }
}


@pytest.fixture(scope="module")
def dataset() -> RootDataset:
    return RootDataset(SPEC, split="all", batch_size=256, shuffle=False)


@pytest.fixture(scope="module")
def layout(dataset: RootDataset) -> InputLayout:
    return InputLayout.from_layout(dataset.layout)


@pytest.fixture(scope="module")
def batch(dataset: RootDataset) -> tuple[torch.Tensor, torch.Tensor]:
    cols = dataset.columns()
    return torch.from_numpy(cols.x[:300]), torch.from_numpy(cols.mask[:300])


# -- InputLayout ---------------------------------------------------------------------------


def test_input_layout_matches_column_names(dataset: RootDataset, layout: InputLayout) -> None:
    names, masks = dataset.feature_names, dataset.mask_names
    assert layout.n_features == len(names) == 11
    assert layout.n_mask == len(masks) == 7
    assert [names[i] for i in layout.flat] == ["MET_px"]
    muon, jet = layout.collections
    assert (muon.name, muon.max_len, jet.name, jet.max_len) == ("Muon", 3, "Jet", 4)
    assert [[names[i] for i in row] for row in muon.columns] == [
        ["Muon_Px_0", "Muon_Px_1", "Muon_Px_2"], ["Muon_Py_0", "Muon_Py_1", "Muon_Py_2"]]
    assert [[names[i] for i in row] for row in jet.columns] == [
        ["Jet_Px_0", "Jet_Px_1", "Jet_Px_2", "Jet_Px_3"]]
    assert [masks[i] for i in muon.mask_columns] == ["Muon_0", "Muon_1", "Muon_2"]
    assert [masks[i] for i in jet.mask_columns] == ["Jet_0", "Jet_1", "Jet_2", "Jet_3"]


def test_input_layout_round_trips_through_json(layout: InputLayout) -> None:
    again = InputLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout


def test_input_layout_needs_known_lengths(dataset: RootDataset) -> None:
    raw = copy.deepcopy(dataset.layout)
    raw.collections["Jet"].max_len = None
    with pytest.raises(ValueError, match=r"max_len of collection 'Jet' is not known yet"):
        InputLayout.from_layout(raw)


# -- builtin models ------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", [
    ("mlp", {}),
    ("mlp", {"hidden": (16,), "dropout": 0.1, "activation": "gelu", "batchnorm": True}),
    ("deepsets", {}),
    ("deepsets", {"pool": "mean", "activation": "silu", "phi": (8,), "rho": (8, 8)}),
    ("deepsets", {"pool": "max", "activation": "elu", "dropout": 0.2}),
    ("DeepSets", {"activation": "tanh"}),
])
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_builtin_shapes_and_gradients(name: str, options: dict, n_outputs: int,
                                      layout: InputLayout,
                                      batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_builtin(name, layout, n_outputs, **options)
    x, mask = batch
    out = model(x, mask)
    assert out.shape == (x.shape[0], n_outputs)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_build_builtin_rejects_unknown_names_and_options(layout: InputLayout) -> None:
    with pytest.raises(ValueError, match=r"unknown builtin model 'bdt'.*mlp, deepsets"):
        build_builtin("bdt", layout, 1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'layers'.*valid options: hidden"):
        build_builtin("mlp", layout, 1, layers=3)
    with pytest.raises(ValueError, match=r"unknown activation 'sigmoid'.*relu"):
        build_builtin("mlp", layout, 1, activation="sigmoid")
    with pytest.raises(ValueError, match=r"unknown pool 'median'.*sum, mean, max"):
        build_builtin("deepsets", layout, 1, pool="median")


def _permute_collection(x: torch.Tensor, mask: torch.Tensor, layout: InputLayout, which: int,
                        perm: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder the slots of one collection, for every branch and the mask alike."""
    x, mask = x.clone(), mask.clone()
    c = layout.collections[which]
    for row in c.columns:
        x[:, row] = x[:, [row[i] for i in perm]]
    mask[:, c.mask_columns] = mask[:, [c.mask_columns[i] for i in perm]]
    return x, mask


@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_deepsets_is_permutation_invariant(pool: str, layout: InputLayout) -> None:
    torch.manual_seed(1)
    model = build_builtin("deepsets", layout, 2, pool=pool).eval()
    n = 64
    x = torch.randn(n, layout.n_features)
    mask = (torch.rand(n, layout.n_mask) > 0.4).float()  # holes too, not only trailing pads
    ref = model(x, mask)
    for which, perm in [(0, [2, 0, 1]), (0, [1, 0, 2]), (1, [3, 2, 1, 0]), (1, [1, 3, 0, 2])]:
        px, pm = _permute_collection(x, mask, layout, which, perm)
        assert not torch.equal(px, x)
        torch.testing.assert_close(model(px, pm), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_deepsets_is_permutation_invariant_on_real_events(
        pool: str, layout: InputLayout, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(2)
    model = build_builtin("deepsets", layout, 1, pool=pool).eval()
    x, mask = batch
    px, pm = _permute_collection(x, mask, layout, 1, [2, 3, 0, 1])
    torch.testing.assert_close(model(px, pm), model(x, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["sum", "mean", "max"])
def test_deepsets_ignores_padded_values(pool: str, layout: InputLayout,
                                        batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(3)
    model = build_builtin("deepsets", layout, 1, pool=pool).eval()
    x, mask = batch
    assert (mask == 0).any() and (mask == 1).any()
    ref = model(x, mask)
    for fill in (1e4, -1e4, float("nan"), float("inf")):
        noisy = x.clone()
        for c in layout.collections:
            slot_mask = mask[:, c.mask_columns]
            for row in c.columns:
                cols = noisy[:, row]
                noisy[:, row] = torch.where(slot_mask > 0, cols, torch.full_like(cols, fill))
        assert not torch.equal(noisy, x)
        torch.testing.assert_close(model(noisy, mask), ref, rtol=0, atol=0)


def test_deepsets_empty_events_with_max_pool_are_finite(layout: InputLayout) -> None:
    model = build_builtin("deepsets", layout, 1, pool="max").eval()
    x = torch.randn(4, layout.n_features)
    out = model(x, torch.zeros(4, layout.n_mask))
    assert torch.isfinite(out).all()
    # with no objects, only the flat features matter
    other = x.clone()
    other[:, 1:] = 123.0
    torch.testing.assert_close(model(other, torch.zeros(4, layout.n_mask)), out)


def test_deepsets_depends_on_real_objects(layout: InputLayout) -> None:
    torch.manual_seed(4)
    model = build_builtin("deepsets", layout, 1).eval()
    x = torch.randn(8, layout.n_features)
    mask = torch.ones(8, layout.n_mask)
    changed = x.clone()
    changed[:, layout.collections[1].columns[0][3]] += 5.0
    assert not torch.allclose(model(changed, mask), model(x, mask))


def test_deepsets_without_collections_and_mlp_ignores_mask() -> None:
    flat = InputLayout.flat_only(5)
    x = torch.randn(3, 5)
    out = DeepSets(flat, 2)(x, torch.zeros(3, 0))
    assert out.shape == (3, 2)
    mlp = MLP(flat, 1).eval()
    torch.testing.assert_close(mlp(x, torch.zeros(3, 0)), mlp(x, torch.ones(3, 7)))


# -- ONNX export ------------------------------------------------------------------------------


def _onnx_parity(model: torch.nn.Module, layout: InputLayout, path: Path, dynamo: bool) -> float:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model.eval()
    torch.manual_seed(5)
    x = torch.randn(4, layout.n_features)
    mask = (torch.rand(4, layout.n_mask) > 0.5).float()
    if dynamo:
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, (x, mask), str(path), input_names=["x", "mask"],
                          output_names=["out"], opset_version=18, dynamo=True,
                          dynamic_shapes={"x": {0: batch}, "mask": {0: batch}})
    else:
        torch.onnx.export(model, (x, mask), str(path), input_names=["x", "mask"],
                          output_names=["out"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "mask": {0: "batch"},
                                        "out": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(37, layout.n_features)  # another batch size than the export's
    mask2 = (torch.rand(37, layout.n_mask) > 0.5).float()
    mask2[0] = 0.0  # an event without objects
    feed = {"x": x2.numpy(), "mask": mask2.numpy()}
    # the TorchScript exporter drops an unused input (the MLP's mask); feed what is declared
    names = [i.name for i in session.get_inputs()]
    assert names[0] == "x"
    (got,) = session.run(["out"], {n: feed[n] for n in names})
    with torch.no_grad():
        want = model(x2, mask2).numpy()
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)))


MODELS = [("mlp", {}), ("mlp", {"batchnorm": True, "activation": "gelu"}),
          ("deepsets", {"pool": "sum"}), ("deepsets", {"pool": "mean", "activation": "silu"}),
          ("deepsets", {"pool": "max", "activation": "elu"})]


@pytest.mark.parametrize("name,options", MODELS)
def test_onnx_parity_torchscript_exporter(name: str, options: dict, layout: InputLayout,
                                          tmp_path: Path) -> None:
    model = build_builtin(name, layout, 3, **options)
    assert _onnx_parity(model, layout, tmp_path / "m.onnx", dynamo=False) <= 1e-5


# torch's own dynamo exporter emits these from its internals (torch 2.13, onnxscript 0.7):
# a FutureWarning about pytree's LeafSpec and a note about naming the shared batch axis.
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:# The axis name. batch will not be used:UserWarning")
@pytest.mark.parametrize("name,options", MODELS)
def test_onnx_parity_dynamo_exporter(name: str, options: dict, layout: InputLayout,
                                     tmp_path: Path) -> None:
    model = build_builtin(name, layout, 2, **options)
    assert _onnx_parity(model, layout, tmp_path / "m.onnx", dynamo=True) <= 1e-5


# -- user model files ---------------------------------------------------------------------------


def _write(tmp_path: Path, body: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_user_model_with_x_only(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        import torch
        from dataclasses import dataclass

        @dataclass
        class Options:
            width: int = 8

        class Net(torch.nn.Module):
            def __init__(self, n, width):
                super().__init__()
                self.lin = torch.nn.Linear(n, 1)

            def forward(self, x):
                return self.lin(x).squeeze(-1)

        def build(n_features, spec):
            return Net(n_features, Options(**spec).width)
    """)
    model = load_user_model(path, 6, {"width": 4})
    assert isinstance(model, UserModel) and not model.takes_mask
    out = model(torch.randn(5, 6), torch.ones(5, 2))
    assert out.shape == (5, 1)  # [B] became [B, 1]


def test_user_model_with_mask(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        import torch

        class Net(torch.nn.Module):
            def __init__(self, n):
                super().__init__()
                self.lin = torch.nn.Linear(n, 2)

            def forward(self, x, mask):
                return self.lin(x) + mask.sum(dim=1, keepdim=True)

        def build(n_features, spec):
            return Net(n_features)
    """)
    model = load_user_model(path, 3, None)
    assert model.takes_mask
    x = torch.zeros(2, 3)
    diff = model(x, torch.ones(2, 4)) - model(x, torch.zeros(2, 4))
    torch.testing.assert_close(diff, torch.full((2, 2), 4.0))


def test_two_user_files_with_the_same_name_do_not_clash(tmp_path: Path) -> None:
    body = """
        import torch
        def build(n_features, spec):
            return torch.nn.Linear(n_features, {n})
    """
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_user_model(_write(tmp_path / "a", body.format(n=1)), 4, None)
    b = load_user_model(_write(tmp_path / "b", body.format(n=2)), 4, None)
    assert a(torch.zeros(1, 4), torch.zeros(1, 0)).shape == (1, 1)
    assert b(torch.zeros(1, 4), torch.zeros(1, 0)).shape == (1, 2)


def test_user_model_file_missing(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"user model file '.*nope\.py' does not exist") as info:
        load_user_model(tmp_path / "nope.py", 3, None)
    assert info.value.file_path.endswith("nope.py")


def test_user_model_without_build(tmp_path: Path) -> None:
    path = _write(tmp_path, "import torch\nmodel = torch.nn.Linear(3, 1)\n")
    with pytest.raises(SpecError, match=r"model\.py' defines no function build\(n_features, spec\)"):
        load_user_model(path, 3, None)


def test_user_model_build_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        import torch

        def helper(spec):
            return spec["width"]

        def build(n_features, spec):
            width = helper(spec)
            return torch.nn.Linear(n_features, width)
    """)
    with pytest.raises(SpecError) as info:
        load_user_model(path, 3, {})
    text = str(info.value)
    assert "model.py" in text
    assert "build(n_features, spec) failed: KeyError: 'width'" in text
    assert "line 5 of model.py: 'return spec[\"width\"]'" in text
    assert isinstance(info.value.__cause__, KeyError)


def test_user_model_import_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "import torch\nimport no_such_module_here\n")
    with pytest.raises(SpecError, match=r"import failed: ModuleNotFoundError: No module named "
                                        r"'no_such_module_here' \(line 2 of model\.py"):
        load_user_model(path, 3, None)


def test_user_model_syntax_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "def build(n_features, spec)\n    return None\n")
    with pytest.raises(SpecError, match=r"import failed: SyntaxError: .*\(line 1: "
                                        r"'def build\(n_features, spec\)'\)"):
        load_user_model(path, 3, None)


def test_user_model_returns_no_module(tmp_path: Path) -> None:
    path = _write(tmp_path, "def build(n_features, spec):\n    return lambda x: x\n")
    with pytest.raises(SpecError, match=r"returned function, not a torch\.nn\.Module"):
        load_user_model(path, 3, None)


def test_user_model_forward_without_arguments(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        import torch
        class Net(torch.nn.Module):
            def forward(self):
                return torch.zeros(1)
        def build(n_features, spec):
            return Net()
    """)
    with pytest.raises(SpecError, match=r"forward takes no positional argument"):
        load_user_model(path, 3, None)


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.parametrize("requested,available,visible,expected", [
    ("auto", False, None, "cpu"),
    ("auto", True, None, "cuda"),
    ("auto", True, "", "cpu"),
    ("auto", True, "-1", "cpu"),
    ("AUTO", True, "0,1", "cuda"),
    ("cpu", True, "0", "cpu"),
    ("cpu", False, None, "cpu"),
    ("cuda", True, None, "cuda"),
    ("cuda:1", True, "2,3", "cuda:1"),
    ("cuda:7", True, None, "cuda:7"),
    (" Cuda:0 ", True, "0", "cuda:0"),
])
def test_select_device(requested: str, available: bool, visible: str | None,
                       expected: str) -> None:
    assert select_device(requested, cuda_available=available, visible=visible) == expected


@pytest.mark.parametrize("requested,available,visible,message", [
    ("cuda", False, None, r"'cuda' requested but torch finds no usable CUDA GPU"),
    ("cuda:0", False, "0", r"'cuda:0' requested but torch finds no usable CUDA GPU"),
    ("cuda", True, "", r"CUDA_VISIBLE_DEVICES hides every GPU"),
    ("cuda:2", True, "0,1", r"only 2 GPU\(s\) are visible \(cuda:0 to cuda:1\)"),
    ("gpu", True, None, r"unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
    ("cuda:x", True, None, r"bad device 'cuda:x'"),
])
def test_select_device_errors(requested: str, available: bool, visible: str | None,
                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_device(requested, cuda_available=available, visible=visible)


def test_select_device_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device() == expected
