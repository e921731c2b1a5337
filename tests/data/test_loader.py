"""RootDataset against an independent in-memory computation with awkward.

The reference side reads each whole file with uproot and pads with
``ak.pad_none`` / ``ak.fill_none`` and sorts with ``ak.argsort``: a different
route from the loader's numpy offsets, so agreement means something.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import awkward as ak
import numpy as np
import pytest
import torch
import uproot
from torch.utils.data import DataLoader

from mlaas.data import RootDataset, sources, synth
from mlaas.data import cache as cache_module
from mlaas.data import chunks as chunking
from mlaas.data.transform import Columns
from mlaas.errors import CacheError, SourceError

FILES = Path(__file__).resolve().parent.parent / "files"
HZZ = str(FILES / "uproot-HZZ.root")
ZMUMU = str(FILES / "uproot-Zmumu.root")


def collect(ds: RootDataset, epoch: int = 0) -> Columns:
    """All batches of one epoch, sorted by (file, entry) so they compare to a reference."""
    parts = [Columns(**b) for b in ds.iter_epoch(epoch)]
    cols = Columns.concat(parts)
    order = np.lexsort((cols.entry, cols.file))
    return cols.take(order)


def padded(arr: ak.Array, length: int, pad: float) -> tuple[np.ndarray, np.ndarray]:
    filled = ak.fill_none(ak.pad_none(arr, length, clip=True), pad)
    mask = ak.fill_none(ak.pad_none(ak.ones_like(arr), length, clip=True), 0)
    return ak.to_numpy(filled).astype(np.float64), ak.to_numpy(mask).astype(np.float32)


def standard(values: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    return (values - pooled.mean()) / pooled.std()


HZZ_SPEC = {
    "data": {
        "sources": [{"files": [HZZ]}],
        "label": "triggerIsoMu24",
        "weight": "EventWeight",
        "derived": {"Muon_pt": "sqrt(Muon_Px**2 + Muon_Py**2)", "nGoodJet": "sum(Jet_ID)"},
        "cut": "(NMuon >= 1) & (MET_px > -100)",
        "features": [
            "MET_px",
            "NPrimaryVertices",
            "nGoodJet",
            "hypot(MET_px, MET_py)",
            {"branch": "Muon_pt", "max_len": 3, "pad": -1.0, "sort_by": "Muon_pt"},
            {"branch": "Muon_Charge", "max_len": 3},
            {"branch": "Jet_ID", "max_len": 4, "pad": 0.0},
        ],
        "normalize": {"default": "standard", "per_feature": {"NPrimaryVertices": "minmax",
                                                            "Jet_ID": "none"}},
        "step_size": 500,
    }
}


def test_hzz_matches_awkward_reference() -> None:
    ds = RootDataset(HZZ_SPEC, split="all", batch_size=128, shuffle=False)
    got = collect(ds)

    a = uproot.open(HZZ)["events"].arrays(library="ak")
    keep = ak.to_numpy((a.NMuon >= 1) & (a.MET_px > -100))
    a = a[keep]
    muon_pt = np.sqrt(a.Muon_Px**2 + a.Muon_Py**2)
    order = ak.argsort(muon_pt, axis=1, ascending=False)
    met = ak.to_numpy(a.MET_px).astype(np.float64)
    npv = ak.to_numpy(a.NPrimaryVertices).astype(np.float64)
    ngood = ak.to_numpy(ak.sum(a.Jet_ID, axis=1)).astype(np.float64)
    met_t = np.hypot(ak.to_numpy(a.MET_px), ak.to_numpy(a.MET_py)).astype(np.float64)
    mu_pt, mu_mask = padded(muon_pt[order], 3, -1.0)
    mu_q, _ = padded(a.Muon_Charge[order], 3, 0.0)
    jet_id, jet_mask = padded(a.Jet_ID, 4, 0.0)
    flat_mu_pt = ak.to_numpy(ak.flatten(muon_pt)).astype(np.float64)
    flat_mu_q = ak.to_numpy(ak.flatten(a.Muon_Charge)).astype(np.float64)
    want_x = np.column_stack([
        standard(met, met),
        (npv - npv.min()) / (npv.max() - npv.min()),
        standard(ngood, ngood),
        standard(met_t, met_t),
        standard(mu_pt, flat_mu_pt),
        standard(mu_q, flat_mu_q),
        jet_id,
    ])

    assert ds.feature_names[:4] == ["MET_px", "NPrimaryVertices", "nGoodJet",
                                    "hypot(MET_px, MET_py)"]
    assert ds.feature_names[4:7] == ["Muon_pt_0", "Muon_pt_1", "Muon_pt_2"]
    assert ds.mask_names == ["Muon_0", "Muon_1", "Muon_2", "Jet_0", "Jet_1", "Jet_2", "Jet_3"]
    np.testing.assert_array_equal(got.entry, np.flatnonzero(keep))
    np.testing.assert_allclose(got.x, want_x, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(got.mask, np.column_stack([mu_mask, jet_mask]))
    np.testing.assert_array_equal(got.y, ak.to_numpy(a.triggerIsoMu24).astype(np.float32))
    np.testing.assert_array_equal(got.w, ak.to_numpy(a.EventWeight).astype(np.float32))
    assert got.x.dtype == np.float32 and got.mask.dtype == np.float32


HZZ_COLLECTIONS = {"Jet": "NJet", "Muon": "NMuon", "Electron": "NElectron", "Photon": "NPhoton"}


LABEL_NOTE = "data.label is computed from it (a feature must not hand the model the answer)"
WEIGHT_NOTE = "data.weight is computed from it (the weight describes the sample, not the event)"


@pytest.mark.filterwarnings("ignore:feature .* has zero variance")  # HZZ's MC truth, trigger
@pytest.mark.parametrize(("label", "weight", "derived", "notes"), [
    ("triggerIsoMu24", "EventWeight", {},
     {"branch 'triggerIsoMu24'": LABEL_NOTE, "branch 'EventWeight'": WEIGHT_NOTE}),
    # through a derived name and an expression: what they are made of is left out too
    ("twoMuons", "EventWeight * 2", {"twoMuons": "NMuon >= 2", "HT": "sum(Jet_Px)"},
     {"derived name 'twoMuons'": LABEL_NOTE, "branch 'NMuon'": LABEL_NOTE,
      "branch 'EventWeight'": WEIGHT_NOTE}),
], ids=["branches", "expressions"])
def test_issue2_features_all_leaves_out_label_and_weight(
        label: str, weight: str, derived: dict[str, str], notes: dict[str, str]) -> None:
    spec = {"data": {"sources": [{"files": [HZZ]}], "label": label, "weight": weight,
                     "derived": derived, "features": "all"}}
    with pytest.warns(UserWarning, match="features: all leaves out") as record:
        ds = RootDataset(spec, split="all", shuffle=False)
    # said once per name, naming it and why it is not a feature
    said = sorted(str(w.message) for w in record if "leaves out" in str(w.message))
    assert said == sorted(f"features: all leaves out {what}: {why}" for what, why in notes.items())
    assert sorted(n for n in ds.stats.warnings if "leaves out" in n) == said  # mlaas stats
    answer = {what.split("'")[1] for what in notes}
    features = {f.name for f in ds.layout.features}
    assert not answer & features
    assert not answer & set(ds.feature_names)
    branches = set(uproot.open(HZZ)["events"].keys())
    assert features == (branches | set(derived)) - answer  # nothing else is left out

    tree = uproot.open(HZZ)["events"]
    for coll, counter in HZZ_COLLECTIONS.items():
        counts = ak.to_numpy(ak.num(tree[f"{coll}_Px"].array(), axis=1))
        np.testing.assert_array_equal(counts, tree[counter].array(library="np"))
        p95 = int(np.quantile(counts, 0.95, method="inverted_cdf"))
        assert p95 < counts.max()
        # at least one slot, so a mostly empty collection (Electron: p95 0) keeps its columns
        assert ds.stats.max_len[coll] == max(1, p95), coll
        assert f"{coll}_Px_{max(1, p95) - 1}" in ds.feature_names
        assert f"{coll}_Px_{max(1, p95)}" not in ds.feature_names
    assert ds.stats.max_len["Jet"] == 3 and ds.stats.max_len["Muon"] == 2  # not the maximum


@pytest.mark.parametrize("tree", ["demo/tree", None])
def test_a_tree_inside_a_directory_is_read_by_its_path(tmp_path: Path, tree: str | None) -> None:
    # CMSSW's TFileService writes trees into a directory named after the analyzer
    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    with uproot.recreate(tmp_path / "sub.root") as f:
        f.mkdir("demo")
        f["demo"].mktree("tree", {"x": "float64", "n": "int32"})
        f["demo"]["tree"].extend({"x": x, "n": np.arange(300, dtype=np.int32)})
    data = {"sources": [{"files": [str(tmp_path / "sub.root")], "label": 1}],
            "features": ["x"], "normalize": "none"}
    if tree is not None:
        data["tree"] = tree
    ds = RootDataset({"data": data}, split="all", shuffle=False)
    assert ds.layout.tree == "demo/tree"
    np.testing.assert_array_equal(ds.columns().x[:, 0], x.astype(np.float32))


def test_zmumu_float64_regression_label() -> None:
    spec = {"data": {
        "sources": [{"files": [ZMUMU]}],
        "label": "M",
        "identifiers": ["Run", "Event"],
        "features": ["px1", "py1", "E1", "E2"],
        "normalize": {"default": "minmax", "per_feature": {"E2": "none"}},
        "step_size": 700,
    }}
    ds = RootDataset(spec, split="all", shuffle=False)
    got = collect(ds)
    a = uproot.open(ZMUMU)["events"].arrays(["px1", "py1", "E1", "E2", "M"], library="np")
    for i, name in enumerate(["px1", "py1", "E1"]):
        v = a[name]
        np.testing.assert_allclose(got.x[:, i], (v - v.min()) / (v.max() - v.min()), rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_allclose(got.x[:, 3], a["E2"], rtol=1e-6)
    np.testing.assert_allclose(got.y, a["M"].astype(np.float32))
    assert got.mask.shape == (2304, 0)


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, 6000, seed=3)
    return out


def synth_spec(directory: Path, **extra: object) -> dict:
    data = {
        "sources": [
            {"name": "signal", "files": [str(directory / "signal.root")], "label": 1},
            {"name": "background", "files": [str(directory / "background.root")], "label": 0},
        ],
        "features": ["MET_pt", {"branch": "Jet_pt", "sort_by": "Jet_pt"},
                     {"branch": "Jet_eta"}, {"branch": "Muon_pt", "max_len": 2}],
        "step_size": 1500,
    }
    data.update(extra)
    return {"data": data}


def test_default_max_len_is_95th_percentile_and_sorting_applies_to_collection(synth_pair: Path) -> None:
    ds = RootDataset(synth_spec(synth_pair), split="all", shuffle=False)
    counts = np.concatenate([
        ak.to_numpy(ak.num(uproot.open(synth_pair / f)["Events"]["Jet_pt"].array(), axis=1))
        for f in ("signal.root", "background.root")
    ])
    want = int(np.quantile(counts, 0.95, method="inverted_cdf"))
    assert ds.stats.max_len["Jet"] == want
    assert want < counts.max()  # the percentile, not the maximum

    got = collect(ds)
    t = uproot.open(synth_pair / "signal.root")["Events"].arrays(["Jet_pt", "Jet_eta"])
    order = ak.argsort(t.Jet_pt, axis=1, ascending=False)
    eta, _ = padded(t.Jet_eta[order], want, 0.0)
    flat_eta = np.concatenate([
        ak.to_numpy(ak.flatten(uproot.open(synth_pair / f)["Events"]["Jet_eta"].array()))
        for f in ("signal.root", "background.root")
    ]).astype(np.float64)
    sig = got.file == 0
    cols = [ds.feature_names.index(f"Jet_eta_{i}") for i in range(want)]
    np.testing.assert_allclose(got.x[sig][:, cols], standard(eta, flat_eta), rtol=2e-5,
                               atol=2e-5)
    pt_cols = [ds.feature_names.index(f"Jet_pt_{i}") for i in range(want)]
    pts = got.x[:, pt_cols]
    real = got.mask[:, : want].astype(bool)
    assert np.all(np.diff(np.where(real, pts, -1e30), axis=1) <= 0)  # descending


def test_features_all_pads_a_jagged_derived_name_like_a_jagged_branch(synth_pair: Path) -> None:
    spec = synth_spec(synth_pair, features="all", normalize="none",
                      derived={"Jet_px": "Jet_pt * cos(Jet_phi)", "HT": "sum(Jet_pt)"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = RootDataset(spec, split="all", shuffle=False)
    n = ds.stats.max_len["Jet"]
    assert "HT" in ds.feature_names and "Jet_px" not in ds.feature_names
    assert [f"Jet_px_{i}" for i in range(n)] == [c for c in ds.feature_names
                                                 if c.startswith("Jet_px_")]
    t = uproot.open(synth_pair / "signal.root")["Events"].arrays(["Jet_pt", "Jet_phi"])
    want, _ = padded(t.Jet_pt * np.cos(t.Jet_phi), n, 0.0)
    got = collect(ds)
    sig = got.file == 0
    cols = [ds.feature_names.index(f"Jet_px_{i}") for i in range(n)]
    np.testing.assert_allclose(got.x[sig][np.argsort(got.entry[sig])][:, cols], want,
                               rtol=1e-6, atol=1e-5)


def test_a_derived_jagged_name_takes_the_collection_of_its_inputs(synth_pair: Path) -> None:
    # MLaaS4HEP named new branches log_Jet_pt, log_Muon_pt: one prefix, two collections
    spec = synth_spec(synth_pair, normalize="none",
                      derived={"log_Jet_pt": "log(Jet_pt)", "log_Muon_pt": "log(Muon_pt)"},
                      features=[{"branch": "log_Jet_pt", "max_len": 3, "sort_by": "Jet_pt"},
                                {"branch": "log_Muon_pt", "max_len": 2},
                                {"branch": "Muon_eta", "max_len": 2}])
    ds = RootDataset(spec, split="all", shuffle=False)
    assert {k: c.features for k, c in ds.layout.collections.items()} == {
        "Jet": ["log_Jet_pt"], "Muon": ["log_Muon_pt", "Muon_eta"]}
    t = uproot.open(synth_pair / "signal.root")["Events"].arrays(["Jet_pt", "Muon_pt"])
    jets = t.Jet_pt[ak.argsort(t.Jet_pt, ascending=False)]
    want_jet, want_mask = padded(np.log(jets), 3, 0.0)
    want_mu, _ = padded(np.log(t.Muon_pt), 2, 0.0)
    got = collect(ds)
    sig = got.file == 0
    x = got.x[sig][np.argsort(got.entry[sig])]
    names = ds.feature_names
    np.testing.assert_allclose(x[:, [names.index(f"log_Jet_pt_{i}") for i in range(3)]],
                               want_jet, rtol=1e-6)
    np.testing.assert_allclose(x[:, [names.index(f"log_Muon_pt_{i}") for i in range(2)]],
                               want_mu, rtol=1e-6)


def test_collection_set_in_the_spec_wins_and_one_collection_pads_as_one(
        synth_pair: Path) -> None:
    from mlaas.errors import SpecError

    apart = [{"branch": "Jet_pt", "max_len": 2},
             {"branch": "Jet_eta", "max_len": 3, "collection": "JetEta"}]
    ds = RootDataset(synth_spec(synth_pair, features=apart), split="all", shuffle=False)
    assert {k: (c.features, c.max_len) for k, c in ds.layout.collections.items()} == {
        "Jet": (["Jet_pt"], 2), "JetEta": (["Jet_eta"], 3)}
    assert ds.feature_names[2:] == ["Jet_eta_0", "Jet_eta_1", "Jet_eta_2"]
    # a derived name's collection is known with the tree: a clash is found there, named
    clash = [{"branch": "log_Jet_pt", "max_len": 3}, {"branch": "Jet_eta", "max_len": 2}]
    spec = synth_spec(synth_pair, derived={"log_Jet_pt": "log(Jet_pt)"}, features=clash)
    with pytest.raises(SpecError) as info:
        RootDataset(spec, split="all")
    text = str(info.value)
    assert "max_len differs within collection 'Jet': log_Jet_pt has 3, Jet_eta has 2" in text
    assert "at spec field data.features[1].max_len" in text


def test_elements_of_a_collection_as_flat_features_match_awkward() -> None:
    spec = {"data": {"sources": [{"files": [HZZ]}], "label": "triggerIsoMu24",
                     "cut": "NJet >= 2", "normalize": "none",
                     "features": ["Jet_Px[0]", "Jet_Px[1]", "Jet_Px[-1]", "Muon_Px[1]"],
                     "nan": {"policy": "replace", "value": -99.0}}}
    got = collect(RootDataset(spec, split="all", shuffle=False))
    t = uproot.open(HZZ)["events"].arrays(["Jet_Px", "Muon_Px", "NJet"])
    t = t[t.NJet >= 2]
    second_muon = ak.fill_none(ak.pad_none(t.Muon_Px, 2)[:, 1], -99.0)
    want = np.stack([ak.to_numpy(t.Jet_Px[:, 0]), ak.to_numpy(t.Jet_Px[:, 1]),
                     ak.to_numpy(t.Jet_Px[:, -1]), ak.to_numpy(second_muon)], axis=1)
    np.testing.assert_array_equal(got.x, want.astype(np.float32))


def test_a_cut_on_a_missing_element_does_not_select_the_event() -> None:
    # Jet_Px[1] of a one-jet event is missing: not "true", not selected
    spec = {"data": {"sources": [{"files": [HZZ]}], "label": "triggerIsoMu24",
                     "cut": "Jet_Px[1] > -1e9", "features": ["MET_px"]}}
    ds = RootDataset(spec, split="all", shuffle=False)
    njet = uproot.open(HZZ)["events"]["NJet"].array(library="np")
    assert ds.num_events == int((njet >= 2).sum()) < len(njet)


def test_a_bundles_expressions_read_back_as_they_were_trained() -> None:
    # written before the refusals of unparenthesised logic: it must load and mean the same
    from mlaas.data.layout import Layout

    ds = RootDataset({"data": {"sources": [{"files": [HZZ]}], "label": "triggerIsoMu24",
                               "features": ["MET_px"]}}, split="all")
    d = {**ds.layout.to_dict(), "cut": "NMuon > 0 | NJet > 0"}
    layout = Layout.from_dict(d)
    t = uproot.open(HZZ)["events"].arrays(["NMuon", "NJet"], library="np")
    inner = np.logical_or(0, t["NJet"])  # Python's reading: NMuon > (0 | NJet) > 0
    got = np.asarray(layout.cut.evaluate(t))
    np.testing.assert_array_equal(got, (t["NMuon"] > inner) & (inner > 0))


DATAGEN_EXACT = {
    "derived": {"HT": "sum(Jet_pt)", "Jet_px": "Jet_pt * cos(Jet_phi)"},
    "cut": "(MET_pt > 20) & (nJet >= 1)",
    "features": [
        "MET_pt", "HT",
        {"branch": "Jet_px", "max_len": 3, "pad": -5.0, "sort_by": "Jet_eta"},
        {"branch": "Jet_btagDeepB", "max_len": 3},
        {"branch": "Muon_pt", "max_len": 1, "sort_by": "Muon_eta"},
        {"branch": "Electron_eta"},
    ],
    "normalize": {"default": "standard",
                  "per_feature": {"Jet_btagDeepB": "minmax", "Electron_eta": "none"}},
}


def test_issue2_datagen_x_and_mask_match_awkward(synth_pair: Path) -> None:
    """Both files, every column: a cut, a derived flat and a derived jagged feature, jagged
    collections truncated below their usual multiplicity and sorted by another branch."""
    ds = RootDataset(synth_spec(synth_pair, **DATAGEN_EXACT), split="all", batch_size=700)
    got = collect(ds)  # shuffled batches, put back in (file, entry) order

    parts = []
    for name in ("signal.root", "background.root"):
        a = uproot.open(synth_pair / name)["Events"].arrays(library="ak")
        keep = ak.to_numpy((a.MET_pt > 20) & (a.nJet >= 1))
        parts.append((a[keep], np.flatnonzero(keep)))
    s = ak.concatenate([p[0] for p in parts])
    jets = ak.argsort(s.Jet_eta, axis=1, ascending=False, stable=True)
    muons = ak.argsort(s.Muon_eta, axis=1, ascending=False, stable=True)
    jet_px = s.Jet_pt * np.cos(s.Jet_phi)
    ht = ak.to_numpy(ak.sum(s.Jet_pt, axis=1)).astype(np.float64)
    met = ak.to_numpy(s.MET_pt).astype(np.float64)
    n_electron = ak.to_numpy(ak.num(s.Electron_eta, axis=1))
    electrons = max(1, int(np.quantile(n_electron, 0.95, method="inverted_cdf")))
    assert ak.max(ak.num(s.Jet_pt, axis=1)) > 3 and np.median(ak.num(s.Jet_pt, axis=1)) > 3
    assert ak.max(ak.num(s.Muon_pt, axis=1)) > 1  # both are truncated

    def pooled(arr: ak.Array) -> np.ndarray:
        return ak.to_numpy(ak.flatten(arr)).astype(np.float64)

    px, jet_mask = padded(jet_px[jets], 3, -5.0)
    btag, _ = padded(s.Jet_btagDeepB[jets], 3, 0.0)
    mu, mu_mask = padded(s.Muon_pt[muons], 1, 0.0)
    ele, ele_mask = padded(s.Electron_eta, electrons, 0.0)
    all_btag = pooled(s.Jet_btagDeepB)
    want_x = np.column_stack([
        standard(met, met), standard(ht, ht), standard(px, pooled(jet_px)),
        (btag - all_btag.min()) / (all_btag.max() - all_btag.min()),
        standard(mu, pooled(s.Muon_pt)), ele,
    ])
    assert ds.feature_names == (["MET_pt", "HT"] + [f"Jet_px_{i}" for i in range(3)]
                                + [f"Jet_btagDeepB_{i}" for i in range(3)] + ["Muon_pt_0"]
                                + [f"Electron_eta_{i}" for i in range(electrons)])
    assert ds.mask_names == (["Jet_0", "Jet_1", "Jet_2", "Muon_0"]
                             + [f"Electron_{i}" for i in range(electrons)])
    np.testing.assert_array_equal(got.file, np.repeat([0, 1], [len(p[1]) for p in parts]))
    np.testing.assert_array_equal(got.entry, np.concatenate([p[1] for p in parts]))
    np.testing.assert_allclose(got.x, want_x, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(got.mask, np.column_stack([jet_mask, mu_mask, ele_mask]))
    np.testing.assert_array_equal(got.y, np.repeat([1.0, 0.0], [len(p[1]) for p in parts]))


def test_a_collection_mixing_dtypes_matches_awkward(synth_pair: Path) -> None:
    """Jet_jetId (int32) between two float32 branches: the padding loop fills a
    collection one dtype group at a time, so the int32 group's columns sit between
    the float32 group's; each must land in its own columns, sorted, the mask once."""
    features = [{"branch": b, "max_len": 4, "sort_by": "Jet_pt", "pad": p}
                for b, p in (("Jet_pt", -1.0), ("Jet_jetId", -2.0), ("Jet_eta", -3.0))]
    ds = RootDataset(synth_spec(synth_pair, features=features, normalize={"default": "none"}),
                     split="all", batch_size=700)
    got = collect(ds)
    parts = [uproot.open(synth_pair / n)["Events"].arrays(["Jet_pt", "Jet_jetId", "Jet_eta"],
                                                         library="ak")
             for n in ("signal.root", "background.root")]
    a = ak.concatenate(parts)
    assert str(ak.type(a.Jet_jetId)).endswith("int32")
    order = ak.argsort(a.Jet_pt, axis=1, ascending=False, stable=True)
    pt, mask = padded(a.Jet_pt[order], 4, -1.0)
    jet_id, _ = padded(a.Jet_jetId[order], 4, -2.0)
    eta, _ = padded(a.Jet_eta[order], 4, -3.0)
    assert ds.feature_names[:5] == ["Jet_pt_0", "Jet_pt_1", "Jet_pt_2", "Jet_pt_3", "Jet_jetId_0"]
    np.testing.assert_array_equal(got.x, np.column_stack([pt, jet_id, eta]).astype(np.float32))
    np.testing.assert_array_equal(got.mask, mask)


