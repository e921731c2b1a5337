"""What a user sees for a mistyped output path, a non-ROOT input or an RNTuple.

Each test here comes from a user audit and failed on the code before its
fix: a Python traceback (or a misleading message) where one line naming the
path, file or tree was due.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml
from typer.testing import CliRunner

from mlaas import cli
from mlaas.data import inspect as inspect_mod
from mlaas.data import stats as stats_mod
from mlaas.data.inspect import inspect_file
from mlaas.errors import SourceError, TreeNotFound
from support.trees import write_ttrees

FILES = Path(__file__).resolve().parent.parent / "files"
HZZ = str(FILES / "uproot-HZZ.root")
OLD = FILES / "mlaas4hep"
WIDE = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli.app, list(args), env=env or WIDE)


def text_of(result: Any) -> str:
    """The output with rich's box and line breaks taken out, so a message reads as one line."""
    return " ".join(result.output.replace("│", " ").split())


def hzz_spec(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"data": {
        "sources": [{"files": [HZZ]}], "label": "triggerIsoMu24", "features": ["MET_px"]}}))
    return path


def usage_error(result: Any, *words: str) -> str:
    """Assert ``result`` is a usage error (exit 2, no traceback) whose text has ``words``."""
    text = text_of(result)
    assert result.exit_code == 2, (result.exception, text)
    assert isinstance(result.exception, SystemExit), result.exception
    for word in words:
        assert word in text, text
    return text


# ------------------------------------------------------------ 1. output paths (-o)


def test_stats_output_in_a_missing_directory_fails_before_pass_1(tmp_path: Path) -> None:
    target = tmp_path / "nonexistent" / "dir" / "s.json"
    result = run("stats", str(hzz_spec(tmp_path)), "--no-progress", "-o", str(target))
    text = usage_error(result, str(target.parent), "does not exist")
    assert "features (pass 1)" not in text  # refused before pass 1, not after


def test_stats_output_that_is_a_directory_fails_before_pass_1(tmp_path: Path) -> None:
    result = run("stats", str(hzz_spec(tmp_path)), "--no-progress", "-o", str(tmp_path))
    text = usage_error(result, str(tmp_path), "is a directory")
    assert "features (pass 1)" not in text


def test_stats_output_under_a_file_fails_before_pass_1(tmp_path: Path) -> None:
    target = Path(HZZ) / "s.json"
    result = run("stats", str(hzz_spec(tmp_path)), "--no-progress", "-o", str(target))
    usage_error(result, HZZ, "not a directory")


