"""The training loop on small synthetic NanoAOD-like files: tasks, resume, SIGTERM, errors."""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from mlaas.data import RootDataset
from mlaas.data.synth import generate
from mlaas.spec import Pipeline, load
from mlaas.train import trainer
from mlaas.train.trainer import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    TrainingError,
    TrainResult,
    load_checkpoint,
    n_outputs,
    train,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    generate(d, 3000, seed=1)
    return d


def spec_for(d: Path, **changes: Any) -> dict[str, Any]:
    """The base spec, with overrides such as ``train__epochs=4`` (``__`` separates keys)."""
    spec: dict[str, Any] = {
        "data": {
            "sources": [{"files": [str(d / "signal.root")], "label": 1},
                        {"files": [str(d / "background.root")], "label": 0}],
            "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 4}],
            "step_size": 2000,
        },
        "model": {"builtin": "mlp", "hidden": [16]},
        "train": {"epochs": 2, "batch_size": 256},
    }
    for dotted, value in changes.items():
        node = spec
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


_CACHE: dict[str, tuple[Any, Any]] = {}


def datasets(spec: dict[str, Any]) -> tuple[Pipeline, RootDataset, RootDataset]:
    p = load(copy.deepcopy(spec))
    key = p.data_digest()
    if key not in _CACHE:  # pass 1 once per data spec
        first = RootDataset(p, "train", batch_size=p.train.batch_size, seed=p.train.seed)
        _CACHE[key] = (first.stats, (first.layout, first.files, first.chunks))
    stats, prepared = _CACHE[key]
    tr = RootDataset(p, "train", batch_size=p.train.batch_size, seed=p.train.seed,
                     stats=stats, prepared=prepared)
    va = RootDataset(p, "validation", batch_size=p.train.batch_size, shuffle=False,
                     seed=p.train.seed, stats=stats, prepared=prepared)
    return p, tr, va


def run(spec: dict[str, Any], out: Path, **kw: Any) -> TrainResult:
    p, tr, va = datasets(spec)
    return train(p, tr, va, out, progress=kw.pop("progress", False), **kw)


def user_model(tmp: Path, body: str) -> Path:
    path = tmp / "model.py"
    path.write_text(textwrap.dedent(body))
    return path


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6)
                                        for k in a)


# -- the three tasks -----------------------------------------------------------------------


def test_binary_trains_writes_history_and_checkpoint(synth: Path, tmp_path: Path) -> None:
    result = run(spec_for(synth), tmp_path, progress=True)
    assert result.stopped == "completed" and result.epochs_run == 2
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert set(h) == {"epoch", "train_loss", "val_loss", "lr", "seconds", "events",
                          "events_per_s"}
        assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
        assert h["events"] > 3000 and h["lr"] == pytest.approx(1e-3)
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_loss"] < math.log(2)  # better than guessing
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["stopped"] == "completed"
    assert ckpt["history"] == result.history
    best = min(result.history, key=lambda h: h["val_loss"])["epoch"]
    assert result.best_epoch == best
    assert same_weights(result.model.state_dict(), ckpt["best_state"])
    assert result.input_layout.n_features == 5
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_multiclass_from_label_expression(synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth, data__label="minimum(nJet, 5) // 2", task="multiclass")
    for s in spec["data"]["sources"]:
        del s["label"]
    p, tr, va = datasets(spec)
    assert n_outputs(p, tr.stats) == 3
    result = train(p, tr, va, tmp_path, progress=False)
    out = result.model(torch.zeros(7, 5), torch.ones(7, 4))
    assert out.shape == (7, 3)
    assert result.history[-1]["val_loss"] < math.log(3)


def test_regression(synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth, data__label="sum(Jet_pt) / 100", task="regression")
    for s in spec["data"]["sources"]:
        del s["label"]
    p, tr, va = datasets(spec)
    assert n_outputs(p, tr.stats) == 1
    result = train(p, tr, va, tmp_path, progress=False)
    assert result.stopped == "completed"
    assert result.history[1]["val_loss"] < result.history[0]["val_loss"]


def test_deepsets_trains(synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth, model={"builtin": "deepsets", "phi": [8], "rho": [8], "pool": "mean"},
                    train__lr_schedule="cosine", train__optimizer="adamw")
    result = run(spec, tmp_path)
    assert type(result.model).__name__ == "DeepSets"
    assert result.history[-1]["val_loss"] < math.log(2)
    assert result.history[1]["lr"] < result.history[0]["lr"]  # cosine


