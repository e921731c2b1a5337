"""`mlaas run`, `mlaas predict` and `mlaas apply` end to end, as a user types them."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import uproot
import yaml
from rich.console import Console
from typer.testing import CliRunner

from mlaas import _progress
from mlaas.bundle import Bundle
from mlaas.cli import app
from mlaas.data import synth
from mlaas.train.trainer import load_checkpoint
from train_support import EXPORT_ONLY_FAILURE

runner = CliRunner()


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("run")
    synth.generate(d / "data", 3000, seed=11)
    spec = {
        "name": "cli-test",
        "data": {
            "sources": [{"name": "signal", "files": ["data/signal.root"], "label": 1},
                        {"name": "background", "files": ["data/background.root"], "label": 0}],
            "derived": {"HT": "sum(Jet_pt)"},
            "cut": "MET_pt > 5",
            "features": ["MET_pt", "HT", {"branch": "Jet_pt", "max_len": 4, "sort_by": "Jet_pt"}],
            "step_size": 2000,
        },
        "model": {"builtin": "deepsets", "phi": [16], "rho": [16]},
        "train": {"epochs": 2, "batch_size": 256},
    }
    path = d / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def spec_with_absolute_files(spec_file: Path) -> dict:
    """The fixture's spec as a dict, its data files named absolutely (to be written elsewhere)."""
    spec = yaml.safe_load(spec_file.read_text())
    for source in spec["data"]["sources"]:
        source["files"] = [str(spec_file.parent / f) for f in source["files"]]
    return spec


