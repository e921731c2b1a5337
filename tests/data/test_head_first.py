"""An epoch's first chunks are read head first: their first cluster, then the rest.

The head of a chunk is its first cluster (entries up to the first point where
every branch read starts a new basket), so reading it apart inflates no
basket twice. These tests use files whose baskets hold 200 events and a step
of ~800 events, so every chunk has a head, and check what must hold: the
heads are read first, every event comes exactly once with the same values
as ``columns()``, the threaded epoch equals the serial one batch for batch,
and leaving an epoch early stops its threads. With a memory or disk cache,
shuffled or not, the head-first epoch (which fills the cache) and the next
(which reads it) yield exactly the events and values an independent
uproot/awkward computation selects, each once, and the splits partition them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

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
        "step_size": "120 kB",
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
    reads = recorded_reads(monkeypatch)
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
    """Reader threads, the padding's second thread (every other row tile of a piece) and
    its gathering of every other batch change nothing: the same batches, bit for bit,
    in the same order as one thread doing everything."""
    from mlaas.data import kernels, transform

    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    monkeypatch.setattr(kernels, "TILE_ROWS", 16)  # many tiles per piece
    helped = []
    features = transform.Transform._features

    def recording(self, env, chunk, keep, index, out, fill=None):  # type: ignore[no-untyped-def]
        helped.append(fill is not None and len(index) > kernels.TILE_ROWS)
        return features(self, env, chunk, keep, index, out, fill)

    monkeypatch.setattr(transform.Transform, "_features", recording)
    threaded = RootDataset(spec(pair), split="all", batch_size=64, seed=9)
    serial = RootDataset(spec(pair), split="all", batch_size=64, seed=9, prefetch=False)
    for epoch in range(2):
        helped.clear()
        a = list(threaded.iter_epoch(epoch))
        assert sum(helped) > 10  # pieces of several tiles, padded by two threads
        helped.clear()
        b = list(serial.iter_epoch(epoch))
        assert helped and not any(helped)
        assert len(a) == len(b) > 10
        for x, y in zip(a, b, strict=True):
            for key in x:
                assert x[key].dtype == y[key].dtype
                np.testing.assert_array_equal(x[key], y[key])


def test_leaving_an_epoch_early_stops_its_threads(pair: Path, monkeypatch) -> None:
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    ds = RootDataset(spec(pair), split="all", batch_size=16)
    names = ("mlaas-batches", "mlaas-prefetch", "mlaas-fill")
    before = {t for t in threading.enumerate() if t.name.startswith(names)}
    it = ds.iter_epoch(0)
    for _ in range(3):
        next(it)
    it.close()
    left = {t for t in threading.enumerate() if t.name.startswith(names)} - before
    assert not [t for t in left if t.is_alive()], left
    assert sum(len(b["y"]) for b in ds.iter_epoch(1)) == ds.num_events  # still usable


# --------------------------------------------- head first with a cache, and unshuffled

CACHES = ["none", "memory", "disk"]


def reference(d: Path) -> Columns:
    """The selected events of both files from uproot and awkward alone, in (file, entry) order.

    The spec's cut, Jet_pt sorted (descending) and padded to 4, Muon_eta
    padded to 2, each standardised with the moments of every selected
    element (jagged branches pooled before truncation), the source's label.
    """
    parts, keeps = [], []
    for name in ("signal.root", "background.root"):
        a = uproot.open(d / name)["Events"].arrays(["MET_pt", "Jet_pt", "Muon_eta"])
        keep = ak.to_numpy(a.MET_pt > 15)
        parts.append(a[keep])
        keeps.append(np.flatnonzero(keep))
    s = ak.concatenate(parts)

    def slots(arr: ak.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
        pooled = ak.to_numpy(ak.flatten(arr)).astype(np.float64)
        values = ak.to_numpy(ak.fill_none(ak.pad_none(arr, width, clip=True), 0.0))
        mask = ak.to_numpy(ak.fill_none(ak.pad_none(ak.ones_like(arr), width, clip=True), 0))
        return (values.astype(np.float64) - pooled.mean()) / pooled.std(), mask

    met = ak.to_numpy(s.MET_pt).astype(np.float64)
    jets, jet_mask = slots(s.Jet_pt[ak.argsort(s.Jet_pt, axis=1, ascending=False,
                                               stable=True)], 4)
    muons, muon_mask = slots(s.Muon_eta, 2)
    sizes = [len(k) for k in keeps]
    return Columns(
        x=np.column_stack([(met - met.mean()) / met.std(), jets, muons]).astype(np.float32),
        y=np.repeat([1.0, 0.0], sizes).astype(np.float32), w=np.ones(sum(sizes), np.float32),
        mask=np.column_stack([jet_mask, muon_mask]).astype(np.float32),
        file=np.repeat([0, 1], sizes).astype(np.int32), entry=np.concatenate(keeps))


def cached_spec(d: Path, cache: str, directory: Path) -> dict:
    out = spec(d)
    out["data"]["cache"] = {"disk": str(directory)} if cache == "disk" else cache
    return out


def recorded_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every range read from a file, in the order the reads start (the real reads run)."""
    reads: list[tuple[int, int, int]] = []
    lock = threading.Lock()
    real = chunks.read

    def read(pipeline, layout, chunk, trees=None):  # type: ignore[no-untyped-def]
        with lock:
            reads.append((chunk.file_index, chunk.start, chunk.stop))
        return real(pipeline, layout, chunk, trees)

    monkeypatch.setattr(chunks, "read", read)
    return reads


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "unshuffled"])
@pytest.mark.parametrize("cache", CACHES)
def test_head_first_epochs_with_a_cache_yield_the_awkward_events_once(
        pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str,
        shuffle: bool) -> None:
    """The first epoch (head first, filling the cache) and the second (reading it back)."""
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)  # rests cut into pieces too
    ds = RootDataset(cached_spec(pair, cache, tmp_path / "cache"), split="all", batch_size=50,
                     shuffle=shuffle, seed=3)
    want = reference(pair)
    reads = recorded_reads(monkeypatch)
    for epoch in range(2):
        batches = list(ds.iter_epoch(epoch))
        got = by_id(batches)
        assert len(got) == len(want) == ds.num_events  # each event once, none left out
        for field in ("y", "w", "mask", "file", "entry"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        np.testing.assert_allclose(got.x, want.x, rtol=2e-5, atol=2e-5)
        if not shuffle:  # chunk after chunk, each in entry order
            ids = np.concatenate([b["file"].astype(np.int64) * 10**6 + b["entry"]
                                  for b in batches])
            for f in (0, 1):
                assert np.all(np.diff(ids[ids // 10**6 == f]) > 0)
        if epoch == 0:
            first = ds._chunk_order(np.random.default_rng([ds.seed, 0]), ds.chunks)[0]
            assert loader._has_head(first)
            assert reads[0] == (first.file_index, first.start, first.start + first.head)
            read_in_first = len(reads)
    if cache != "none":
        assert len(reads) == read_in_first  # the second epoch came from the cache
    if cache == "disk":
        assert len(list((tmp_path / "cache").glob("*/*/complete"))) == len(ds.chunks)


@pytest.mark.parametrize("cache", CACHES)
def test_head_first_splits_with_a_cache_are_the_awkward_selection_once(
        pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str) -> None:
    """Each split, unshuffled and cached, head first: disjoint, each event once, all of them."""
    monkeypatch.setattr(loader, "PIECE_ROWS", 300)
    want = reference(pair)
    seen: dict[str, set[tuple[int, int]]] = {}
    for split in ("train", "validation", "test"):
        ds = RootDataset(cached_spec(pair, cache, tmp_path / "cache"), split=split,
                         batch_size=50, shuffle=False)
        for epoch in range(2):
            got = by_id(list(ds.iter_epoch(epoch)))
            ids = list(zip(got.file.tolist(), got.entry.tolist(), strict=True))
            assert len(ids) == len(set(ids)) == ds.num_events > 0
            if epoch == 0:
                seen[split] = set(ids)
            assert set(ids) == seen[split]
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"] and not seen["validation"] & seen["test"]
    union = seen["train"] | seen["validation"] | seen["test"]
    assert union == set(zip(want.file.tolist(), want.entry.tolist(), strict=True))


def test_a_failed_head_read_does_not_wait_for_the_rests_being_read(pair: Path,
                                                                    monkeypatch) -> None:
    # Heads are handed on as futures and fail in the batch thread, outside the reads'
    # generator: that failure must fail the reads' pass (no waiting for the rests, which
    # a stalled server would hold for a whole attempt), not look like leaving early.
    real = chunks.read
    release, finished, calls, lock = threading.Event(), threading.Event(), [], threading.Lock()

    def read(pipeline, layout, chunk, trees=None):  # type: ignore[no-untyped-def]
        with lock:
            calls.append(chunk)
            first = len(calls) == 1
        if first:  # the first head: fails once the other reader is inside its read
            release.wait(0.3)
            raise chunks.sources.SourceError("cannot read: server stalled",
                                              file_path=chunk.url)
        if chunk.start % BASKET == 0 and chunk.stop - chunk.start == BASKET:
            return real(pipeline, layout, chunk, trees)  # other heads are fine
        release.wait(30)  # a rest: as on a server that stopped answering
        finished.set()
        return real(pipeline, layout, chunk, trees)

    ds = RootDataset(spec(pair), split="all", batch_size=64)  # pass 1 reads as usual
    monkeypatch.setattr(chunks, "read", read)
    try:
        with pytest.raises(chunks.sources.SourceError, match="server stalled"):
            for _ in ds.iter_epoch(0):
                pass
        assert not finished.is_set()  # the error came while rests were still being read
    finally:
        release.set()
