"""The reading plan: every input file cut into entry ranges of about ``step_size``.

Ranges end on cluster boundaries (where every branch read starts a basket)
when the step is a size in bytes, so no basket is read by two chunks.

Layer: data, between sources and interpretation. Planning every chunk up
front is what lets workers share an epoch exactly (worker k takes chunks
k, k+K, ...) and lets a cache name each chunk. Planning opens each file once
to learn its entries and the entries per step for the branches read.
"""

from __future__ import annotations

import bisect
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

from mlaas.data import sources
from mlaas.data.layout import Layout, branch_kinds
from mlaas.data.sources import FileRef
from mlaas.data.transform import Chunk
from mlaas.errors import BranchNotFound, DataError, close_names
from mlaas.spec import Pipeline

__all__ = ["ChunkRange", "FileInfo", "plan", "bounds", "read", "read_ahead", "interleave",
           "shard", "READS_PER_STEP"]

#: A ``step_size`` in bytes is the memory the loader's arrays in flight may take, so a
#: chunk is a quarter of it: the loader holds two chunks being preprocessed (one per
#: source in a shuffle buffer) and reads two ahead. Whole-step chunks held four steps:
#: a 4M-event pair peaked at 1.55x a 1M-event one (RSS from 2M events up was flat, but a
#: 1M pair had too few chunks to read ahead), quarter-step chunks 1.0x at half the
#: peak and the same speed (BENCHMARKS.md, "Data layer", session 14). An entry count
#: is taken as given: the user chose the chunk's length.
READS_PER_STEP = 4


@dataclass(frozen=True)
class FileInfo:
    """One input file as planned: its identity (for caches) and size."""

    index: int
    ref: FileRef
    entries: int
    compressed_bytes: int
    identity: dict


