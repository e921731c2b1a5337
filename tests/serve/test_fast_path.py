"""The numpy path for JSON events (``Preprocessor.prepare_events``) against the general one.

The general path (``events_to_arrays`` + ``Preprocessor.__call__``, awkward
arrays, the training code's functions) is the reference: the numpy path must
give the same ``x``, ``mask`` and ``index`` bit for bit, and for bad input the
same error class, message, event and field.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from mlaas.bundle import Bundle, InvalidEvent, Preprocessor, events_to_arrays
from mlaas.data.layout import Layout
from mlaas.errors import MlaasError

TYPES = {
    "MET_pt": {"kind": "flat", "dtype": "float32"},
    "nJet": {"kind": "flat", "dtype": "int32"},
    "run": {"kind": "flat", "dtype": "int64"},
    "Jet_pt": {"kind": "jagged", "dtype": "float32"},
    "Jet_eta": {"kind": "jagged", "dtype": "float32"},
    "Jet_btag": {"kind": "jagged", "dtype": "float64"},
    "Muon_pt": {"kind": "jagged", "dtype": "float32"},
    "Muon_charge": {"kind": "jagged", "dtype": "int32"},
}


def flat(name: str) -> dict[str, Any]:
    return {"name": name, "expression": name, "jagged": False}


def jagged(name: str, collection: str) -> dict[str, Any]:
    return {"name": name, "expression": name, "jagged": True, "collection": collection,
            "pad": -1.0}


def layout(features: list[dict[str, Any]], collections: dict[str, Any] | None = None,
           derived: list[list[str]] | None = None, cut: str | None = None) -> dict[str, Any]:
    return {"tree": "Events", "branches": sorted(TYPES), "features": features,
            "collections": collections or {}, "derived": derived or [], "cut": cut}


JETS = {"features": ["Jet_pt", "Jet_eta", "Jet_btag"], "max_len": 3, "sort_by": "Jet_pt"}
MUONS = {"features": ["Muon_pt", "Muon_charge"], "max_len": 2, "sort_by": None}

LAYOUTS = {
    "flat": layout([flat("MET_pt"), flat("nJet"), flat("run")]),
    "jagged_sort_by": layout(
        [flat("MET_pt"), jagged("Jet_pt", "Jet"), jagged("Jet_eta", "Jet"),
         jagged("Jet_btag", "Jet"), jagged("Muon_pt", "Muon"), jagged("Muon_charge", "Muon")],
        {"Jet": JETS, "Muon": MUONS}),
    "cut": layout([flat("MET_pt"), flat("nJet"), jagged("Jet_pt", "Jet")],
                  {"Jet": {"features": ["Jet_pt"], "max_len": 4, "sort_by": "Jet_eta"}},
                  cut="(MET_pt > 20) & (nJet >= 1)"),
    "derived": layout(
        [flat("MET_pt"), flat("HT"), flat("nB"),
         {"name": "logMET", "expression": "log(MET_pt + 1)", "jagged": False},
         jagged("Jet_pt", "Jet")],
        {"Jet": {"features": ["Jet_pt"], "max_len": 2, "sort_by": "Jet_pt"}},
        derived=[["HT", "sum(Jet_pt)"], ["nB", "sum(Jet_btag > 0.5)"]], cut="HT > 10"),
    # a derived name shadowing a branch, a derived jagged feature and sort key
    "derived_jagged": layout(
        [flat("MET_pt"), jagged("Jet_ptx", "Jet"), jagged("Jet_eta", "Jet")],
        {"Jet": {"features": ["Jet_ptx", "Jet_eta"], "max_len": 3, "sort_by": "Jet_ptx"}},
        derived=[["MET_pt", "MET_pt * 2"], ["Jet_ptx", "Jet_pt * Jet_eta"]]),
}


def random_events(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    """Events as a JSON client sends them (json round trip): ints in float branches,
    ties in sort keys, -0.0, empty lists, float32-unrepresentable values."""
    events = []
    for _ in range(n):
        nj, nm = int(rng.integers(0, 7)), int(rng.integers(0, 4))
        pts = [float(v) for v in rng.choice([10.0, 25.5, 25.5, 40.1, -0.0, 3.3333333333],
                                            size=nj)]
        if nj and rng.random() < 0.3:
            pts[0] = int(rng.integers(0, 100))  # an int in a float branch
        event = {
            "MET_pt": (float(rng.exponential(30)) if rng.random() < 0.8
                       else int(rng.integers(0, 50))),
            "nJet": nj, "run": int(rng.integers(0, 2**40)),
            "Jet_pt": pts, "Jet_eta": [float(v) for v in rng.normal(size=nj)],
            "Jet_btag": [float(v) for v in rng.random(nj)],
            "Muon_pt": [float(v) for v in rng.exponential(20, size=nm)],
            "Muon_charge": [int(v) for v in rng.choice([-1, 1], size=nm)],
            "extra": "ignored",
        }
        events.append(event)
    out: list[dict[str, Any]] = json.loads(json.dumps(events))
    return out


def general(pre: Preprocessor, events: Any) -> Any:
    return pre(events_to_arrays(events, TYPES))


def assert_same(a: Any, b: Any) -> None:
    for name in ("x", "mask", "index"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name  # bit for bit (-0.0, NaN payloads)
    assert a.n == b.n


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("policy", ["error", "replace"])
def test_numpy_path_is_identical_on_random_events(name: str, policy: str) -> None:
    pre = Preprocessor(Layout.from_dict(LAYOUTS[name]), policy, -5.0)
    rng = np.random.default_rng(len(name))
    for n in (1, 2, 7, 32, 300):
        rows = random_events(rng, n)
        columns = {k: [r[k] for r in rows] for k in TYPES}
        for events in (rows, columns, {"events": rows}):
            fast = pre.prepare_events(events, TYPES)
            assert_same(fast, general(pre, events))
        assert fast.x.shape[1] == len(pre.feature_names)
    if name == "cut":  # the cut really drops events
        assert 0 < len(fast.index) < fast.n


def test_numpy_path_takes_the_numpy_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain JSON numbers never build awkward arrays of branches no expression reads."""
    import mlaas.bundle as mod

    pre = Preprocessor(Layout.from_dict(LAYOUTS["jagged_sort_by"]))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("events_to_arrays called on plain numbers")

    monkeypatch.setattr(mod, "events_to_arrays", refuse)
    rows = random_events(np.random.default_rng(3), 16)
    assert pre.prepare_events(rows, TYPES).x.shape == (16, 1 + 3 * 3 + 2 * 2)


