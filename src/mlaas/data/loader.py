"""``RootDataset``: a split of a pipeline's events as shuffled, class-mixed float32 batches.

Layer: data, the only module that batches and shuffles. It plans chunks
(``chunks``), runs pass 1 (``stats``) unless given its result, and per chunk
reads (``sources``) and preprocesses (``transform``); ``mixing`` plans which
pieces of which chunks fill each shuffle buffer. Memory is bounded by the step
size times the chunks in memory at once (each source's current one and the
``readers`` read ahead) plus the shuffle buffer, never by file size.

Exactness across workers: the chunk plan is the same in every process, and
worker k of K takes its share of each source's chunks (``chunks.shard``: the
same ones every epoch, so its caches stay useful), in an order shuffled per epoch; the
split of an event is a hash of (file name, entry, seed). So every selected
event of a split is yielded exactly once per epoch, whatever the worker count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mlaas import spec as spec_module
from mlaas.data import chunks as chunking
from mlaas.data import kernels, mixing
from mlaas.data import sources
from mlaas.data import stats as pass1
from mlaas.data.background import Backlog, in_background
from mlaas.data.cache import ChunkCache, MemoryCache, dataset_key, make_cache
from mlaas.data.layout import Layout, resolve_layout
from mlaas.data.transform import COLUMN_FIELDS, SPLITS, Chunk, Columns, Transform, uniform_hash
from mlaas.errors import SpecError
from mlaas.spec import Pipeline

__all__ = ["RootDataset", "prepare"]

Batch = dict[str, np.ndarray]

#: Events per piece of a chunk in the shuffle buffer (see ``RootDataset._plan``):
#: a buffer holds ``shuffle_chunks`` times this many events from all sources,
#: 54 MB per 131k at the benchmark's 416 bytes per event, whatever
#: ``data.step_size`` is.
PIECE_ROWS = 131_072
#: Batches gathered in one hand-over to the second thread (see ``RootDataset._flush``).
GATHER_RUN = 8
Prepared = tuple[Layout, list[chunking.FileInfo], list[chunking.ChunkRange]]


def prepare(pipeline: Pipeline) -> Prepared:
    """Resolve files, bind the spec to the first tree with entries and plan every chunk.

    With entries: the layout learns on a few of them what kinds of values
    expressions give (a derived list under ``features: all``, a jagged
    ``sort_by``); an empty first file taught it nothing, and pass 1 then
    failed with awkward's message. An empty file is opened and passed over;
    when all are empty, the first is used (and the plan says no source has
    events).
    """
    files = sources.resolve_files(pipeline)
    first = files[0]
    tree = sources.open_tree(first.url, pipeline.data.tree, pipeline.data.retries)
    for other in files[1:]:
        if tree.num_entries > 0:
            break
        tree.file.close()
        first = other
        tree = sources.open_tree(first.url, pipeline.data.tree, pipeline.data.retries)
    layout = resolve_layout(pipeline, tree, first.url)
    tree.file.close()
    infos, plan = chunking.plan(pipeline, layout, files)
    return layout, infos, plan


def _equal_shares(sizes: np.ndarray) -> np.ndarray:
    """Per group, the share of its events that leaves every group as large as the smallest."""
    smallest = sizes[sizes > 0].min() if (sizes > 0).any() else 0.0
    return np.where(sizes > 0, smallest / np.maximum(sizes, 1), 0.0)


class RootDataset:
    """Iterate one split of a pipeline as dicts of numpy arrays.

    Args:
        spec (path, dict or Pipeline): the pipeline spec (see ``mlaas.spec.load``).
        split (str): ``train``, ``validation``, ``test`` or ``all``.
        batch_size (int): events per batch (the last one may be smaller).
        shuffle (bool): shuffle chunk order and events within the buffer,
            differently each epoch.
        seed (int): seed of the shuffling (the split has its own, in the spec).
        stats (Stats, dict or path): the result of pass 1, to avoid running it
            again for each split.
        shuffle_chunks (int): the shuffle buffer's size in pieces of
            ``PIECE_ROWS`` events (taken from every source in proportion,
            see :mod:`mlaas.data.mixing`); default: the number of sources, at
            least 2.
        drop_last (bool): drop a final partial batch.
        prefetch (bool): read the next chunk in a background thread, and
            preprocess and batch in another (``False``: all on the caller's).
        readers (int): chunks read at once ahead of the one being preprocessed,
            each in its own thread (with ``prefetch``); each costs one chunk of
            memory.
        progress (callable): ``(events, bytes)`` per chunk read in pass 1.
        prepared (tuple): the result of :func:`prepare`, shared by the splits of
            one run so files are opened and planned once.

    Each batch has ``x`` float32 [B, n_features] (normalised), ``y`` float32 [B],
    ``w`` float32 [B], ``mask`` float32 [B, n_slots] (1 for a real jagged
    object, 0 for padding; columns in ``mask_names``), and ``file`` (index in
    ``files``) and ``entry`` int64, which identify each event.
    """

    def __init__(
        self,
        spec: str | os.PathLike[str] | dict[str, Any] | Pipeline,
        split: str = "train",
        batch_size: int = 1024,
        shuffle: bool = True,
        seed: int = 0,
        *,
        stats: pass1.Stats | dict[str, Any] | str | os.PathLike[str] | None = None,
        shuffle_chunks: int | None = None,
        drop_last: bool = False,
        prefetch: bool = True,
        readers: int = 2,
        progress: Callable[[int, int], None] | None = None,
        prepared: Prepared | None = None,
    ) -> None:
        if split not in (*SPLITS, "all"):
            raise SpecError(f"unknown split {split!r}; use train, validation, test or all")
        if batch_size < 1:
            raise SpecError(f"batch_size must be positive, not {batch_size}")
        self.pipeline = spec_module.load(spec)
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.prefetch = prefetch
        if readers < 1:
            raise SpecError(f"readers must be at least 1, not {readers}")
        self.readers = readers
        self.layout, self.files, self.chunks = prepared or prepare(self.pipeline)
        self.stats = self._stats(stats, progress)
        pass1.resolve_lengths(self.layout, self.stats)
        shift, scale = pass1.normalization(self.pipeline, self.layout, self.stats)
        self.transform = Transform(self.pipeline, self.layout, shift, scale)
        self.feature_names: list[str] = self.layout.column_names()
        self.mask_names: list[str] = self.layout.mask_names()
        n_sources = len(self.pipeline.data.sources)
        self.shuffle_chunks = shuffle_chunks or max(2, n_sources)
        self.epoch = 0
        self._keep_fraction = self._balance_fractions()
        self.cache: ChunkCache = self._cache(shift, scale)
        if self.layout.collections:
            kernels.warm_up()  # numba loads in a thread now, not on the first chunk
        # shuffle-buffer blocks kept between passes (see _ShuffleBuffer)
        self._spare: list[Columns] = []
        self._spare_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """For DataLoader workers started by spawn: spare buffers and locks stay behind."""
        state = self.__dict__.copy()
        state["_spare"], state["_spare_lock"] = [], None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._spare_lock = threading.Lock()

    # -- construction helpers -------------------------------------------------

    def _stats(self, given: Any, progress: Callable[[int, int], None] | None) -> pass1.Stats:
        if given is None:
            return pass1.compute(self.pipeline, self.layout, self.files, self.chunks, progress)
        if isinstance(given, pass1.Stats):
            stats = given
        elif isinstance(given, dict):
            stats = pass1.Stats.from_dict(given)
        else:
            stats = pass1.Stats.from_dict(json.loads(Path(given).read_text()))
        stats.check_fits(self.pipeline, self.layout, self.files)
        return stats

    def _balance_fractions(self) -> dict[float, float] | np.ndarray:
        """The fraction of events kept each epoch under ``balance: equal``: per class, so
        every class contributes about as many events as the smallest.

        With fixed labels a class is the sources of one label (one signal
        source against two background ones is 1:1, not 1:2; within a class,
        sources keep their proportions): an array per source. Under
        ``data.label`` a label value -> fraction mapping from pass 1's label
        counts (of the training split when this is it). A regression label
        (``task: regression``, or more than 64 values) has no classes:
        sources are balanced instead, and said so.
        """
        sources_ = self.pipeline.data.sources
        if self.pipeline.data.balance != "equal":
            return np.ones(len(sources_))
        key = self.split if self.split != "all" else None
        per_source = np.array([
            (s["splits"][key] if key else s["selected"]) for s in self.stats.sources
        ], dtype=np.float64)
        if self.pipeline.data.label is None:
            labels = [s.label for s in sources_]
            per_class = {lab: sum(n for n, other in zip(per_source, labels, strict=True)
                                  if other == lab) for lab in labels}
            sizes = np.array([per_class[lab] for lab in labels])
            return _equal_shares(sizes)
        counts = ((self.stats.label.get("train_counts") if self.split == "train" else None)
                  or self.stats.label.get("counts"))
        if not counts or self.pipeline.task == "regression":
            warnings.warn("balance: equal with a regression label (or one of more than 64 "
                          "values) has no classes to balance: sources are balanced instead",
                          UserWarning, stacklevel=3)
            return _equal_shares(per_source)
        values = [float(v) for v in counts]
        shares = _equal_shares(np.array([counts[v] for v in counts], dtype=np.float64))
        return dict(zip(values, shares.tolist(), strict=True))

    def _cache(self, shift: np.ndarray, scale: np.ndarray) -> ChunkCache:
        c = self.pipeline.data.cache
        key = dataset_key({
            "spec": self.pipeline.data_digest(), "split": self.split,
            "shift": shift.tolist(), "scale": scale.tolist(),
            "files": [f.identity for f in self.files],
        })
        width = len(self.feature_names) + len(self.mask_names) + 2  # x, mask, y, w (float32)
        needed = self.num_events * (4 * width + 12)  # + file int32 + entry int64
        return make_cache(c.kind, c.path, key, needed, c.max_bytes, self.pipeline.base_dir)

    # -- public API -------------------------------------------------------------

    @property
    def num_events(self) -> int:
        """Selected events in this split before any ``balance: equal`` subsampling."""
        if self.split == "all":
            return self.stats.selected
        return int(self.stats.splits[self.split])

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle is used next (as with DistributedSampler)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        return self.iter_epoch(epoch)

    def iter_epoch(self, epoch: int, worker: int = 0, num_workers: int = 1,
                   read_ahead: bool | None = None) -> Iterator[Batch]:
        """The batches of one epoch for worker ``worker`` of ``num_workers``.

        With ``prefetch``, a thread preprocesses and builds the batches (and
        ``readers`` more read ahead) while the caller uses the previous ones;
        it may run one shuffle buffer ahead, so the caller rarely waits.
        ``read_ahead=False`` keeps the batch thread but reads in it, with no
        reader threads (DataLoader workers, whose processes already are the
        parallelism).
        """
        if not self.prefetch:
            return self._epoch_batches(epoch, worker, num_workers, False)
        ahead = True if read_ahead is None else read_ahead
        backlog = Backlog()
        batches = self._epoch_batches(epoch, worker, num_workers, ahead, backlog)
        return in_background(batches, self._queue_depth(), "mlaas-batches", backlog)

    def _queue_depth(self) -> int:
        """Batches the background thread may hold: one shuffle buffer's worth."""
        return max(2, -(-self.shuffle_chunks * self._piece_rows() // self.batch_size))

    def _epoch_batches(self, epoch: int, worker: int, num_workers: int,
                       threads: bool = True, backlog: Backlog | None = None
                       ) -> Iterator[Batch]:
        """The epoch's batches: shuffle buffers are filled, then cut into batches.

        One thread does both. Filling in one thread and cutting in another,
        on two buffers in turn, made the loader alone 12-16% faster, but
        training slower: the third busy thread took more from torch's two
        (deepsets epochs 1.24-1.29 of in-memory against 1.16 serial) and the
        second buffer cost its first touch every first epoch.
        """
        rng = np.random.default_rng([self.seed, epoch])
        if num_workers > 1:
            # the same chunks for a worker every epoch (in a new order), so a worker's
            # memory cache and open disk-cache maps hold the chunks it will read again
            mine = self._chunk_order(rng, chunking.shard(self.chunks, worker, num_workers))
        else:
            mine = self._chunk_order(rng, self.chunks)
        buffer = self._shuffle_buffer()
        in_place = not isinstance(self.cache, MemoryCache)  # a memory cache keeps each chunk
        # A second thread for the compiled padding (see Transform._features) and the
        # batch gathers, used while the consumer waits for batches (backlog low): then
        # the batch thread is the critical path and the readers leave part of a core
        # free. A training step slower than the loader keeps the queue full, and the
        # cores go to torch (a third busy thread slowed its steps).
        pool = ThreadPoolExecutor(1, thread_name_prefix="mlaas-fill") if threads else None
        wanted = backlog.low if backlog is not None else (lambda: True)

        def fill() -> Executor | None:
            return pool if pool is not None and wanted() else None

        try:
            for cols, last in self._pieces(mine, buffer if in_place else None, threads, fill):
                buffer.add(self._balanced(cols, epoch))
                if last:
                    rest = yield from self._flush(buffer.filled(), rng, False, fill())
                    buffer.restart(rest)
            yield from self._flush(buffer.filled(), rng, True, fill())
        finally:
            if pool is not None:  # before the buffer is lent again: a take may still read it
                pool.shutdown(wait=True)
            buffer.give_back()

    def _shuffle_buffer(self) -> _ShuffleBuffer:
        # + the last buffer's rest, + one event per source that the plan's rounding may add
        rows = (self.shuffle_chunks * self._piece_rows() + self.batch_size
                + len(self.pipeline.data.sources))
        return _ShuffleBuffer(self._spare, self._spare_lock, rows, len(self.feature_names),
                              len(self.mask_names))

    def _piece_rows(self) -> int:
        """The most rows one piece of a chunk can have (see :meth:`_pieces`)."""
        return min(PIECE_ROWS, max((c.entries for c in self.chunks), default=0))

    def torch(self, advance: bool = True) -> Any:
        """A torch ``IterableDataset`` yielding batches of tensors (use ``batch_size=None``).

        ``advance=False``: every pass uses the same epoch (for a validation
        loader with ``persistent_workers=True``).
        """
        from mlaas.data.torch_dataset import TorchRootDataset

        return TorchRootDataset(self, advance)

    def columns(self) -> Columns:
        """The whole split in memory, unshuffled: for small data, evaluation and tests."""
        with sources.OpenTrees() as trees:
            parts = [self._balanced(self._columns(c, trees), 0)
                     for c in chunking.interleave(self.chunks)]
        return Columns.concat(parts) if parts else self.transform.empty()

    # -- internals ----------------------------------------------------------------

    def _chunk_order(self, rng: np.random.Generator,
                     chunks: list[chunking.ChunkRange]) -> list[chunking.ChunkRange]:
        if not self.shuffle:
            return chunking.interleave(chunks)
        by_source: dict[int, list[chunking.ChunkRange]] = {}
        for c in chunks:
            by_source.setdefault(c.source, []).append(c)
        shuffled = []
        for items in by_source.values():
            shuffled.extend(items[i] for i in rng.permutation(len(items)))
        return chunking.interleave(shuffled)

    def _plan(self, chunks: list[chunking.ChunkRange]) -> list[list[mixing.Piece]]:
        """The epoch's shuffle buffers as pieces of chunks (see :mod:`mlaas.data.mixing`).

        Shuffled, every buffer takes from every source in proportion, about
        ``shuffle_chunks`` pieces of ``PIECE_ROWS`` events in all, so its
        memory does not grow with ``data.step_size``. Unshuffled, pieces
        follow each other chunk by chunk, so an epoch is in the order of
        :meth:`columns` (evaluation and ``apply`` rely on it).
        """
        piece_rows = self._piece_rows()
        if not self.shuffle:
            return mixing.sequential(chunks, piece_rows)
        by_source: dict[int, list[chunking.ChunkRange]] = {}
        for c in chunks:
            by_source.setdefault(c.source, []).append(c)
        return mixing.mixed(list(by_source.values()), self.shuffle_chunks * piece_rows,
                            piece_rows)

    def _pieces(self, chunks: list[chunking.ChunkRange], outputs: _ShuffleBuffer | None,
                threads: bool, fill: Callable[[], Executor | None] = lambda: None
                ) -> Iterator[tuple[Columns, bool]]:
        """Each piece's columns, and whether it completes a shuffle buffer.

        Chunks are read in the order the plan first needs them; a chunk is
        let go after its last piece (a source's current chunk, one per
        source, plus the ``readers`` read ahead are in memory at once).
        """
        plan = self._plan(chunks)
        first = {p.chunk.name for p in plan[0]} if plan else set()
        fetched = self._fetched(mixing.first_use(plan), threads, first)
        held: dict[str, Columns | Chunk | _HeadFirst] = {}
        kept: dict[str, list[Columns]] = {}  # pieces of chunks being cached
        try:
            for buffer in plan:
                for k, piece in enumerate(buffer):
                    name = piece.chunk.name
                    if name not in held:
                        chunk, item = next(fetched)
                        assert chunk.name == name, (chunk.name, name)  # read in first-use order
                        held[name] = item
                    cols = self._piece_columns(piece, held[name], outputs, kept, fill)
                    if piece.last:
                        del held[name]
                    yield cols, k == len(buffer) - 1
        except Exception as exc:
            # a failure here (a head-first read, the transform) fails the reads' pass too,
            # so it does not wait for the other reads as a pass left early would
            with contextlib.suppress(BaseException):
                fetched.throw(exc)
            raise
        finally:
            fetched.close()

    def _piece_columns(self, piece: mixing.Piece, fetched: Columns | Chunk | _HeadFirst,
                       outputs: _ShuffleBuffer | None, kept: dict[str, list[Columns]],
                       fill: Callable[[], Executor | None]) -> Columns:
        """A piece from a cached chunk's columns, or transformed from the chunk's arrays."""
        chunk = piece.chunk
        if isinstance(fetched, Columns):  # cached: the rows of the piece's entries
            lo, hi = np.searchsorted(fetched.entry, [chunk.start + piece.start,
                                                     chunk.start + piece.stop])
            return fetched.take(slice(int(lo), int(hi)))
        cols = self._transform_piece(fetched, piece.start, piece.stop, outputs, fill())
        if self.cache.enabled:  # the buffer's rows are overwritten: keep a copy
            kept.setdefault(chunk.name, []).append(Columns.concat([cols]))
            if piece.last:
                self.cache.put(chunk.name, Columns.concat(kept.pop(chunk.name)))
        return cols

    def _transform_piece(self, chunk: Chunk | _HeadFirst, start: int, stop: int,
                         outputs: _ShuffleBuffer | None, fill: Executor | None = None
                         ) -> Columns:
        piece = chunk.piece(start, stop) if isinstance(chunk, _HeadFirst) else _slice(
            chunk, start, stop)
        return self.transform(piece, None if self.split == "all" else self.split,
                              outputs.lend if outputs is not None else None, fill=fill)

    def _fetched(self, chunks: list[chunking.ChunkRange], threads: bool = True,
                 first: set[str] | None = None,
                 ) -> Iterator[tuple[chunking.ChunkRange, Columns | Chunk | _HeadFirst]]:
        """Each chunk with its cached columns or raw arrays; ``readers`` chunks read ahead.

        Only reading runs in those threads: decompression releases the GIL, so
        it overlaps the preprocessing of the current chunk (on the batch
        thread, see :meth:`iter_epoch`, whose compiled padding releases it
        too). Two readers: one reader was the critical path of an epoch on
        two cores (the chunks' reads back to back, 1.47 s of a 1.63 s epoch of
        2M zlib events); two overlap each other's waits and the transform.
        Each chunk in flight costs one chunk's arrays of memory.

        The chunks named in ``first`` (those of the epoch's first buffer) are
        read head first: their first cluster (``ChunkRange.head``, where every
        branch starts a new basket),
        every head before any rest, so the epoch's first batches wait for one
        cluster of each chunk instead of whole chunks (two 400-500k-event
        chunks of the benchmark, half of its 2M events, took ~0.25 s before
        anything else could start). The split is on a basket boundary, so no
        basket is inflated twice; without one (``head == 0``) a chunk is read
        whole. (Head-first reads at arbitrary entries were tried before and
        removed: they inflated the border baskets twice.)
        """
        if not threads or len(chunks) < 2:
            with sources.OpenTrees() as trees:
                for chunk in chunks:
                    yield chunk, self._fetch(chunk, trees)
            return
        depth = min(self.readers, len(chunks))
        # leaving early or failing cancels the reads not begun (read_pool)
        with sources.OpenTrees() as trees, sources.read_pool(trees, depth,
                                                             "mlaas-prefetch") as pool:
            pending: deque[Future[Columns | Chunk] | _HeadFirst] = deque(
                self._start(pool, chunks[:depth], first or set(), trees))
            for i, chunk in enumerate(chunks):
                item = pending.popleft()
                if i + depth < len(chunks):
                    pending.append(pool.submit(self._fetch, chunks[i + depth], trees))
                yield chunk, (item if isinstance(item, _HeadFirst) else item.result())

    def _start(self, pool: ThreadPoolExecutor, ahead: list[chunking.ChunkRange],
               first: set[str], trees: sources.OpenTrees,
               ) -> list[Future[Columns | Chunk] | _HeadFirst]:
        """The first reads: heads of the first buffer's chunks, then their rests, then others."""
        split = {c.name for c in ahead
                 if c.name in first and _has_head(c) and self.cache.get(c.name) is None}
        heads = {c.name: pool.submit(self._read_rows, c, 0, c.head, trees)
                 for c in ahead if c.name in split}
        started: list[Future[Columns | Chunk] | _HeadFirst] = []
        for c in ahead:
            if c.name in heads:
                rest = pool.submit(self._read_rows, c, c.head, c.entries, trees)
                started.append(_HeadFirst(c.head, heads[c.name], rest))
            else:
                started.append(pool.submit(self._fetch, c, trees))
        return started

    def _read_rows(self, chunk: chunking.ChunkRange, start: int, stop: int,
                   trees: sources.OpenTrees) -> Chunk:
        """Entries ``[start, stop)`` of ``chunk`` (relative to its start), read from the file."""
        part = dataclasses.replace(chunk, start=chunk.start + start, stop=chunk.start + stop,
                                   head=0)
        return chunking.read(self.pipeline, self.layout, part, trees)

    def _fetch(self, chunk: chunking.ChunkRange,
               trees: sources.OpenTrees | None = None) -> Columns | Chunk:
        """The cached columns of ``chunk``, or its arrays read from the file."""
        cached = self.cache.get(chunk.name)
        if cached is not None:
            return cached
        return chunking.read(self.pipeline, self.layout, chunk, trees)

    def _finish(self, chunk: chunking.ChunkRange, fetched: Columns | Chunk,
                outputs: _ShuffleBuffer | None = None) -> Columns:
        if isinstance(fetched, Columns):
            return fetched
        cols = self.transform(fetched, None if self.split == "all" else self.split,
                              outputs.lend if outputs is not None else None)
        if self.cache.enabled:
            self.cache.put(chunk.name, cols)
        return cols

    def _columns(self, chunk: chunking.ChunkRange,
                 trees: sources.OpenTrees | None = None) -> Columns:
        return self._finish(chunk, self._fetch(chunk, trees))

    def _balanced(self, cols: Columns, epoch: int) -> Columns:
        """Under ``balance: equal``, keep a fresh random share of larger classes each epoch."""
        if self.pipeline.data.balance != "equal" or len(cols) == 0:
            return cols
        fraction = np.zeros(len(cols))
        if isinstance(self._keep_fraction, dict):  # by each event's label
            for value, share in self._keep_fraction.items():
                fraction[cols.y == np.float32(value)] = share
        keep = np.zeros(len(cols), dtype=bool)
        for file_index in np.unique(cols.file):
            rows = np.flatnonzero(cols.file == file_index)
            info = self.files[int(file_index)]
            if not isinstance(self._keep_fraction, dict):
                fraction[rows] = self._keep_fraction[info.ref.source]
            u = uniform_hash(info.ref.key, np.asarray(cols.entry[rows]), self.seed, 1 + epoch)
            keep[rows] = u < fraction[rows]
        return cols.take(np.flatnonzero(keep))

    def _flush(self, buf: Columns, rng: np.random.Generator, final: bool,
               fill: Executor | None = None) -> Iterator[Batch]:
        """Shuffle the buffer, yield full batches, return the rest (a copy) for the next one.

        With ``fill`` (the padding's second thread, idle meanwhile) every other run
        of ``GATHER_RUN`` batches is gathered there while this thread gathers the
        run before it: the gathers were a fifth of the batch thread's time, and
        they run without the GIL (``kernels.take_rows``, or ``np.take`` before
        numba is loaded). Runs, not single batches: handing one 0.1 ms gather
        to the other thread cost about as much in wake-ups as it saved.
        """
        n, b = len(buf), self.batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        full = n // b

        def batch(i: int) -> Batch:
            index = order[i * b:(i + 1) * b]
            taken = kernels.take_rows(buf.x, buf.mask, buf.y, buf.w, buf.file, buf.entry, index)
            if taken is None:
                return buf.take(index).as_dict()
            x, mask, y, w, file, entry = taken
            return {"x": x, "y": y, "w": w, "mask": mask, "file": file, "entry": entry}

        def batches(first: int) -> list[Batch]:
            return [batch(i) for i in range(first, min(full, first + GATHER_RUN))]

        step = 2 * GATHER_RUN if fill is not None else GATHER_RUN
        for i in range(0, full, step):
            theirs = (fill.submit(batches, i + GATHER_RUN)
                      if fill is not None and i + GATHER_RUN < full else None)
            yield from batches(i)
            if theirs is not None:
                yield from theirs.result()
        rest = buf.take(order[full * b:])
        if final and len(rest) and not self.drop_last:
            yield rest.as_dict()
        return rest


class _ShuffleBuffer:
    """One contiguous block that the chunks of a shuffle buffer are written into.

    The transform writes each chunk's ``x`` and ``mask`` straight into the
    next free rows (``lend``); ``y``, ``w`` and the ids, and chunks that come
    from a cache, are copied in (``add``). Batches are then gathered from one
    array per field with ``np.take``: 2.3x faster than gathering from several
    parts (0.06 against 0.14 s CPU per 600k events). The block is reused for
    every buffer of the pass and kept by the dataset for the next pass, so its
    pages are touched once: on this VM fresh chunk-sized arrays pay their page
    faults every time (a transform into reused memory took 0.105 s CPU per
    200k events against 0.12-0.33 s into fresh arrays).

    Memory: ``shuffle_chunks`` pieces plus one batch of rows of every field,
    kept while the dataset lives (one block per pass running at once).
    """

    def __init__(self, spare: list[Columns], lock: threading.Lock, rows: int,
                 n_features: int, n_mask: int) -> None:
        self.spare, self.lock = spare, lock
        self.shapes = {"x": (rows, n_features), "y": (rows,), "w": (rows,),
                       "mask": (rows, n_mask), "file": (rows,), "entry": (rows,)}
        self.block: Columns | None = None
        self.fill = 0
        self.lent: np.ndarray | None = None

    def _ensure(self) -> Columns:
        if self.block is None:
            with self.lock:
                while self.spare and self.block is None:
                    old = self.spare.pop()
                    if all(getattr(old, k).shape == v for k, v in self.shapes.items()):
                        self.block = old
            if self.block is None:
                dtypes = {"file": np.int32, "entry": np.int64}
                self.block = Columns(*(np.empty(self.shapes[k], dtype=dtypes.get(k, np.float32))
                                       for k in COLUMN_FIELDS))
        return self.block

    def lend(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``m`` free rows of ``x`` and ``mask``, for the transform to write into."""
        block = self._ensure()
        stop = self.fill + m
        if stop > len(block):
            raise AssertionError(f"shuffle buffer of {len(block)} rows overflows at {stop}")
        x, mask = block.x[self.fill:stop], block.mask[self.fill:stop]
        self.lent = x
        return x, mask

    def add(self, cols: Columns) -> None:
        """Append ``cols``; the rows lent for it are already written, the rest is copied."""
        block = self._ensure()
        m = len(cols)
        stop = self.fill + m
        if stop > len(block):
            raise AssertionError(f"shuffle buffer of {len(block)} rows overflows at {stop}")
        written = self.lent is not None and cols.x is self.lent
        for k in COLUMN_FIELDS:
            if written and k in ("x", "mask"):
                continue
            getattr(block, k)[self.fill:stop] = getattr(cols, k)
        self.fill, self.lent = stop, None

    def filled(self) -> Columns:
        """Views of the rows written so far."""
        if self.block is None:
            return Columns(*(np.empty((0, *self.shapes[k][1:]),
                                      dtype={"file": np.int32, "entry": np.int64}.get(k, np.float32))
                             for k in COLUMN_FIELDS))
        return self.block.take(slice(0, self.fill))

    def restart(self, rest: Columns) -> None:
        """Start the next buffer with ``rest`` (a copy, so overwriting the block is safe)."""
        self.fill, self.lent = 0, None
        if len(rest):
            self.add(rest)

    def give_back(self) -> None:
        """At the end of a pass the block goes back to the dataset for the next one."""
        if self.block is not None:
            with self.lock:
                self.spare.append(self.block)
            self.block = None


def _has_head(chunk: chunking.ChunkRange) -> bool:
    return 0 < chunk.head < chunk.entries


class _HeadFirst:
    """A chunk read as two ranges: its first cluster (``head`` entries), then the rest.

    Pieces come from whichever read holds them; a piece never straddles the
    border, because the plan cuts pieces at every chunk's head (``mixing``).
    """

    def __init__(self, head: int, first: Future[Columns | Chunk],
                 rest: Future[Columns | Chunk]) -> None:
        self.head = head
        self.futures = [first, rest]

    def piece(self, start: int, stop: int) -> Chunk:
        if stop <= self.head:
            part, offset = self.futures[0].result(), 0
        elif start >= self.head:
            part, offset = self.futures[1].result(), self.head
        else:
            raise AssertionError(f"piece {start}:{stop} straddles the head of {self.head} rows")
        assert isinstance(part, Chunk)
        return _slice(part, start - offset, stop - offset)


def _slice(chunk: Chunk, start: int, stop: int) -> Chunk:
    """Entries ``[start, stop)`` of a chunk (relative to it); awkward slices are views.

    The whole chunk is returned as it is.
    """
    n = len(next(iter(chunk.arrays.values()))) if chunk.arrays else 0
    if (start, stop) == (0, n):
        return chunk
    return Chunk(arrays={k: v[start:stop] for k, v in chunk.arrays.items()},
                 file_index=chunk.file_index, file_key=chunk.file_key, source=chunk.source,
                 entry_start=chunk.entry_start + start, url=chunk.url)

