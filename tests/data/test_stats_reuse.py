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
import uproot

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


def test_a_nan_pad_accepts_its_own_stats_json_and_a_nan_fixed_label_is_refused_at_load(
        tmp_path: Path) -> None:
    s = spec(features=["MET_px", {"branch": "Muon_Px", "max_len": 2, "pad": float("nan")}])
    RootDataset(s, split="all").stats.save(tmp_path / "pad.json")
    same_as_fresh(s, tmp_path / "pad.json")
    # a NaN fixed label passed pass 1 and failed at the first batch, naming data.label
    for bad in (float("nan"), float("inf")):
        with pytest.raises(SpecError) as info:
            RootDataset(spec(label=None, sources=[{"files": [HZZ], "label": bad}]))
        assert "data.sources[0].label: Input should be a finite number" in str(info.value)


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


def two_tree_file(path: Path) -> str:
    """One file, two trees of other contents (signal and background kept apart)."""
    rng = np.random.default_rng(0)
    with uproot.recreate(path) as f:
        for name, mean in (("sig", 10.0), ("bkg", -5.0)):
            f.mktree(name, {"x": "f8", "y": "i4"}).extend(
                {"x": rng.normal(mean, 1.0, 500), "y": rng.integers(0, 2, 500).astype(np.int32)})
    return str(path)


def test_stats_of_another_tree_of_the_same_file_are_refused(tmp_path: Path) -> None:
    path = two_tree_file(tmp_path / "trees.root")

    def on(tree: str | None) -> dict[str, Any]:
        return {"data": {"tree": tree, "label": "y", "sources": [{"files": [path]}],
                         "features": ["x"]}}

    sig = RootDataset(on("sig"), split="all").stats.to_dict()
    with pytest.raises(SpecError) as info:
        RootDataset(on("bkg"), split="all", stats=sig)
    assert "were computed on tree 'sig', this spec reads 'bkg'" in str(info.value)
    assert "at spec field data.tree" in str(info.value)
    # tree: null and the name of a file's only tree are the same tree
    one = {"data": {"sources": [{"files": [HZZ], "label": 1}], "features": ["MET_px"]}}
    named = copy.deepcopy(one)
    named["data"]["tree"] = "events"
    same_as_fresh(named, RootDataset(one, split="all").stats.to_dict())


def test_the_same_files_in_another_order_under_max_events_are_other_events(
        tmp_path: Path) -> None:
    synth.generate(tmp_path, 600, seed=3)
    a, b = str(tmp_path / "signal.root"), str(tmp_path / "background.root")

    def listed(*files: str) -> dict[str, Any]:
        return {"data": {"sources": [{"files": list(files), "label": 1}], "max_events": 300,
                         "features": ["MET_pt"]}}

    stats = RootDataset(listed(a, b), split="all").stats.to_dict()
    assert stats["sources"][0]["file_entries"] == [300, 0]
    with pytest.raises(SpecError) as info:
        RootDataset(listed(b, a), split="all", stats=stats)
    assert f"file {b} of source 'source0': pass 1 read 0 of its entries, this spec reads 300" \
        in str(info.value)
    # without max_events the order of the files is free
    whole = {"data": {**listed(a, b)["data"], "max_events": None}}
    reordered = {"data": {**listed(b, a)["data"], "max_events": None}}
    same_as_fresh(reordered, RootDataset(whole, split="all").stats.to_dict())


def test_a_file_that_grew_in_place_keeps_its_uuid_but_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "grows.root"
    with uproot.recreate(path) as f:
        f.mktree("events", {"x": "f8", "y": "i4"}).extend(
            {"x": np.arange(100.0), "y": np.arange(100, dtype=np.int32) % 2})
    s = {"data": {"label": "y", "sources": [{"files": [str(path)]}], "features": ["x"]}}
    stats = RootDataset(s, split="all").stats.to_dict()
    uuid = str(uproot.open(path).file.uuid)
    with uproot.update(path) as f:  # ROOT's UPDATE mode: a new cycle events;2, the same UUID
        f.mktree("events", {"x": "f8", "y": "i4"}).extend(
            {"x": np.arange(300.0), "y": np.arange(300, dtype=np.int32) % 2})
    assert str(uproot.open(path).file.uuid) == uuid
    with pytest.raises(SpecError) as info:
        RootDataset(s, split="all", stats=stats)
    assert "pass 1 read 100 of its entries, this spec reads 300" in str(info.value)


def test_stats_from_before_uuids_say_they_compare_full_paths(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    shutil.copy(HZZ, tmp_path / "a" / "hzz.root")
    s = {"data": {"sources": [{"name": "hzz", "files": [str(tmp_path / "a" / "hzz.root")],
                               "label": 1}], "features": ["MET_px"]}}
    legacy = RootDataset(s, split="all").stats.to_dict()
    for source in legacy["sources"]:  # as written before uuids and file_entries were recorded
        del source["uuids"], source["file_entries"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = copy.deepcopy(s)
    moved["data"]["sources"][0]["files"] = [str(tmp_path / "b" / "hzz.root")]
    same_as_fresh(s, legacy)  # where it was, it still fits
    with pytest.raises(SpecError) as info:
        RootDataset(moved, split="all", stats=legacy)
    text = str(info.value)
    assert "compare full paths: a file moved is another file to them" in text
    assert "with other content" not in text  # the same bytes: never said to differ


def test_the_refusal_names_the_source_as_this_spec_names_it(tmp_path: Path) -> None:
    synth.generate(tmp_path, 400, seed=4)
    s = {"data": {"sources": [{"name": "old", "files": [str(tmp_path / "signal.root")],
                               "label": 1}], "features": ["MET_pt"]}}
    stats = RootDataset(s, split="all").stats.to_dict()
    renamed = copy.deepcopy(s)
    renamed["data"]["sources"][0].update(name="signal",
                                         files=[str(tmp_path / "background.root")])
    with pytest.raises(SpecError) as info:
        RootDataset(renamed, split="all", stats=stats)
    assert "of source 'signal' is not among them" in str(info.value)


@pytest.mark.filterwarnings("ignore:data.derived.MET_px replaces the branch")
def test_derived_names_in_another_order_are_another_spec(hzz_stats: dict[str, Any]) -> None:
    # a derived name may shadow a branch: each expression sees the names defined before it
    first = spec(derived={"a": "MET_px", "MET_px": "MET_py * 10"})
    then = spec(derived={"MET_px": "MET_py * 10", "a": "MET_px"})
    stats = RootDataset(first, split="all").stats.to_dict()
    with pytest.raises(SpecError) as info:
        RootDataset(then, split="all", stats=stats)
    assert "were computed for another spec: data.derived differ" in str(info.value)
    same_as_fresh(first, stats)
    from mlaas import spec as spec_module

    assert spec_module.load(first).data_digest() != spec_module.load(then).data_digest()