def test_nan_under_error_policy_names_the_same_event() -> None:
    pre = Preprocessor(Layout.from_dict(LAYOUTS["jagged_sort_by"]), "error")
    rows = random_events(np.random.default_rng(4), 10)
    rows[6]["Jet_pt"] = [5.0, math.nan]
    rows[6]["nJet"] = 2
    rows[6]["Jet_eta"], rows[6]["Jet_btag"] = [0.1, 0.2], [0.3, 0.4]
    errors = []
    for call in (lambda: pre.prepare_events(rows, TYPES), lambda: general(pre, rows)):
        with pytest.raises(MlaasError) as info:
            call()
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
    assert errors[0].to_dict() == errors[1].to_dict()
    assert "event 6" in str(errors[0])


def _bad_cases() -> list[tuple[str, Any]]:
    base = random_events(np.random.default_rng(5), 4)

    def with_(i: int, field: str, value: Any) -> list[dict[str, Any]]:
        rows = json.loads(json.dumps(base))
        rows[i][field] = value
        return rows

    missing = json.loads(json.dumps(base))
    del missing[2]["Jet_eta"]
    columns = {k: [r[k] for r in base] for k in TYPES}
    short = dict(columns, MET_pt=columns["MET_pt"][:3])
    return [
        ("missing field", missing),
        ("string", with_(1, "MET_pt", "12.5")),
        ("null", with_(3, "MET_pt", None)),
        ("bool in flat", with_(0, "MET_pt", True)),
        ("list in flat", with_(2, "MET_pt", [1.0])),
        ("number in jagged", with_(1, "Jet_pt", 4.0)),
        ("string in jagged", with_(2, "Jet_btag", [0.1, "x"])),
        ("empty string as jagged", with_(2, "Muon_pt", "")),
        ("object as jagged", with_(2, "Muon_pt", {})),
        ("nested list", with_(0, "Jet_eta", [[0.1]])),
        ("float in int", with_(3, "nJet", 2.5)),
        ("integral float in int", with_(3, "nJet", 2.0)),
        ("integral floats in jagged int", with_(1, "Muon_charge", [1.0, -1.0, 1])),
        ("fraction in jagged int", with_(1, "Muon_charge", [1.0, -0.5])),
        ("huge float in int", with_(3, "nJet", 1e30)),
        ("infinity in int", with_(3, "nJet", math.inf)),
        ("int too large", with_(1, "nJet", 2**40)),
        ("bool in jagged int", with_(1, "Muon_charge", [True])),
        ("row not an object", [base[0], 7]),
        ("events a number", 5),
        ("events a string", "events"),
        ("empty list", []),
        ("columns of unequal length", short),
        ("column not a list", dict(columns, nJet=3)),
        ("column missing", {k: v for k, v in columns.items() if k != "run"}),
    ]


@pytest.mark.parametrize(("case", "events"), _bad_cases(), ids=[c for c, _ in _bad_cases()])
def test_bad_input_same_answer_as_the_general_path(case: str, events: Any) -> None:
    pre = Preprocessor(Layout.from_dict(LAYOUTS["jagged_sort_by"]), "replace")
    outcomes = []
    for call in (lambda: pre.prepare_events(events, TYPES), lambda: general(pre, events)):
        try:
            outcomes.append(call())
        except Exception as exc:  # noqa: BLE001 - compared below
            outcomes.append(exc)
    fast, ref = outcomes
    if isinstance(ref, BaseException):
        assert type(fast) is type(ref) and str(fast) == str(ref), case
        if isinstance(ref, InvalidEvent):
            assert fast.to_dict() == ref.to_dict()  # type: ignore[union-attr]
    else:
        assert not isinstance(fast, BaseException), fast
        assert_same(fast, ref)
    if case in ("string", "missing field", "string in jagged", "float in int"):
        assert isinstance(ref, InvalidEvent)  # the case is really bad
        assert ref.to_dict().get("field") and ref.to_dict().get("event") is not None


def test_bundle_predict_events_matches_the_general_path(trained: dict[str, Any]) -> None:
    """A real bundle (derived, cut, jagged): scores through the numpy path equal the
    scores of the awkward path, NaN off the cut included."""
    bundle = Bundle.load(trained["dir"])
    for events in (trained["rows"], trained["columns"]):
        ref, _ = bundle.predict_arrays(events_to_arrays(events, bundle.branch_types))
        got = bundle.predict_events(events)
        assert got.tobytes() == ref.tobytes()
        assert np.isnan(got[1, 0]) and not np.isnan(got[0, 0])
