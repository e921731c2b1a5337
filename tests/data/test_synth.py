"""Tests for mlaas.data.synth: schema, determinism, compression and a non-trivial class split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot

from mlaas.data import synth
from mlaas.errors import SourceError, SpecError

EVENTS = 2_500

EXPECTED_TYPES = {
    "run": "uint32_t",
    "luminosityBlock": "uint32_t",
    "event": "uint64_t",
    "MET_pt": "float",
    "MET_phi": "float",
    "PV_npvs": "int32_t",
    "Jet_pt": "float[]",
    "Jet_eta": "float[]",
    "Jet_phi": "float[]",
    "Jet_mass": "float[]",
    "Jet_btagDeepB": "float[]",
    "Jet_jetId": "int32_t[]",
    "Muon_pt": "float[]",
    "Muon_eta": "float[]",
    "Muon_phi": "float[]",
    "Muon_charge": "int32_t[]",
    "Electron_pt": "float[]",
    "Electron_eta": "float[]",
    "Electron_phi": "float[]",
}
COUNTERS = {"nJet": "int32_t", "nMuon": "int32_t", "nElectron": "int32_t"}


def read(path: str | Path) -> ak.Array:
    with uproot.open(path) as file:
        return file[synth.TREE_NAME].arrays(library="ak")


def roc_auc(signal: np.ndarray, background: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties (events without jets tie at HT=0)."""
    values = np.concatenate([signal, background])
    order = np.argsort(values, kind="mergesort")
    _, inverse, counts = np.unique(values[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = np.empty(len(values))
    ranks[order] = (ends - (counts - 1) / 2)[inverse]
    ns, nb = len(signal), len(background)
    return float((ranks[:ns].sum() - ns * (ns + 1) / 2) / (ns * nb))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small dataset shared by the read-only checks; odd chunk size exercises re-chunking."""
    calls: list[tuple[int, int]] = []
    outdir = tmp_path_factory.mktemp("synth") / "not-yet-created"
    summary = synth.generate(outdir, EVENTS, seed=7, chunk_size=999,
                             progress=lambda n, nbytes: calls.append((n, nbytes)))
    return {"summary": summary, "calls": calls}


def test_summary_describes_written_files(sample: dict[str, Any]) -> None:
    summary = sample["summary"]
    assert set(summary) == {"files", "events", "compression", "seed", "bytes"}
    assert summary["events"] == EVENTS
    assert summary["compression"] == "zlib"
    assert summary["seed"] == 7
    assert set(summary["files"]) == {"signal", "background"}
    for name, path in summary["files"].items():
        assert Path(path).name == f"{name}.root"
        assert summary["bytes"][name] == Path(path).stat().st_size > 0
    assert not list(Path(summary["files"]["signal"]).parent.glob(".*partial"))


def test_branch_names_and_types(sample: dict[str, Any]) -> None:
    for path in sample["summary"]["files"].values():
        with uproot.open(path) as file:
            types = file[synth.TREE_NAME].typenames()
        assert set(types) == set(EXPECTED_TYPES) | set(COUNTERS)  # nothing else sneaks in
        assert {k: types[k] for k in EXPECTED_TYPES} == EXPECTED_TYPES
        assert {k: types[k] for k in COUNTERS} == COUNTERS


def test_entry_counts_identifiers_and_progress(sample: dict[str, Any]) -> None:
    for path in sample["summary"]["files"].values():
        with uproot.open(path) as file:
            assert file[synth.TREE_NAME].num_entries == EVENTS
        events = read(path)
        assert np.all(events.run == 1)
        assert np.array_equal(ak.to_numpy(events.event).astype(np.int64), np.arange(1, EVENTS + 1))
        assert np.all(np.diff(ak.to_numpy(events.luminosityBlock).astype(np.int64)) >= 0)
        for collection in ("Jet", "Muon", "Electron"):
            assert ak.all(events[f"n{collection}"] == ak.num(events[f"{collection}_pt"]))
    events = [n for n, _ in sample["calls"]]
    assert sum(events) == 2 * EVENTS
    assert max(events) <= 999
    written = sum(nbytes for _, nbytes in sample["calls"])  # for the bar's MB/s
    files = sum(sample["summary"]["bytes"].values())
    assert 0.5 * files < written <= files  # all but the footers written at close


def test_collections_sorted_by_descending_pt(sample: dict[str, Any]) -> None:
    for path in sample["summary"]["files"].values():
        events = read(path)
        for collection in ("Jet", "Muon", "Electron"):
            pt = events[f"{collection}_pt"]
            assert ak.all(pt[:, :-1] >= pt[:, 1:])


def test_values_are_physical(sample: dict[str, Any]) -> None:
    for path in sample["summary"]["files"].values():
        e = read(path)
        assert ak.all(e.Jet_pt >= 20) and ak.all(e.Jet_mass > 0)
        assert ak.all(abs(e.Jet_eta) <= 4.7) and ak.all(abs(e.Jet_phi) <= np.pi)
        assert ak.all((e.Jet_btagDeepB >= 0) & (e.Jet_btagDeepB <= 1))
        assert set(np.unique(ak.to_numpy(ak.flatten(e.Jet_jetId)))) <= {0, 2, 6}
        assert set(np.unique(ak.to_numpy(ak.flatten(e.Muon_charge)))) == {-1, 1}
        assert ak.all(abs(e.Muon_eta) <= 2.4) and ak.all(abs(e.Electron_eta) <= 2.5)
        assert ak.all(e.MET_pt >= 0) and ak.all(abs(e.MET_phi) <= np.pi)
        assert 25 < np.mean(e.PV_npvs) < 35


def test_signal_separable_but_not_trivially(sample: dict[str, Any]) -> None:
    files = sample["summary"]["files"]
    ht = {k: ak.to_numpy(ak.sum(read(p).Jet_pt, axis=1)) for k, p in files.items()}
    auc = roc_auc(ht["signal"], ht["background"])
    assert 0.6 < auc < 0.97
    pileup = {k: ak.to_numpy(read(p).PV_npvs) for k, p in files.items()}
    assert 0.45 < roc_auc(pileup["signal"], pileup["background"]) < 0.55  # no free lunch


def test_same_seed_same_content_regardless_of_chunk_size(tmp_path: Path) -> None:
    a = synth.generate(tmp_path / "a", 1_200, seed=11, chunk_size=1_200)
    b = synth.generate(tmp_path / "b", 1_200, seed=11, chunk_size=250)
    c = synth.generate(tmp_path / "c", 1_200, seed=12)
    for name in ("signal", "background"):
        first, again, other = (read(s["files"][name]) for s in (a, b, c))
        assert ak.array_equal(first, again)
        assert not ak.array_equal(first.Jet_pt, other.Jet_pt)
    signal, background = (read(a["files"][name]) for name in ("signal", "background"))
    assert not ak.array_equal(signal.MET_pt, background.MET_pt)


def test_fewer_events_is_a_prefix(tmp_path: Path) -> None:
    short = read(synth.generate(tmp_path / "s", 300, seed=5)["files"]["signal"])
    full = read(synth.generate(tmp_path / "f", 900, seed=5)["files"]["signal"])
    assert ak.array_equal(short, full[:300])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("zlib", uproot.ZLIB(1)),
        ("lz4", uproot.LZ4(4)),
        ("zstd", uproot.ZSTD(5)),
        ("lzma", uproot.LZMA(7)),
        ("none", None),
    ],
)
def test_compression_is_applied_and_readable(tmp_path: Path, name: str, expected: Any) -> None:
    summary = synth.generate(tmp_path, 200, compression=name, seed=1)
    assert summary["compression"] == name
    for path in summary["files"].values():
        with uproot.open(path) as file:
            compression = file.file.compression
            if expected is None:
                assert compression is None
            else:
                assert type(compression) is type(expected)
                assert compression.level == expected.level
            assert file[synth.TREE_NAME].num_entries == 200
        assert len(read(path)) == 200


def test_unknown_compression_names_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        synth.generate(tmp_path / "never", 10, compression="gzip")
    message = str(info.value)
    assert "'gzip'" in message
    for valid in ("zlib", "lz4", "zstd", "lzma", "none"):
        assert valid in message
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("events", "chunk_size"), [(-1, 10), (10, 0), (1.5, 10), (True, 10)])
def test_bad_counts_raise_spec_error(tmp_path: Path, events: Any, chunk_size: Any) -> None:
    with pytest.raises(SpecError):
        synth.generate(tmp_path, events, chunk_size=chunk_size)


def test_negative_seed_raises_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="seed"):
        synth.generate(tmp_path, 10, seed=-1)


def test_outdir_under_a_file_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "signal.root"
    blocker.write_bytes(b"")
    with pytest.raises(SourceError) as info:  # was NotADirectoryError, a traceback in the CLI
        synth.generate(blocker / "x", 10)
    message = str(info.value)
    assert f"cannot create the output directory {str(blocker / 'x')!r}" in message
    assert f"{str(blocker)!r} is a file, not a directory" in message


def test_outdir_that_cannot_be_created_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="cannot create the output directory '/proc/mlaas-x/y'"):
        synth.generate("/proc/mlaas-x/y", 10)  # was FileNotFoundError


def test_zero_events_still_has_schema(tmp_path: Path) -> None:
    summary = synth.generate(tmp_path, 0)
    with uproot.open(summary["files"]["signal"]) as file:
        tree = file[synth.TREE_NAME]
        assert tree.num_entries == 0
        assert set(EXPECTED_TYPES) <= set(tree.keys())


_PEAK = """
import json, sys
from mlaas.data import synth

def hwm_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

before = hwm_kb()
summary = synth.generate(sys.argv[1], int(sys.argv[2]), chunk_size=10_000, seed=3)
print(json.dumps({"before": before, "peak": hwm_kb(), "bytes": summary["bytes"]}))
"""


def peak_memory(outdir: Path, events: int) -> dict[str, Any]:
    """Generate in a fresh interpreter; its VmHWM before and after, in kB."""
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(outdir), str(events)],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(proc.stdout)


def test_issue2_generation_memory_does_not_grow_with_events(tmp_path: Path) -> None:
    """4x the events, the same peak: both runs are many 10k-event chunks, so what a
    non-streaming writer would hold (~60 MB per 100k events) would show as growth."""
    small = peak_memory(tmp_path / "small", 50_000)
    large = peak_memory(tmp_path / "large", 200_000)
    assert large["bytes"]["signal"] > 3 * small["bytes"]["signal"]  # 4x the data was written
    assert small["peak"] > small["before"]  # the peak includes the generation
    assert large["peak"] <= 1.25 * small["peak"], (small, large)
