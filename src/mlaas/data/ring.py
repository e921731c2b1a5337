"""Batches from a DataLoader worker to the main process through a ring in shared memory.

Layer: data, plumbing for ``torch_dataset``. Why: a batch pickled into the
DataLoader's pipe is copied five times (into the pickle, the pipe, out of it,
into the unpickled buffer) and made one DataLoader worker keep 1.47 cores
busy, half of it moving bytes: two workers on two cores then were slower
than one. Here a worker writes each batch into the next slot of one file in
``/dev/shm`` that it maps once; only a small descriptor (:class:`Slotted`) goes
through the pipe, and unpickling it in the main process copies the batch out
of the slot into arrays of its own (the consumer may keep them as long as it
likes) and counts the slot as taken.

Flow control does not depend on the DataLoader's prefetching: the ring's
header holds the number of batches the main process has taken, and a worker
writes batch ``k`` into slot ``k % slots`` only once batch ``k - slots`` was
taken. The DataLoader asks each worker for ``prefetch_factor`` (default 2)
batches ahead, so with :data:`SLOTS` slots a worker waits here only when
asked for more (a larger prefetch, or the last worker of a pass, which may be
asked for all the others' share). Waiting cannot deadlock: the main process
unpickles every batch that arrives, in whatever order, while it waits for
the one it needs next.

Memory: ``SLOTS`` batches per worker, reserved in ``/dev/shm`` while the
worker lives (1.7 MB for the benchmark's 1024 events of 416 bytes; 110 MB for
65,536 such events), twice what the DataLoader's default prefetching holds in flight.

Lifetime: one ring per worker process, reused by its later passes
(persistent workers). The main process maps the file at the first batch and
unlinks it at once, so it vanishes when both sides unmap it; a worker that
exits before any batch was taken unlinks it itself (``Finalize`` at the
worker's exit). The main process unmaps rings whose worker has exited when
it maps a new one. A worker killed with SIGKILL before its first batch was
taken leaves its file behind, as torch's own shared memory would.

Where ``/dev/shm`` is missing (not Linux) or too full for the ring, or a
batch does not fit its slot, batches are pickled whole instead (:class:`Piped`).
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import struct
import time
from multiprocessing import util

import numpy as np
import torch

__all__ = ["Ring", "Piped", "Slotted", "SHM_DIR", "SLOTS", "open_rings"]

SHM_DIR = "/dev/shm"
#: Slots per worker: twice the batches that the DataLoader's default prefetch asks for.
SLOTS = 4
_PREFIX = "mlaas-batches-"
_HEADER = 64  # taken (u64, written by the main process), worker pid (u64)
_ALIGN = 64
_WAIT_S = 0.0005  # a worker's poll while every slot waits to be taken

Layout = list[tuple[str, str, tuple[int, ...], int]]  # key, dtype, shape, offset in the slot


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _layout(batch: dict[str, np.ndarray]) -> tuple[Layout, int]:
    """Where each array of ``batch`` goes in one buffer, and the buffer's size."""
    layout, total = [], 0
    for key, array in batch.items():
        layout.append((key, array.dtype.str, tuple(array.shape), total))
        total += _aligned(array.nbytes)
    return layout, total


def _write(buffer: mmap.mmap | bytearray, start: int, layout: Layout,
           batch: dict[str, np.ndarray]) -> None:
    """Copy ``batch`` into ``buffer`` at ``start``, as ``layout`` places it."""
    for (_key, _dtype, _shape, offset), array in zip(layout, batch.values(), strict=True):
        view = np.frombuffer(buffer, dtype=array.dtype, count=array.size, offset=start + offset)
        view[...] = array.reshape(-1)
        del view  # a map with views left on it cannot be closed


def _views(buffer: mmap.mmap | bytearray, start: int, layout: Layout) -> dict[str, np.ndarray]:
    """The arrays ``layout`` places in ``buffer`` at ``start``, as views (no copy)."""
    return {key: np.frombuffer(buffer, dtype=dtype, count=math.prod(shape),  # not np.prod:
                               offset=start + offset).reshape(shape)  # 0.05 ms a batch
            for key, dtype, shape, offset in layout}


