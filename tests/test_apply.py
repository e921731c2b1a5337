"""``apply_files``: friend trees of scores, entry for entry, locally and over XRootD."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import torch
import uproot

from mlaas.apply import apply_files, friend_path
from mlaas.bundle import Bundle
from mlaas.data import RootDataset, synth
from mlaas.errors import DataError, MlaasError, TreeNotFound
from mlaas.train import export
from mlaas.train.models import InputLayout, build_builtin
from mlaas.train.provenance import provenance

FILES = Path(__file__).resolve().parent / "files"
BRANCHES = ["MET_pt", "Jet_pt", "Jet_eta"]


def make_bundle(files: dict[str, str], out: Path, task: str = "binary") -> Path:
    data: dict[str, Any] = {
        "sources": [{"files": [files["signal"]], "label": 1},
                    {"files": [files["background"]], "label": 0}],
        "derived": {"HT": "sum(Jet_pt)"},
        "cut": "MET_pt > 15",
        "features": ["MET_pt", "HT", {"branch": "Jet_pt", "max_len": 4, "sort_by": "Jet_pt"},
                     {"branch": "Jet_eta", "max_len": 4}],
        "step_size": 700,  # entries: 2000-entry files are applied in 3 chunks
    }
    n_out = 1
    if task == "multiclass":
        for s in data["sources"]:
            s.pop("label")
        data["label"] = "where(nJet > 6, 2, where(nJet > 4, 1, 0))"
        n_out = 3
    ds = RootDataset({"task": task, "data": data}, "train", shuffle=False)
    torch.manual_seed(7)
    model = build_builtin("deepsets", InputLayout.from_layout(ds.layout), n_out)
    export.export_bundle(ds.pipeline, model, ds, {}, out,
                         provenance=provenance(ds.pipeline, ds, 0.0, 1.0), plots_dir=None)
    return out / "bundle.tar.gz"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("apply")
    files = synth.generate(tmp / "data", 2000, seed=1)["files"]
    return {"files": files, "bundle": make_bundle(files, tmp / "run"), "tmp": tmp}


def rows(path: str, entries: np.ndarray) -> list[dict[str, Any]]:
    arrays = uproot.open(path)["Events"].arrays(BRANCHES, library="ak")[entries]
    return ak.to_list(arrays)


def check_friend(friend: Path, source: str, bundle: Bundle, columns: list[str]) -> None:
    with uproot.open(source) as f:
        n = f["Events"].num_entries
    with uproot.open(friend) as f:
        assert [k.split(";")[0] for k in f.keys()] == ["Events"]
        tree = f["Events"]
        assert tree.num_entries == n
        got = np.stack([tree[c].array(library="np") for c in columns], axis=1)
    assert got.dtype == np.float32
    rng = np.random.default_rng(0)
    sample = np.sort(np.concatenate([rng.choice(n, 150, replace=False),
                                     [0, 699, 700, 1399, 1400, n - 1]]))
    want = bundle.predict_events(rows(source, sample))
    fails = np.isnan(want[:, 0])
    assert fails.sum() >= 5 and (~fails).sum() >= 50  # the sample covers both
    np.testing.assert_array_equal(np.isnan(got[sample]), np.isnan(want))
    assert np.nanmax(np.abs(got[sample] - want)) <= 1e-6
    met = uproot.open(source)["Events"]["MET_pt"].array(library="np")
    np.testing.assert_array_equal(np.isnan(got[:, 0]), ~(met > 15))


def test_friend_trees_match_predict_events(setup: dict[str, Any], tmp_path: Path) -> None:
    files = setup["files"]
    out = apply_files(setup["bundle"], [files["signal"], files["background"]], tmp_path / "out",
                      progress=False)
    assert out == [tmp_path / "out" / "signal_friend.root",
                   tmp_path / "out" / "background_friend.root"]
    bundle = Bundle.load(setup["bundle"])
    for friend, source in zip(out, [files["signal"], files["background"]], strict=True):
        check_friend(friend, source, bundle, ["score"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "background_friend.root", "signal_friend.root"]


def test_each_input_is_opened_once_for_its_chunks(setup: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Three chunks of one file: opened to plan them, then once for reading (then closed)."""
    from mlaas.data import sources

    opened: list[Any] = []
    real = sources._find_tree  # every opening, with or without retries around it

    def find_tree(*args: Any, **kwargs: Any) -> Any:
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sources, "_find_tree", find_tree)
    (friend,) = apply_files(setup["bundle"], [setup["files"]["signal"]], tmp_path, progress=False)
    check_friend(friend, setup["files"]["signal"], Bundle.load(setup["bundle"]), ["score"])
    assert len(opened) == 2
    assert all(tree.file.closed for tree in opened)


def test_custom_name_and_progress_bar(setup: dict[str, Any], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    (friend,) = apply_files(setup["bundle"], [setup["files"]["signal"]], tmp_path, name="ttH",
                            progress=True)
    with uproot.open(friend) as f:
        assert f["Events"].keys() == ["ttH"]
    assert capsys.readouterr().out == ""


def test_multiclass_writes_one_branch_per_class(setup: dict[str, Any], tmp_path: Path) -> None:
    bundle_path = make_bundle(setup["files"], tmp_path / "run", "multiclass")
    (friend,) = apply_files(bundle_path, [setup["files"]["background"]], tmp_path / "out",
                            progress=False)
    columns = ["score_0", "score_1", "score_2"]
    with uproot.open(friend) as f:
        assert f["Events"].keys() == columns
    check_friend(friend, setup["files"]["background"], Bundle.load(bundle_path), columns)


def test_errors_before_anything_is_written(setup: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(TreeNotFound, match="no tree 'Events'"):
        apply_files(setup["bundle"], [setup["files"]["signal"], str(FILES / "uproot-HZZ.root")],
                    out, progress=False)
    assert list(out.iterdir()) == []
    other = tmp_path / "other" / "signal.root"
    other.parent.mkdir()
    shutil.copy(setup["files"]["signal"], other)
    with pytest.raises(DataError, match="would both be written to signal_friend.root"):
        apply_files(setup["bundle"], [setup["files"]["signal"], str(other)], out, progress=False)
    with pytest.raises(MlaasError, match="does not exist"):
        apply_files(setup["bundle"], [str(tmp_path / "nope.root")], out, progress=False)
    assert list(out.iterdir()) == []
    assert friend_path("root://h:1//a/b/x.root", out) == out / "x_friend.root"


@pytest.mark.xrootd
def test_apply_over_xrootd(setup: dict[str, Any], xrootd_server: Any, tmp_path: Path) -> None:
    url = xrootd_server.put(Path(setup["files"]["signal"]), "apply/signal.root")
    (remote,) = apply_files(setup["bundle"], [url], tmp_path / "remote", progress=False)
    (local,) = apply_files(setup["bundle"], [setup["files"]["signal"]], tmp_path / "local",
                           progress=False)
    assert remote.name == "signal_friend.root"
    with uproot.open(remote) as r, uproot.open(local) as loc:
        np.testing.assert_array_equal(r["Events"]["score"].array(library="np"),
                                      loc["Events"]["score"].array(library="np"))
    check_friend(remote, setup["files"]["signal"], Bundle.load(setup["bundle"]), ["score"])
