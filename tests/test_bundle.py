"""Loading bundles (directories and archives, safely) and scoring JSON-like events.

The reference for every score is the training path: the loader's Transform
(normalised ``x``) and the torch model, on the same entries read from the
ROOT file with uproot.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import torch
import uproot

from mlaas.bundle import Bundle, InvalidEvent, predict_file
from mlaas.data import RootDataset, synth
from mlaas.data.transform import Chunk
from mlaas.errors import BadValues, BundleError
from mlaas.train import export
from mlaas.train.models import InputLayout, build_builtin
from mlaas.train.provenance import provenance

BRANCHES = ["MET_pt", "Jet_pt", "Jet_eta"]
N = 400  # entries of signal.root compared


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bundle")
    files = synth.generate(tmp / "data", 2000, seed=1)["files"]
    spec = {"data": {
        "sources": [{"files": [files["signal"]], "label": 1},
                    {"files": [files["background"]], "label": 0}],
        "derived": {"HT": "sum(Jet_pt)"},
        "cut": "MET_pt > 15",
        "features": ["MET_pt", "HT", {"branch": "Jet_pt", "max_len": 4, "sort_by": "Jet_pt"},
                     {"branch": "Jet_eta", "max_len": 4}],
        "step_size": 700,
    }}
    ds = RootDataset(spec, "train", shuffle=False)
    torch.manual_seed(5)
    model = build_builtin("deepsets", InputLayout.from_layout(ds.layout), 1).eval()
    info = provenance(ds.pipeline, ds, 0.0, 1.0)
    bundle_dir = export.export_bundle(ds.pipeline, model, ds, {"auc": 0.5}, tmp / "run",
                                      provenance=info, plots_dir=None)
    arrays = uproot.open(files["signal"])["Events"].arrays(BRANCHES, entry_stop=N, library="ak",
                                                           how=dict)
    chunk = Chunk(arrays=arrays, file_index=0, file_key="signal.root", source=0, entry_start=0,
                  url=files["signal"])
    cols = ds.transform(chunk, None)
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.from_numpy(cols.x), torch.from_numpy(cols.mask)))
    expected = np.full(N, np.nan, dtype=np.float32)
    expected[cols.entry] = scores.numpy()[:, 0]
    rows = ak.to_list(ak.zip(arrays, depth_limit=1))
    return {"dir": bundle_dir, "tar": tmp / "run" / "bundle.tar.gz", "expected": expected,
            "rows": rows, "columns": {k: ak.to_list(v) for k, v in arrays.items()},
            "bundle": Bundle.load(bundle_dir)}


def test_row_and_columnar_events_match_torch(setup: dict[str, Any]) -> None:
    bundle: Bundle = setup["bundle"]
    expected = setup["expected"]
    assert np.isnan(expected).sum() > 10 and (~np.isnan(expected)).sum() > 100
    for events in (setup["rows"], setup["columns"], {"events": setup["rows"]}):
        got = bundle.predict_events(events)
        assert got.shape == (N, 1) and got.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(got[:, 0]), np.isnan(expected))
        ok = ~np.isnan(expected)
        assert np.abs(got[ok, 0] - expected[ok]).max() <= 1e-5


def test_events_failing_the_cut_score_nan(setup: dict[str, Any]) -> None:
    bundle: Bundle = setup["bundle"]
    got = bundle.predict_events([
        {"MET_pt": 20.1, "Jet_pt": [50.2, 31.0], "Jet_eta": [0.1, -1.2]},
        {"MET_pt": 3.0, "Jet_pt": [50.2], "Jet_eta": [0.1]},
        {"MET_pt": 40.0, "Jet_pt": [], "Jet_eta": [], "extra": "ignored"},
    ])
    assert not math.isnan(got[0, 0]) and math.isnan(got[1, 0]) and not math.isnan(got[2, 0])
    scores, passed = bundle.predict_arrays({"MET_pt": ak.Array(np.array([1.0, 30.0])),
                                            "Jet_pt": ak.Array([[], [40.0]]),
                                            "Jet_eta": ak.Array([[], [0.5]])})
    assert passed.tolist() == [False, True] and math.isnan(scores[0, 0])
    assert bundle.predict_events([]).shape == (0, 1)


GOOD = {"MET_pt": 20.0, "Jet_pt": [50.0, 31.0], "Jet_eta": [0.1, 0.2]}


@pytest.mark.parametrize(("bad", "field", "words"), [
    ({"MET_pt": 20.0, "Jet_eta": [0.1]}, "Jet_pt", "has no field 'Jet_pt'"),
    ({**GOOD, "MET_pt": "abc"}, "MET_pt", "the string 'abc', not a number"),
    ({**GOOD, "MET_pt": None}, "MET_pt", "null"),
    ({**GOOD, "MET_pt": [1.0, 2.0]}, "MET_pt", "is a list, but 'MET_pt' holds one number"),
    ({**GOOD, "Jet_pt": 5.0}, "Jet_pt", "holds a list of numbers per event"),
    ({**GOOD, "Jet_pt": [1.0, "x"]}, "Jet_pt", "element 1 of field 'Jet_pt'"),
    ({**GOOD, "Jet_pt": [1.0, [2.0]]}, "Jet_pt", "element 1 of field 'Jet_pt' is a list"),
])
def test_bad_events_name_the_event_and_field(setup: dict[str, Any], bad: dict[str, Any],
                                             field: str, words: str) -> None:
    bundle: Bundle = setup["bundle"]
    with pytest.raises(InvalidEvent) as info:
        bundle.predict_events([GOOD, GOOD, bad])
    assert info.value.event == 2 and info.value.field == field
    assert "event 2" in str(info.value) and words in str(info.value)
    assert info.value.to_dict()["event"] == 2


def test_bad_columns(setup: dict[str, Any]) -> None:
    bundle: Bundle = setup["bundle"]
    cols = {"MET_pt": [20.0, 30.0], "Jet_pt": [[1.0], [2.0]], "Jet_eta": [[0.0], [0.0]]}
    with pytest.raises(InvalidEvent, match="no column for field 'Jet_eta'"):
        bundle.predict_events({k: v for k, v in cols.items() if k != "Jet_eta"})
    with pytest.raises(InvalidEvent, match="column 'MET_pt' has 1 values but column 'Jet_eta' has 2"):
        bundle.predict_events({**cols, "MET_pt": [1.0]})
    with pytest.raises(InvalidEvent, match="event 1: field 'MET_pt' is the string"):
        bundle.predict_events({**cols, "MET_pt": [20.0, "x"]})
    with pytest.raises(InvalidEvent, match="event 0 has no field 'MET_pt'.*did you mean 'MET_Pt'"):
        bundle.predict_events([{"MET_Pt": 1.0, "Jet_pt": [], "Jet_eta": []}])
    with pytest.raises(InvalidEvent, match="event 0 is a int"):
        bundle.predict_events([3])
    with pytest.raises(InvalidEvent, match="give a list of objects"):
        bundle.predict_events("events")


def test_nan_policy_error_names_event_and_feature(setup: dict[str, Any]) -> None:
    bundle: Bundle = setup["bundle"]
    with pytest.raises(BadValues) as info:
        bundle.predict_events([GOOD, {**GOOD, "Jet_eta": [0.1, float("nan")]}])
    assert info.value.event == 1 and "'Jet_eta'" in str(info.value) and "event 1" in str(info.value)
    # a NaN in an event that fails the cut is never looked at
    assert math.isnan(bundle.predict_events([{**GOOD, "MET_pt": 1.0,
                                              "Jet_pt": [float("nan")], "Jet_eta": [0.0]}])[0, 0])


def test_nan_policy_replace(setup: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(setup["dir"], copy)
    spec = json.loads((copy / "spec.json").read_text())
    spec["nan"] = {"policy": "replace", "value": 0.0}
    (copy / "spec.json").write_text(json.dumps(spec))
    bundle = Bundle.load(copy)
    a = bundle.predict_events([{**GOOD, "Jet_eta": [0.1, float("nan")]}])
    b = bundle.predict_events([{**GOOD, "Jet_eta": [0.1, 0.0]}])
    assert a[0, 0] == b[0, 0]


def test_tar_round_trip(setup: dict[str, Any]) -> None:
    from_dir: Bundle = setup["bundle"]
    from_tar = Bundle.load(setup["tar"])
    assert from_tar.spec == from_dir.spec and from_tar.metrics == {"auc": 0.5}
    assert from_tar.provenance["spec_digest"] == from_dir.provenance["spec_digest"]
    np.testing.assert_array_equal(from_tar.predict_events(setup["rows"]),
                                  from_dir.predict_events(setup["rows"]))


def test_predict_file(setup: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "MET_pt": 2.0}]))
    out = predict_file(setup["tar"], path)
    assert isinstance(out[0], float) and out[1] is None
    assert out[0] == pytest.approx(float(setup["bundle"].predict_events([GOOD])[0, 0]))
    json.dumps(out, allow_nan=False)


# -- unsafe and broken bundles --------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def archive_with(bundle_dir: Path, target: Path, extra: tarfile.TarInfo,
                 data: bytes | None = None) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        tar.add(bundle_dir, arcname="bundle")
        tar.addfile(extra, io.BytesIO(data) if data is not None else None)
    return target


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = link
    return info


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "hardlink", "device", "fifo",
                                  "oversized"])
def test_unsafe_archive_members_are_refused(setup: dict[str, Any], tmp_path: Path,
                                            case: str) -> None:
    tag = uuid.uuid4().hex
    victim = tmp_path / "victim"
    shutil.copytree(setup["dir"], victim)
    before = snapshot(victim)
    payload = b"pwned"
    members = {
        "absolute": (_info(f"/tmp/mlaas-evil-{tag}", size=5), payload),
        "dotdot": (_info("bundle/../../victim/spec.json", size=5), payload),
        "symlink": (_info("bundle/link", tarfile.SYMTYPE, link=str(victim / "spec.json")), None),
        "hardlink": (_info("bundle/hard", tarfile.LNKTYPE, link="bundle/spec.json"), None),
        "device": (_info("bundle/dev", tarfile.CHRTYPE), None),
        "fifo": (_info("bundle/fifo", tarfile.FIFOTYPE), None),
        "oversized": (_info("bundle/big.bin", size=2_000_000), b"\0" * 2_000_000),
    }
    member, data = members[case]
    archive = archive_with(setup["dir"], tmp_path / "evil.tar.gz", member, data)
    with tarfile.open(archive) as tar:
        assert member.name in tar.getnames()  # the archive really holds it
    limits = {"max_member_bytes": 1_000_000} if case == "oversized" else {}
    with pytest.raises(BundleError) as info:
        Bundle.load(archive, **limits)
    assert repr(member.name) in str(info.value)
    assert snapshot(victim) == before
    assert not Path(f"/tmp/mlaas-evil-{tag}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "victim"]


def test_total_size_limit(setup: dict[str, Any]) -> None:
    with pytest.raises(BundleError, match="larger than 1000 bytes unpacked"):
        Bundle.load(setup["tar"], max_total_bytes=1000)


def test_broken_bundles(setup: dict[str, Any], tmp_path: Path) -> None:
    def variant(name: str, change: Any) -> Path:
        d = tmp_path / name
        shutil.copytree(setup["dir"], d)
        change(d)
        return d

    def edit(key: str, value: Any) -> Any:
        def change(d: Path) -> None:
            spec = json.loads((d / "spec.json").read_text())
            spec[key] = value
            (d / "spec.json").write_text(json.dumps(spec))
        return change

    with pytest.raises(BundleError, match="no model.onnx"):
        Bundle.load(variant("nomodel", lambda d: (d / "model.onnx").unlink()))
    with pytest.raises(BundleError, match=r"no spec \(spec.json\)"):
        Bundle.load(variant("nospec", lambda d: (d / "spec.json").unlink()))
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(variant("badjson", lambda d: (d / "spec.json").write_text("{")))
    with pytest.raises(BundleError, match="format_version 99"):
        Bundle.load(variant("future", edit("format_version", 99)))
    with pytest.raises(BundleError, match=r"takes inputs \['x', 'mask'\] but spec.json declares"):
        Bundle.load(variant("inputs", edit("inputs", [{"name": "x"}])))
    with pytest.raises(BundleError, match="cannot be loaded by ONNX Runtime"):
        Bundle.load(variant("garbage", lambda d: (d / "model.onnx").write_bytes(b"nope")))
    with pytest.raises(BundleError, match="no bundle at"):
        Bundle.load(tmp_path / "missing")
    (tmp_path / "notatar.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(BundleError, match="not a readable bundle archive"):
        Bundle.load(tmp_path / "notatar.tar.gz")