@dataclass(frozen=True)
class ChunkRange:
    """Entries ``[start, stop)`` of one file: the unit of reading, caching and sharding."""

    file_index: int
    url: str
    key: str
    source: int
    start: int
    stop: int
    compressed_bytes: int
    #: entries from ``start`` to the first cluster start inside the chunk (0: none
    #: known): a read of ``[start, start + head)`` inflates no basket of the rest
    head: int = 0

    @property
    def entries(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"{self.file_index}-{self.start}-{self.stop}"


def _check_schema(layout: Layout, tree: object, url: str) -> None:
    kinds = branch_kinds(tree)
    for name in layout.branches:
        if name not in kinds:
            near = close_names(name, kinds)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise BranchNotFound(f"no branch {name!r} in this file{hint}", file_path=url,
                                 tree=layout.tree, branch=name)


def plan(pipeline: Pipeline, layout: Layout, files: list[FileRef]) -> tuple[list[FileInfo], list[ChunkRange]]:
    """Open each file once; return file infos and chunk ranges, in file order."""
    data = pipeline.data
    infos: list[FileInfo] = []
    chunks: list[ChunkRange] = []
    left = {i: data.max_events for i in range(len(data.sources))}
    empty: list[str] = []
    for index, ref in enumerate(files):
        tree = sources.open_tree(ref.url, layout.tree, data.retries)
        _check_schema(layout, tree, ref.url)
        entries = int(tree.num_entries)
        budget = left[ref.source]
        if budget is not None:
            entries = min(entries, budget)
            left[ref.source] = budget - entries
        nbytes = sources.compressed_bytes(tree, layout.branches)
        per_entry = nbytes / max(1, tree.num_entries)
        info = FileInfo(index, ref, entries, int(per_entry * entries),
                        sources.file_identity(ref.url, tree))
        infos.append(info)
        if entries == 0:
            if tree.num_entries == 0:  # not a file max_events left unread: that is asked for
                empty.append(ref.url)
            continue
        whole = sources.entries_per_step(tree, layout.branches, data.step_size)
        step = max(1, whole // READS_PER_STEP) if isinstance(data.step_size, str) else whole
        clusters = (sources.cluster_starts(tree, layout.branches)
                    if isinstance(data.step_size, str) else [])
        for start, stop in bounds(entries, step, clusters, stretch=whole):
            chunks.append(ChunkRange(index, ref.url, ref.key, ref.source, start, stop,
                                     int(per_entry * (stop - start)),
                                     _first_cluster(clusters, start, stop)))
    _check_sources(pipeline, infos, layout)  # a source with no events at all is an error
    for url in empty:  # ... an empty file among others only a warning
        warnings.warn(f"tree {layout.tree!r} in {url} has no entries", UserWarning, stacklevel=2)
    _warn_copies(infos)
    return infos, chunks


def _warn_copies(infos: list[FileInfo]) -> None:
    """Say when two files look like copies of one: their events would be read twice.

    Each ROOT file gets a UUID when it is created, and ``cp`` keeps it, so
    the same UUID and entry count under two names (``gen/signal.root``, a
    copy in ``multi/``) is almost surely one dataset listed twice. A warning,
    not a refusal: a writer that reuses UUIDs would otherwise lock a user out.
    """
    seen: dict[tuple[str, int], FileInfo] = {}
    for info in infos:
        uuid = info.identity.get("uuid")
        if uuid is None or info.entries == 0:
            continue
        first = seen.setdefault((uuid, int(info.identity.get("entries", info.entries))), info)
        if first is not info:
            where = ("" if first.ref.source == info.ref.source else
                     f" (data.sources[{first.ref.source}] and data.sources[{info.ref.source}])")
            warnings.warn(f"{info.ref.url} and {first.ref.url} have the same ROOT UUID ({uuid}) "
                          f"and entries: copies of one file, whose events are read twice"
                          f"{where}; list one of them", UserWarning, stacklevel=3)


def bounds(entries: int, step: int, clusters: Sequence[int] = (),
           stretch: int = 0) -> list[tuple[int, int]]:
    """Cut ``[0, entries)`` into ranges of about ``step`` entries, on cluster starts if possible.

    ``clusters`` are the entries where every branch read starts a new basket
    (uproot's ``common_entry_offsets``). A range ends on the last of them
    that fits in the step, so no basket is decompressed by two chunks: with
    the 100k-event baskets of datagen and ~594k-event steps, cutting anywhere
    decompressed 10-20% of the baskets twice (counted from the plans) (``uproot.iterate`` keeps a
    border basket for the next step instead). Where no cluster start fits
    (clusters longer than the step), the range runs on to the next cluster
    start if that is within ``stretch`` entries (a quarter-step chunk of
    100k-event clusters cut at 65k inflated every cluster's baskets twice:
    +30% CPU per training epoch), else it ends at the step.
    """
    starts = sorted({c for c in clusters if 0 < c < entries})
    out: list[tuple[int, int]] = []
    start, i = 0, 0
    while start < entries:
        limit = min(entries, start + step)
        while i < len(starts) and starts[i] <= start:
            i += 1
        j = bisect.bisect_right(starts, limit, lo=i) - 1  # last cluster start <= limit
        after = starts[i] if i < len(starts) else entries  # the next cluster start (or end)
        if limit == entries:
            stop = limit
        elif j >= i:
            stop = starts[j]
        elif after <= start + stretch:  # past the step, but no cluster is cut
            stop = after
        else:
            stop = limit
        out.append((start, stop))
        start = stop
    return out


def _first_cluster(clusters: Sequence[int], start: int, stop: int) -> int:
    """Entries from ``start`` to the first cluster start strictly inside ``(start, stop)``."""
    i = bisect.bisect_right(clusters, start)
    return clusters[i] - start if i < len(clusters) and clusters[i] < stop else 0


def _check_sources(pipeline: Pipeline, infos: list[FileInfo], layout: Layout) -> None:
    per_source = [0] * len(pipeline.data.sources)
    for info in infos:
        per_source[info.ref.source] += info.entries
    for i, n in enumerate(per_source):
        if n == 0:
            files = ", ".join(info.ref.url for info in infos if info.ref.source == i)
            raise DataError(
                f"source {i} has no events: tree {layout.tree!r} is empty in {files}",
                field_path=f"data.sources[{i}]",
            )


def read(pipeline: Pipeline, layout: Layout, chunk: ChunkRange,
         trees: sources.OpenTrees | None = None) -> Chunk:
    """Read one chunk's branches (retried on transient failures), from ``trees`` if given."""
    arrays = sources.read_range(chunk.url, layout.tree, layout.branches, chunk.start,
                                chunk.stop, pipeline.data.retries, trees)
    return Chunk(arrays=arrays, file_index=chunk.file_index, file_key=chunk.key,
                 source=chunk.source, entry_start=chunk.start, url=chunk.url)


def read_ahead(pipeline: Pipeline, layout: Layout, plan: list[ChunkRange],
               trees: sources.OpenTrees, depth: int = 2) -> Iterator[tuple[ChunkRange, Chunk]]:
    """Each chunk of ``plan`` with its arrays, in order; the next ``depth`` read meanwhile.

    For passes that handle every chunk in order in one thread (pass 1): reading
    (inflating, or waiting for a remote server) runs in ``depth`` threads while
    the caller works on the chunk before. On this project's benchmark pass 1
    is bound by its statistics, not its reads, and gained little from it.
    Each chunk in flight costs one chunk's arrays; ``depth=2`` is what an
    epoch already holds (``READS_PER_STEP``). A failed read is raised when its
    chunk's turn comes, after the chunks before it.
    """
    if depth < 1 or len(plan) < 2:
        for c in plan:
            yield c, read(pipeline, layout, c, trees)
        return
    # leaving early or failing cancels the reads not begun (read_pool)
    with sources.read_pool(trees, depth, "mlaas-read-ahead") as pool:
        pending: deque[Future[Chunk]] = deque(
            pool.submit(read, pipeline, layout, c, trees) for c in plan[:depth])
        for i, c in enumerate(plan):
            chunk = pending.popleft().result()
            if i + depth < len(plan):
                pending.append(pool.submit(read, pipeline, layout, plan[i + depth], trees))
            yield c, chunk


def interleave(chunks: list[ChunkRange]) -> list[ChunkRange]:
    """Order chunks so every source advances at the same relative pace.

    A stream that reads all of one source before the next would hand the
    shuffle buffer a single class; interleaving by each chunk's position
    within its source (stride scheduling) mixes classes from the start.
    """
    by_source: dict[int, list[ChunkRange]] = {}
    for c in chunks:
        by_source.setdefault(c.source, []).append(c)
    keyed = []
    for src, items in by_source.items():
        for pos, c in enumerate(items):
            keyed.append(((pos + 0.5) / len(items), src, pos, c))
    keyed.sort(key=lambda t: (t[0], t[1], t[2]))
    return [t[3] for t in keyed]


def shard(chunks: list[ChunkRange], worker: int, workers: int) -> list[ChunkRange]:
    """The chunks DataLoader worker ``worker`` of ``workers`` reads, the same every epoch.

    Each source's chunks are dealt out on their own, each to the worker with
    the fewest chunks of that source so far, then the fewest events in all:
    every worker gets every source it can (so its batches mix classes; taking
    every K-th chunk of the interleaved plan gave two workers one class each
    with two sources) and about as many events as the others (the slowest
    worker sets an epoch's time). A source with fewer chunks than workers
    (a small file is one chunk at the default step) has its chunks split
    first, so every worker still gets some of it. Every process computes
    the same plan.
    """
    by_source: dict[int, list[ChunkRange]] = {}
    for c in chunks:
        by_source.setdefault(c.source, []).append(c)
    events = [0] * workers
    mine: list[ChunkRange] = []
    for items in by_source.values():
        items = _at_least(items, workers)
        taken = [0] * workers
        for c in sorted(items, key=lambda c: -c.entries):  # largest first balances best
            k = min(range(workers), key=lambda w: (taken[w], events[w], w))
            taken[k] += 1
            events[k] += c.entries
            if k == worker:
                mine.append(c)
    return interleave(mine)


def _at_least(chunks: list[ChunkRange], count: int) -> list[ChunkRange]:
    """``chunks``, the largest split in two until there are ``count`` (or single events).

    Splits fall in the middle, so the workers get even shares; the basket
    across the middle is inflated by both halves, a small price for a source
    that has so few chunks. The halves know no cluster start of their own
    (``head`` 0), so each is read whole.
    """
    out = list(chunks)
    while len(out) < count:
        largest = max(range(len(out)), key=lambda i: (out[i].entries, -i))
        c = out[largest]
        if c.entries < 2:
            break
        cut = c.entries // 2
        share = c.compressed_bytes * cut // c.entries
        out[largest:largest + 1] = [
            replace(c, stop=c.start + cut, compressed_bytes=share, head=0),
            replace(c, start=c.start + cut, compressed_bytes=c.compressed_bytes - share, head=0),
        ]
    return out