class Ring:
    """A worker's ring: ``slots`` slots of ``slot_bytes`` each, after a small header."""

    def __init__(self, slot_bytes: int, slots: int, directory: str | None = None) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"a ring needs slots and bytes, not {slots} x {slot_bytes}")
        self.slot_bytes, self.slots = slot_bytes, slots
        name = f"{_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.path = os.path.join(directory or SHM_DIR, name)
        size = _HEADER + slots * slot_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # reserved now: a full /dev/shm (64 MB in a default Docker container)
            # fails here, with OSError, instead of with SIGBUS at a later write
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size)
        except OSError:
            _unlink(self.path)
            raise
        finally:
            os.close(fd)
        struct.pack_into("<QQ", self.map, 0, 0, os.getpid())
        self.sent = 0
        self._parent = os.getppid()
        # at the worker's exit: remove the file if the main process never mapped it
        util.Finalize(self, _unlink, args=(self.path,), exitpriority=10)

    @classmethod
    def for_batch(cls, batch: dict[str, np.ndarray], rows: int, slots: int = SLOTS
                  ) -> Ring | None:
        """A ring whose slots hold ``rows`` rows of arrays like ``batch``'s.

        None where there is no shared memory to be had.
        """
        if not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
            return None
        n = max(1, len(next(iter(batch.values()))))
        size = sum(_aligned(a.nbytes // n * rows) for a in batch.values())
        try:
            return cls(size, slots)
        except OSError:
            return None

    def taken(self) -> int:
        return int(struct.unpack_from("<Q", self.map, 0)[0])

    def put(self, batch: dict[str, np.ndarray]) -> Slotted | Piped:
        """Write ``batch`` into the next slot once it is free; what to send for it."""
        layout, size = _layout(batch)
        if size > self.slot_bytes:
            return Piped(batch)
        self._wait_for_slot()
        start = _HEADER + (self.sent % self.slots) * self.slot_bytes
        _write(self.map, start, layout, batch)
        self.sent += 1
        return Slotted(self.path, start, layout)

    def _wait_for_slot(self) -> None:
        """Until the batch that last used the next slot was taken by the main process."""
        while self.sent - self.taken() >= self.slots:
            if os.getppid() != self._parent:
                raise RuntimeError("the DataLoader's main process exited; stopping this worker")
            time.sleep(_WAIT_S)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # the main process mapped it and removed the name


class Slotted:
    """What a worker sends for a batch in its ring: unpickled as a dict of tensors."""

    __slots__ = ("path", "start", "layout")

    def __init__(self, path: str, start: int, layout: Layout) -> None:
        self.path, self.start, self.layout = path, start, layout

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return _take, (self.path, self.start, self.layout)


class _Attached:
    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        _unlink(path)  # the mappings keep the memory; nothing is left to clean up
        self.worker = int(struct.unpack_from("<Q", self.map, 8)[0])


_open: dict[str, _Attached] = {}  # rings mapped by this (main) process


def open_rings() -> int:
    """Rings this process has mapped and not yet released (for tests)."""
    return len(_open)


def _attach(path: str) -> _Attached:
    if os.path.dirname(path) != SHM_DIR or not os.path.basename(path).startswith(_PREFIX):
        raise ValueError(f"not a batch ring: {path!r}")
    for other, ring in list(_open.items()):  # rings of workers that have exited
        if not _alive(ring.worker):
            ring.map.close()
            del _open[other]
    ring = _open[path] = _Attached(path)
    return ring


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take(path: str, start: int, layout: Layout) -> dict[str, torch.Tensor]:
    """In the main process: the batch copied out of its slot, which is then free."""
    ring = _open.get(path) or _attach(path)
    views = _views(ring.map, start, layout)
    out = {key: torch.from_numpy(view.copy()) for key, view in views.items()}
    del views  # a map with views left on it cannot be closed
    taken = struct.unpack_from("<Q", ring.map, 0)[0]
    struct.pack_into("<Q", ring.map, 0, taken + 1)
    return out


class Piped:
    """A worker's batch pickled whole through the DataLoader's pipe (no ring).

    Tensors would leave a worker through a new shared-memory segment each,
    whose pages are fresh on both sides every batch: 1.3 ms per 1024-event
    batch here. Pickled as one ``bytearray`` (about five memory copies of
    0.4 MB, ~0.3 ms) it arrives as a plain dict of writable tensors:
    ``DataLoader`` passes objects it does not know through
    ``default_convert`` unchanged, and unpickling builds the dict.
    """

    __slots__ = ("batch",)

    def __init__(self, batch: dict[str, np.ndarray]) -> None:
        self.batch = batch

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        layout, total = _layout(self.batch)
        buffer = bytearray(total)
        _write(buffer, 0, layout, self.batch)
        return _unpipe, (buffer, layout)


def _unpipe(buffer: bytearray, layout: Layout) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(view) for key, view in _views(buffer, 0, layout).items()}