def test_splits_are_disjoint_complete_and_independent_of_chunking(synth_pair: Path) -> None:
    seen = {}
    for step in (1500, 4000):
        for split in ("train", "validation", "test"):
            cols = collect(RootDataset(synth_spec(synth_pair, step_size=step), split=split,
                                       shuffle=True))
            seen[(step, split)] = set(zip(cols.file.tolist(), cols.entry.tolist()))
    for split in ("train", "validation", "test"):
        assert seen[(1500, split)] == seen[(4000, split)]
    union = seen[(1500, "train")] | seen[(1500, "validation")] | seen[(1500, "test")]
    assert len(union) == 12000
    assert not seen[(1500, "train")] & seen[(1500, "test")]
    assert not seen[(1500, "train")] & seen[(1500, "validation")]
    n = 12000
    for split, frac in (("validation", 0.2), ("test", 0.1)):
        sigma = np.sqrt(n * frac * (1 - frac))
        assert abs(len(seen[(1500, split)]) - n * frac) < 5 * sigma


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_torch_workers_yield_each_event_exactly_once(synth_pair: Path, workers: int) -> None:
    ds = RootDataset(synth_spec(synth_pair), split="train", batch_size=500)
    want = collect(ds)
    loader = DataLoader(ds.torch(), batch_size=None, num_workers=workers)
    batches = list(loader)
    ids = np.concatenate([b["file"].numpy().astype(np.int64) * 10**9 + b["entry"].numpy()
                          for b in batches])
    assert len(ids) == len(np.unique(ids)) == ds.num_events
    np.testing.assert_array_equal(np.sort(ids), np.sort(want.file * 10**9 + want.entry))
    assert all(isinstance(b["x"], torch.Tensor) and b["x"].dtype == torch.float32
               for b in batches)


