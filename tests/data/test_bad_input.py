"""Every bad input gets a clear error: the right class, and a message naming what is wrong.

Each test checks the mlaas class, that it is also the built-in a caller would
catch (``except KeyError`` for a missing branch, ``except OSError`` for an
unreadable file, ``except ValueError`` for a bad spec), and that the message
names the file or URL, tree, branch or spec field path, with close names
suggested where there are some.
"""

from __future__ import annotations

import functools
import http.server
import re
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot

from mlaas import spec as spec_module
from mlaas.data import RootDataset, sources, synth
from mlaas.data.inspect import inspect_file
from mlaas.errors import (
    BadValues,
    BranchNotFound,
    CacheError,
    DataError,
    ExpressionError,
    MlaasError,
    SourceError,
    SpecError,
    TreeNotFound,
    UnsupportedBranch,
)
from mlaas.spec import RetrySpec
from support.trees import write_ttrees

FILES = Path(__file__).resolve().parent.parent / "files"
HZZ = str(FILES / "uproot-HZZ.root")
ZMUMU = str(FILES / "uproot-Zmumu.root")
RETRIES = {"attempts": 2, "backoff": 0.1, "timeout": 5}


def hzz_spec(files: list[str] | None = None, **data: Any) -> dict[str, Any]:
    """A small valid spec on HZZ; keyword arguments replace or add ``data`` keys."""
    d: dict[str, Any] = {
        "sources": [{"files": files or [HZZ]}],
        "label": "triggerIsoMu24",
        "features": ["MET_px", {"branch": "Muon_Px", "max_len": 2, "sort_by": "Muon_Px"}],
        "retries": dict(RETRIES),
    }
    d.update(data)
    return {"data": d}


def labelled_spec(files: list[str], features: Any, **data: Any) -> dict[str, Any]:
    """A spec with a constant per-source label (for files without a label branch)."""
    d: dict[str, Any] = {"sources": [{"files": files, "label": 1}], "features": features,
                         "retries": dict(RETRIES)}
    d.update(data)
    return {"data": d}


def fails(cls: type[MlaasError], builtin: type[BaseException], action: Callable[[], Any]) -> str:
    """Run ``action``; it must raise ``cls``, which must also be a ``builtin``; return the text."""
    with pytest.raises(cls) as info:
        action()
    assert isinstance(info.value, builtin), f"{type(info.value).__name__} is not a {builtin}"
    assert isinstance(info.value, MlaasError)
    return str(info.value)


def dataset(spec: Any) -> Callable[[], RootDataset]:
    return lambda: RootDataset(spec, split="all", batch_size=256, shuffle=False)


def write_tree(path: Path, trees: dict[str, dict[str, Any]]) -> str:
    return str(write_ttrees(path, trees))


# --------------------------------------------------------------- 1. unreadable files


def _corrupt(tmp: Path) -> Path:
    path = tmp / "corrupt.root"
    path.write_bytes(np.random.default_rng(7).bytes(20_000))
    return path