def test_class_weights_balanced(synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth, train__class_weights="balanced", train__optimizer="sgd",
                    train__lr_schedule="plateau")
    p, tr, va = datasets(spec)
    sources = tr.stats.sources
    n1, n0 = (s["splits"]["train"] for s in sources)  # signal (1), background (0)
    table = trainer._class_table(p, tr, 1)
    assert table is not None
    expected = [(n0 + n1) / (2 * n0), (n0 + n1) / (2 * n1)]
    assert table.tolist() == pytest.approx(expected)
    assert float(table[0] * n0 + table[1] * n1) == pytest.approx(n0 + n1)
    result = train(p, tr, va, tmp_path, progress=False)
    assert all(math.isfinite(h["val_loss"]) for h in result.history)


def test_class_weights_balanced_count_the_training_split_of_data_label(
        synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth, data__label="minimum(nJet, 5) // 2", task="multiclass",
                    data__cut="MET_pt > 10", train__class_weights="balanced",
                    data__split={"validation": 0.3, "test": 0.3, "seed": 3})
    for s in spec["data"]["sources"]:
        del s["label"]
    p, tr, va = datasets(spec)
    seen: dict[float, int] = {}
    for batch in tr.iter_epoch(0):  # what training sees, counted from its batches
        for v, n in zip(*np.unique(batch["y"], return_counts=True), strict=True):
            seen[float(v)] = seen.get(float(v), 0) + int(n)
    assert sorted(seen) == [0.0, 1.0, 2.0]
    # pass 1 counts the training split's labels as the batches carry them
    assert {float(k): v for k, v in tr.stats.label["train_counts"].items()} == seen
    total = sum(seen.values())
    want = [total / (3 * seen[c]) for c in (0.0, 1.0, 2.0)]
    table = trainer._class_table(p, tr, 3)
    assert table is not None and table.tolist() == pytest.approx(want, rel=1e-6)
    every_split = {float(k): v for k, v in tr.stats.label["counts"].items()}
    assert sum(every_split.values()) > total  # pass 1 counted all splits
    all_splits = [sum(every_split.values()) / (3 * every_split[c]) for c in (0.0, 1.0, 2.0)]
    assert table.tolist() != pytest.approx(all_splits, rel=1e-4)
    result = train(p, tr, va, tmp_path, progress=False)
    assert result.stopped == "completed"


def test_class_weights_need_classes(synth: Path) -> None:
    spec = spec_for(synth, data__label="MET_pt", task="regression",
                    train__class_weights="balanced")
    for s in spec["data"]["sources"]:
        del s["label"]
    p = load(spec)
    with pytest.raises(TrainingError, match="task regression has none"):
        trainer._class_table(p, SimpleNamespace(label={}, sources=[]), 1)


def test_loss_weight_zero_is_dropping_the_event() -> None:
    torch.manual_seed(0)
    out = torch.randn(8, 1, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    w = torch.tensor([2.0, 0.0, 2.0, 0.0, 2.0, 0.0, 2.0, 2.0])
    loss = trainer._Loss("binary", 1, None, "cpu")
    weighted = trainer._mean(*loss(out, y, w))
    (grad_weighted,) = torch.autograd.grad(weighted, out)
    kept = w > 0
    dropped = trainer._mean(*loss(out[kept], y[kept], torch.ones(int(kept.sum()))))
    (grad_dropped,) = torch.autograd.grad(dropped, out)
    assert weighted.item() == pytest.approx(dropped.item())
    assert torch.allclose(grad_weighted, grad_dropped)  # zero where w = 0
    unweighted = trainer._mean(*loss(out, y, torch.ones(8)))
    assert unweighted.item() != pytest.approx(weighted.item())


def test_event_weights_weight_the_validation_loss(synth: Path, tmp_path: Path) -> None:
    # weight 0 on events with MET_pt > 40: the validation loss is that of the others only
    spec = spec_for(synth, train__epochs=1, data__weight="where(MET_pt > 40, 0.0, 2.0)")
    p, tr, va = datasets(spec)
    result = train(p, tr, va, tmp_path, progress=False)
    model = result.model.eval()
    losses, weights = [], []
    with torch.no_grad():
        for batch in va.iter_epoch(0):
            logit = model(torch.from_numpy(batch["x"]), torch.from_numpy(batch["mask"]))[:, 0]
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(
                logit, torch.from_numpy(batch["y"]), reduction="none"))
            weights.append(torch.from_numpy(batch["w"]))
    per, w = torch.cat(losses).double(), torch.cat(weights).double()
    assert set(w.unique().tolist()) == {0.0, 2.0}
    kept = float(per[w > 0].mean())
    assert result.history[0]["val_loss"] == pytest.approx(kept, rel=1e-5)
    assert abs(float(per.mean()) - kept) > 1e-3  # ignoring the weights would show
    unweighted = run(spec_for(synth, train__epochs=1), tmp_path / "unweighted")
    assert not same_weights(unweighted.model.state_dict(), result.model.state_dict())


