"""The torch face of ``RootDataset``: an ``IterableDataset`` that shards chunks across workers.

Layer: data. Kept apart so that importing ``mlaas.data`` does not import
torch. Batches are already formed by the dataset, so use
``DataLoader(ds.torch(), batch_size=None, num_workers=k)``.

Epochs: every pass over a DataLoader uses the next epoch's shuffle, with or
without workers and with or without ``persistent_workers``; ``set_epoch(e)``
makes the next pass epoch ``e`` (as with ``DistributedSampler``). Pass ``k``
after ``set_epoch(e)`` is epoch ``e + k`` of :meth:`RootDataset.iter_epoch`.
Call ``set_epoch`` in the main process, between passes; persistent workers
read it from shared memory (:class:`_SharedEpoch`).
"""

from __future__ import annotations

import ctypes
import multiprocessing
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mlaas.data.ring import Piped, Ring, Slotted

if TYPE_CHECKING:
    from mlaas.data.loader import RootDataset

__all__ = ["TorchRootDataset"]


class TorchRootDataset(IterableDataset):  # type: ignore[type-arg]
    """Every selected event of the split exactly once per epoch, across all workers."""

    def __init__(self, dataset: RootDataset, advance: bool = True) -> None:
        super().__init__()
        self.dataset = dataset
        self.epoch = dataset.epoch  # the epoch of the next pass, before workers' passes
        self.advance = advance  # False: every pass repeats the same epoch (validation)
        self._passes = _SharedPasses()
        self._chosen = _SharedEpoch()
        self._generation = 0  # the set_epoch call self.epoch follows (_SharedEpoch)
        self._runs = 0  # passes this copy has made (a persistent worker's own count)
        self._ring: Ring | None | bool = None  # a worker's ring (False: none to be had)

    def __getstate__(self) -> dict[str, Any]:
        """For workers started by spawn: a ring belongs to the process that made it."""
        state = self.__dict__.copy()
        state["_ring"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """The next pass uses ``epoch``; the ones after it ``epoch + 1``, ``epoch + 2``...

        Persistent workers hold copies made before this call, so the choice
        also goes to shared memory, where they find it at their next pass.
        """
        self.epoch = epoch
        self._runs = 0
        self._passes.reset()
        self._generation = self._chosen.set(epoch)

    def _epoch(self, info: Any) -> int:
        """The epoch of this pass, in the main process (``info`` None) or a worker.

        A worker's pass adds the passes that workers made since the epoch was
        set (shared through :class:`_SharedPasses`) and, if the worker is
        persistent, its own earlier passes. A copy made before the last
        ``set_epoch`` (a persistent worker's) first takes the epoch it set.
        """
        generation, chosen = self._chosen.get()
        if generation != self._generation:
            self.epoch, self._runs, self._generation = chosen, 0, generation
        if not self.advance:
            return self.epoch
        done = self._passes.take(info.seed - info.id if info else None)
        if info is None:
            epoch = self.epoch + done
            self.epoch, self._runs = epoch + 1, 0
            return epoch
        epoch = self.epoch + done + self._runs
        self._runs += 1
        return epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self._epoch(info)
        if info is None:
            for batch in self.dataset.iter_epoch(epoch, worker, workers):
                yield {k: torch.from_numpy(v) for k, v in batch.items()}
            return
        # In a worker the DataLoader's processes are the parallelism (torch
        # likewise gives each worker one intra-op thread): no reader threads,
        # one thread reads, preprocesses and batches, so k workers use about
        # k cores. That thread stays: the DataLoader takes batches from its
        # workers in turn, so a worker that made batches only when asked would
        # wait for the other's reading instead of reading at the same time.
        for batch in self.dataset.iter_epoch(epoch, worker, workers, read_ahead=False):
            yield self._send(batch)  # type: ignore[misc]  # arrives as a dict of tensors

    def _send(self, batch: dict[str, np.ndarray]) -> Slotted | Piped:
        """What a worker sends for ``batch``: a slot of its ring in shared memory.

        The ring is made at the first batch (its slots hold ``batch_size``
        rows) and kept for the worker's later passes.
        """
        if self._ring is None:
            self._ring = Ring.for_batch(batch, self.dataset.batch_size) or False
        return self._ring.put(batch) if self._ring else Piped(batch)


class _SharedPasses:
    """DataLoader passes begun by workers since the epoch was set, shared by all processes.

    Without persistent workers a DataLoader starts new workers from the main
    process's dataset on every pass, and no code of the dataset runs in the
    main process when it does: a counter kept in the dataset never moves, and
    every pass repeated the first shuffle. The workers of one pass share the
    DataLoader's base seed (``WorkerInfo.seed - WorkerInfo.id``), new on each
    pass; so one word in shared memory holds the last base seen (32 bits of
    it) and the passes counted, and the first worker to see a new base counts
    a new pass. Its siblings compute the same update from the same word, so
    no lock is needed; a stale worker of an abandoned pass can at worst give a
    sibling another epoch's order, never another worker's events (the chunks a
    worker reads do not depend on the epoch).
    """

    def __init__(self) -> None:
        self.word = multiprocessing.RawValue(ctypes.c_uint64, 0)  # inherited by the workers

    def take(self, base: int | None) -> int:
        """Passes before this one; ``base`` None: a pass in the main process, which resets."""
        value = int(self.word.value)
        seen, count = value >> 32, value & 0xFFFF_FFFF
        if base is None:
            self.word.value = 0
            return count
        tag = (base & 0xFFFF_FFFF) or 1  # 0 means "no pass yet"
        if tag == seen:
            return count - 1  # a sibling worker counted this pass already
        self.word.value = (tag << 32) | (count + 1)
        return count

    def reset(self) -> None:
        self.word.value = 0


class _SharedEpoch:
    """The epoch of the last ``set_epoch`` and a count of the calls, shared by all processes.

    Persistent workers are copies of the dataset made when the DataLoader
    first started them; ``set_epoch`` in the main process changed only its
    own copy, and the workers went on from their own epoch (after
    ``set_epoch(0)`` the 4th pass was epoch 3). Each copy records the count
    its ``epoch`` follows; one that sees a newer count takes the shared
    epoch and restarts its own passes, so every worker of the pass agrees.
    Written only by ``set_epoch``, between passes: the epoch before the
    count, so a copy that sees the new count also sees the new epoch.
    """

    def __init__(self) -> None:
        # [count of set_epoch calls, epoch]; inherited by the workers like _SharedPasses
        self.values = multiprocessing.RawArray(ctypes.c_int64, 2)

    def set(self, epoch: int) -> int:
        """Share ``epoch``; the new count, for the caller to record."""
        self.values[1] = epoch
        self.values[0] += 1
        return int(self.values[0])

    def get(self) -> tuple[int, int]:
        """(count, epoch) of the last ``set_epoch``; (0, 0) before any."""
        return int(self.values[0]), int(self.values[1])
