"""`mlaas run --resume` when the data moved or changed since the run began.

A run directory moved together with its data (or restarted on another node
by the platform) must resume on the saved pass 1: the files are the same by
content. Files that did change must not be trained on with stale constants,
nor with new constants under a model that learnt the old ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mlaas.data import synth
from mlaas.train.run import run
from mlaas.train.trainer import TrainingError


def write_run_dir(root: Path, epochs: int = 1) -> Path:
    """A pipeline.yaml naming its data relatively (a glob for the signal), next to the data."""
    synth.generate(root / "data", 1500, seed=5)
    spec = {
        "name": "resume-data",
        "data": {
            "sources": [{"name": "signal", "files": ["data/sig*.root"], "label": 1},
                        {"name": "background", "files": ["data/background.root"], "label": 0}],
            "features": ["MET_pt", "PV_npvs", {"branch": "Jet_pt", "max_len": 3}],
        },
        "model": {"builtin": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "batch_size": 256},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def with_epochs(spec_path: Path, epochs: int) -> Path:
    spec = yaml.safe_load(spec_path.read_text())
    spec["train"]["epochs"] = epochs
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path


def add_signal_file(root: Path) -> Path:
    """Another signal file, picked up by the glob ``data/sig*.root``."""
    synth.generate(root / "more", 500, seed=9)
    extra = root / "data" / "signal2.root"
    shutil.copy(root / "more" / "signal.root", extra)
    return extra


def test_run_dir_moved_with_its_data_resumes_on_the_saved_pass_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first"
    run(write_run_dir(first), first / "out", progress=False)
    saved = (first / "out" / "stats.json").read_text()
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(first), str(moved))
    result = run(with_epochs(moved / "pipeline.yaml", 2), moved / "out", resume=True,
                 progress=False)
    assert result.epochs_run == 2 and result.stopped == "completed"
    history = json.loads((moved / "out" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 kept, not redone
    assert (moved / "out" / "stats.json").read_text() == saved  # pass 1 not redone
    assert "pass 1 again" not in capsys.readouterr().err


def test_a_new_file_after_the_first_checkpoint_refuses_the_resume(tmp_path: Path) -> None:
    spec = write_run_dir(tmp_path)
    run(spec, tmp_path / "out", progress=False)
    extra = add_signal_file(tmp_path)
    with pytest.raises(TrainingError) as info:
        run(with_epochs(spec, 2), tmp_path / "out", resume=True, progress=False)
    text = str(info.value)
    assert "the input files changed since the run began" in text
    assert f"file {extra} of source 'signal' is not among them" in text
    assert "run without --resume" in text
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(history) == 1  # nothing lost, nothing trained on the changed data


def test_a_file_written_anew_under_its_name_refuses_the_resume(tmp_path: Path) -> None:
    spec = write_run_dir(tmp_path)
    run(spec, tmp_path / "out", progress=False)
    synth.generate(tmp_path / "other", 1500, seed=6)
    shutil.copy(tmp_path / "other" / "background.root", tmp_path / "data" / "background.root")
    with pytest.raises(TrainingError) as info:
        run(with_epochs(spec, 2), tmp_path / "out", resume=True, progress=False)
    assert "a file of that name is, with other content" in str(info.value)


def test_a_new_file_before_any_checkpoint_runs_pass_1_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_run_dir(tmp_path)
    run(spec, tmp_path / "out", progress=False)
    (tmp_path / "out" / "checkpoint.pt").unlink()  # preempted before the first checkpoint
    extra = add_signal_file(tmp_path)
    result = run(spec, tmp_path / "out", resume=True, progress=False)
    assert result.stopped == "completed"
    assert f"file {extra} of source 'signal' is not among them: running pass 1 again" \
        in capsys.readouterr().err
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert str(extra) in stats["sources"][0]["files"]


def test_a_changed_spec_is_refused_before_pass_1_reads_anything(tmp_path: Path) -> None:
    # the trainer refuses it too, but only after pass 1: hours of reading on a large dataset
    spec = write_run_dir(tmp_path)
    run(spec, tmp_path / "out", progress=False)
    changed = yaml.safe_load(spec.read_text())
    changed["data"]["cut"] = "MET_pt > 10"
    spec.write_text(yaml.safe_dump(changed))
    phases: list[str] = []
    with pytest.raises(TrainingError, match=r"the spec changed since it was written \(data\.cut"):
        run(spec, tmp_path / "out", resume=True, progress=False,
            on_progress=lambda report: phases.append(report.get("phase", "")))
    assert phases == []  # not even pass 1 began


def test_a_stats_json_from_before_derived_kept_its_order_is_reused(tmp_path: Path) -> None:
    # its data_digest hashed derived as a sorted mapping; pass 1 is hours on real data
    from mlaas.spec import load

    spec = write_run_dir(tmp_path)
    with_derived = yaml.safe_load(spec.read_text())
    with_derived["data"]["derived"] = {"ht": "sum(Jet_pt)", "a": "MET_pt * 2"}
    spec.write_text(yaml.safe_dump(with_derived, sort_keys=False))
    run(spec, tmp_path / "out", progress=False)
    stats_path = tmp_path / "out" / "stats.json"
    saved = json.loads(stats_path.read_text())
    pipeline = load(spec)
    assert saved["data_digest"] == pipeline.data_digest() != pipeline.legacy_data_digest()
    saved["data_digest"] = pipeline.legacy_data_digest()  # as the code before wrote it
    stats_path.write_text(json.dumps(saved, indent=2) + "\n")
    before = stats_path.read_text()
    with_derived["train"]["epochs"] = 2
    spec.write_text(yaml.safe_dump(with_derived, sort_keys=False))  # derived kept in order
    result = run(spec, tmp_path / "out", resume=True, progress=False)
    assert result.epochs_run == 2
    assert stats_path.read_text() == before  # pass 1 not redone


def test_the_legacy_data_digest_is_the_old_formula() -> None:
    import hashlib

    from mlaas.spec import load

    pipeline = load({"data": {"sources": [{"files": ["a.root"], "label": 1}],
                              "features": ["x", {"branch": "Jet_pt", "max_len": 2}],
                              "derived": {"b": "Jet_pt * 2", "a": "x"}}})
    dumped = pipeline.data.model_dump(mode="json", exclude={"retries", "cache", "balance"})
    for f in dumped["features"]:
        if isinstance(f, dict):
            del f["collection"]  # the field came later
    old = hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()
    assert pipeline.legacy_data_digest() == old