def test_shuffle_mixes_classes_and_changes_each_epoch(synth_pair: Path) -> None:
    ds = RootDataset(synth_spec(synth_pair), split="train", batch_size=256, seed=7)
    first = [b for b in ds]
    second = [b for b in ds]
    assert 0.2 < first[0]["y"].mean() < 0.8  # both classes in the first batch
    ids = [np.concatenate([b["file"] * 10**9 + b["entry"] for b in e]) for e in (first, second)]
    assert not np.array_equal(ids[0], ids[1])
    np.testing.assert_array_equal(np.sort(ids[0]), np.sort(ids[1]))
    again = RootDataset(synth_spec(synth_pair), split="train", batch_size=256, seed=7)
    np.testing.assert_array_equal(np.concatenate([b["entry"] for b in again]),
                                  np.concatenate([b["entry"] for b in first]))


def test_balance_equal_keeps_class_counts_close(synth_pair: Path) -> None:
    spec = synth_spec(synth_pair, balance="equal", cut="MET_pt > 40")
    ds = RootDataset(spec, split="train", batch_size=1000)
    per_source = [s["splits"]["train"] for s in ds.stats.sources]
    assert per_source[0] != per_source[1]
    y = np.concatenate([b["y"] for b in ds])
    small = min(per_source)
    for label in (0.0, 1.0):
        assert abs(int((y == label).sum()) - small) < 5 * np.sqrt(small)


