"""Pass-1 statistics given to another dataset: ``RootDataset(spec, stats=...)``.

Pass 1 is the slow read of everything; its stats.json is meant to be
reused (by the splits of one run, by a resumed run, by a user tuning
``max_len``). What does not change pass 1's numbers must not refuse them;
what does, must. Each reuse is checked against a fresh pass 1 of the same
spec, batch by batch.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlaas.data import RootDataset, synth
from mlaas.errors import SpecError

FILES = Path(__file__).resolve().parents[1] / "files"
HZZ = str(FILES / "uproot-HZZ.root")


def spec(**data: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "sources": [{"name": "hzz", "files": [HZZ]}],
        "label": "triggerIsoMu24",
        "cut": "NMuon >= 1",
        "features": ["MET_px", {"branch": "Muon_Px", "max_len": 2, "sort_by": "Muon_Px"},
                     {"branch": "Jet_Px", "max_len": 3}],
    }
    d.update(data)
    return {"data": d}


def batches(ds: RootDataset) -> dict[str, np.ndarray]:
    parts = list(ds)
    return {k: np.concatenate([b[k] for b in parts]) for k in ("x", "y", "mask", "entry")}


def same_as_fresh(s: dict[str, Any], stats: Any) -> RootDataset:
    """The dataset built on ``stats`` yields exactly what one with its own pass 1 yields."""
    reused = RootDataset(s, split="train", batch_size=128, shuffle=False, stats=stats)
    fresh = RootDataset(s, split="train", batch_size=128, shuffle=False)
    a, b = batches(reused), batches(fresh)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    return reused


@pytest.fixture(scope="module")
def hzz_stats() -> dict[str, Any]:
    return RootDataset(spec(), split="all").stats.to_dict()


def test_padding_truncation_order_and_names_do_not_refuse_stats(
        hzz_stats: dict[str, Any]) -> None:
    other = spec(
        sources=[{"name": "renamed", "files": [HZZ]}],
        features=[{"branch": "Jet_Px", "max_len": 5, "pad": -1.0, "sort_by": "Jet_Px"},
                  {"branch": "Muon_Px", "max_len": 1}, "MET_px"],
    )
    ds = same_as_fresh(other, hzz_stats)
    assert ds.feature_names[:5] == [f"Jet_Px_{i}" for i in range(5)]


def test_a_nan_pad_or_label_accepts_its_own_stats_json(tmp_path: Path) -> None:
    # NaN != NaN: compared as read back from stats.json, such a spec refused its own pass 1
    s = spec(features=["MET_px", {"branch": "Muon_Px", "max_len": 2, "pad": float("nan")}])
    RootDataset(s, split="all").stats.save(tmp_path / "pad.json")
    same_as_fresh(s, tmp_path / "pad.json")
    fixed = spec(label=None, sources=[{"files": [HZZ], "label": float("nan")}])
    stats = RootDataset(fixed, split="all").stats
    stats.save(tmp_path / "label.json")
    assert RootDataset(fixed, split="all", stats=tmp_path / "label.json").num_events \
        == stats.selected


def test_a_copy_of_the_files_elsewhere_fits_a_file_written_anew_does_not(
        tmp_path: Path) -> None:
    synth.generate(tmp_path / "a", 800, seed=1)
    s = {"data": {"sources": [{"files": [str(tmp_path / "a" / "signal.root")], "label": 1},
                              {"files": [str(tmp_path / "a" / "background.root")], "label": 0}],
                  "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 2}]}}
    stats = RootDataset(s, split="all").stats.to_dict()
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same contents, moved
    moved = copy.deepcopy(s)
    for source in moved["data"]["sources"]:
        source["files"] = [f.replace("/a/", "/b/") for f in source["files"]]
    same_as_fresh(moved, stats)
    synth.generate(tmp_path / "c", 800, seed=2)  # other events under the same name
    shutil.copy(tmp_path / "c" / "background.root", tmp_path / "b" / "background.root")
    with pytest.raises(SpecError) as info:
        RootDataset(moved, split="all", stats=stats)
    text = str(info.value)
    assert f"file {tmp_path / 'b' / 'background.root'} of source 'source1' is not among them" in text
    assert "(a file of that name is, with other content)" in text
    assert "at spec field data.sources[1].files" in text


def test_what_changes_pass_1_refuses_the_stats(hzz_stats: dict[str, Any]) -> None:
    for changed, field in [({"cut": "NMuon >= 2"}, "data.cut"),
                           ({"label": "NMuon"}, "data.label"),
                           ({"weight": "MET_px * 0 + 2"}, "data.weight"),
                           ({"split": {"validation": 0.3}}, "data.split"),
                           ({"max_events": 1000}, "data.max_events"),
                           ({"derived": {"r": "MET_px / 2"}}, "data.derived")]:
        with pytest.raises(SpecError) as info:
            RootDataset(spec(**changed), split="all", stats=hzz_stats)
        assert f"were computed for another spec: {field} differ" in str(info.value), changed
