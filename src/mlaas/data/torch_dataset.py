"""The torch face of ``RootDataset``: an ``IterableDataset`` that shards chunks across workers.

Layer: data. Kept apart so that importing ``mlaas.data`` does not import
torch. Batches are already formed by the dataset, so use
``DataLoader(ds.torch(), batch_size=None, num_workers=k)``.

Epochs: with ``persistent_workers=True`` each worker advances its own epoch
counter after every pass; otherwise workers are fresh copies each epoch, so
call ``set_epoch(e)`` before each epoch (as with ``DistributedSampler``) to
get a new shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

if TYPE_CHECKING:
    from mlaas.data.loader import RootDataset

__all__ = ["TorchRootDataset"]


class TorchRootDataset(IterableDataset):  # type: ignore[type-arg]
    """Every selected event of the split exactly once per epoch, across all workers."""

    def __init__(self, dataset: RootDataset, advance: bool = True) -> None:
        super().__init__()
        self.dataset = dataset
        self.epoch = dataset.epoch
        self.advance = advance  # False: every pass repeats the same epoch (validation)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        if self.advance:
            self.epoch += 1
        as_tensors = _packed if info is not None else _plain
        for batch in self.dataset.iter_epoch(epoch, worker, workers):
            yield as_tensors(batch)


def _plain(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _packed(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The batch's tensors as views of one shared-memory buffer.

    A worker hands each tensor to the main process through shared memory;
    six tensors cost six segments per batch, which dominated the transfer
    (about 3.9 ms against 1.3 ms for one). Views of one storage travel as one.
    """
    offsets, total = [], 0
    for array in batch.values():
        offsets.append(total)
        total += -(-array.nbytes // 8) * 8  # keep every view 8-byte aligned
    buffer = torch.empty(max(total, 8), dtype=torch.uint8).share_memory_()
    out: dict[str, torch.Tensor] = {}
    for (key, array), start in zip(batch.items(), offsets, strict=True):
        dtype = torch.from_numpy(array[:0]).dtype
        view = buffer[start:start + array.nbytes].view(dtype).view(array.shape)
        view.numpy()[...] = array
        out[key] = view
    return out