def _half(tmp: Path) -> Path:
    data = Path(HZZ).read_bytes()
    path = tmp / "half.root"
    path.write_bytes(data[: len(data) // 2])
    return path


def _first_kb(tmp: Path) -> Path:
    path = tmp / "head.root"
    path.write_bytes(Path(HZZ).read_bytes()[:1000])
    return path


def _text(tmp: Path) -> Path:
    path = tmp / "notes.root"
    path.write_text("this is a text file, not ROOT\n" * 40)
    return path


BROKEN = {"corrupt": _corrupt, "truncated_half": _half, "truncated_1000_bytes": _first_kb,
          "text": _text}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_unreadable_file_via_dataset_names_the_file(tmp_path: Path, kind: str) -> None:
    path = BROKEN[kind](tmp_path)
    text = fails(SourceError, OSError, dataset(hzz_spec([str(path)])))
    assert str(path) in text
    assert "not a readable ROOT file" in text
    assert "Traceback" not in text and "Files may be specified as" not in text


@pytest.mark.parametrize("kind", list(BROKEN))
def test_unreadable_file_via_inspect_names_the_file(tmp_path: Path, kind: str) -> None:
    path = BROKEN[kind](tmp_path)
    text = fails(SourceError, OSError, lambda: inspect_file(str(path)))
    assert str(path) in text
    assert "not a readable ROOT file" in text


def test_truncated_file_says_truncated(tmp_path: Path) -> None:
    for path in (_half(tmp_path), _first_kb(tmp_path)):
        text = fails(SourceError, OSError, lambda p=path: inspect_file(str(p)))
        assert "truncated" in text
        assert f"in file {path}" in text


def _damaged_basket(tmp: Path, compression: str, which: str,
                    branch: str = "PV_npvs") -> tuple[Path, int, int]:
    """A valid datagen file whose first or last basket of ``branch`` has garbage in its payload."""
    synth.generate(tmp, 3000, compression=compression, seed=3, chunk_size=700)
    path = tmp / "signal.root"
    b = uproot.open(path)["Events"][branch]
    last = b.num_baskets - 1 if which == "last" else 0
    seek, size = int(b.member("fBasketSeek")[last]), b.basket_compressed_bytes(last)
    key = b.basket(last).member("fKeylen")
    data = bytearray(path.read_bytes())
    payload = slice(seek + key + 9, seek + size)  # after the key and the 9-byte codec header
    data[payload] = bytes(range(256)) * ((size - key - 9) // 256) + bytes((size - key - 9) % 256)
    path.write_bytes(bytes(data))
    return path, int(b.entry_offsets[last]), int(b.entry_offsets[last + 1])


@pytest.mark.parametrize("which", ["first", "last"])  # first: found by the layout's sample
@pytest.mark.parametrize("compression", ["zlib", "lz4"])  # uncompressed garbage is just numbers
def test_damaged_basket_names_the_branch_and_entries(tmp_path: Path, compression: str,
                                                     which: str) -> None:
    path, first, end = _damaged_basket(tmp_path, compression, which)  # [first, end): damaged
    spec = labelled_spec([str(path)], ["MET_pt", "PV_npvs"], tree="Events")
    text = fails(SourceError, OSError, dataset(spec))
    found = re.search(r"branch 'PV_npvs', entries (\d+) to (\d+): the data is corrupt", text)
    assert found is not None, text
    assert int(found.group(1)) <= first < int(found.group(2)) <= end  # the damaged range
    assert f"in file {path}" in text
    assert "not a readable ROOT file" not in text  # the file is, one basket is not


def test_non_root_file_quotes_its_first_bytes(tmp_path: Path) -> None:
    path = _text(tmp_path)
    text = fails(SourceError, OSError, dataset(hzz_spec([str(path)])))
    assert "not a ROOT file" in text
    assert "b'this'" in text  # the first four bytes, so 'HTML error page' is recognisable


def test_unreadable_second_file_is_named(tmp_path: Path) -> None:
    path = _corrupt(tmp_path)
    text = fails(SourceError, OSError, dataset(hzz_spec([HZZ, str(path)])))
    assert str(path) in text
    assert HZZ not in text


# ------------------------------------------------------------------------ 2. trees


def test_missing_tree_suggests_the_real_one() -> None:
    text = fails(TreeNotFound, KeyError, dataset(hzz_spec(tree="Evnts")))
    assert "'Evnts'" in text
    assert "did you mean 'events'" in text
    assert "trees here: events" in text
    assert f"in file {HZZ}" in text


def test_two_trees_without_data_tree_lists_both(tmp_path: Path) -> None:
    path = write_tree(tmp_path / "two.root", {
        "alpha": {"x": np.arange(10.0)},
        "beta": {"x": np.arange(10.0)},
    })
    text = fails(TreeNotFound, KeyError, dataset(labelled_spec([path], ["x"])))
    assert "2 trees" in text
    assert "alpha" in text and "beta" in text
    assert "data.tree" in text
    assert path in text
    # ... and naming one works
    assert RootDataset(labelled_spec([path], ["x"], tree="beta"), split="all").num_events == 10


def test_file_with_an_rntuple_but_no_ttree(tmp_path: Path) -> None:
    path = tmp_path / "rntuple.root"
    with uproot.recreate(path) as f:
        f["events"] = {"x": np.arange(10.0)}  # uproot 5.7 writes an RNTuple here
    if uproot.open(path).classnames().get("events;1") == "TTree":
        pytest.fail("uproot wrote a TTree; this test needs a file without one")
    text = fails(TreeNotFound, KeyError, dataset(labelled_spec([str(path)], ["x"])))
    assert "no TTree" in text
    assert "RNTuple" in text
    assert str(path) in text


# --------------------------------------------------------------------- 3. branches


def test_missing_branch_in_features() -> None:
    text = fails(BranchNotFound, KeyError, dataset(hzz_spec(features=["MET_px", "MET_pz"])))
    assert "'MET_pz'" in text
    assert "did you mean" in text and "'MET_px'" in text
    assert "at spec field data.features[1]" in text
    assert f"in file {HZZ}" in text and "in tree events" in text


def test_missing_branch_in_jagged_feature() -> None:
    text = fails(BranchNotFound, KeyError,
                 dataset(hzz_spec(features=[{"branch": "Muon_Pxx", "max_len": 2}])))
    assert "'Muon_Pxx'" in text and "'Muon_Px'" in text
    assert "data.features[0].branch" in text


def test_missing_branch_in_cut() -> None:
    text = fails(BranchNotFound, KeyError, dataset(hzz_spec(cut="MET_pz > 0")))
    assert "'MET_pz'" in text and "'MET_px'" in text
    assert "at spec field data.cut" in text


def test_missing_branch_in_derived() -> None:
    text = fails(BranchNotFound, KeyError,
                 dataset(hzz_spec(derived={"met": "hypot(MET_px, MET_pz)"})))
    assert "'MET_pz'" in text and "'MET_px'" in text
    assert "at spec field data.derived.met" in text


def test_missing_branch_in_sort_by() -> None:
    features = ["MET_px", {"branch": "Muon_Px", "max_len": 2, "sort_by": "Muon_pt"}]
    text = fails(BranchNotFound, KeyError, dataset(hzz_spec(features=features)))
    assert "'Muon_pt'" in text
    assert "did you mean" in text and "Muon_P" in text
    assert "at spec field data.features[1].sort_by" in text


def test_missing_branch_in_label_and_weight() -> None:
    text = fails(BranchNotFound, KeyError, dataset(hzz_spec(label="triggerIsoMu42")))
    assert "'triggerIsoMu24'" in text and "data.label" in text
    text = fails(BranchNotFound, KeyError, dataset(hzz_spec(weight="EventWieght")))
    assert "'EventWeight'" in text and "data.weight" in text


UNKNOWN_NAMES: dict[str, tuple[dict[str, Any], str, str, str]] = {
    # case: (spec change, the unknown name, the expression it is in, the spec field)
    "cut": ({"cut": "(MET_pz > 0) & (NMuon > 0)"}, "MET_pz", "(MET_pz > 0) & (NMuon > 0)",
            "data.cut"),
    "derived": ({"derived": {"met": "hypot(MET_px, MET_pz)"}}, "MET_pz",
                "hypot(MET_px, MET_pz)", "data.derived.met"),
    "label": ({"label": "triggerIsoMu42 > 0"}, "triggerIsoMu42", "triggerIsoMu42 > 0",
              "data.label"),
    "weight": ({"weight": "EventWieght * 2"}, "EventWieght", "EventWieght * 2", "data.weight"),
    "feature expression": ({"features": ["MET_px", "hypot(MET_px, MET_pz)"]}, "MET_pz",
                           "hypot(MET_px, MET_pz)", "data.features[1]"),
    "jagged feature": ({"features": [{"branch": "Muon_Pxx", "max_len": 2}]}, "Muon_Pxx",
                       "Muon_Pxx", "data.features[0].branch"),
}


@pytest.mark.parametrize("case", list(UNKNOWN_NAMES))
def test_issue2_unknown_name_lists_the_available_names(case: str) -> None:
    data, name, source, field = UNKNOWN_NAMES[case]
    text = fails(BranchNotFound, KeyError, dataset(hzz_spec(**data)))
    assert f"unknown name {name!r} in expression {source!r}" in text
    assert "did you mean" in text.split("available names:")[0]  # close names come first
    names = sorted(uproot.open(HZZ)["events"].keys())
    listed = ", ".join(names[:20]) + f", ... ({len(names) - 20} more)"
    assert f"available names: {listed}" in text
    assert f"at spec field {field}" in text and f"in file {HZZ}" in text


def test_issue2_unknown_name_lists_branches_and_derived_names(tmp_path: Path) -> None:
    path = write_tree(tmp_path / "small.root", {"events": {
        "pt": np.arange(5.0), "eta": np.zeros(5), "lab": np.ones(5)}})
    spec = {"data": {"sources": [{"files": [path]}], "label": "lab",
                     "derived": {"pt2": "pt ** 2"}, "cut": "(pt3 > 1) | (ETA < 0)",
                     "features": ["pt"]}}
    text = fails(BranchNotFound, KeyError, dataset(spec))
    assert "unknown names 'ETA' (did you mean 'eta'?), 'pt3' (did you mean " in text
    assert "in expression '(pt3 > 1) | (ETA < 0)'" in text
    assert "available names: eta, lab, pt, pt2\n" in text  # every one, the derived one too
    assert f"in file {path}" in text and "at spec field data.cut" in text


def test_branch_missing_in_second_file_names_that_file(tmp_path: Path) -> None:
    n = 50
    first = write_tree(tmp_path / "first.root",
                       {"events": {"MET_px": np.arange(n, dtype=np.float64), "lab": np.ones(n)}})
    second = write_tree(tmp_path / "second.root",
                        {"events": {"MET_py": np.arange(n, dtype=np.float64), "lab": np.ones(n)}})
    spec = {"data": {"sources": [{"files": [first, second]}], "label": "lab",
                     "features": ["MET_px"]}}
    text = fails(BranchNotFound, KeyError, dataset(spec))
    assert "'MET_px'" in text
    assert f"in file {second}" in text
    assert first not in text
    assert "did you mean 'MET_py'" in text


# ----------------------------------------------------------------- 4. unsupported types


def test_string_branch_as_feature_is_unsupported() -> None:
    text = fails(UnsupportedBranch, TypeError, dataset(labelled_spec([ZMUMU], ["M", "Type"])))
    assert "'Type'" in text
    assert "char*" in text
    assert "in branch Type" in text and ZMUMU in text


def test_features_all_skips_string_branch_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="'Type'") as record:
        ds = RootDataset(labelled_spec([ZMUMU], "all"), split="all", batch_size=512, shuffle=False)
    assert any("unsupported" in str(w.message) for w in record)
    assert "Type" not in ds.feature_names
    # identifiers default to run/event/luminosityBlock, in any case: Zmumu's
    # capitalised Run and Event are event numbers too, not features.
    assert "Run" not in ds.feature_names and "Event" not in ds.feature_names
    assert {"M", "E1", "px1", "Q2"} <= set(ds.feature_names)
    cols = ds.columns()
    assert cols.x.shape == (2304, len(ds.feature_names))
    assert np.isfinite(cols.x).all()


def test_features_all_respects_exclude_and_identifiers() -> None:
    spec = labelled_spec([ZMUMU], "all", exclude=["Type"], identifiers=["Run", "Event"])
    ds = RootDataset(spec, split="all", shuffle=False)  # no warning: Type is excluded
    assert not {"Type", "Run", "Event"} & set(ds.feature_names)


def write_nested(path: Path) -> str:
    """A tree with fixed-size arrays per event (double[3]) and lists of them (double[][3])."""
    n = 12
    per_event = ak.unflatten(ak.Array(np.arange(3.0 * 20).reshape(20, 3)),
                             [2, 0, 3, 1, 0, 2, 1, 1, 4, 0, 3, 3])
    with uproot.recreate(path) as f:
        f.mktree("events", {"x": np.float64, "vec": np.dtype(("f8", (3,))),
                            "jv": per_event.type.content, "lab": np.float64})
        f["events"].extend({"x": np.arange(n, dtype=np.float64),
                            "vec": np.arange(3.0 * n).reshape(n, 3), "jv": per_event,
                            "lab": np.arange(n) % 2.0})
    assert uproot.open(path)["events"].typenames()["jv"] == "double[][3]"
    return str(path)


@pytest.mark.parametrize(("features", "cut", "branch", "typename"), [
    (["x", "vec"], None, "vec", "double[3]"),
    (["x", {"branch": "jv", "max_len": 2}], None, "jv", "double[][3]"),
    (["x"], "sum(jv) > 0", "jv", "double[][3]"),  # used only by the cut
], ids=["fixed-size array", "list of arrays", "in a cut"])
def test_issue2_nested_objects_are_unsupported(tmp_path: Path, features: list[Any],
                                               cut: str | None, branch: str,
                                               typename: str) -> None:
    path = write_nested(tmp_path / "nested.root")
    spec = {"data": {"sources": [{"files": [path]}], "label": "lab", "features": features,
                     **({"cut": cut} if cut else {})}}
    with pytest.raises(UnsupportedBranch) as info:
        RootDataset(spec, split="all", shuffle=False)
    assert isinstance(info.value, TypeError)
    text = str(info.value)
    assert text.startswith(f"branch {branch!r} has type {typename!r}, which is not a number")
    assert f"in file {path}" in text and "in tree events" in text and f"in branch {branch}" in text
    assert (info.value.file_path, info.value.tree, info.value.branch) == (path, "events", branch)


def test_issue2_features_all_skips_nested_objects_with_a_warning(tmp_path: Path) -> None:
    path = write_nested(tmp_path / "nested.root")
    spec = {"data": {"sources": [{"files": [path]}], "label": "lab", "features": "all"}}
    with pytest.warns(UserWarning) as record:
        ds = RootDataset(spec, split="all", shuffle=False)
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "features: all leaves out branch 'lab': data.label is computed from it "
        "(a feature must not hand the model the answer)",
        "features: all skips branch 'jv' of unsupported type 'double[][3]'",
        "features: all skips branch 'vec' of unsupported type 'double[3]'",
    ]
    assert ds.feature_names == ["x", "njv"]  # the list's counter is a plain number
    cols = ds.columns()
    np.testing.assert_array_equal(np.sort(cols.entry), np.arange(12))
    assert np.isfinite(cols.x).all()


def test_dotted_branch_names_are_skipped_by_name_and_refused_when_named(tmp_path: Path) -> None:
    # Delphes-style members of split objects (Jet.PT): the expression language has no
    # way to write such a name, so features: all says it leaves them out
    rng = np.random.default_rng(4)
    path = write_tree(tmp_path / "delphes.root", {"Delphes": {
        "MissingET.MET": rng.normal(size=20), "HT": rng.normal(size=20)}})
    spec = {"data": {"sources": [{"files": [path], "label": 1}], "features": "all"}}
    with pytest.warns(UserWarning, match=r"skips branch 'MissingET.MET' \(a name with a dot"):
        ds = RootDataset(spec, split="all", shuffle=False)
    assert ds.feature_names == ["HT"]
    spec["data"]["features"] = ["MissingET.MET"]
    text = load_fails(spec)
    assert "a branch name with a dot cannot be named" in text and "data.features[0]" in text


def test_features_all_with_a_derived_name_of_an_unsupported_branch_names_it(
        tmp_path: Path) -> None:
    path = write_nested(tmp_path / "nested.root")
    spec = {"data": {"sources": [{"files": [path]}], "label": "lab", "features": "all",
                     "derived": {"v2": "vec * 2"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        text = fails(UnsupportedBranch, TypeError, dataset(spec))
    assert "branch 'vec' has type 'double[3]'" in text, text


def test_features_that_read_no_branch_are_an_error_not_an_empty_epoch() -> None:
    spec = {"data": {"sources": [{"files": [HZZ], "label": 1}], "features": ["2 ** 3"]}}
    text = fails(SpecError, ValueError, dataset(spec))
    assert "reads no branch of tree 'events'" in text and "data.features" in text, text


def test_exclude_takes_shell_patterns() -> None:
    spec = {"data": {"sources": [{"files": [HZZ], "label": 1}], "features": "all",
                     "exclude": ["MC*", "Photon_*", "Jet_?[xyz]", "Nope_*"]}}
    with pytest.warns(UserWarning) as record:
        ds = RootDataset(spec, split="all", shuffle=False)
    names = set(ds.feature_names)
    assert not any(n.startswith(("MC", "Photon_", "Jet_Px", "Jet_Py", "Jet_Pz")) for n in names)
    assert "Jet_E_0" in names and "MET_px" in names
    said = [str(w.message) for w in record]
    assert any("data.exclude[3] is the pattern 'Nope_*', which matches no branch" in m
               for m in said), said
    assert not any("data.exclude[0]" in m for m in said), said


def test_features_all_with_nothing_left_is_an_error_not_an_empty_dataset() -> None:
    names = ["E1", "px1", "py1", "pz1", "pt1", "eta1", "phi1", "Q1",
             "E2", "px2", "py2", "pz2", "pt2", "eta2", "phi2", "Q2", "M"]
    spec = {"data": {"sources": [{"files": [ZMUMU], "label": 1}], "features": "all",
                     "exclude": names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the string branch it skips
        text = fails(SpecError, ValueError, dataset(spec))
    assert "no features to train on" in text and "data.features" in text, text


# ---------------------------------------------------------------- 5-8. data problems


def test_empty_tree_says_the_source_has_no_events(tmp_path: Path) -> None:
    path = write_tree(tmp_path / "empty.root",
                      {"events": {"MET_px": np.zeros(0), "lab": np.zeros(0)}})
    spec = {"data": {"sources": [{"files": [path]}], "label": "lab", "features": ["MET_px"]}}
    text = fails(DataError, ValueError, dataset(spec))
    assert "no events" in text
    assert path in text
    assert "data.sources[0]" in text


def test_empty_file_among_others_only_warns(tmp_path: Path) -> None:
    empty = write_tree(tmp_path / "empty.root",
                       {"events": {"MET_px": np.zeros(0), "lab": np.zeros(0)}})
    full = write_tree(tmp_path / "full.root",
                      {"events": {"MET_px": np.arange(20.0), "lab": np.ones(20)}})
    spec = {"data": {"sources": [{"files": [empty, full]}], "label": "lab",
                     "features": ["MET_px"]}}
    with pytest.warns(UserWarning, match=re.escape(empty)):
        ds = RootDataset(spec, split="all")
    assert ds.num_events == 20


def test_an_empty_first_file_does_not_decide_the_layout(tmp_path: Path) -> None:
    # the layout learns on a few entries whether a derived name gives a list per event;
    # from an empty first file it learnt nothing, and pass 1 failed with awkward's message
    empty = write_tree(tmp_path / "empty.root", {"events": {
        "MET_px": np.zeros(0), "lab": np.zeros(0), "Jet_pt": ak.Array([[1.0]])[:0]}})
    full = write_tree(tmp_path / "full.root", {"events": {
        "MET_px": np.arange(3.0), "lab": np.ones(3), "Jet_pt": ak.Array([[1.0, 2.0], [], [3.0]])}})
    spec = {"data": {"sources": [{"files": [empty, full]}], "label": "lab", "features": "all",
                     "derived": {"Jet_x": "2 * Jet_pt"}}}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", UserWarning)
        ds = RootDataset(spec, split="all", shuffle=False)
    assert any(empty in str(w.message) for w in said)  # the empty file is still named
    assert "Jet_x_0" in ds.feature_names and ds.num_events == 3


def test_cut_selecting_nothing_names_data_cut() -> None:
    text = fails(DataError, ValueError, dataset(hzz_spec(cut="MET_px > 1e9")))
    assert "selects no events" in text
    assert "'MET_px > 1e9'" in text
    assert "at spec field data.cut" in text
    assert "2421" in text


def test_source_emptied_by_the_cut_is_warned_about(tmp_path: Path) -> None:
    low = write_tree(tmp_path / "low.root", {"t": {"x": np.arange(100.0)}})
    high = write_tree(tmp_path / "high.root", {"t": {"x": np.arange(100.0, 200.0)}})
    spec = {"data": {"sources": [{"name": "low", "files": [low], "label": 0},
                                 {"name": "high", "files": [high], "label": 1}],
                     "features": ["x"], "cut": "x >= 100"}}
    with pytest.warns(UserWarning, match=r"source low \(data.sources\[0\]\) has no events "
                                         r"after the cut 'x >= 100'"):
        ds = RootDataset(spec, split="all", shuffle=False)
    assert ds.num_events == 100
    assert any("data.sources[0]" in note for note in ds.stats.warnings)


def test_zero_variance_feature_is_reported_and_finite() -> None:
    spec = hzz_spec(derived={"one": "MET_px*0 + 1"}, features=["MET_px", "one"])
    with pytest.warns(UserWarning, match=r"^feature 'one' has zero variance \(always 1\) "
                                         r"over 2421 values") as record:
        ds = RootDataset(spec, split="all", shuffle=False)
    assert len(record) == 1  # MET_px varies: one warning, raised where Python users see it
    assert any("'one'" in w and "zero variance" in w for w in ds.stats.warnings)
    assert not any("'MET_px'" in w for w in ds.stats.warnings)
    column = ds.columns().x[:, ds.feature_names.index("one")]
    assert column.shape == (2421,)
    assert np.isfinite(column).all()
    assert np.all(column == 0.0)


def test_non_finite_feature_fails_by_default() -> None:
    spec = hzz_spec(derived={"r": "1 / (NMuon - NMuon)"}, features=["MET_px", "r"])
    text = fails(BadValues, ValueError, dataset(spec))
    assert "'r'" in text
    assert "inf" in text
    assert "at spec field data.nan" in text
    assert "policy: replace" in text
    assert "'MET_px'" not in text


def test_a_nan_label_fails_pass_1_counting_every_file_and_quoting_the_expression() -> None:
    # max() of an event without jets is NaN: found by the transform, it was a count of one
    # shuffle piece's events after pass 1 had passed
    spec = hzz_spec(label="max(Jet_Px)", cut="NMuon >= 1")
    with pytest.raises(BadValues) as info:
        dataset(spec)()
    text = str(info.value)
    events = uproot.open(HZZ)["events"].arrays(["NJet", "NMuon"], library="np")
    empty = int(((events["NJet"] == 0) & (events["NMuon"] >= 1)).sum())
    assert empty > 0
    assert f"the label 'max(Jet_Px)' is NaN for {empty} selected events of all files" in text
    assert "max(Jet_pt, 0)" in text  # how to give the empty value
    assert f"in file {HZZ}" in text and "at spec field data.label" in text
    assert info.value.stats is not None and info.value.stats.selected > 0  # stats still shown
    assert info.value.stats.max_len == {"Muon": 2}  # complete: mlaas stats -o writes them


def test_a_failing_label_check_still_carries_the_notes_of_pass_1() -> None:
    # mlaas stats -o writes the stats a failing pass 1 carries: its notes were left out
    spec = hzz_spec(label="max(Jet_Px)", features=["MET_px", "MET_px * 0"])
    with pytest.warns(UserWarning, match="zero variance"), pytest.raises(BadValues) as info:
        dataset(spec)()
    assert any("feature 'MET_px * 0' has zero variance" in w for w in info.value.stats.warnings)


def test_an_infinite_weight_fails_pass_1_naming_data_weight() -> None:
    spec = hzz_spec(weight="1 / (NJet - NJet)")
    text = fails(BadValues, ValueError, dataset(spec))
    assert "the weight '1 / (NJet - NJet)' is infinite for 2421 selected events" in text
    assert "max(Jet_pt, 0)" not in text  # no reduction in it: no hint about one
    assert "at spec field data.weight" in text


def test_stats_of_another_spec_are_refused_naming_what_differs() -> None:
    # a cut's stats given to a spec without it counted the wrong events, silently
    with_cut = RootDataset(hzz_spec(cut="NMuon >= 2"), split="all").stats
    text = fails(SpecError, ValueError,
                 lambda: RootDataset(hzz_spec(), split="train", stats=with_cut.to_dict()))
    assert "were computed for another spec: data.cut differ" in text
    assert "at spec field data.cut" in text
    # what pass 1 does not depend on may differ
    ds = RootDataset(hzz_spec(cut="NMuon >= 2", normalize="minmax", step_size=500),
                     split="train", stats=with_cut)
    assert ds.num_events == with_cut.splits["train"]


def test_stats_without_a_recorded_spec_are_checked_by_features_and_files(tmp_path: Path) -> None:
    old = RootDataset(hzz_spec(), split="all").stats.to_dict()
    del old["spec"]  # stats.json written before it recorded its spec
    spec = hzz_spec(features=["MET_px", "MET_py"])
    text = fails(SpecError, ValueError, lambda: RootDataset(spec, split="all", stats=old))
    assert "have no feature 'MET_py'" in text and "at spec field data.features" in text
    copy = tmp_path / "copy.root"
    copy.write_bytes(Path(HZZ).read_bytes())
    text = fails(SpecError, ValueError,
                 lambda: RootDataset(hzz_spec(files=[str(copy)]), split="all", stats=old))
    assert "computed over other files" in text and "at spec field data.sources" in text


def test_issue2_non_finite_error_counts_exactly() -> None:
    spec = hzz_spec(derived={"r": "1 / (NMuon - 1)", "q": "(NMuon - 1) / (NMuon - 1) * MET_px"},
                    features=["MET_px", "r", "q"], cut="NMuon < 3")
    text = fails(BadValues, ValueError, dataset(spec))
    n_muon = uproot.open(HZZ)["events"]["NMuon"].array(library="np")
    ones = int((n_muon == 1).sum())
    assert 0 < ones < int((n_muon < 3).sum())
    assert f"'r': 0 NaN, {ones} inf; 'q': {ones} NaN, 0 inf" in text
    assert "'MET_px'" not in text
    assert f"in file {HZZ}" in text and "at spec field data.nan" in text


def test_issue2_non_finite_error_names_the_first_file_with_bad_values(tmp_path: Path) -> None:
    n = 40
    x = np.linspace(1.0, 2.0, n)
    with_nan, with_inf = x.copy(), x.copy()
    with_nan[[3, 7]] = np.nan
    with_inf[[5]] = np.inf
    paths = [write_tree(tmp_path / f"{name}.root", {"events": {"x": v, "lab": np.ones(n)}})
             for name, v in (("clean", x), ("nan", with_nan), ("inf", with_inf))]
    spec = {"data": {"sources": [{"files": paths}], "label": "lab", "features": ["x"],
                     "step_size": 25}}
    with pytest.raises(BadValues) as info:
        RootDataset(spec, split="all", shuffle=False)
    assert info.value.file_path == paths[1]  # the counts cover every file; the first bad one
    text = str(info.value)
    assert "'x': 2 NaN, 1 inf" in text
    assert f"in file {paths[1]}" in text and paths[0] not in text and paths[2] not in text


def test_issue2_first_bad_file_counts_selected_jagged_values_of_any_chunk(
        tmp_path: Path) -> None:
    """The file named is the first whose *selected* events hold a bad value, in any chunk.

    A NaN in an event the cut removes does not count; a bad jagged element
    in the second chunk of a file does.
    """
    n = 40
    x = np.linspace(1.0, 2.0, n)
    counts = np.full(n, 2)

    def jets(bad: dict[int, float]) -> ak.Array:
        flat = np.linspace(10.0, 90.0, 2 * n)
        for event, value in bad.items():
            flat[2 * event + 1] = value
        return ak.unflatten(flat, counts)

    cut_away = x.copy()
    cut_away[2] = 1000.0  # event 2 fails the cut, and only it holds a NaN
    trees = {"cut-away": (cut_away, jets({2: np.nan})), "late": (x, jets({33: np.nan})),
             "inf": (x, jets({5: np.inf}))}
    paths = [write_tree(tmp_path / f"{name}.root",
                        {"events": {"x": xs, "Jet_pt": jet, "lab": np.ones(n)}})
             for name, (xs, jet) in trees.items()]
    spec = {"data": {"sources": [{"files": paths}], "label": "lab", "cut": "x < 100",
                     "features": ["x", {"branch": "Jet_pt", "max_len": 2}], "step_size": 25}}
    lenient = {"data": {**spec["data"], "nan": {"policy": "replace", "value": 0}}}
    late = [c for c in RootDataset(lenient, split="all").chunks if c.url == paths[1]]
    assert len(late) == 2 and late[1].start <= 33 < late[1].stop  # the NaN is in chunk 2
    with pytest.raises(BadValues) as info:
        RootDataset(spec, split="all", shuffle=False)
    assert info.value.file_path == paths[1]
    text = str(info.value)
    assert "'Jet_pt': 1 NaN, 1 inf" in text and "'x'" not in text
    assert f"in file {paths[1]}" in text and paths[0] not in text and paths[2] not in text


def test_non_finite_with_given_stats_still_fails_in_transform() -> None:
    good = RootDataset(hzz_spec(derived={"r": "1 / (NMuon - 1)"}, features=["MET_px", "r"],
                                nan={"policy": "replace", "value": 0}),
                       split="all", shuffle=False)
    strict = hzz_spec(derived={"r": "1 / (NMuon - 1)"}, features=["MET_px", "r"])
    ds = RootDataset(strict, split="all", shuffle=False, stats=good.stats)
    with pytest.raises(BadValues) as info:
        ds.columns()
    assert "'r'" in str(info.value) and "data.nan" in str(info.value)


def test_nan_replace_all_values() -> None:
    spec = hzz_spec(derived={"r": "1 / (NMuon - NMuon)"}, features=["MET_px", "r"],
                    nan={"policy": "replace", "value": -1})
    ds = RootDataset(spec, split="all", shuffle=False)
    col = ds.feature_names.index("r")
    x = ds.columns().x[:, col]
    expected = (-1.0 - ds.transform.shift[col]) * ds.transform.scale[col]
    assert np.allclose(x, expected)
    assert np.allclose(x, -1.0)  # no finite value: shift 0, scale 1


def test_nan_replace_some_values_is_consistent_with_scaling() -> None:
    spec = hzz_spec(derived={"r": "1 / (NMuon - 1)"}, features=["MET_px", "r"],
                    nan={"policy": "replace", "value": -1})
    ds = RootDataset(spec, split="all", shuffle=False)
    col = ds.feature_names.index("r")
    cols = ds.columns()
    nmuon = uproot.open(HZZ)["events"]["NMuon"].array(library="np")[cols.entry]
    shift, scale = ds.transform.shift[col], ds.transform.scale[col]
    assert scale != 1.0  # the finite values set a real scale
    bad = nmuon == 1
    assert bad.any() and (~bad).any()
    got = cols.x[:, col].astype(np.float64)
    assert np.allclose(got[bad], (-1.0 - shift) * scale, rtol=1e-6)
    with np.errstate(divide="ignore"):
        raw = 1.0 / (nmuon[~bad] - 1.0)
    assert np.allclose(got[~bad], (raw - shift) * scale, rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()


# ---------------------------------------------------------------------- 9. XRootD


@pytest.mark.xrootd
@pytest.mark.network
@pytest.mark.slow
def test_http_server_without_range_requests_is_named(tmp_path: Path) -> None:
    """A plain file server that answers every request with the whole file: uproot reads
    parts of files, so the error says the server may ignore Range requests."""
    served = tmp_path / "www"
    served.mkdir()
    (served / "hzz.root").write_bytes(Path(HZZ).read_bytes())
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hzz.root"
        text = fails(SourceError, OSError, dataset(hzz_spec([url])))
    finally:
        server.shutdown()
        server.server_close()
    assert "the server may ignore HTTP Range requests" in text and url in text, text


def test_redirector_names_what_it_rewrites(tmp_path: Path) -> None:
    spec = hzz_spec(["/eos/user/hzz.root"], redirector="root://127.0.0.1:1094")
    text = fails(SourceError, OSError, dataset(spec))
    assert "rewrites /store/... names only" in text
    assert "root://127.0.0.1:1094//eos/user/hzz.root" in text


def test_xrootd_server_down_gives_up_after_bounded_retries(dead_root_url: str) -> None:
    started = time.monotonic()
    text = fails(SourceError, OSError, dataset(hzz_spec([dead_root_url])))
    elapsed = time.monotonic() - started
    assert dead_root_url in text
    assert "gave up after 2 attempts" in text
    assert 0.1 <= elapsed < 60


@pytest.mark.xrootd
@pytest.mark.network
@pytest.mark.slow
def test_xrootd_server_down_retries_with_backoff(dead_root_url: str) -> None:
    waits: list[float] = []
    retry = RetrySpec(attempts=3, backoff=0.1, timeout=5)
    with pytest.raises(SourceError) as info:
        sources.with_retries(dead_root_url, lambda: sources.open_file(dead_root_url, retry),
                             retry, sleep=waits.append)
    assert waits == [0.1, 0.2]
    assert "gave up after 3 attempts" in str(info.value)
    assert info.value.file_path == dead_root_url


def hang_mid_epoch(server: Any, files: Path, hang: Callable[[], None],
                   frozen: threading.Event | None = None) -> tuple[str, list[str]]:
    """An epoch over ``server`` (a pair of datagen files put there) whose server stops
    answering after 20 batches (``hang``): the epoch's error, and the URLs served."""
    synth.generate(files, 40_000, seed=5)
    urls = [server.put(files / "signal.root"), server.put(files / "background.root")]
    spec = {"data": {
        "sources": [{"files": [urls[0]], "label": 1}, {"files": [urls[1]], "label": 0}],
        "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 4}],
        "step_size": "100 kB",  # many chunks: both readers are busy when it hangs
        "retries": {"attempts": 2, "timeout": 2, "backoff": 0.1}}}
    batches = iter(RootDataset(spec, split="all", batch_size=256))
    for _ in range(20):
        next(batches)
    hang()
    if frozen is not None:
        frozen.set()
    with pytest.raises(SourceError) as info:
        for _ in batches:
            pass
    return str(info.value), urls


@pytest.mark.xrootd
@pytest.mark.network
@pytest.mark.slow
def test_xrootd_server_that_hangs_mid_epoch_fails_it_within_one_retry_chain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that stops answering (frozen with SIGSTOP: its connections stay open)
    fails the epoch with the URL once the waited-for chunk's retries are spent.
    Reads of other chunks that the failed pass no longer needs make no second
    attempt and are not waited for: the error once came after another reader's
    whole retry chain for a chunk nobody would use (six attempts here, 2-3x the
    time that data.retries implies)."""
    from servers import XRootDServer

    attempts: list[str] = []  # one entry per attempt of any read, made after the freeze
    frozen = threading.Event()
    real_with_retries = sources.with_retries

    def counted(url: str, action: Callable[[], Any], retry: RetrySpec, *args: Any,
                **kw: Any) -> Any:
        def attempt() -> Any:
            if frozen.is_set():
                attempts.append(url)
            return action()
        return real_with_retries(url, attempt, retry, *args, **kw)

    monkeypatch.setattr(sources, "with_retries", counted)
    with XRootDServer(name="mlaas-stall") as server:  # its own: this test freezes it
        try:
            text, urls = hang_mid_epoch(server, tmp_path, server.pause, frozen)
        finally:
            server.resume()
    assert "gave up after 2 attempts" in text and any(u in text for u in urls), text
    # two readers, two attempts each; at most one more first attempt, by a reader
    # that took a queued chunk at the moment the pass failed (the attempts of reads
    # not waited for are counted too: they end within one timeout, and none follows)
    time.sleep(2 * 2 + 1)
    assert 1 <= len(attempts) <= 2 * 2 + 1, attempts


@pytest.mark.network
@pytest.mark.slow
def test_http_server_that_hangs_mid_epoch_fails_it_within_one_retry_chain(
        tmp_path: Path) -> None:
    """The same over HTTP: the requests wait, each timeout is a failed attempt."""
    from servers import RangeHTTPServer

    with RangeHTTPServer() as server:  # its own: this test makes it hang
        try:
            text, urls = hang_mid_epoch(server, tmp_path, server.hang)
        finally:
            server.release()
    assert "gave up after 2 attempts, each waiting up to 2 s (data.retries.timeout)" in text
    assert any(u in text for u in urls), text
    assert "FSTimeoutError: FSTimeoutError" not in text, text


@pytest.mark.xrootd
@pytest.mark.network
def test_xrootd_url_with_one_slash_gets_a_hint(xrootd_server: Any) -> None:
    good = xrootd_server.put(Path(HZZ), "bad_input/one-slash.root")
    host, path = good.split("//", 2)[1], good.split("//", 2)[2]
    url = f"root://{host}/{path}"  # root://host:port/path: a relative path to XRootD
    text = fails(SourceError, OSError, dataset(hzz_spec([url])))
    assert "root:// URLs take the path after two slashes" in text and url in text, text


def test_remote_pattern_is_refused_by_name() -> None:
    url = "root://127.0.0.1:1094//store/mc/*.root"
    text = fails(SourceError, OSError, dataset(hzz_spec([url])))
    assert "patterns work on local paths only" in text and url in text, text


def test_xrootd_missing_file_is_not_retried(xrootd_server: Any) -> None:
    xrootd_server.put(Path(HZZ), "bad_input/present.root")
    url = xrootd_server.url("bad_input/absent.root")
    started = time.monotonic()
    text = fails(SourceError, OSError, dataset(hzz_spec([url])))
    assert time.monotonic() - started < 5
    assert url in text
    assert "not found" in text or "no such file" in text
    assert "gave up" not in text
    assert "Files may be specified as" not in text  # uproot's usage help is cut off

    waits: list[float] = []
    retry = RetrySpec(attempts=3, backoff=0.1, timeout=5)
    with pytest.raises(SourceError):
        sources.with_retries(url, lambda: sources.open_file(url, retry), retry,
                             sleep=waits.append)
    assert waits == []


@pytest.mark.xrootd
@pytest.mark.network
def test_xrootd_corrupt_file_names_the_url(xrootd_server: Any, tmp_path: Path) -> None:
    url = xrootd_server.put(_corrupt(tmp_path), "bad_input/corrupt.root")
    text = fails(SourceError, OSError, dataset(hzz_spec([url])))
    assert url in text
    assert "not a readable ROOT file" in text
    assert "gave up" not in text


# -------------------------------------------------------- 10-11. bad specs at load time


def load_fails(raw: Any, cls: type[SpecError] = SpecError) -> str:
    return fails(cls, ValueError, lambda: spec_module.load(raw))


@pytest.mark.parametrize(("field", "extra"), [
    ("data.derived.x", {"derived": {"x": "sqr(MET_px)"}}),
    ("data.cut", {"cut": "sqr(MET_px) > 1"}),
    ("data.features[0]", {"features": ["sqr(MET_px)"]}),
])
def test_unknown_function_at_load(field: str, extra: dict[str, Any]) -> None:
    text = load_fails(hzz_spec(**extra), ExpressionError)
    assert f"{field}: unknown function 'sqr'" in text
    assert "did you mean 'sqrt'" in text
    assert "available functions:" in text
    for name in ("abs", "hypot", "log", "where"):
        assert name in text


def test_unknown_function_fails_before_opening_files() -> None:
    spec = hzz_spec(["/nonexistent/never.root"], derived={"x": "sqr(MET_px)"})
    text = fails(ExpressionError, ValueError, dataset(spec))
    assert "data.derived.x" in text
    assert "never.root" not in text


def test_every_bad_expression_is_listed() -> None:
    text = load_fails(hzz_spec(derived={"x": "sqr(MET_px)"}, cut="MET_px >", weight="lg(1)"),
                      ExpressionError)
    assert "data.derived.x:" in text and "data.cut:" in text and "data.weight:" in text


def _raw(**data: Any) -> dict[str, Any]:
    d = {"sources": [{"files": [HZZ]}], "label": "triggerIsoMu24", "features": ["MET_px"]}
    d.update(data)
    return {"data": {k: v for k, v in d.items() if v is not None}}


MALFORMED: dict[str, tuple[dict[str, Any], list[str]]] = {
    "missing sources": (_raw(sources=None), ["data.sources", "required"]),
    "empty sources": (_raw(sources=[]), ["data.sources"]),
    "source without files": (_raw(sources=[{"label": 1}]), ["data.sources[0].files"]),
    "files as a string": (_raw(sources=[{"files": HZZ}]), ["data.sources[0].files", "list"]),
    "no label anywhere": (_raw(label=None), ["data.sources[0]", "no label", "data.label"]),
    "second source unlabelled": (
        _raw(label=None, sources=[{"files": [HZZ], "label": 1}, {"files": [HZZ]}]),
        ["data.sources[1] has no label"]),
    "both label kinds": (_raw(sources=[{"files": [HZZ], "label": 1}]),
                         ["data.label", "data.sources[0].label", "not both"]),
    "negative max_len": (_raw(features=["MET_px", {"branch": "Muon_Px", "max_len": -2}]),
                         ["data.features[1].max_len", "greater than or equal to 1"]),
    "empty features": (_raw(features=[]), ["data.features", "at least one feature"]),
    "features not all": (_raw(features="everything"), ["data.features", "'all'"]),
    "typo featurs": (
        {"data": {"sources": [{"files": [HZZ]}], "label": "x", "featurs": ["MET_px"]}},
        ["data.featurs", "unknown key 'featurs'", "did you mean 'features'"]),
    "typo in a feature": (_raw(features=[{"branch": "Muon_Px", "maxlen": 2}]),
                          ["data.features[0].maxlen", "did you mean 'max_len'"]),
    "typo in a source": (_raw(sources=[{"files": [HZZ], "lable": 1}]),
                         ["data.sources[0].lable", "did you mean 'label'"]),
    "bad step_size": (_raw(step_size="100 MBB"), ["data.step_size", "'100 MBB'", "100 MB"]),
    "split sums to one": (_raw(split={"validation": 0.6, "test": 0.4}),
                          ["data.split", "sum < 1"]),
    "split above one": (_raw(split={"validation": 1.5}), ["data.split.validation"]),
    "disk cache without path": (_raw(cache="disk"), ["data.cache", "directory"]),
    "zero retries": (_raw(retries={"attempts": 0}), ["data.retries.attempts"]),
    "unknown normalize": (_raw(normalize="zscore"), ["data.normalize.default", "standard"]),
    "nan policy": (_raw(nan={"policy": "drop"}), ["data.nan.policy", "replace"]),
    "jagged collection disagrees": (
        _raw(features=[{"branch": "Jet_Px", "max_len": 2}, {"branch": "Jet_Py", "max_len": 3}]),
        ["data", "max_len differs within collection 'Jet'"]),
    "duplicate feature": (_raw(features=["MET_px", "MET_px"]), ["listed twice", "MET_px"]),
    "bad redirector": (_raw(redirector="http://x"), ["data.redirector", "root://"]),
    "wrong version": ({"version": 2, **_raw()}, ["version"]),
    "data is a list": ({"data": [1, 2]}, ["data", "dictionary"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_spec_names_the_field(case: str) -> None:
    raw, needles = MALFORMED[case]
    text = load_fails(raw)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    assert "Value error," not in text  # pydantic's prefix is noise


def test_union_noise_is_dropped_for_a_bad_jagged_feature() -> None:
    with pytest.raises(SpecError) as info:
        spec_module.load(_raw(features=["MET_px", {"branch": "Muon_Px", "max_len": -2}]))
    text = str(info.value)
    assert "valid string" not in text
    assert "should be 'all'" not in text
    assert [path for path, _ in info.value.problems] == ["data.features[1].max_len"]


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  sources: [\n  features: x\n")
    text = load_fails(path)
    assert str(path) in text
    assert "not valid" in text
    assert "line" in text


def test_yaml_list_at_top_level(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- data\n- sources\n")
    text = load_fails(path)
    assert str(path) in text
    assert "mapping" in text and "list" in text


def test_json_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"data": {')
    text = load_fails(path)
    assert str(path) in text and "json" in text


def test_spec_file_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    text = load_fails(path)
    assert str(path) in text


def test_spec_errors_in_a_yaml_file_keep_field_paths(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "data:\n"
        "  sources:\n"
        f"    - files: [{HZZ}]\n"
        "  label: triggerIsoMu24\n"
        "  features: [MET_px, {branch: Muon_Px, max_len: 0}]\n"
        "  step_size: 100 MBB\n"
    )
    text = load_fails(path)
    assert "data.features[1].max_len" in text
    assert "data.step_size" in text


# ---------------------------------------------------------------- 12. file names


def test_glob_matching_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-*.root")
    text = fails(SourceError, OSError, dataset(hzz_spec([pattern])))
    assert "no file matches" in text
    assert pattern in text


def test_local_file_that_does_not_exist(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.root")
    text = fails(SourceError, OSError, dataset(hzz_spec([path])))
    assert "does not exist" in text
    assert path in text


def test_relative_missing_file_shows_where_it_was_looked_for(tmp_path: Path) -> None:
    spec = spec_module.load(hzz_spec(["sub/missing.root"]), base_dir=tmp_path)
    text = fails(SourceError, OSError, dataset(spec))
    assert "'sub/missing.root'" in text
    assert str(tmp_path / "sub" / "missing.root") in text


def test_inspect_missing_local_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.root")
    text = fails(SourceError, OSError, lambda: inspect_file(path))
    assert path in text and "not found" in text


# --------------------------------------------------------- 13. flat versus jagged


def test_jagged_branch_as_plain_feature() -> None:
    text = fails(SpecError, ValueError, dataset(hzz_spec(features=["MET_px", "Muon_Px"])))
    assert "'Muon_Px'" in text
    assert "jagged" in text
    assert "{branch: Muon_Px, max_len:" in text
    assert "at spec field data.features[1]" in text


def test_jagged_derived_as_plain_feature() -> None:
    spec = hzz_spec(derived={"Muon_pt": "hypot(Muon_Px, Muon_Py)"}, features=["Muon_pt"])
    text = fails(SpecError, ValueError, dataset(spec))
    assert "'Muon_pt'" in text and "max_len" in text
    assert "data.features[0]" in text


def test_flat_branch_declared_jagged() -> None:
    spec = hzz_spec(features=["NMuon", {"branch": "MET_px", "max_len": 2}])
    text = fails(SpecError, ValueError, dataset(spec))
    assert "'MET_px'" in text
    assert "declared jagged" in text
    assert "at spec field data.features[1]" in text


def test_flat_sort_key_names_the_field() -> None:
    features = ["MET_px", {"branch": "Muon_Px", "max_len": 2, "sort_by": "MET_px"}]
    text = fails(SpecError, ValueError, dataset(hzz_spec(features=features)))
    assert "sort_by 'MET_px' has one value per event" in text
    assert "at spec field data.features[1].sort_by" in text


def test_flat_derived_sort_key_names_the_field() -> None:
    features = ["MET_px", {"branch": "Muon_Px", "max_len": 2},
                {"branch": "Muon_Py", "max_len": 2, "sort_by": "twice"}]
    spec = hzz_spec(derived={"twice": "2 * MET_px"}, features=features)
    text = fails(SpecError, ValueError, dataset(spec))
    assert "sort_by 'twice' has one value per event" in text
    assert "at spec field data.features[2].sort_by" in text  # the item that names it


@pytest.mark.parametrize("field,value", [("label", "Muon_Px"), ("weight", "abs(Muon_Px)"),
                                         ("cut", "Muon_Px > 0")])
def test_jagged_label_weight_or_cut_names_the_field(field: str, value: str) -> None:
    text = fails(SpecError, ValueError, dataset(hzz_spec(**{field: value})))
    assert f"data.{field} {value!r} gives a list of values per event" in text
    assert f"at spec field data.{field}" in text
    assert "max(...)" in text


@pytest.mark.parametrize("name,hint", [("MET_pxx", "did you mean 'MET_px'"),
                                       ("Muon_Px_0", "not by its columns")])
def test_normalize_per_feature_of_no_feature(name: str, hint: str) -> None:
    spec = hzz_spec(normalize={"per_feature": {name: "none"}})
    text = fails(SpecError, ValueError, dataset(spec))
    assert f"normalize.per_feature names {name!r}, which is not a feature" in text
    assert hint in text
    assert f"at spec field data.normalize.per_feature.{name}" in text


def test_exclude_of_no_branch_and_exclude_without_all_warn() -> None:
    spec = hzz_spec(features="all", exclude=["Muon_Pxx"], label=None,
                    sources=[{"files": [HZZ], "label": 1}])
    with warnings.catch_warnings(record=True) as caught:  # zero-variance notes come too
        warnings.simplefilter("always")
        ds = RootDataset(spec, split="all", shuffle=False)
    said = [str(w.message) for w in caught]
    assert any(re.match(r"data.exclude\[0\] names 'Muon_Pxx'.*did you mean 'Muon_Px'", m)
               for m in said), said
    assert "Muon_Px_0" in ds.feature_names  # the branch the typo meant is still a feature
    with pytest.warns(UserWarning, match="data.exclude applies to features: all only"):
        RootDataset(hzz_spec(exclude=["MET_px"]), split="all", shuffle=False)


# ----------------------------------------------------------------------- 14. cache


def test_memory_cache_that_does_not_fit() -> None:
    spec = hzz_spec(cache={"kind": "memory", "max_bytes": 1000})
    text = fails(CacheError, ValueError, dataset(spec))
    assert "at spec field data.cache" in text
    assert re.search(r"needs about \S+ \w*B but data.cache.max_bytes allows \S+ \w*B", text), text
    assert "cache: {disk: DIR}" in text
    assert "raise data.cache.max_bytes" in text  # the limit is the user's own


def test_a_disk_cache_over_its_max_bytes_says_to_raise_it_not_to_free_space(
        tmp_path: Path) -> None:
    spec = hzz_spec(cache={"disk": str(tmp_path / "cache"), "max_bytes": 1000})
    text = fails(CacheError, ValueError, dataset(spec))
    assert "raise data.cache.max_bytes or select fewer events" in text
    assert "free space" not in text


def test_lists_of_two_collections_combined_elementwise_are_explained() -> None:
    spec = hzz_spec(derived={"x": "Jet_Px + Muon_Px"}, features=[{"branch": "x", "max_len": 2}])
    text = fails(ExpressionError, ValueError, dataset(spec))
    assert "combines lists of different lengths element by element" in text
    assert f"in file {HZZ}" in text and "at spec field data.derived.x" in text
    assert "cannot broadcast" not in text  # awkward's words, not the user's


def test_memory_cache_error_shows_distinct_sizes() -> None:
    spec = hzz_spec(cache={"kind": "memory", "max_bytes": 1000})
    with pytest.raises(CacheError) as info:
        RootDataset(spec, split="all")
    m = re.search(r"needs about (\S+ \w*B) but data.cache.max_bytes allows (\S+ \w*B)",
                  str(info.value))
    assert m is not None
    assert m.group(1) != m.group(2)


@pytest.mark.parametrize("in_the_way", ["a file", "a file above it"])
def test_disk_cache_where_a_file_is_is_a_cache_error(tmp_path: Path, in_the_way: str) -> None:
    (tmp_path / "afile").write_text("not a directory")
    where = tmp_path / "afile" if in_the_way == "a file" else tmp_path / "afile" / "cache"
    text = fails(CacheError, ValueError, dataset(hzz_spec(cache={"disk": str(where)})))
    assert f"cannot use {where} as the disk cache" in text and "data.cache.path" in text, text


def test_cache_max_bytes_takes_a_size_like_step_size() -> None:
    assert spec_module.load(_raw(cache={"kind": "memory", "max_bytes": "1.5 GB"})
                            ).data.cache.max_bytes == 1_500_000_000
    assert spec_module.load(_raw(cache={"kind": "memory", "max_bytes": "2048"})
                            ).data.cache.max_bytes == 2048
    text = load_fails(_raw(cache={"kind": "memory", "max_bytes": "lots"}))
    assert "max_bytes 'lots' is not a size" in text and "data.cache.max_bytes" in text, text


def test_cache_that_fits_is_used(tmp_path: Path) -> None:
    spec = hzz_spec(cache={"disk": str(tmp_path / "cache"), "max_bytes": "100 MB"})
    ds = RootDataset(spec, split="all", shuffle=False)
    first = ds.columns().x
    assert any((tmp_path / "cache").rglob("complete"))
    assert np.array_equal(ds.columns().x, first)


def test_the_base_spec_is_valid() -> None:
    """The specs the tests above break are valid as written, so each failure is the one meant."""
    ds = RootDataset(hzz_spec(), split="all", shuffle=False)
    assert ds.feature_names == ["MET_px", "Muon_Px_0", "Muon_Px_1"]
    assert ds.num_events == 2421
    assert spec_module.load(_raw()).data.features == ["MET_px"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """The stdlib's file server (no Range support), without request logging."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_every_unknown_name_of_the_spec_is_reported_at_once() -> None:
    # one typo per run was the old way: fix, rerun, find the next
    spec = hzz_spec(cut="NMuonn > 0",
                    features=["MET_Pt", {"branch": "Jet_Pxx", "max_len": 2}])
    with pytest.raises(BranchNotFound) as info:
        dataset(spec)()
    text = str(info.value)
    assert "unknown name 'NMuonn' in expression 'NMuonn > 0'; did you mean 'NMuon'" in text
    assert "and at spec field data.features[0]: unknown name 'MET_Pt'" in text
    assert "and at spec field data.features[1].branch: unknown name 'Jet_Pxx'" in text
    assert text.count("available names:") == 1  # listed once, for the first
    assert "at spec field data.cut" in text


def test_a_derived_name_used_before_it_is_defined_says_so() -> None:
    spec = hzz_spec(derived={"a": "b + 1", "b": "MET_px"}, features=["a"])
    with pytest.raises(BranchNotFound) as info:
        dataset(spec)()
    assert ("'b' is defined later in data.derived, which is evaluated in order: move it "
            "before its first use") in str(info.value)
    assert "at spec field data.derived.a" in str(info.value)
    spec = hzz_spec(derived={"HTx": "HTx + sum(Jet_Px)"}, features=["HTx"])
    with pytest.raises(BranchNotFound) as info:
        dataset(spec)()
    assert "'HTx' reads itself" in str(info.value)
    assert "defined later" not in str(info.value)  # it is not: it is this one


def test_a_derived_name_that_replaces_a_branch_is_said_aloud() -> None:
    # meant at times (a unit change), but the cut then cuts the new value, silently
    spec = hzz_spec(derived={"MET_px": "MET_px / 1000"}, cut="MET_px > 0.01")
    with pytest.warns(UserWarning, match=r"data\.derived\.MET_px replaces the branch 'MET_px'"):
        ds = dataset(spec)()
    assert any("replaces the branch 'MET_px'" in w for w in ds.stats.warnings)


def test_signalling_nan_bytes_are_counted_without_a_numpy_warning(tmp_path: Path) -> None:
    # damaged bytes in an uncompressed basket can read as signalling NaNs: numpy warned
    # "invalid value encountered in cast" (bare, in the middle of mlaas stats) on float64
    values = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    values.view(np.uint32)[1] = 0x7FA00000  # a signalling NaN
    path = tmp_path / "snan.root"
    with uproot.recreate(path, compression=None) as f:
        f.mktree("events", {"x": "f4", "y": "i4"}).extend(
            {"x": values, "y": np.array([0, 1, 0, 1], dtype=np.int32)})
    spec = {"data": {"sources": [{"files": [str(path)]}], "label": "y", "features": ["x"],
                     "nan": {"policy": "replace", "value": 0.0}}}
    ds = RootDataset(spec, split="all", shuffle=False)  # warnings are errors in the tests
    assert ds.stats.features["x"].moments.nan == 1
    x = np.concatenate([b["x"] for b in ds])[:, 0]
    assert np.isfinite(x).all() and len(x) == 4  # replaced in the epoch too, silently
