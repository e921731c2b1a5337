"""Compiled loops for the one step numpy cannot do in a single pass: padding jagged slots.

Layer: data, interpretation side, used by ``transform``. Padding a jagged
branch into ``x`` with numpy took five passes over memory per branch (slot
index, gather, float64 scale, a broadcast pad fill, a boolean-mask scatter
into a strided block): ~1.1 s CPU per 2M events for the benchmark's 13
branches, as much as zlib decompression. One compiled loop per collection
(its branches of one dtype together) writes each slot of ``x`` and the mask
once, reading one element per slot and branch (a pad slot's read is
discarded by a select, not skipped by a branch), and runs without the GIL,
so it overlaps the reader thread.

Exactness: the arithmetic is what numpy did, element by element: the value
converted to float64, ``(value - shift) * scale`` in float64 (no fused
multiply-add: numba compiles without fast-math), rounded to float32 on the
store. Tests compare the two bit for bit.

Compilation: numba compiles each signature (one per content dtype and
number of branches given together) on first use and keeps it in
``__pycache__`` (``cache=True``), so only the first run on a machine pays
(~0.2 s per signature). numba (and LLVM, ~60 MB) is imported on
the first call, not with the module: the server imports the transform
module through ``mlaas.bundle`` but never pads chunks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Slots", "take_rows", "warm_up", "TILE_ROWS"]

#: Rows of ``x`` filled per call for all branches before the next rows: a tile
#: of 8192 rows of ~100 float32 columns (~3 MB) stays in cache while the
#: collection's branches write their slots into it, instead of every branch
#: streaming the whole chunk-sized ``x`` through memory again.
TILE_ROWS = 8192


def _fill_py(x, cols, width, mask, mcol, rows, offsets, order, contents,  # pragma: no cover
             shifts, scales, pads, start, stop):  # compiled by numba in _compiled()
    # One pass per collection, not per branch: an event's offsets, its sort order
    # and the slot's padding decision are read once and shared by every branch of
    # the collection (contents: a tuple of same-dtype arrays), and the row of x is
    # written while it is in cache: half the time of one pass per branch (0.21 ->
    # 0.11 s per 1M events for the benchmark's 13 branches, one thread).
    # Branch-free per slot: every slot reads an element (clamped to the last one)
    # and stores it or the pad by a select, so the random multiplicities cost no
    # mispredicted loop exits; sorted or not is decided once per call, not per slot
    # (one loop testing it per slot was 8-17% slower: hence the two near-copies).
    nb = len(contents)
    last = contents[0].shape[0] - 1
    if last < 0:  # no element at all in this chunk: every slot is padding
        for i in range(start, stop):
            for j in range(width):
                for b in range(nb):
                    x[i, cols[b] + j] = pads[b]
                if mcol >= 0:
                    mask[i, mcol + j] = 0.0
    elif order.shape[0] > 0:
        for i in range(start, stop):
            e = rows[i]
            first = offsets[e]
            count = offsets[e + 1] - first
            for j in range(width):
                k = order[min(first + j, last)]
                real = j < count
                for b in range(nb):
                    value = np.float32((np.float64(contents[b][k]) - shifts[b]) * scales[b])
                    x[i, cols[b] + j] = value if real else pads[b]
                if mcol >= 0:
                    mask[i, mcol + j] = 1.0 if real else 0.0
    else:
        for i in range(start, stop):
            e = rows[i]
            first = offsets[e]
            count = offsets[e + 1] - first
            for j in range(width):
                k = min(first + j, last)
                real = j < count
                for b in range(nb):
                    value = np.float32((np.float64(contents[b][k]) - shifts[b]) * scales[b])
                    x[i, cols[b] + j] = value if real else pads[b]
                if mcol >= 0:
                    mask[i, mcol + j] = 1.0 if real else 0.0


def _take_py(x, mask, y, w, file, entry, index,  # pragma: no cover - compiled by numba
             ox, omask, oy, ow, ofile, oentry):
    # Rows of x and mask first, then the four per-event values: two passes over the
    # index, each with few streams to miss in at once.
    for i in range(index.shape[0]):
        r = index[i]
        for j in range(x.shape[1]):
            ox[i, j] = x[r, j]
        for j in range(mask.shape[1]):
            omask[i, j] = mask[r, j]
    for i in range(index.shape[0]):
        r = index[i]
        oy[i] = y[r]
        ow[i] = w[r]
        ofile[i] = file[r]
        oentry[i] = entry[r]


_FILL: list[Callable[..., Any]] = []
_TAKE: list[Callable[..., Any]] = []


def _compiled() -> Callable[..., Any]:
    if not _FILL:
        import numba

        _FILL.append(numba.njit(nogil=True, cache=True)(_fill_py))
        _TAKE.append(numba.njit(nogil=True, cache=True)(_take_py))
    return _FILL[0]


def take_rows(x: np.ndarray, mask: np.ndarray, y: np.ndarray, w: np.ndarray, file: np.ndarray,
              entry: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Rows ``index`` of the six fields of a batch in one compiled call, or None.

    The shuffle buffer's batch gathers read rows from all over ~100 MB, and
    six ``np.take`` calls cost 20-25% more than one loop over the rows
    (147 against 118 us per 1024-row batch of the benchmark's 81 + 18
    columns). None when numba is not loaded (a dataset without jagged
    branches never loads it for this alone) or the arrays are not the
    C-contiguous ones of a shuffle buffer: ``np.take`` then.
    """
    if not _TAKE or not (x.flags.c_contiguous and mask.flags.c_contiguous):
        return None
    m = len(index)
    out = (np.empty((m, x.shape[1]), x.dtype), np.empty((m, mask.shape[1]), mask.dtype),
           np.empty(m, y.dtype), np.empty(m, w.dtype), np.empty(m, file.dtype),
           np.empty(m, entry.dtype))
    _TAKE[0](x, mask, y, w, file, entry, index, *out)
    return out


