"""An epoch's first chunks are read head first: their first cluster, then the rest.

The head of a chunk is its first cluster (entries up to the first point where
every branch read starts a new basket), so reading it apart inflates no
basket twice. These tests use files whose baskets hold 200 events and a step
of ~800 events, so every chunk has a head, and check what must hold: the
heads are read first, every event comes exactly once with the same values
as ``columns()``, the threaded epoch equals the serial one batch for batch,
and leaving an epoch early stops its threads.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from mlaas.data import RootDataset, chunks, loader, synth
from mlaas.data.transform import Columns

BASKET = 200


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heads")
    synth.generate(out, 4000, seed=13, chunk_size=BASKET)
    return out


def spec(d: Path) -> dict:
    return {"data": {
        "sources": [{"files": [str(d / "signal.root")], "label": 1},
                    {"files": [str(d / "background.root")], "label": 0}],
        "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 4, "sort_by": "Jet_pt"},
                     {"branch": "Muon_eta", "max_len": 2}],
        "cut": "MET_pt > 15",
        "step_size": "30 kB",
    }}


def by_id(batches: list[dict]) -> Columns:
    cols = Columns.concat([Columns(**{k: np.asarray(v) for k, v in b.items()}) for b in batches])
    return cols.take(np.lexsort((cols.entry, cols.file)))


def test_chunks_know_their_first_cluster(pair: Path) -> None:
    ds = RootDataset(spec(pair), split="all")
    assert len(ds.chunks) > 4
    assert all(c.entries > BASKET and c.head == BASKET for c in ds.chunks if c.stop != 4000)


def test_the_first_group_is_read_head_first(pair: Path, monkeypatch) -> None:
    ds = RootDataset(spec(pair), split="all", batch_size=64, seed=5)
    reads: list[tuple[int, int, int]] = []
    lock = threading.Lock()
    real = chunks.read

    def read(pipeline, layout, chunk):  # type: ignore[no-untyped-def]
        with lock:
            reads.append((chunk.file_index, chunk.start, chunk.stop))
        return real(pipeline, layout, chunk)

    monkeypatch.setattr(chunks, "read", read)
    batches = list(ds.iter_epoch(0))
    assert sum(len(b["y"]) for b in batches) == ds.num_events
    first = ds._chunk_order(np.random.default_rng([ds.seed, 0]), ds.chunks)[:2]
    heads = {(c.file_index, c.start, c.start + c.head) for c in first}
    assert set(reads[:2]) == heads, reads[:4]  # both heads before any rest
    rests = {(c.file_index, c.start + c.head, c.stop) for c in first}
    assert rests <= set(reads[2:])
    # no entry is read twice: the head and the rest split on a basket boundary
    per_file: dict[int, list[tuple[int, int]]] = {}
    for f, a, b in reads:
        per_file.setdefault(f, []).append((a, b))
    for ranges in per_file.values():
        ranges.sort()
        assert all(ranges[i][1] <= ranges[i + 1][0] for i in range(len(ranges) - 1)), ranges


def test_every_event_once_with_the_values_of_columns(pair: Path, monkeypatch) -> None:
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)  # rests cut into pieces too
    ds = RootDataset(spec(pair), split="train", batch_size=50)
    want = ds.columns()
    want = want.take(np.lexsort((want.entry, want.file)))
    for epoch in range(2):  # the first epoch is read head first, the second not
        got = by_id(list(ds.iter_epoch(epoch)))
        for field in ("x", "y", "w", "mask", "file", "entry"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_threads_give_the_batches_of_the_serial_epoch(pair: Path, monkeypatch) -> None:
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    threaded = RootDataset(spec(pair), split="all", batch_size=64, seed=9)
    serial = RootDataset(spec(pair), split="all", batch_size=64, seed=9, prefetch=False)
    for epoch in range(2):
        a, b = list(threaded.iter_epoch(epoch)), list(serial.iter_epoch(epoch))
        assert len(a) == len(b) > 10
        for x, y in zip(a, b, strict=True):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])


def test_leaving_an_epoch_early_stops_its_threads(pair: Path, monkeypatch) -> None:
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    ds = RootDataset(spec(pair), split="all", batch_size=16)
    names = ("mlaas-batches", "mlaas-prefetch")
    before = {t for t in threading.enumerate() if t.name.startswith(names)}
    it = ds.iter_epoch(0)
    for _ in range(3):
        next(it)
    it.close()
    left = {t for t in threading.enumerate() if t.name.startswith(names)} - before
    assert not [t for t in left if t.is_alive()], left
    assert sum(len(b["y"]) for b in ds.iter_epoch(1)) == ds.num_events  # still usable