def predict_cli(bundle: Path, events: list[dict], tmp_path: Path) -> list:
    """``mlaas predict BUNDLE --input events.json``: the scores it prints."""
    (tmp_path / "events.json").write_text(json.dumps(events))
    result = runner.invoke(app, ["predict", str(bundle), "--input",
                                 str(tmp_path / "events.json")])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_run_predict_apply(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(spec_file), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and summary["stopped"] == "completed"
    assert 0.5 < summary["test"]["roc_auc"] <= 1.0
    for name in ("stats.json", "history.json", "metrics.json", "checkpoint.pt", "bundle.tar.gz",
                 "bundle/model.onnx", "bundle/spec.json", "bundle/provenance.json",
                 "plots/loss.png", "plots/roc.png", "plots/scores.png"):
        assert (out / name).exists(), name

    scores = predict_cli(out / "bundle.tar.gz",
                         [{"MET_pt": 50.0, "Jet_pt": [120.0, 40.0, 33.0]},
                          {"MET_pt": 1.0, "Jet_pt": []}],  # fails the cut
                         tmp_path)
    assert 0.0 <= scores[0] <= 1.0 and scores[1] is None

    signal_file = spec_file.parent / "data" / "signal.root"
    result = runner.invoke(app, ["apply", str(out / "bundle"), str(signal_file), "-o",
                                 str(tmp_path / "friends"), "--no-progress"])
    assert result.exit_code == 0, result.output
    friend = Path(result.stdout.strip().splitlines()[-1])
    got = uproot.open(friend)["Events"]["score"].array(library="np")
    assert len(got) == 3000
    arrays = uproot.open(signal_file)["Events"].arrays(["MET_pt", "Jet_pt"], entry_stop=50)
    want, passed = Bundle.load(out / "bundle").predict_arrays(
        {"MET_pt": arrays["MET_pt"], "Jet_pt": arrays["Jet_pt"]})
    np.testing.assert_allclose(got[:50], want[:, 0], rtol=1e-6)
    assert np.isnan(got[:50][~passed]).all()


def test_regression_run_exports_a_bundle_that_predicts(spec_file: Path, tmp_path: Path) -> None:
    spec = spec_with_absolute_files(spec_file)
    spec.update(task="regression", name="ht-regression")
    spec["data"]["label"] = "HT"  # GeV, hundreds: parity is relative here
    spec["model"] = {"builtin": "mlp", "hidden": [16]}
    spec["train"].update(epochs=2, lr=0.01)
    for source in spec["data"]["sources"]:
        del source["label"]
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(tmp_path / "reg.yaml"), "-o", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "regression" and metrics["test"]["rmse"] > 0
    bundle_spec = json.loads((out / "bundle" / "spec.json").read_text())
    parity = bundle_spec["parity"]
    assert parity["measure"] == "|onnx - torch| / max(1, |torch|)"
    assert parity["split"] == "test" and parity["events"] == metrics["test"]["n_events"]
    assert parity["max_abs_diff"] <= 1e-5
    assert bundle_spec["task"] == "regression" and bundle_spec["label_names"] == ["HT"]
    scores = predict_cli(out / "bundle", [{"MET_pt": 50.0, "Jet_pt": [120.0, 40.0, 33.0]},
                                          {"MET_pt": 30.0, "Jet_pt": [300.0, 250.0, 80.0, 60.0]},
                                          {"MET_pt": 1.0, "Jet_pt": []}],  # fails the cut
                         tmp_path)
    assert len(scores) == 3 and scores[2] is None
    assert all(isinstance(v, float) and np.isfinite(v) for v in scores[:2])
    assert scores[1] > scores[0]  # HT 690 against 193: a trained network knows which is larger


def test_progress_bars_show_epochs_events_per_second_and_loss(
        spec_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlaas.apply import apply_files
    from mlaas.train.run import run as run_pipeline

    # not a terminal (a log file, a platform job): rich prints each bar's final state
    stream = io.StringIO()
    monkeypatch.setattr(_progress, "err_console",
                        Console(file=stream, force_terminal=False, width=200))
    result = run_pipeline(spec_file, tmp_path / "out", progress=True)  # 2 epochs
    text = stream.getvalue()
    assert re.search(r"pass 1 .*100%.* [\d,]+ events .*[\d,]+ ev/s", text), text
    assert re.search(r"epoch 2/2 .*100%.* [\d,]+ ev/s  loss \d\.\d+", text), text
    assert re.search(r"epochs .*100%.* train \d\.\d+  val \d\.\d+  lr 0\.001", text), text

    stream.truncate(0)
    apply_files(result.bundle, [str(spec_file.parent / "data" / "signal.root")],
                tmp_path / "friends", progress=True)
    assert re.search(r"apply .*100%.* 3,000 events .*[\d,]+ ev/s", stream.getvalue()), \
        stream.getvalue()


def test_sigterm_exits_75_and_resume_finishes(spec_file: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load(spec_file.read_text())
    spec["train"]["epochs"] = 400  # long enough to be interrupted
    spec["data"]["sources"][0]["files"] = [str(spec_file.parent / "data" / "signal.root")]
    spec["data"]["sources"][1]["files"] = [str(spec_file.parent / "data" / "background.root")]
    long_spec = tmp_path / "long.yaml"
    long_spec.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mlaas.cli", "run", str(long_spec), "-o",
                             str(out), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first checkpoint means training is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Preempted" in err and "Traceback" not in err
    spec["train"]["epochs"] = 3
    long_spec.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["run", str(long_spec), "-o", str(out), "--resume",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert (out / "bundle" / "model.onnx").exists()


def test_sigterm_to_the_process_group_with_workers_checkpoints(spec_file: Path,
                                                               tmp_path: Path) -> None:
    # A batch system signals the whole process group: DataLoader workers get
    # SIGTERM too. They must ignore it, so the main process (which only sets a
    # flag) reaches the next batch boundary, checkpoints and exits 75.
    spec = spec_with_absolute_files(spec_file)
    spec["train"].update(epochs=400, num_workers=1)
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mlaas.cli", "run", str(path), "-o", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)  # the first checkpoint: epoch 1 is done, workers are running
        assert proc.poll() is None, proc.communicate()[1]
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, err
    assert "Preempted" in err and "--resume" in err and "Traceback" not in err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] >= 1 and len(ckpt["history"]) == ckpt["epoch"]


def test_a_model_that_cannot_be_exported_ends_run_with_one_error(spec_file: Path,
                                                                  tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(EXPORT_ONLY_FAILURE)
    spec = spec_with_absolute_files(spec_file)
    spec["model"] = {"file": "model.py"}
    spec["train"]["epochs"] = 1
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "mlaas.cli", "run",
                           str(tmp_path / "pipeline.yaml"), "-o", str(tmp_path / "out"),
                           "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("BundleError: cannot export user model 'model.py' to ONNX: "
                                  "torch.onnx.export raised NotImplementedError: no ONNX for "
                                  "this layer (line 12 of model.py:"), proc.stderr
    assert (tmp_path / "out" / "checkpoint.pt").exists()  # training itself went through
    assert not (tmp_path / "out" / "bundle").exists()


OUTSIDE_TRAINING_CHILD = """
import os, signal, sys, time
from mlaas import _stop
from mlaas.train.run import _preemptible

_stop.on_preempted(lambda reason: open(sys.argv[1], "w").write(reason))
with _preemptible():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs here
    except BaseException as exc:  # what careless library code (or importlib) does
        print("CAUGHT", type(exc).__name__, flush=True)
    finally:
        print("FINALLY", flush=True)
print("AFTER", flush=True)
"""


def test_sigterm_outside_training_ends_the_process_without_raising(tmp_path: Path) -> None:
    # Outside training nothing is checkpointed, and a SIGTERM there once raised
    # an exception wherever the main thread was: inside importlib it left the
    # import lock held and the job hung until SIGKILL. Now nothing is raised
    # (no except or finally block sees it); the process ends with 75 at once.
    said = tmp_path / "hook.txt"
    proc = subprocess.run([sys.executable, "-c", OUTSIDE_TRAINING_CHILD, str(said)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr
    assert proc.stdout == "", "no except, finally or later line ran"
    assert "Preempted: received SIGTERM outside training; nothing to checkpoint" in proc.stderr
    assert said.read_text() == "received SIGTERM outside training; nothing to checkpoint"