def test_label_checks() -> None:
    spec = {"data": {"sources": [{"files": ["x.root"]}], "label": "y", "features": ["a"]}}
    multi = load({**spec, "task": "multiclass"})
    binary = load(spec)
    stats = SimpleNamespace(label={"counts": {"0": 5, "2": 3}})
    with pytest.raises(TrainingError, match=r"0\.\.K-1.*labels 0, 2"):
        n_outputs(multi, stats)
    with pytest.raises(TrainingError, match="more than 64"):
        n_outputs(multi, SimpleNamespace(label={"mean": 1.0}))
    with pytest.raises(TrainingError, match=r"labels in \[0, 1\].*0, 2"):
        n_outputs(binary, stats)
    assert n_outputs(multi, SimpleNamespace(label={"counts": {"0": 1, "1": 1, "2": 4}})) == 3
    assert n_outputs(binary, SimpleNamespace(label={"counts": {"0": 1, "1": 1}})) == 1


# -- early stopping, max_time ---------------------------------------------------------------


def test_early_stopping_keeps_best(synth: Path, tmp_path: Path) -> None:
    # lr so small nothing moves: no epoch improves by min_delta after the first
    spec = spec_for(synth, train__epochs=10, train__lr=1e-12,
                    train__early_stopping={"patience": 2, "min_delta": 0.5})
    result = run(spec, tmp_path)
    assert result.stopped == "early_stopping"
    assert result.epochs_run == 3 and result.best_epoch == 1
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["stopped"] == "early_stopping" and ckpt["bad_epochs"] == 2
    # a stopped run is final: resuming trains nothing more
    again = run(spec, tmp_path, resume=True)
    assert again.stopped == "early_stopping" and again.epochs_run == 3


def test_max_time_checkpoints_and_stops(synth: Path, tmp_path: Path) -> None:
    result = run(spec_for(synth, train__max_time=1e-6), tmp_path)
    assert result.stopped == "max_time" and result.epochs_run == 0
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and ckpt["stopped"] is None
    done = run(spec_for(synth), tmp_path, resume=True)  # max_time is allowed to change
    assert done.stopped == "completed" and done.epochs_run == 2


# -- resume ----------------------------------------------------------------------------------


def test_resume_equals_uninterrupted(synth: Path, tmp_path: Path) -> None:
    extra = {"model__dropout": 0.2, "train__lr_schedule": "plateau"}  # RNG and scheduler state
    full = run(spec_for(synth, train__epochs=4, **extra), tmp_path / "full")
    half = run(spec_for(synth, train__epochs=2, **extra), tmp_path / "split")
    assert half.epochs_run == 2
    resumed = run(spec_for(synth, train__epochs=4, **extra), tmp_path / "split", resume=True)
    assert resumed.epochs_run == 4 and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    last_full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    last_split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert same_weights(last_full["model"], last_split["model"])
    for key in ("train_loss", "val_loss", "lr"):
        assert [h[key] for h in full.history] == pytest.approx([h[key] for h in resumed.history])


def test_issue3_cosine_resumed_with_more_epochs_keeps_learning(synth: Path,
                                                               tmp_path: Path) -> None:
    # torch's CosineAnnealingLR ended 2 epochs at lr 0 and, resumed with T_max = 4,
    # scaled that 0 recursively: epochs 3 and 4 trained at lr 0
    cosine = {"train__lr_schedule": "cosine", "train__lr": 0.01}
    first = run(spec_for(synth, train__epochs=2, **cosine), tmp_path)
    before = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    resumed = run(spec_for(synth, train__epochs=4, **cosine), tmp_path, resume=True)
    lrs = [h["lr"] for h in resumed.history]
    assert lrs[:2] == pytest.approx([h["lr"] for h in first.history])
    assert lrs == pytest.approx([0.01, 0.005, 0.005, 0.01 * (1 + math.cos(3 * math.pi / 4)) / 2])
    assert lrs[2] > 0 and lrs[3] > 0
    after = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert not same_weights(before, after)  # epochs 3 and 4 moved the weights


