"""DataLoader workers across epochs: fixed chunk sets per worker, persistent loaders in training.

A worker keeps a memory cache and open disk-cache maps only for the chunks it
reads; those must be the same chunks every epoch, and the trainer's
persistent loaders must give each epoch (and validation) the shuffle that a
fresh loader per epoch would.
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

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


def ids_of(batches: list[dict[str, Any]]) -> np.ndarray:
    """Each event as ``file * 1e9 + entry``, in the order the batches came."""
    return np.concatenate([np.asarray(b["file"], dtype=np.int64) * 10**9
                           + np.asarray(b["entry"]) for b in batches])


def epoch_in_loader_order(ds: RootDataset, epoch: int, workers: int) -> np.ndarray:
    """Epoch ``epoch`` as a DataLoader delivers it: one batch of each worker in turn."""
    per_worker = [list(ds.iter_epoch(epoch, w, workers)) for w in range(workers)]
    turns = [b for group in zip_longest(*per_worker) for b in group if b is not None]
    return ids_of(turns)


@pytest.mark.parametrize("persistent", [False, True], ids=["fresh", "persistent"])
def test_issue2_every_pass_over_a_dataloader_with_workers_reshuffles(pair: Path,
                                                                     persistent: bool) -> None:
    ds = RootDataset(spec(pair), split="train", batch_size=200, seed=3)
    torch_ds = ds.torch()
    loader = DataLoader(torch_ds, batch_size=None, num_workers=2,
                        persistent_workers=persistent)
    passes = [ids_of(list(loader)) for _ in range(3)]
    assert not np.array_equal(passes[0], passes[1])
    assert not np.array_equal(passes[1], passes[2])
    for ids in passes:  # each pass: every event of the split once (balance: equal aside)
        assert len(np.unique(ids)) == len(ids)
    for k, ids in enumerate(passes):  # pass k is epoch k, as without workers
        np.testing.assert_array_equal(ids, epoch_in_loader_order(ds, k, 2))


def test_issue2_dataloader_passes_are_permutations_of_the_same_events(pair: Path) -> None:
    p = spec(pair)
    p["data"]["balance"] = "proportional"  # every event every epoch
    ds = RootDataset(p, split="train", batch_size=200, seed=3)
    loader = DataLoader(ds.torch(), batch_size=None, num_workers=2)
    first, second = ids_of(list(loader)), ids_of(list(loader))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.sort(first), np.sort(second))
    assert len(np.unique(first)) == len(first) == ds.num_events


def test_issue2_set_epoch_chooses_the_next_pass(pair: Path) -> None:
    ds = RootDataset(spec(pair), split="train", batch_size=200, seed=3)
    torch_ds = ds.torch()
    loader = DataLoader(torch_ds, batch_size=None, num_workers=2)
    first, _ = ids_of(list(loader)), list(loader)
    torch_ds.set_epoch(0)
    np.testing.assert_array_equal(ids_of(list(loader)), first)
    torch_ds.set_epoch(5)
    np.testing.assert_array_equal(ids_of(list(loader)), epoch_in_loader_order(ds, 5, 2))
    np.testing.assert_array_equal(ids_of(list(loader)), epoch_in_loader_order(ds, 6, 2))
    in_main = DataLoader(torch_ds, batch_size=None, num_workers=0)  # continues the count
    np.testing.assert_array_equal(ids_of(list(in_main)), ids_of(list(ds.iter_epoch(7))))


def test_issue2_validation_dataset_repeats_its_epoch(pair: Path) -> None:
    ds = RootDataset(spec(pair), split="validation", batch_size=200, seed=3)
    loader = DataLoader(ds.torch(advance=False), batch_size=None, num_workers=2)
    first, second = ids_of(list(loader)), ids_of(list(loader))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, epoch_in_loader_order(ds, 0, 2))



def test_set_epoch_reaches_persistent_workers(pair: Path) -> None:
    """Persistent workers are copies made at the first pass; set_epoch must still reach them.

    They used to keep their own epoch: after set_epoch(0) the 4th pass was epoch 3.
    """
    ds = RootDataset(spec(pair), split="train", batch_size=200, seed=3)
    torch_ds = ds.torch()
    loader = DataLoader(torch_ds, batch_size=None, num_workers=2, persistent_workers=True,
                        multiprocessing_context="fork")
    for k in range(3):
        np.testing.assert_array_equal(ids_of(list(loader)), epoch_in_loader_order(ds, k, 2))
    for e in (0, 6):  # an epoch before the current pass, one after it
        torch_ds.set_epoch(e)
        np.testing.assert_array_equal(ids_of(list(loader)), epoch_in_loader_order(ds, e, 2))
        np.testing.assert_array_equal(ids_of(list(loader)),
                                      epoch_in_loader_order(ds, e + 1, 2))
    torch_ds.set_epoch(9)  # the last of consecutive calls counts
    torch_ds.set_epoch(1)
    np.testing.assert_array_equal(ids_of(list(loader)), epoch_in_loader_order(ds, 1, 2))


def test_set_epoch_reaches_persistent_workers_that_do_not_advance(pair: Path) -> None:
    ds = RootDataset(spec(pair), split="validation", batch_size=200, seed=3)
    torch_ds = ds.torch(advance=False)
    loader = DataLoader(torch_ds, batch_size=None, num_workers=2, persistent_workers=True,
                        multiprocessing_context="fork")
    np.testing.assert_array_equal(ids_of(list(loader)), epoch_in_loader_order(ds, 0, 2))
    torch_ds.set_epoch(4)
    for _ in range(2):
        np.testing.assert_array_equal(ids_of(list(loader)), epoch_in_loader_order(ds, 4, 2))
