"""DataLoader workers across epochs: fixed chunk sets per worker, persistent loaders in training.

A worker keeps a memory cache and open disk-cache maps only for the chunks it
reads; those must be the same chunks every epoch, and the trainer's
persistent loaders must give each epoch (and validation) the shuffle that a
fresh loader per epoch would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlaas.data import RootDataset, synth
from mlaas.spec import load
from mlaas.train.trainer import train


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("workers")
    synth.generate(out, 2500, seed=5)
    return out


def spec(d: Path, **train: Any) -> dict[str, Any]:
    return {
        "data": {
            "sources": [{"files": [str(d / "signal.root")], "label": 1},
                        {"files": [str(d / "background.root")], "label": 0}],
            "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 4}],
            "step_size": 500,
            "balance": "equal",  # the kept share changes with the epoch, in validation too
            "cache": "memory",
        },
        "model": {"builtin": "mlp", "hidden": [8]},
        "train": {"epochs": 3, "batch_size": 200, **train},
    }


def test_each_worker_reads_the_same_chunks_every_epoch(pair: Path) -> None:
    ds = RootDataset(spec(pair), split="train", batch_size=200)
    seen: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for epoch in (0, 1, 2):
        for worker in (0, 1):
            ids = set()
            for batch in ds.iter_epoch(epoch, worker, 2):
                ids.update(zip(batch["file"].tolist(), (batch["entry"] // 500).tolist()))
            seen[(epoch, worker)] = ids  # (file, chunk of 500 entries) pairs
    for worker in (0, 1):
        assert seen[(0, worker)] == seen[(1, worker)] == seen[(2, worker)]
    assert not seen[(0, 0)] & seen[(0, 1)]
    assert len(seen[(0, 0)] | seen[(0, 1)]) == len(ds.chunks)


def test_persistent_workers_train_the_same_model_as_no_workers(pair: Path,
                                                               tmp_path: Path) -> None:
    models = []
    for workers in (0, 1):
        p = load(spec(pair, num_workers=workers))
        tr = RootDataset(p, "train", batch_size=200, seed=p.train.seed)
        va = RootDataset(p, "validation", batch_size=200, shuffle=False, seed=p.train.seed,
                         stats=tr.stats)
        result = train(p, tr, va, tmp_path / f"w{workers}", progress=False)
        assert result.epochs_run == 3
        models.append(result)
    a, b = models
    for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(x, y)
    np.testing.assert_array_equal([h["val_loss"] for h in a.history],
                                  [h["val_loss"] for h in b.history])
    assert [h["events"] for h in a.history] == [h["events"] for h in b.history]