class Slots:
    """Jagged branches of one collection and one content dtype, padded by one compiled loop.

    Branch ``b`` (content ``contents[b]``; all of one dtype and length) fills
    ``x[:, cols[b]:cols[b] + width]``. Row ``i`` of ``x`` is event ``rows[i]``
    of the chunk, whose elements are ``offsets[e]:offsets[e + 1]`` of each
    content (through ``order`` when the collection is sorted: ``order``
    permutes the flat content). Slots past an event's count get
    ``(pads[b] - shifts[b]) * scales[b]``. With ``mcol >= 0`` the
    collection's mask columns ``mask[:, mcol:mcol + width]`` are written too
    (once per collection is enough). The arrays are made once per chunk,
    not per tile.
    """

    def __init__(self, cols: Sequence[int], width: int, mcol: int, offsets: np.ndarray,
                 order: np.ndarray | None, contents: Sequence[np.ndarray],
                 shifts: Sequence[float], scales: Sequence[float],
                 pads: Sequence[float]) -> None:
        self.cols = np.asarray(cols, dtype=np.int64)
        self.width, self.mcol = width, mcol
        self.offsets = offsets
        self.order = _NO_ORDER if order is None else order
        # one numba type for the whole tuple (else it is heterogeneous and cannot be
        # indexed in the loop): C-contiguous and writeable; a read-only or strided
        # content (a memory map, a view) is copied
        self.contents = tuple(c if c.flags.c_contiguous and c.flags.writeable
                              else np.array(c, order="C") for c in contents)
        self.shifts = np.asarray(shifts, dtype=np.float64)
        self.scales = np.asarray(scales, dtype=np.float64)
        self.pads = ((np.asarray(pads, dtype=np.float64) - self.shifts)
                     * self.scales).astype(np.float32)

    def fill(self, x: np.ndarray, mask: np.ndarray, rows: np.ndarray, start: int,
             stop: int) -> None:
        """Write rows ``start:stop`` of ``x`` (and of ``mask``, with ``mcol >= 0``)."""
        _compiled()(x, self.cols, self.width, mask, self.mcol, rows, self.offsets, self.order,
                    self.contents, self.shifts, self.scales, self.pads, start, stop)


_NO_ORDER = np.zeros(0, dtype=np.int64)


def warm_up() -> None:
    """Import numba and load (or compile) the float32 loops in a background thread.

    The first call in a process costs ~0.4 s (numba and LLVM start, the
    cached machine code loads); other dtypes then take ~2 ms. A dataset
    starts this when it is built, so the first chunk of the first epoch does
    not wait for it. Safe to call many times and beside a real first call
    (numba compiles under its own lock).
    """
    if _FILL or _WARMING:
        return
    thread = threading.Thread(target=_warm, name="mlaas-numba-warm-up", daemon=True)
    _WARMING.append(thread)
    thread.start()


_WARMING: list[threading.Thread] = []


def _finish_warm_up() -> None:
    """Before a fork, let a running warm-up finish.

    A child forked while the thread imports numba inherits a half-imported
    module and fails on ``numba.njit`` (a DataLoader made right after its
    dataset forked its workers then); forked after it, workers also start
    with numba loaded instead of importing it each.
    """
    if _WARMING and _WARMING[0] is not threading.current_thread():
        _WARMING[0].join()


os.register_at_fork(before=_finish_warm_up)


def _warm() -> None:
    x = np.zeros((1, 1), np.float32)
    Slots([0], 1, -1, np.zeros(2, np.int64), None, [np.zeros(0, np.float32)],
          [0.0], [1.0], [0.0]).fill(x, x, np.zeros(1, np.int64), 0, 1)
    one = np.zeros(1, np.float32)  # the shuffle buffer's dtypes (loader._ShuffleBuffer)
    take_rows(x, x, one, one, np.zeros(1, np.int32), np.zeros(1, np.int64),
              np.zeros(1, np.int64))
