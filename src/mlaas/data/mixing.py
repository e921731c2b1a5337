"""Which entries of which chunks fill each shuffle buffer: every source in proportion.

Layer: data, planning only (no reading; ``loader`` carries the plan out).

A buffer is shuffled and cut into batches, so a batch can only mix the
classes its buffer holds. Each buffer therefore takes from every source a
share of its events in proportion to that source's entries: with 20k signal
and 220k background events, every buffer is about 8% signal, from the first
to the last. Taking whole chunks instead (earlier versions took the next
``shuffle_chunks`` chunks of the interleaved plan) gave buffers, and so
batches, of one class as soon as the sources' chunk counts or sizes
differed.

The plan depends on the chunks alone, never on threads or timing, so
serial and threaded epochs give the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from mlaas.data.chunks import ChunkRange

__all__ = ["Piece", "RAMP", "mixed", "sequential", "first_use"]

#: The epoch's first buffers are smaller, 1/16, 1/8, 1/4, 1/2 of the others: the
#: first batches wait for little reading and preprocessing (see ``loader._fetched``).
RAMP = 4


@dataclass(frozen=True)
class Piece:
    """Entries ``[start, stop)`` of ``chunk`` (relative to its start), transformed at once."""

    chunk: ChunkRange
    start: int
    stop: int

    @property
    def last(self) -> bool:
        """The chunk's last piece: after it the chunk is complete (and may be cached)."""
        return self.stop == self.chunk.entries


def mixed(by_source: list[list[ChunkRange]], rows: int, piece_rows: int,
          ramp: int = RAMP) -> list[list[Piece]]:
    """Buffers of at most about ``rows`` entries, each taking from every source in proportion.

    ``by_source`` holds each source's chunks in the order they are read.
    Buffer boundaries are points u of the epoch, 0 < u <= 1: at u, source s
    has given ``floor(N_s * u)`` of its N_s entries, so each buffer's share
    of a source is its share of the epoch (to one event). A boundary is put
    where some source's chunk ends when one fits (the furthest that keeps
    the buffer within ``rows``): with sources of equal chunks every chunk is
    then one piece, as many pieces as reading whole chunks would make (more,
    smaller pieces cost 10-15% of an epoch's CPU). Otherwise the buffer ends
    after ``rows`` entries. A buffer may exceed ``rows`` by fewer entries
    than there are sources (the rounding).
    """
    totals = [sum(c.entries for c in chunks) for chunks in by_source]
    n = sum(totals)
    ends = _chunk_ends(by_source, totals)
    cursors = [_Cursor(chunks, piece_rows) for chunks in by_source]
    given = [0] * len(by_source)
    out: list[list[Piece]] = []
    i = 0
    while sum(given) < n:
        limit = max(1, rows >> max(0, ramp - len(out)))
        # in the ramp a chunk end up to twice as far is taken: no sliver of a buffer after it
        reach = min(rows, 2 * limit)
        now = sum(given)
        best: list[int] | None = None
        while i < len(ends):
            # never behind what a source gave already (an earlier cut's rounding)
            at = [max(g, a) for g, a in zip(given, _at(ends[i], totals), strict=True)]
            if sum(at) <= now:  # passed already
                i += 1
            elif sum(at) - now <= reach:
                best, i = at, i + 1
            else:
                break
        if best is None:  # no chunk ends within the limit: cut after ``limit`` entries
            end = min(n, now + limit)
            best = [max(g, total * end // n) for g, total in zip(given, totals, strict=True)]
            while sum(best) <= now:  # rounding left everything in place: one event further
                end += 1
                best = [max(g, total * end // n) for g, total in zip(given, totals, strict=True)]
        buffer: list[Piece] = []
        for s, cursor in enumerate(cursors):
            buffer.extend(cursor.take(best[s] - given[s], first=not out))
        given = best
        out.append(buffer)
    return out


def _chunk_ends(by_source: list[list[ChunkRange]], totals: list[int]) -> list[Fraction]:
    """The points of the epoch where some source's chunk ends, in order."""
    ends = set()
    for chunks, total in zip(by_source, totals, strict=True):
        at = 0
        for c in chunks:
            at += c.entries
            ends.add(Fraction(at, total))
    return sorted(ends)


def _at(u: Fraction, totals: list[int]) -> list[int]:
    """Each source's entries given by point ``u`` of the epoch."""
    return [total * u.numerator // u.denominator for total in totals]


def sequential(chunks: list[ChunkRange], piece_rows: int) -> list[list[Piece]]:
    """One piece per buffer, chunk after chunk: an unshuffled epoch in the order of the plan."""
    cursor = _Cursor(chunks, piece_rows)
    cursor.heads.add(0)  # the first buffer's chunk
    return [[piece] for piece in cursor.take(sum(c.entries for c in chunks))]


def first_use(plan: list[list[Piece]]) -> list[ChunkRange]:
    """The chunks in the order the plan first needs them: the order to read them in."""
    seen: dict[str, ChunkRange] = {}
    for buffer in plan:
        for piece in buffer:
            seen.setdefault(piece.chunk.name, piece.chunk)
    return list(seen.values())


class _Cursor:
    """Walks one source's chunks, handing out pieces of the requested number of entries.

    Pieces end at chunk ends, after at most ``piece_rows`` entries (the
    transform's temporary arrays stay that small), and, in chunks the
    epoch's first buffer reads from, at the chunk's first cluster
    (``ChunkRange.head``): those chunks are read head first (see
    ``loader``), and a piece must come from one of the two reads.
    """

    def __init__(self, chunks: list[ChunkRange], piece_rows: int) -> None:
        self.chunks = chunks
        self.piece_rows = max(1, piece_rows)
        self.index = 0  # the current chunk
        self.at = 0  # entries of it already given
        self.heads: set[int] = set()  # chunks touched by the first buffer

    def take(self, entries: int, first: bool = False) -> list[Piece]:
        pieces = []
        while entries > 0 and self.index < len(self.chunks):
            chunk = self.chunks[self.index]
            if first:
                self.heads.add(self.index)
            stop = min(chunk.entries, self.at + entries, self.at + self.piece_rows)
            if self.index in self.heads and self.at < chunk.head < stop:
                stop = chunk.head
            pieces.append(Piece(chunk, self.at, stop))
            entries -= stop - self.at
            self.at = stop
            if self.at == chunk.entries:
                self.index, self.at = self.index + 1, 0
        return pieces
