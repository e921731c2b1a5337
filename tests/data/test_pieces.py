"""Chunks cut into pieces for the shuffle buffer, and chunks dealt to DataLoader workers.

The buffer holds piece j of every chunk of a group, not whole chunks, so its
memory does not grow with ``data.step_size``. These tests make pieces small
(``PIECE_ROWS`` patched to 300 events, chunks of 1500) so that every chunk
is cut, and check what must not change: every event exactly once, the same
values as without pieces, both classes in every buffer, caches, workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from mlaas.data import RootDataset, chunks, loader, synth
from mlaas.data.transform import Columns


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pieces")
    synth.generate(out, 5000, seed=11)
    return out


def spec(d: Path, **extra: object) -> dict:
    data = {
        "sources": [{"files": [str(d / "signal.root")], "label": 1},
                    {"files": [str(d / "background.root")], "label": 0}],
        "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 4, "sort_by": "Jet_pt"},
                     {"branch": "Muon_eta", "max_len": 2}],
        "cut": "MET_pt > 15",
        "step_size": 1500,
    }
    data.update(extra)
    return {"data": data}


def by_id(batches: list[dict]) -> Columns:
    cols = Columns.concat([Columns(**{k: np.asarray(v) for k, v in b.items()}) for b in batches])
    return cols.take(np.lexsort((cols.entry, cols.file)))


def test_pieces_give_the_same_events_and_values(pair: Path, monkeypatch) -> None:
    whole = by_id(list(RootDataset(spec(pair), split="train", batch_size=128)))
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    ds = RootDataset(spec(pair), split="train", batch_size=128)
    assert max(c.entries for c in ds.chunks) > 300  # every chunk is cut
    cut = by_id(list(ds))
    assert len(cut) == ds.num_events == len(np.unique(cut.file * 10**9 + cut.entry))
    for field in ("x", "y", "w", "mask", "file", "entry"):
        np.testing.assert_array_equal(getattr(cut, field), getattr(whole, field))


def test_every_buffer_mixes_both_sources(pair: Path, monkeypatch) -> None:
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    ds = RootDataset(spec(pair), split="all", batch_size=100, seed=3)
    assert ds._shuffle_buffer().shapes["x"][0] == 2 * 300 + 100 + 2  # pieces, + a batch, + sources
    batches = list(ds)
    # a buffer is ~2 x 300 events: every batch draws from both classes
    means = np.array([b["y"].mean() for b in batches[:-1]])
    assert (means > 0.1).all() and (means < 0.9).all()


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_cached_pieces_replay_the_first_epoch(pair: Path, tmp_path: Path, monkeypatch,
                                              kind: str) -> None:
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    cache = {"kind": "memory"} if kind == "memory" else {"disk": str(tmp_path / "c")}
    ds = RootDataset(spec(pair, cache=cache), split="train", batch_size=128)
    first, second = by_id(list(ds)), by_id(list(ds))
    for field in ("x", "y", "mask", "entry"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    if kind == "disk":  # one entry per chunk, written whole from its pieces
        assert len(list((tmp_path / "c").glob("*/*/complete"))) == len(ds.chunks)


def test_workers_with_pieces_yield_each_event_once(pair: Path, monkeypatch) -> None:
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    ds = RootDataset(spec(pair), split="train", batch_size=128)
    got = by_id([{k: v.numpy() for k, v in b.items()}
                 for b in DataLoader(ds.torch(), batch_size=None, num_workers=2)])
    want = by_id(list(ds.iter_epoch(0)))
    np.testing.assert_array_equal(got.file * 10**9 + got.entry, want.file * 10**9 + want.entry)
    np.testing.assert_array_equal(got.x, want.x)


def test_shard_gives_every_worker_every_source_and_even_events(pair: Path) -> None:
    ds = RootDataset(spec(pair), split="all")
    plan = ds.chunks
    shares = [chunks.shard(plan, k, 2) for k in (0, 1)]
    assert sorted(c.name for s in shares for c in s) == sorted(c.name for c in plan)
    for share in shares:
        assert {c.source for c in share} == {0, 1}  # both classes in each worker
    events = [sum(c.entries for c in s) for s in shares]
    assert abs(events[0] - events[1]) <= max(c.entries for c in plan)


def test_readers_must_be_positive(pair: Path) -> None:
    from mlaas.errors import SpecError

    with pytest.raises(SpecError, match="readers must be at least 1"):
        RootDataset(spec(pair), split="train", readers=0)


def test_unshuffled_epoch_is_in_the_order_of_columns(pair: Path, monkeypatch) -> None:
    """Evaluation and apply read an unshuffled epoch and expect the file order."""
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    ds = RootDataset(spec(pair), split="test", batch_size=64, shuffle=False)
    got = Columns.concat([Columns(**b) for b in ds.iter_epoch(0)])
    want = ds.columns()
    np.testing.assert_array_equal(got.file * 10**9 + got.entry, want.file * 10**9 + want.entry)
    np.testing.assert_array_equal(got.x, want.x)