def test_cosine_lr_closed_form() -> None:
    assert trainer.cosine_lr(0.1, 0, 4) == pytest.approx(0.1)
    assert trainer.cosine_lr(0.1, 2, 4) == pytest.approx(0.05)
    assert trainer.cosine_lr(0.1, 4, 4) == pytest.approx(0.0, abs=1e-12)
    assert trainer.cosine_lr(0.1, 6, 4) == pytest.approx(0.0, abs=1e-12)  # never past the end


def test_cosine_interrupted_after_epoch_2_of_4_equals_uninterrupted(synth: Path,
                                                                    tmp_path: Path) -> None:
    spec = spec_for(synth, train__epochs=4, train__lr_schedule="cosine", train__lr=0.01)
    full = run(spec, tmp_path / "full")
    p, tr, va = datasets(spec)
    original = tr.iter_epoch
    epochs_started = []

    def sigterm_in_epoch_3(epoch: int, *args: Any, **kwargs: Any) -> Any:
        epochs_started.append(epoch)
        for i, batch in enumerate(original(epoch, *args, **kwargs)):
            if i == 2 and len(epochs_started) == 3:
                signal.raise_signal(signal.SIGTERM)
            yield batch

    tr.iter_epoch = sigterm_in_epoch_3  # type: ignore[method-assign]
    with pytest.raises(Preempted, match="after 2 completed epoch"):
        train(p, tr, va, tmp_path / "split", progress=False)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 2
    resumed = run(spec, tmp_path / "split", resume=True)
    assert resumed.epochs_run == 4
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in full.history])
    assert same_weights(load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"],
                        load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"])
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_checkpoint_every_2_of_3_epochs(synth: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[tuple[int, int]] = []  # (epoch in the file, epochs in its history)
    original = trainer._write_atomic

    def record(state: dict[str, Any], path: Path) -> None:
        original(state, path)
        on_disk = load_checkpoint(path)
        written.append((on_disk["epoch"], len(on_disk["history"])))

    monkeypatch.setattr(trainer, "_write_atomic", record)
    result = run(spec_for(synth, train__epochs=3, train__checkpoint_every=2), tmp_path)
    assert result.epochs_run == 3
    assert written == [(2, 2), (3, 3)]  # after epoch 2, then the final one (not after 1)


def test_resume_refuses_a_changed_spec(synth: Path, tmp_path: Path) -> None:
    run(spec_for(synth, train__epochs=1), tmp_path)
    with pytest.raises(TrainingError, match=r"spec changed.*train\.lr.*train\.epochs"):
        run(spec_for(synth, train__epochs=1, train__lr=0.01), tmp_path, resume=True)
    # without resume the old checkpoint is simply replaced
    run(spec_for(synth, train__epochs=1, train__lr=0.01), tmp_path)


@pytest.mark.filterwarnings("ignore:data.derived.MET_pt replaces the branch")
def test_resume_tells_derived_names_in_another_order_apart(synth: Path, tmp_path: Path) -> None:
    # a derived name may shadow a branch, so the order of data.derived is part of the spec
    derived = {"ratio": "MET_pt / 100", "MET_pt": "MET_pt * 2"}
    run(spec_for(synth, train__epochs=1, data__derived=derived), tmp_path)
    swapped = dict(reversed(list(derived.items())))
    with pytest.raises(TrainingError, match=r"spec changed.*data\.derived"):
        run(spec_for(synth, train__epochs=1, data__derived=swapped), tmp_path, resume=True)
    # a checkpoint from before the order was kept (its derived sorted as a mapping) and
    # before features had a collection field resumes
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path)
    spec = json.loads(state["spec"])
    spec["data"]["derived"] = dict(spec["data"]["derived"])
    assert any(isinstance(f, dict) for f in spec["data"]["features"])  # a jagged feature
    for f in spec["data"]["features"]:
        if isinstance(f, dict):
            f.pop("collection", None)
    state["spec"] = json.dumps(spec, sort_keys=True)
    torch.save(state, path)
    again = run(spec_for(synth, train__epochs=2, data__derived=derived), tmp_path, resume=True)
    assert again.epochs_run == 2 and [h["epoch"] for h in again.history] == [1, 2]


def test_resume_without_checkpoint_starts_afresh(synth: Path, tmp_path: Path) -> None:
    result = run(spec_for(synth, train__epochs=1), tmp_path, resume=True)
    assert result.epochs_run == 1


# -- errors -------------------------------------------------------------------------------------


def test_user_model_raising_in_forward(synth: Path, tmp_path: Path) -> None:
    path = user_model(tmp_path, """
        import torch

        class Bad(torch.nn.Module):
            def __init__(self, n):
                super().__init__()
                self.lin = torch.nn.Linear(n, 1)

            def forward(self, x):
                raise RuntimeError("kaboom")

        def build(n_features, spec):
            return Bad(n_features)
    """)
    with pytest.raises(TrainingError) as info:
        run(spec_for(synth, model={"file": str(path)}), tmp_path / "out")
    text = str(info.value)
    assert "model.py" in text and "RuntimeError: kaboom" in text
    assert "epoch 1, batch 1" in text and "raise RuntimeError" in text


def test_wrong_output_shape(synth: Path, tmp_path: Path) -> None:
    path = user_model(tmp_path, """
        import torch

        def build(n_features, spec):
            assert spec["n_outputs"] == 1 and spec["task"] == "binary"
            return torch.nn.Linear(n_features, 3)
    """)
    with pytest.raises(TrainingError, match=r"shape \[256, 3\], expected \[256, 1\]"):
        run(spec_for(synth, model={"file": str(path)}), tmp_path / "out")


def test_nan_loss(synth: Path, tmp_path: Path) -> None:
    path = user_model(tmp_path, """
        import torch

        class Nan(torch.nn.Module):
            def __init__(self, n):
                super().__init__()
                self.lin = torch.nn.Linear(n, 1)

            def forward(self, x, mask):
                return self.lin(x) * float("nan")

        def build(n_features, spec):
            return Nan(n_features)
    """)
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1, batch 1; lower train\.lr"):
        run(spec_for(synth, model={"file": str(path)}), tmp_path / "out")


def test_lr_far_too_high_is_reported(synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth, train__lr=1e30, train__optimizer="sgd", train__epochs=3)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at epoch \d+, batch \d+"):
        run(spec, tmp_path)


# -- SIGTERM ------------------------------------------------------------------------------------

CHILD = """
import json, sys, time
from mlaas.data import RootDataset
from mlaas.spec import load
from mlaas.train.trainer import Preempted, train

p = load(json.loads(open(sys.argv[1]).read()))
tr = RootDataset(p, "train", batch_size=p.train.batch_size, seed=p.train.seed)
va = RootDataset(p, "validation", batch_size=p.train.batch_size, shuffle=False,
                 seed=p.train.seed, stats=tr.stats)
original = tr.iter_epoch

def slow(*args, **kwargs):
    for batch in original(*args, **kwargs):
        print("BATCH", flush=True)
        time.sleep(0.05)
        yield batch

tr.iter_epoch = slow
try:
    train(p, tr, va, sys.argv[2], progress=False)
except Preempted as exc:
    print(exc, file=sys.stderr)
    sys.exit(exc.exit_code)
print("FINISHED", flush=True)
"""


def test_sigterm_checkpoints_and_resume_is_exact(synth: Path, tmp_path: Path) -> None:
    spec = spec_for(synth, train__epochs=3, model__dropout=0.1)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(spec_file), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "BATCH", child.stderr.read() if child.stderr else line
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == PREEMPTED_EXIT_CODE == 75, stderr
    assert "FINISHED" not in stdout and "--resume" in stderr
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 0  # interrupted in epoch 1: it is redone from its start

    resumed = run(spec, out, resume=True)
    assert resumed.stopped == "completed" and resumed.epochs_run == 3
    fresh = run(spec, tmp_path / "fresh")
    for a, b in zip(fresh.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_sigterm_in_process_raises_preempted(synth: Path, tmp_path: Path) -> None:
    p, tr, va = datasets(spec_for(synth, train__epochs=2))
    original = tr.iter_epoch
    previous = signal.getsignal(signal.SIGTERM)

    def once(*args: Any, **kwargs: Any) -> Any:
        for i, batch in enumerate(original(*args, **kwargs)):
            if i == 3 and tr.epoch_seen == 1:
                signal.raise_signal(signal.SIGTERM)
            yield batch
        tr.epoch_seen += 1

    tr.epoch_seen = 0  # type: ignore[attr-defined]
    tr.iter_epoch = once  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(Preempted, match="after 1 completed epoch") as info:
        train(p, tr, va, tmp_path, progress=False)
    assert info.value.exit_code == 75 and time.monotonic() - started < 30
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_worker_processes_give_the_same_model(synth: Path, tmp_path: Path) -> None:
    # one worker reads every chunk in the same order as the main process
    a = run(spec_for(synth, train__epochs=1), tmp_path / "a")
    b = run(spec_for(synth, train__epochs=1, train__num_workers=1), tmp_path / "b")
    for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(x, y)
