"""The shared-memory ring that carries a DataLoader worker's batches to the main process.

A batch must arrive exactly as it was made, stay the consumer's after its
slot is reused, and a worker must never overwrite a slot the main process
has not taken; no file may be left in ``/dev/shm`` by a finished or an
abandoned pass.
"""

from __future__ import annotations

import gc
import glob
import multiprocessing
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlaas.data import RootDataset, synth
from mlaas.data import ring as ring_module
from mlaas.data.ring import Piped, Ring, Slotted

pytestmark = pytest.mark.skipif(not Path(ring_module.SHM_DIR).is_dir(),
                                reason="no /dev/shm on this system: batches are piped")


def batch(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(rows, 7)).astype(np.float32),
            "y": rng.integers(0, 2, rows).astype(np.float32),
            "mask": (rng.random((rows, 3)) < 0.5).astype(np.float32),
            "file": rng.integers(0, 9, rows).astype(np.int32),
            "entry": rng.integers(0, 2**40, rows).astype(np.int64)}


def through_pipe(sent: Slotted | Piped) -> dict[str, torch.Tensor]:
    return pickle.loads(pickle.dumps(sent))  # what the DataLoader does between processes


def ring_files() -> set[str]:
    return set(glob.glob(f"{ring_module.SHM_DIR}/mlaas-batches-*"))


def test_a_batch_arrives_bit_for_bit_and_stays_when_its_slot_is_reused() -> None:
    first, second = batch(100, 1), batch(100, 2)
    ring = Ring.for_batch(first, rows=100, slots=1)
    assert ring is not None
    got = through_pipe(ring.put(first))
    through_pipe(ring.put(second))  # the same slot, overwritten
    for key, array in first.items():
        assert got[key].numpy().dtype == array.dtype
        assert np.array_equal(got[key].numpy(), array), key
    got["x"][0, 0] = 42.0  # the consumer's own, writable memory


def test_a_worker_waits_for_its_slot_until_the_main_process_takes_the_batch() -> None:
    ring = Ring.for_batch(batch(10, 0), rows=10, slots=2)
    assert ring is not None
    pending = [ring.put(batch(10, 1)), ring.put(batch(10, 2))]
    third = threading.Thread(target=lambda: pending.append(ring.put(batch(10, 3))))
    third.start()
    third.join(0.3)
    assert third.is_alive() and ring.sent == 2  # both slots hold batches not yet taken
    got = through_pipe(pending[0])
    third.join(10)
    assert not third.is_alive() and ring.sent == 3
    assert np.array_equal(got["x"].numpy(), batch(10, 1)["x"])  # copied before the reuse
    assert np.array_equal(through_pipe(pending[1])["x"].numpy(), batch(10, 2)["x"])
    assert np.array_equal(through_pipe(pending[2])["x"].numpy(), batch(10, 3)["x"])


def test_a_batch_larger_than_a_slot_is_piped_whole() -> None:
    ring = Ring.for_batch(batch(10, 0), rows=10, slots=2)
    assert ring is not None
    big = batch(11, 5)
    sent = ring.put(big)
    assert isinstance(sent, Piped)
    assert np.array_equal(through_pipe(sent)["entry"].numpy(), big["entry"])


def test_a_full_dev_shm_gives_no_ring_and_leaves_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for a full tmpfs (a container's 64 MB /dev/shm cannot be filled here safely)."""
    import errno
    import os

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    before = ring_files()
    monkeypatch.setattr(os, "posix_fallocate", full)
    assert Ring.for_batch(batch(10, 0), rows=10) is None
    assert ring_files() == before


def test_only_batch_rings_can_be_named_by_a_descriptor(tmp_path: Path) -> None:
    victim = tmp_path / "mlaas-batches-1-00"
    victim.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a batch ring"):
        through_pipe(Slotted(str(victim), 64, [("x", "<f4", (1,), 0)]))
    with pytest.raises(ValueError, match="not a batch ring"):
        through_pipe(Slotted(f"{ring_module.SHM_DIR}/../tmp/x", 64, [("x", "<f4", (1,), 0)]))
    assert victim.exists()


def _make_ring(paths: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    paths.put(Ring(4096, 2).path)


def test_a_ring_nobody_took_from_is_removed_when_its_worker_exits() -> None:
    context = multiprocessing.get_context("fork")
    paths = context.Queue()
    child = context.Process(target=_make_ring, args=(paths,))
    child.start()
    path = paths.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert not Path(path).exists()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ring")
    synth.generate(out, 3000, seed=11)
    return out


def dataset(d: Path) -> RootDataset:
    return RootDataset({"data": {
        "sources": [{"files": [str(d / "signal.root")], "label": 1},
                    {"files": [str(d / "background.root")], "label": 0}],
        "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 4}],
        "step_size": 700,
    }}, split="all", batch_size=128)


def ids(batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    return np.concatenate([b["file"].numpy().astype(np.int64) << 40 | b["entry"].numpy()
                           for b in batches])


def test_issue2_workers_that_must_wait_for_slots_still_give_every_event_once(pair: Path) -> None:
    """prefetch_factor 8 asks each worker for more batches than its ring has slots."""
    ds = dataset(pair)
    expected = np.sort(ids(list(DataLoader(ds.torch(), batch_size=None, num_workers=0))))
    before = ring_files()
    loader = DataLoader(ds.torch(), batch_size=None, num_workers=2, prefetch_factor=8)
    got = ids(list(loader))
    assert len(got) == len(expected) == 6000
    assert np.array_equal(np.sort(got), expected)
    del loader
    gc.collect()
    assert ring_files() <= before


def test_an_abandoned_pass_leaves_no_ring_behind(pair: Path) -> None:
    before = ring_files()
    loader = iter(DataLoader(dataset(pair).torch(), batch_size=None, num_workers=2))
    assert len(next(loader)["y"]) == 128
    del loader  # shuts the workers down with batches still in their rings
    gc.collect()
    assert ring_files() <= before


def test_issue2_without_shared_memory_workers_pipe_whole_batches(
        pair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ring_module, "SHM_DIR", str(tmp_path / "missing"))
    assert Ring.for_batch(batch(10, 0), rows=10, slots=2) is None
    ds = dataset(pair)
    expected = np.sort(ids(list(DataLoader(ds.torch(), batch_size=None, num_workers=0))))
    got = ids(list(DataLoader(ds.torch(), batch_size=None, num_workers=2)))  # forked: patched too
    assert np.array_equal(np.sort(got), expected)


def test_issue2_workers_started_by_spawn_give_every_event_once(pair: Path) -> None:
    """macOS's default: the dataset reaches each worker pickled, and rings work the same."""
    ds = dataset(pair)
    expected = np.sort(ids(list(DataLoader(ds.torch(), batch_size=None, num_workers=0))))
    before = ring_files()
    loader = DataLoader(ds.torch(), batch_size=None, num_workers=2,
                        multiprocessing_context="spawn", persistent_workers=True)
    for _ in range(2):  # the second pass reuses the persistent workers' rings
        assert np.array_equal(np.sort(ids(list(loader))), expected)
    del loader
    gc.collect()
    assert ring_files() <= before