def test_balance_equal_balances_classes_not_sources(synth_pair: Path, tmp_path: Path) -> None:
    # one signal source against two background ones: 1:1 signal to background, not 1:2
    synth.generate(tmp_path, 6000, seed=4)
    spec = synth_spec(synth_pair, balance="equal")
    spec["data"]["sources"].append({"name": "more", "files": [str(tmp_path / "background.root")],
                                    "label": 0})
    ds = RootDataset(spec, split="train", batch_size=1000)
    per_source = [s["splits"]["train"] for s in ds.stats.sources]
    y = np.concatenate([b["y"] for b in ds])
    signal = per_source[0]
    assert signal < per_source[1] + per_source[2]
    for label in (0.0, 1.0):
        assert abs(int((y == label).sum()) - signal) < 5 * np.sqrt(signal), label
    # a label expression: balanced by each event's label, from pass 1's counts
    expression = synth_spec(synth_pair, balance="equal", label="nJet >= 4",
                            features=["MET_pt"])
    for source in expression["data"]["sources"]:
        del source["label"]
    ds = RootDataset(expression, split="train", batch_size=1000)
    counts = ds.stats.label["train_counts"]
    assert counts["0"] != counts["1"]
    y = np.concatenate([b["y"] for b in ds])
    small = min(counts.values())
    for label in (0.0, 1.0):
        assert abs(int((y == label).sum()) - small) < 5 * np.sqrt(small), label
    # a regression target with few values (nJet) is no class label: sources are balanced
    regression = synth_spec(synth_pair, balance="equal", label="nJet", features=["MET_pt"])
    regression["task"] = "regression"
    for source in regression["data"]["sources"]:
        del source["label"]
    with pytest.warns(UserWarning, match="has no classes to balance: sources are balanced"):
        RootDataset(regression, split="train")


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_cache_second_epoch_equals_first(synth_pair: Path, tmp_path: Path, kind: str) -> None:
    cache = {"kind": "memory"} if kind == "memory" else {"disk": str(tmp_path / "cache")}
    ds = RootDataset(synth_spec(synth_pair, cache=cache), split="train", shuffle=False)
    first, second = collect(ds, 0), collect(ds, 1)
    for field in ("x", "y", "w", "mask", "entry"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    if kind == "disk":
        entries = list((tmp_path / "cache").glob("*/*/complete"))
        assert len(entries) == len(ds.chunks)


def test_disk_cache_is_invalidated_when_a_file_changes(tmp_path: Path) -> None:
    synth.generate(tmp_path / "d", 2000, seed=1)
    spec = synth_spec(tmp_path / "d", cache={"disk": str(tmp_path / "cache")})
    collect(RootDataset(spec, split="all", shuffle=False))
    synth.generate(tmp_path / "d", 2000, seed=2)  # same names, new content
    ds = RootDataset(spec, split="all", shuffle=False)
    got = collect(ds)
    fresh = collect(RootDataset(synth_spec(tmp_path / "d"), split="all", shuffle=False))
    np.testing.assert_array_equal(got.x, fresh.x)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def assert_same_events(got: Columns, want: Columns) -> None:
    for field in ("x", "y", "w", "mask", "file", "entry"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def no_file_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every chunk read fail; returns the list the attempts are recorded in."""
    attempts: list[str] = []

    def refuse(pipeline: object, layout: object, chunk: chunking.ChunkRange,
               trees: object = None) -> None:
        attempts.append(chunk.name)
        raise AssertionError(f"chunk {chunk.name} read from its file, not from the cache")

    monkeypatch.setattr(chunking, "read", refuse)
    return attempts


def key_dirs(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


@pytest.fixture
def own_pair(tmp_path: Path, synth_pair: Path) -> Path:
    """A copy of the synth pair this test may rename, touch or delete."""
    d = tmp_path / "pair"
    d.mkdir()
    for name in ("signal.root", "background.root"):
        shutil.copy2(synth_pair / name, d / name)
    return d


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_issue2_second_epoch_reads_the_cache_not_the_files(own_pair: Path, tmp_path: Path,
                                                           kind: str) -> None:
    cache = {"kind": "memory"} if kind == "memory" else {"disk": str(tmp_path / "cache")}
    ds = RootDataset(synth_spec(own_pair, cache=cache), split="train", batch_size=500)
    first = collect(ds, 0)
    for name in ("signal.root", "background.root"):
        (own_pair / name).rename(own_pair / f"{name}.gone")
    second = collect(ds, 1)  # shuffled anew, from the cache: the files are gone
    assert_same_events(second, first)
    assert len(first) == ds.num_events


def test_issue2_disk_cache_is_reused_by_a_new_dataset_even_on_a_full_disk(
        own_pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = synth_spec(own_pair, cache={"disk": str(tmp_path / "cache")})
    first = RootDataset(spec, split="validation")
    want = collect(first)
    (key,) = key_dirs(tmp_path / "cache")
    assert len(list(key.glob("*/complete"))) == len(first.chunks)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    again = RootDataset(spec, split="validation", stats=first.stats)  # fits: it is all written
    attempts = no_file_reads(monkeypatch)
    assert_same_events(collect(again), want)
    assert attempts == []
    assert key_dirs(tmp_path / "cache") == [key]

    with pytest.raises(CacheError) as info:  # another key has nothing written: refused
        RootDataset(spec, split="train", stats=first.stats)
    assert "refusing rather than caching part of the data" in str(info.value)


def test_issue2_a_changed_spec_gives_a_new_cache_key(own_pair: Path, tmp_path: Path) -> None:
    cache = {"disk": str(tmp_path / "cache")}
    collect(RootDataset(synth_spec(own_pair, cache=cache), split="all", shuffle=False))
    changes = [{"cut": "MET_pt > 40"}, {"normalize": "minmax"},
               {"features": ["MET_pt", {"branch": "Jet_pt", "max_len": 2}]}]
    for n, change in enumerate(changes, start=2):
        cached = collect(RootDataset(synth_spec(own_pair, cache=cache, **change), split="all",
                                     shuffle=False))
        fresh = collect(RootDataset(synth_spec(own_pair, **change), split="all", shuffle=False))
        assert_same_events(cached, fresh)  # not the stale entries of another spec
        assert len(key_dirs(tmp_path / "cache")) == n


def test_issue2_a_touched_input_file_invalidates_the_cache(
        own_pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = synth_spec(own_pair, cache={"disk": str(tmp_path / "cache")})
    want = collect(RootDataset(spec, split="all", shuffle=False))
    stat = (own_pair / "signal.root").stat()
    os.utime(own_pair / "signal.root", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ds = RootDataset(spec, split="all", shuffle=False)  # same content, new mtime: a new key
    assert len(key_dirs(tmp_path / "cache")) == 2
    attempts = no_file_reads(monkeypatch)
    with pytest.raises(AssertionError, match="read from its file"):
        collect(ds)
    assert attempts  # the changed file's chunks are read again, not taken from the old key
    monkeypatch.undo()
    assert_same_events(collect(ds), want)


def test_issue2_disk_cache_over_its_limit_is_refused(own_pair: Path, tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    spec = synth_spec(own_pair, cache={"kind": "disk", "path": str(directory), "max_bytes": 4096})
    with pytest.raises(CacheError) as info:
        RootDataset(spec, split="train")
    text = str(info.value)
    m = re.search(r"the cache needs about (\S+ \w*B) but data.cache.max_bytes for disk at "
                  r"(\S+) allows 4\.1 kB; "
                  r"refusing rather than caching part of the data", text)
    assert m is not None, text
    assert m.group(2) == str(directory)
    assert "at spec field data.cache" in text
    assert not list(directory.rglob("complete"))  # nothing was cached


@pytest.mark.xrootd
def test_xrootd_reads_equal_local_reads(xrootd_server, synth_pair: Path) -> None:  # type: ignore[no-untyped-def]
    local = synth_spec(synth_pair)
    remote = synth_spec(synth_pair)
    for src, name in zip(remote["data"]["sources"], ("signal.root", "background.root"),
                         strict=True):
        src["files"] = [xrootd_server.put(synth_pair / name, f"loader/{name}")]
    want = collect(RootDataset(local, split="validation"))
    got = collect(RootDataset(remote, split="validation"))
    for field in ("x", "y", "w", "mask", "entry", "file"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


@pytest.mark.xrootd
def test_redirector_turns_logical_names_into_xrootd_urls(xrootd_server) -> None:  # type: ignore[no-untyped-def]
    xrootd_server.put(Path(HZZ), "store/mc/uproot-HZZ.root")
    spec = {"data": {
        "redirector": f"root://127.0.0.1:{xrootd_server.port}",
        "sources": [{"files": ["/store/mc/uproot-HZZ.root"]}],
        "label": "triggerIsoMu24",
        "features": ["MET_px", {"branch": "Muon_Px", "max_len": 2}],
    }}
    ds = RootDataset(spec, split="all", shuffle=False)
    assert ds.files[0].ref.url == f"root://127.0.0.1:{xrootd_server.port}//store/mc/uproot-HZZ.root"
    local = dict(spec["data"], sources=[{"files": [HZZ]}])
    local.pop("redirector")
    np.testing.assert_array_equal(collect(ds).x, collect(RootDataset({"data": local},
                                                                     split="all")).x)


@pytest.mark.network
def test_https_reads_equal_local_reads(http_server) -> None:  # type: ignore[no-untyped-def]
    url = http_server.put(Path(HZZ), "remote/uproot-HZZ.root")  # same base name: same split
    base = {"label": "triggerIsoMu24", "features": ["MET_px", {"branch": "Jet_Px", "max_len": 3}]}
    remote = RootDataset({"data": {"sources": [{"files": [url]}], **base}}, split="test")
    local = RootDataset({"data": {"sources": [{"files": [HZZ]}], **base}}, split="test")
    np.testing.assert_array_equal(collect(remote).x, collect(local).x)


@pytest.mark.network
def test_http_connection_dropped_mid_epoch_is_retried(http_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A dropped connection while reading is a network failure: retried per data.retries,
    and the epoch equals a clean one; past the attempts, an error that says so.
    (uproot hands the failed request's exception back as data; it used to be
    reported as a corrupt file, and never retried.)"""
    url = http_server.put(Path(HZZ), "drops/uproot-HZZ.root")
    spec = {"data": {"sources": [{"files": [url]}], "label": "triggerIsoMu24",
                     "features": ["MET_px", {"branch": "Jet_Px", "max_len": 3}],
                     "retries": {"attempts": 3, "backoff": 0.05, "timeout": 5}}}
    ds = RootDataset(spec, split="all", shuffle=False, prefetch=False)
    before = len(http_server.requests)
    clean = collect(ds)
    per_epoch = len(http_server.requests) - before  # the last one reads baskets
    lost: list[str] = []
    spy = sources._lost_connection

    def seen(exc: BaseException) -> str | None:
        name = spy(exc)
        lost.extend([name] if name else [])
        return name

    monkeypatch.setattr(sources, "_lost_connection", seen)
    for skip in (0, per_epoch - 1):  # at the file's opening, then while reading baskets
        http_server.drop_next(2, skip=skip)  # two: aiohttp itself retries one on keep-alive
        np.testing.assert_array_equal(collect(ds).x, clean.x)  # a blip: retried, no loss
        assert http_server._server.drops == 0  # it happened during the epoch
    assert lost, "the basket read's failure was not seen as a lost connection"
    http_server.drop_next(10_000, skip=per_epoch - 1)
    try:
        with pytest.raises(SourceError) as info:
            collect(ds)
    finally:
        http_server.drop_next(0)
    text = str(info.value)
    assert url in text and "gave up after 3 attempts" in text, text
    assert "Server disconnected" in text or "connection failed" in text, text
    assert "corrupt" not in text, text


def test_gathers_shared_with_the_second_thread_keep_the_batch_order(synth_pair: Path) -> None:
    """Runs of batches gathered by the second thread come back in their place, each row once."""
    from concurrent.futures import ThreadPoolExecutor

    from mlaas.data.loader import GATHER_RUN

    ds = RootDataset(synth_spec(synth_pair), split="all", batch_size=10, prefetch=False)
    n = 10 * (3 * GATHER_RUN + 3) + 7  # runs on both threads, a short last run and a rest
    buf = Columns(x=np.arange(2 * n, dtype=np.float32).reshape(n, 2),
                  y=np.zeros(n, np.float32), w=np.ones(n, np.float32),
                  mask=np.zeros((n, 1), np.float32), file=np.zeros(n, np.int32),
                  entry=np.arange(n, dtype=np.int64))
    serial = list(ds._flush(buf, np.random.default_rng(1), True, None))
    with ThreadPoolExecutor(1) as pool:
        shared = list(ds._flush(buf, np.random.default_rng(1), True, pool))
    assert len(serial) == len(shared) == n // 10 + 1
    for a, b in zip(serial, shared, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["entry"], b["entry"])
    entries = np.concatenate([b["entry"] for b in shared])
    assert sorted(entries.tolist()) == list(range(n))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in shared])[:, 0], 2 * entries)


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_background_threads_give_the_same_batches_in_the_same_order(synth_pair: Path,
                                                                     cache: str) -> None:
    spec = synth_spec(synth_pair, cache=cache)
    alone = RootDataset(spec, split="train", batch_size=300, seed=5, prefetch=False)
    threaded = RootDataset(spec, split="train", batch_size=300, seed=5, prefetch=True)
    for epoch in (0, 1):  # with the memory cache, epoch 1 reads it back
        want, got = list(alone.iter_epoch(epoch)), list(threaded.iter_epoch(epoch))
        assert len(want) == len(got) > 1
        for a, b in zip(want, got, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
