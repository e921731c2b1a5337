"""The basket-by-basket reader of plain branches against uproot's own ``arrays``.

``baskets.read_plain`` replaces uproot's assembly of an entry range for
local files, so for every plain branch and any range (inside one basket,
across basket borders, empty, the whole tree) it must give what uproot
gives: the same values, types and jagged structure. Branches it does not
handle must be left to uproot, and ``sources.read_range`` must still give
uproot's result for a mix of both.
"""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from mlaas.data import baskets, sources, synth

FILES = Path(__file__).resolve().parent.parent / "files"
HZZ = str(FILES / "uproot-HZZ.root")
ZMUMU = str(FILES / "uproot-Zmumu.root")


def _same(got: ak.Array, want: ak.Array, what: str) -> None:
    assert str(ak.type(got)) == str(ak.type(want)), what
    assert ak.to_list(got) == ak.to_list(want), what


@pytest.fixture(scope="module")
def many_baskets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Datagen files of 3,000 events written 700 at a time: five baskets per branch."""
    out = {}
    for compression in ("zlib", "lz4", "none"):
        d = tmp_path_factory.mktemp(f"baskets-{compression}")
        synth.generate(d, 3000, compression=compression, seed=4, chunk_size=700)
        out[compression] = d / "signal.root"
    return out


@pytest.mark.parametrize("compression", ["zlib", "lz4", "none"])
@pytest.mark.parametrize("start,stop", [(0, 3000), (0, 700), (650, 760), (699, 701),
                                        (10, 2990), (1400, 1400), (2999, 3000)])
def test_plain_branches_equal_uproot_on_any_range(many_baskets, compression, start,
                                                  stop) -> None:
    tree = uproot.open(many_baskets[compression])["Events"]
    assert tree["Jet_pt"].num_baskets >= 5
    names = [b.name for b in tree.branches]
    want = tree.arrays(names, entry_start=start, entry_stop=stop, library="ak", how=dict)
    for name in names:
        assert baskets.plain_dtype(tree[name]) is not None, name  # every datagen branch is plain
        _same(baskets.read_plain(tree[name], start, stop), want[name], f"{name}[{start}:{stop}]")


@pytest.mark.parametrize("start,stop", [(0, 3000), (650, 760), (10, 2990)])
def test_branches_of_one_counter_share_one_offsets_array(many_baskets, start, stop) -> None:
    """Read with one ``counted`` dict, as ``read_range`` does: same values as uproot,
    and each collection's offsets one array, which the transform then need not compare."""
    tree = uproot.open(many_baskets["none"])["Events"]
    names = [b.name for b in tree.branches]
    want = tree.arrays(names, entry_start=start, entry_stop=stop, library="ak", how=dict)
    counted: dict[str, np.ndarray] = {}
    got = {name: baskets.read_plain(tree[name], start, stop, counted) for name in names}
    for name in names:
        _same(got[name], want[name], f"{name}[{start}:{stop}]")

    def offsets(name: str) -> np.ndarray:
        return np.asarray(got[name].layout.offsets)

    leaves = {id(tree[n].member("fLeaves")[0]): n for n in ("nElectron", "nJet", "nMuon")}
    assert sorted(leaves[k] for k in counted) == ["nElectron", "nJet", "nMuon"]  # the counters
    for collection, fields in (("Jet", ["eta", "phi", "mass", "btagDeepB", "jetId"]),
                               ("Muon", ["eta", "phi", "charge"])):
        first = offsets(f"{collection}_pt")
        for field in fields:
            assert np.shares_memory(offsets(f"{collection}_{field}"), first), field


def test_shared_offsets_that_disagree_are_not_used(many_baskets) -> None:
    """Offsets of the wrong total (a broken file, here planted) are replaced by the
    branch's own, so the transform's multiplicity check still sees the difference."""
    tree = uproot.open(many_baskets["none"])["Events"]
    want = tree.arrays(["Jet_eta"], entry_start=650, entry_stop=760, library="ak")["Jet_eta"]
    key = baskets._counter(tree["Jet_eta"])
    assert key == id(tree["nJet"].member("fLeaves")[0])  # the counting leaf
    planted = {key: np.arange(111, dtype=np.int64)}  # right length, wrong counts
    got = baskets.read_plain(tree["Jet_eta"], 650, 760, planted)
    _same(got, want, "Jet_eta")
    assert not np.shares_memory(np.asarray(got.layout.offsets), planted[key])


def test_hzz_bool_int_and_float_collections_equal_uproot() -> None:
    tree = uproot.open(HZZ)["events"]
    assert tree["Muon_Px"].num_baskets == 2  # a range across the border is tested
    border = int(tree["Muon_Px"].entry_offsets[1])
    for start, stop in ((0, tree.num_entries), (border - 3, border + 5), (5, 6)):
        for branch in tree.branches:
            if baskets.plain_dtype(branch) is None:
                continue
            want = tree.arrays([branch.name], entry_start=start, entry_stop=stop,
                               library="ak", how=dict)[branch.name]
            _same(baskets.read_plain(branch, start, stop), want, branch.name)


def test_strings_are_left_to_uproot() -> None:
    tree = uproot.open(ZMUMU)["events"]
    assert baskets.plain_dtype(tree["Type"]) is None
    with pytest.raises(baskets.NotPlain):
        baskets.read_plain(tree["Type"], 0, 10)
    assert baskets.plain_dtype(tree["E1"]) is not None  # float64 is plain


def test_read_range_mixes_plain_and_uproot_branches() -> None:
    """A string branch beside float64 ones: each from its own path, same as uproot."""
    names = ["Type", "E1", "Run", "px1"]
    got = sources.read_range(ZMUMU, "events", names, 100, 1300)
    want = uproot.open(ZMUMU)["events"].arrays(names, entry_start=100, entry_stop=1300,
                                                library="ak", how=dict)
    assert sorted(got) == sorted(names)
    for name in names:
        _same(got[name], want[name], name)


def test_a_jagged_basket_without_offsets_goes_to_uproot(monkeypatch) -> None:
    tree = uproot.open(HZZ)["events"]
    branch = tree["Jet_Px"]
    real = type(branch).basket

    def without_offsets(self, i):  # type: ignore[no-untyped-def]
        basket = real(self, i)
        basket._byte_offsets = None  # as a basket read with a count branch only
        return basket

    monkeypatch.setattr(type(branch), "basket", without_offsets)
    with pytest.raises(baskets.NotPlain):
        baskets.read_plain(branch, 0, 10)
    got = sources.read_range(HZZ, "events", ["Jet_Px"], 0, 10)["Jet_Px"]
    np.testing.assert_array_equal(ak.to_numpy(ak.flatten(got)),
                                  ak.to_numpy(ak.flatten(tree["Jet_Px"].array(entry_stop=10))))


def test_a_range_past_the_end_is_left_to_uproot() -> None:
    tree = uproot.open(HZZ)["events"]
    n = tree.num_entries
    for name in ("MET_px", "Jet_Px"):
        with pytest.raises(baskets.NotPlain):
            baskets.read_plain(tree[name], n - 5, n + 5)
    got = sources.read_range(HZZ, "events", ["MET_px", "Jet_Px"], n - 5, n + 5)
    assert len(got["MET_px"]) == len(got["Jet_Px"]) == 5  # uproot clips, as before