def test_stats_that_cannot_be_saved_still_shows_the_tables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Any, path: Any) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(stats_mod.Stats, "save", refuse)
    target = tmp_path / "s.json"
    result = run("stats", str(hzz_spec(tmp_path)), "--no-progress", "-o", str(target))
    assert result.exit_code == 1, (result.exception, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    text = text_of(result)
    assert "features (pass 1)" in text and "MET_px" in text  # the result is not lost
    assert f"cannot write {str(target)!r}: No space left on device" in text


def test_import_mlaas4hep_output_in_a_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "p.yaml"
    result = run("import-mlaas4hep", "--params", str(OLD / "params.json"),
                 "--files", str(OLD / "files.txt"), "--labels", str(OLD / "labels.txt"),
                 "-o", str(target))
    usage_error(result, str(target.parent), "does not exist")


def test_import_mlaas4hep_output_that_is_a_directory(tmp_path: Path) -> None:
    result = run("import-mlaas4hep", "--params", str(OLD / "params.json"),
                 "--files", str(OLD / "files.txt"), "--labels", str(OLD / "labels.txt"),
                 "-o", str(tmp_path))
    usage_error(result, str(tmp_path), "is a directory")


def test_run_output_under_a_file(tmp_path: Path) -> None:
    target = Path(HZZ) / "run"
    result = run("run", str(hzz_spec(tmp_path)), "--no-progress", "-o", str(target))
    usage_error(result, str(target), "not a directory")


def test_run_with_a_spec_that_does_not_validate_leaves_no_run_directory(
        tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {sources: [{files: [x.root], label: 1}], features: [a], cutt: b}\n")
    result = run("run", str(bad), "--no-progress", "-o", str(tmp_path / "out"))
    assert result.exit_code != 0 and "unknown key 'cutt'" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_apply_output_under_a_file(tmp_path: Path) -> None:
    target = Path(HZZ) / "friends"
    result = run("apply", str(tmp_path), HZZ, "-o", str(target))
    usage_error(result, str(target), "not a directory")


# ------------------------------------------------------------- 2. datagen's OUTDIR


def test_datagen_into_a_path_under_a_file(tmp_path: Path) -> None:
    target = Path(HZZ) / "x"
    result = run("datagen", str(target), "--events", "10")
    text = usage_error(result, str(target), "not a directory")
    assert "events/s" not in text  # refused before the progress bar


def test_datagen_into_a_directory_that_cannot_be_created() -> None:
    result = run("datagen", "/proc/mlaas-test/x", "--events", "10")
    usage_error(result, "/proc/mlaas-test/x", "cannot create")


# ------------------------------------------------------------------- 3. inspect table


def test_inspect_table_says_multiplicity_is_from_a_sample(tmp_path: Path) -> None:
    n = inspect_mod.SAMPLE + 2_000
    counts = np.arange(n) % 3
    jagged = ak.unflatten(np.ones(int(counts.sum())), counts)
    path = write_ttrees(tmp_path / "big.root", {"t": {"Jet_pt": jagged}})
    text = text_of(run("inspect", str(path)))
    assert f"multiplicity over the first {inspect_mod.SAMPLE:,} of {n:,} entries" in text


def test_inspect_table_has_no_sample_note_when_every_entry_was_read() -> None:
    text = text_of(run("inspect", HZZ))
    assert "multiplicity over the first" not in text


def test_inspect_table_shows_long_branch_names_whole(tmp_path: Path) -> None:
    stem = "HLT_" + "VeryLongTriggerPathName_" * 4
    names = [f"{stem}v{i}" for i in (1, 2)]
    path = write_ttrees(tmp_path / "long.root",
                        {"t": {name: np.arange(3, dtype=np.int32) for name in names}})
    result = run("inspect", str(path), env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    first = [line.split("│")[1].strip() for line in result.output.splitlines()
             if line.startswith("│")]
    joined = "".join(first)  # the name column, its folded lines put back together
    for name in names:
        assert name in joined, result.output


# ----------------------------------------------------------------------- 4. RNTuples


@pytest.fixture()
def rntuple_and_ttree(tmp_path: Path) -> Path:
    """RNTuple ``Events`` and TTree ``Empty`` in one file."""
    path = tmp_path / "mixed.root"
    with uproot.recreate(path) as f:
        f["Events"] = {"x": np.arange(5.0)}  # uproot 5.7 writes an RNTuple for a plain dict
        f.mktree("Empty", {"y": "f8"})
    classes = uproot.open(path).classnames()
    if classes.get("Events;1") not in ("ROOT::RNTuple", "ROOT::Experimental::RNTuple"):
        pytest.fail(f"uproot did not write an RNTuple: {classes}")
    return path


def test_inspect_lists_an_rntuple_as_such(rntuple_and_ttree: Path) -> None:
    result = run("inspect", str(rntuple_and_ttree))
    assert result.exit_code == 0, result.output
    text = text_of(result)
    assert "tree Empty" in text
    assert "Events is an RNTuple (ROOT::RNTuple), which mlaas does not read yet" in text
    info = json.loads(run("inspect", str(rntuple_and_ttree), "--json").stdout)
    assert list(info["rntuples"]) == ["Events"] and list(info["trees"]) == ["Empty"]


def test_inspect_tree_naming_an_rntuple_says_so(rntuple_and_ttree: Path) -> None:
    with pytest.raises(TreeNotFound) as info:
        inspect_file(str(rntuple_and_ttree), "Events")
    text = str(info.value)
    assert "'Events' is an RNTuple (ROOT::RNTuple), which mlaas does not read yet" in text
    assert "trees here: Empty" in text
    assert f"in file {rntuple_and_ttree}" in text


def test_a_spec_naming_an_rntuple_as_its_tree_says_so(rntuple_and_ttree: Path) -> None:
    from mlaas.data import RootDataset

    spec = {"data": {"tree": "Events", "sources": [{"files": [str(rntuple_and_ttree)],
                                                    "label": 1}], "features": ["x"]}}
    with pytest.raises(TreeNotFound) as info:
        RootDataset(spec, split="all")
    text = str(info.value)
    assert "'Events' is an RNTuple, which mlaas does not read yet" in text
    assert "trees here: Empty" in text and f"in file {rntuple_and_ttree}" in text


def test_a_file_with_only_an_rntuple_says_mlaas_does_not_read_it(tmp_path: Path) -> None:
    path = tmp_path / "rntuple.root"
    with uproot.recreate(path) as f:
        f["Events"] = {"x": np.arange(5.0)}
    with pytest.raises(TreeNotFound) as info:
        inspect_file(str(path))
    assert "Events (ROOT::RNTuple)" in str(info.value)
    assert "mlaas does not read RNTuples yet" in str(info.value)


# ----------------------------------------------------------- 5. files that are not ROOT


@pytest.mark.parametrize("content", [b"hello\n", b"x" * 100, b"root:x:0:0:root:/root:/bin/sh\n"],
                         ids=["short text", "100 bytes", "passwd-like"])
def test_a_short_text_file_is_called_not_a_root_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(SourceError) as info:
        inspect_file(str(path))
    text = str(info.value)
    assert "it is not a ROOT file" in text, text
    assert "expected Chunk" not in text and "truncated" not in text
    assert f"in file {path}" in text


def test_an_empty_file_is_called_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.root"
    path.write_bytes(b"")
    with pytest.raises(SourceError) as info:
        inspect_file(str(path))
    assert "the file is empty" in str(info.value) and "truncated" not in str(info.value)


def test_etc_passwd_is_called_not_a_root_file() -> None:
    if not os.access("/etc/passwd", os.R_OK):
        pytest.skip("no readable /etc/passwd here")
    with pytest.raises(SourceError) as info:
        inspect_file("/etc/passwd")
    assert "it is not a ROOT file" in str(info.value)


def test_a_real_root_file_cut_short_is_still_called_truncated(tmp_path: Path) -> None:
    path = tmp_path / "head.root"
    path.write_bytes(Path(HZZ).read_bytes()[:200])
    with pytest.raises(SourceError) as info:
        inspect_file(str(path))
    text = str(info.value)
    assert "not a readable ROOT file (truncated?)" in text and "not a ROOT file" not in text
