"""The ``mlaas`` command line: inspect, stats, datagen, help, and how errors are shown.

Most tests drive ``mlaas.cli.app`` in-process with typer's ``CliRunner``; one
runs the installed console script in a real subprocess, because only there do
``main()``'s error handling, stderr and the exit code meet as a user sees them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml
from typer.testing import CliRunner

from mlaas import cli
from mlaas.data import synth
from mlaas.errors import BadValues, BranchNotFound, SourceError

FILES = Path(__file__).resolve().parent.parent / "files"
HZZ = str(FILES / "uproot-HZZ.root")
ZMUMU = str(FILES / "uproot-Zmumu.root")
WIDE = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def run(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args), env=WIDE)


def mlaas_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m mlaas.cli``."""
    script = Path(sys.executable).with_name("mlaas")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlaas.cli"]


def write_spec(path: Path, **data: Any) -> Path:
    d: dict[str, Any] = {
        "sources": [{"files": [HZZ]}],
        "label": "triggerIsoMu24",
        "features": ["MET_px", {"branch": "Muon_Px", "max_len": 2, "sort_by": "Muon_Px"}],
    }
    d.update(data)
    path.write_text(yaml.safe_dump({"data": d}))
    return path


# ------------------------------------------------------------------------ inspect


def test_inspect_json_describes_hzz() -> None:
    result = run("inspect", HZZ, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["file"] == HZZ
    assert "ZLIB" in info["compression"]
    tree = info["trees"]["events"]
    assert tree["entries"] == 2421
    branches = {b["name"]: b for b in tree["branches"]}
    assert branches["Jet_Px"]["kind"] == "jagged"
    assert branches["Jet_Px"]["multiplicity_max"] > 0
    assert branches["Jet_Px"]["multiplicity_mean"] > 0
    assert branches["MET_px"]["kind"] == "flat"
    assert "multiplicity_max" not in branches["MET_px"]
    assert branches["Jet_ID"]["kind"] == "jagged"
    assert branches["NMuon"]["kind"] == "flat"
    assert all(b["compressed_bytes"] > 0 for b in branches.values())


def test_inspect_multiplicity_matches_uproot() -> None:
    result = run("inspect", HZZ, "--json", "--tree", "events")
    assert result.exit_code == 0, result.output
    rows = {b["name"]: b for b in json.loads(result.stdout)["trees"]["events"]["branches"]}
    counts = uproot.open(HZZ)["events"]["NMuon"].array(library="np")
    assert rows["Muon_Px"]["multiplicity_max"] == int(counts.max())
    assert rows["Muon_Px"]["multiplicity_mean"] == pytest.approx(float(counts.mean()))


def test_inspect_zmumu_marks_the_string_branch_unsupported() -> None:
    result = run("inspect", ZMUMU)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "2,304 entries" in out
    assert "ZLIB" in out
    type_line = next(line for line in out.splitlines() if " Type " in line)
    assert "unsupported" in type_line and "char*" in type_line
    m_line = next(line for line in out.splitlines() if " M " in line)
    assert "flat" in m_line

    as_json = json.loads(run("inspect", ZMUMU, "--json").stdout)
    kinds = {b["name"]: b["kind"] for b in as_json["trees"]["events"]["branches"]}
    assert kinds["Type"] == "unsupported"
    assert kinds["Run"] == "flat" and kinds["M"] == "flat"


def test_inspect_missing_tree_is_an_mlaas_error() -> None:
    result = run("inspect", HZZ, "--tree", "Evnts")
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "TreeNotFound"
    assert "did you mean 'events'" in str(result.exception)


def test_inspect_json_gives_an_error_as_json_too(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.root")
    result = subprocess.run([*mlaas_command(), "inspect", missing, "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    error = json.loads(result.stdout)
    assert error["error"] == "SourceError" and error["file_path"] == missing
    assert error["message"] == "file not found"  # once, not "file not found: file not found"
    assert "SourceError: file not found" in result.stderr and missing in result.stderr


def test_inspect_a_file_without_ttrees_says_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "rntuple.root"
    with uproot.recreate(path) as f:
        f["Events"] = {"x": np.arange(5.0)}  # uproot writes an RNTuple for a plain dict
    result = run("inspect", str(path))
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "TreeNotFound"
    assert "no TTree in the file" in str(result.exception)
    assert "Events (ROOT::RNTuple)" in str(result.exception)


def test_inspect_prints_square_brackets_in_names(tmp_path: Path) -> None:
    path = tmp_path / "skim[v2].root"
    shutil.copyfile(HZZ, path)
    result = run("inspect", str(path))
    assert result.exit_code == 0 and "skim[v2].root" in result.output, result.output


# -------------------------------------------------------------------------- stats


def test_stats_writes_json_per_feature(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "pipeline.yaml")
    out = tmp_path / "stats.json"
    result = run("stats", str(spec), "-o", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    stats = json.loads(out.read_text())
    assert stats["entries"] == 2421
    assert stats["selected"] == 2421
    assert set(stats["features"]) == {"MET_px", "Muon_Px"}
    for name, f in stats["features"].items():
        for key in ("count", "min", "max", "mean", "std"):
            assert key in f, f"{key} missing for {name}"
        assert f["count"] > 0 and f["min"] <= f["mean"] <= f["max"] and f["std"] > 0
    met = uproot.open(HZZ)["events"]["MET_px"].array(library="np").astype("float64")
    assert stats["features"]["MET_px"]["count"] == 2421
    assert stats["features"]["MET_px"]["mean"] == pytest.approx(met.mean())
    assert stats["features"]["MET_px"]["std"] == pytest.approx(met.std())
    assert stats["features"]["MET_px"]["min"] == pytest.approx(met.min())
    assert stats["features"]["Muon_Px"]["jagged"] is True
    assert stats["max_len"] == {"Muon": 2}
    assert sum(stats["splits"].values()) == 2421
    assert "MET_px" in result.stdout  # the table is printed too


def test_stats_records_and_shows_each_sources_sum_of_weights(tmp_path: Path) -> None:
    # the yield after the cut, the first number a physicist checks against a cut flow
    spec = write_spec(tmp_path / "pipeline.yaml", weight="EventWeight * 2", cut="NMuon >= 2")
    out = tmp_path / "stats.json"
    result = run("stats", str(spec), "-o", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    t = uproot.open(HZZ)["events"].arrays(["EventWeight", "NMuon"], library="np")
    want = float((2 * t["EventWeight"].astype(np.float64))[t["NMuon"] >= 2].sum())
    (source,) = json.loads(out.read_text())["sources"]
    assert source["sum_weights"] == pytest.approx(want, rel=1e-12)
    assert "sum of weights" in result.stdout and f"{want:.4g}" in result.stdout
    plain = run("stats", str(write_spec(tmp_path / "p2.yaml")), "--no-progress")
    assert "sum of weights" not in plain.stdout  # no weight: no column


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stats-pair")
    synth.generate(out, 3000, seed=11)
    return out


STATS_CUT = "MET_pt > 30"
STATS_DERIVED = {
    "inv": "1 / (nMuon - 1)",  # +inf where nMuon == 1
    "nan_or_met": "(nMuon - 1) / (nMuon - 1) * MET_pt",  # NaN where nMuon == 1
    "Muon_leta": "log(Muon_eta)",  # jagged: NaN where eta < 0
}


def reference(path: Path) -> dict[str, Any]:
    """One file's selected events and feature values, computed with awkward alone."""
    a = uproot.open(path)["Events"].arrays(library="ak")
    keep = ak.to_numpy(a.MET_pt > 30)
    s = a[keep]
    n_muon = ak.to_numpy(s.nMuon).astype(np.float64)
    with np.errstate(all="ignore"):
        values = {
            "MET_pt": ak.to_numpy(s.MET_pt).astype(np.float64),
            "inv": 1 / (n_muon - 1),
            "nan_or_met": (n_muon - 1) / (n_muon - 1) * ak.to_numpy(s.MET_pt),
            "Jet_pt": ak.to_numpy(ak.flatten(s.Jet_pt)).astype(np.float64),
            "Muon_leta": np.log(ak.to_numpy(ak.flatten(s.Muon_eta)).astype(np.float64)),
            "Electron_pt": ak.to_numpy(ak.flatten(s.Electron_pt)).astype(np.float64),
        }
    counts = {c: ak.to_numpy(ak.num(s[f"{c}_pt"], axis=1)) for c in ("Jet", "Muon", "Electron")}
    return {"entries": len(a), "selected": int(keep.sum()), "values": values, "counts": counts}


def test_issue2_stats_counts_match_awkward_exactly(pair: Path, tmp_path: Path) -> None:
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(yaml.safe_dump({"data": {
        "sources": [{"name": "signal", "files": [str(pair / "signal.root")], "label": 1},
                    {"name": "background", "files": [str(pair / "background.root")],
                     "label": 0}],
        "derived": STATS_DERIVED,
        "cut": STATS_CUT,
        "features": ["MET_pt", "inv", "nan_or_met", {"branch": "Jet_pt", "max_len": 4},
                     {"branch": "Muon_leta", "max_len": 2}, {"branch": "Electron_pt"}],
        "nan": {"policy": "replace", "value": 0},
        "step_size": 700,
    }}))
    out = tmp_path / "stats.json"
    result = run("stats", str(spec), "-o", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    stats = json.loads(out.read_text())
    refs = {name: reference(pair / f"{name}.root") for name in ("signal", "background")}

    for source, ref in zip(stats["sources"], refs.values(), strict=True):
        assert (source["entries"], source["selected"]) == (ref["entries"], ref["selected"])
        assert sum(source["splits"].values()) == ref["selected"]
    assert 0 < stats["selected"] == sum(r["selected"] for r in refs.values()) < 6000

    for name, got in stats["features"].items():
        values = np.concatenate([r["values"][name] for r in refs.values()])
        want = {"count": int(np.isfinite(values).sum()), "nan": int(np.isnan(values).sum()),
                "inf": int(np.isinf(values).sum())}
        assert {k: got[k] for k in want} == want, name
    assert stats["features"]["inv"]["inf"] > 0 and stats["features"]["nan_or_met"]["nan"] > 0
    assert stats["features"]["Muon_leta"]["nan"] > 0

    for coll, feature in (("Jet", "Jet_pt"), ("Muon", "Muon_leta"), ("Electron", "Electron_pt")):
        counts = np.concatenate([r["counts"][coll] for r in refs.values()])
        assert stats["features"][feature]["multiplicity"] == np.bincount(counts).tolist()
    electrons = np.concatenate([r["counts"]["Electron"] for r in refs.values()])
    assert stats["max_len"] == {
        "Jet": 4, "Muon": 2,
        "Electron": max(1, int(np.quantile(electrons, 0.95, method="inverted_cdf")))}


def test_stats_reports_zero_variance_on_stderr(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "pipeline.yaml", derived={"one": "MET_px*0 + 1"},
                      features=["MET_px", "one"])
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        result = run("stats", str(spec), "--no-progress")
    assert result.exit_code == 0, result.output
    # printed once, in the command's own style; Python's display does not repeat it
    assert result.stderr.count("zero variance") == 1 and "'one'" in result.stderr
    assert not [w for w in escaped if "zero variance" in str(w.message)]


def test_stats_tables_show_the_label_expression_its_values_and_max_len_whole(
        tmp_path: Path) -> None:
    """In 80 columns (a pipe) no number is cut short; the label says what it is and takes."""
    spec = write_spec(tmp_path / "pipeline.yaml", cut="NMuon >= 1", label="NJet >= 2",
                      features=["MET_px", "NPrimaryVertices",
                                {"branch": "Muon_Px", "max_len": 1}])
    result = subprocess.run([*mlaas_command(), "stats", str(spec), "--no-progress"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    assert "NJet >= 2" in result.stdout  # the sources table's label column
    events = uproot.open(HZZ)["events"].arrays(["NMuon", "NJet"], library="np")
    selected = events["NMuon"] >= 1
    ones = int((events["NJet"][selected] >= 2).sum())
    assert 0 < ones < selected.sum()
    assert f"label values (selected events): 0: {selected.sum() - ones:,}, 1: {ones:,}" \
        in result.stdout
    assert re.search(r"Muon_Px .* 1 \(p95 2\) ", result.stdout), result.stdout
    assert "a classifier needs events of at least two classes" not in result.stderr


def test_stats_warns_when_the_label_has_one_value(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "pipeline.yaml")  # triggerIsoMu24 is 1 in every HZZ event
    result = run("stats", str(spec), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "the label is 1 for every selected event" in result.stderr


def test_stats_with_nan_shows_and_writes_the_counts_then_fails(tmp_path: Path) -> None:
    """Under nan: error the run fails, but the counts it found are what the user needs."""
    spec = write_spec(tmp_path / "pipeline.yaml", derived={"bad": "log(MET_px)"},
                      features=["MET_px", "bad"])
    out = tmp_path / "stats.json"
    result = run("stats", str(spec), "--no-progress", "-o", str(out))
    assert result.exit_code == 1
    assert isinstance(result.exception, BadValues)
    assert "data.nan" in str(result.exception)
    written = json.loads(out.read_text())
    nan = written["features"]["bad"]["nan"]
    assert nan > 0 and written["features"]["MET_px"]["nan"] == 0
    assert "features (pass 1)" in result.stdout and str(nan) in result.stdout


def test_stats_with_a_bad_spec_is_an_mlaas_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "pipeline.yaml", features=["MET_pz"])
    result = run("stats", str(spec), "--no-progress")
    assert result.exit_code == 1
    assert isinstance(result.exception, BranchNotFound)
    assert "data.features[0]" in str(result.exception)


def test_stats_spec_must_exist(tmp_path: Path) -> None:
    result = run("stats", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2  # a usage error, from the argument check
    assert "nope.yaml" in result.output


# ------------------------------------------------------------------------ datagen


def test_datagen_writes_both_files(tmp_path: Path) -> None:
    outdir = tmp_path / "gen"
    result = run("datagen", str(outdir), "-n", "2000", "--compression", "lz4")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["events"] == 2000 and summary["compression"] == "lz4"
    for name in ("signal", "background"):
        path = outdir / f"{name}.root"
        assert path.is_file()
        with uproot.open(path) as f:
            assert f["Events"].num_entries == 2000
            assert type(f.file.compression).__name__ == "LZ4"
            assert {"MET_pt", "Jet_pt", "Muon_pt"} <= set(f["Events"].keys())


def test_datagen_unknown_compression(tmp_path: Path) -> None:
    result = run("datagen", str(tmp_path / "gen"), "-n", "10", "--compression", "gzip")
    assert result.exit_code == 2  # a usage error, before any bar or file
    text = " ".join(result.output.split())
    assert "Invalid value for --compression: 'gzip' is not one of" in text and "lz4" in text
    assert "events" not in text  # no progress bar was drawn
    assert not (tmp_path / "gen").exists()


# --------------------------------------------------------------------------- help


HELP = {
    (): ["datagen", "inspect", "stats", "HEP"],
    ("datagen",): ["NanoAOD-like", "signal", "--compression", "--events"],
    ("inspect",): ["branch", "compression", "--json", "--tree"],
    ("stats",): ["Pass 1", "mean", "--output", "--no-progress"],
    ("demo",): ["epoch", "--workdir"],
    ("import-mlaas4hep",): ["MLaaS4HEP", "--params"],
}


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "mlaas")
def test_help(command: tuple[str, ...]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    for word in HELP[command]:
        assert word in result.stdout, f"{word!r} not in help of {command}:\n{result.stdout}"


def test_no_arguments_shows_help() -> None:
    result = run()
    assert "datagen" in result.output and "Usage" in result.output


# ---------------------------------------------------------- errors, as a user sees them


def test_main_prints_type_and_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.root")
    monkeypatch.setattr(sys, "argv", ["mlaas", "inspect", missing])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("SourceError: ")
    assert missing in err
    assert "Traceback" not in err


def test_cli_runner_keeps_the_exception(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.root")
    result = run("inspect", missing)
    assert result.exit_code == 1
    assert isinstance(result.exception, SourceError)
    assert result.exception.file_path == missing


def test_real_process_error_is_one_message_no_traceback(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.root"
    corrupt.write_bytes(b"not a ROOT file at all" * 100)
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run([*mlaas_command(), "inspect", str(corrupt)], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("SourceError: not a readable ROOT file")
    assert f"in file {corrupt}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_real_process_spec_error_lists_field_paths(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "pipeline.yaml", step_size="100 MBB", featurs=["x"])
    proc = subprocess.run([*mlaas_command(), "stats", str(spec), "--no-progress"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("SpecError: invalid pipeline spec")
    assert "data.step_size" in proc.stderr
    assert "did you mean 'features'" in proc.stderr
    assert "Traceback" not in proc.stderr


def features_table() -> Any:
    from rich.table import Table

    table = Table(title="features (pass 1)")
    table.add_column("feature", no_wrap=True, min_width=24)
    for col in ("count", "min", "max", "mean", "std", "max_len"):
        table.add_column(col, justify="right")
    table.add_row("Electron_a_rather_long_derived_name", "1,234,567", "-49.1234", "1234.567",
                  "0.001234", "123.456", "3 (p95 4)")
    table.add_row("MET_pt", "7", "1", "2", "3", "4", "")
    return table


def print_whole(width: int, terminal: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    """What ``_print_whole`` prints of :func:`features_table` on such a console, styles removed."""
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=width, force_terminal=terminal,
                                                color_system=None))
    cli._print_whole(features_table())
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())
    assert "…" not in text
    for number in ("1,234,567", "-49.1234", "1234.567", "0.001234", "123.456", "3 (p95 4)"):
        assert number in text
    return text


def test_a_too_wide_table_folds_its_names_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    text = print_whole(84, True, monkeypatch)
    assert max(len(line) for line in text.splitlines()) <= 84, text  # no line wraps
    assert "Electron_a_rather_long_derived_name" not in text  # folded onto more lines
    assert re.search(r"│ Electron_a\S* +│ 1,234,567 │", text), text
    assert re.search(r"│ MET_pt +│ +7 │", text), text


def test_a_too_wide_table_prints_one_line_per_row_in_a_pipe_or_when_folding_cannot_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for width, terminal in [(84, False), (60, True)]:  # the numbers alone need more than 60
        text = print_whole(width, terminal, monkeypatch)
        assert re.search(r"│ Electron_a_rather_long_derived_name +│ 1,234,567 │", text), text
