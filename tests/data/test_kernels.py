"""The compiled slot filler against numpy's arithmetic, bit for bit.

``kernels.Slots`` replaced a numpy gather-scale-scatter; the transform's
outputs must not change by one bit (caches and bundles compare them), so
each content dtype the reader can hand over is checked against the numpy
formula: float64 of the value, ``(v - shift) * scale``, rounded to float32,
for one branch and for several branches of a collection filled together.
The batch gather (``take_rows``) must give what ``np.take`` gives.
The last test checks the numba warm-up's at-fork hook in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlaas.data import kernels, synth


def _reference(rows, offsets, order, content, width, shift, scale, pad):
    out = np.empty((len(rows), width), np.float32)
    valid = np.zeros((len(rows), width), np.float32)
    flat = content if order is None else content[order]
    for i, e in enumerate(rows):
        values = flat[offsets[e]:offsets[e + 1]][:width].astype(np.float64)
        out[i, :] = np.float32((pad - shift) * scale)
        out[i, :len(values)] = (values - shift) * scale
        valid[i, :len(values)] = 1.0
    return out, valid


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint8, np.bool_, np.int64])
@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("branches", [1, 3])
def test_slots_match_numpy_bit_for_bit(dtype, sort, branches) -> None:
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 9, size=500)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    contents = []
    for _ in range(branches):
        raw = rng.normal(30.0, 20.0, size=int(offsets[-1])) * 3
        contents.append((raw > 0) if dtype is np.bool_ else raw.astype(dtype))
    order = None
    if sort:  # a permutation within each event, as the collection's sort gives
        order = np.argsort(np.repeat(np.arange(len(counts)), counts) * 1000.0
                           - rng.random(int(offsets[-1])), kind="stable")
    rows = np.flatnonzero(rng.random(len(counts)) < 0.7)  # the kept events
    width = 4
    shifts = [12.345678901 * (b + 1) for b in range(branches)]
    scales = [0.0372619 / (b + 1) for b in range(branches)]
    pads = [-1.5 + b for b in range(branches)]
    cols = [3 + 2 * width * b for b in range(branches)]  # other columns between the branches
    x = np.full((len(rows), 3 + 2 * width * branches), np.nan, np.float32)
    mask = np.full((len(rows), 2 + width), np.nan, np.float32)
    slots = kernels.Slots(cols, width, 2, offsets, order, contents, shifts, scales, pads)
    for first in range(0, len(rows), 64):  # in tiles, as the transform calls it
        slots.fill(x, mask, rows, first, min(len(rows), first + 64))
    untouched = np.ones(x.shape[1], bool)
    for b in range(branches):
        want, valid = _reference(rows, offsets, order, contents[b], width, shifts[b], scales[b],
                                 pads[b])
        got = x[:, cols[b]:cols[b] + width]
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"branch {b}"
        untouched[cols[b]:cols[b] + width] = False
        assert np.array_equal(mask[:, 2:], valid)
    assert np.isnan(x[:, untouched]).all() and np.isnan(mask[:, :2]).all()  # others untouched


@pytest.mark.parametrize("sort", [False, True])
def test_a_chunk_without_any_element_is_all_padding(sort) -> None:
    """Slots past a count read a clamped element; with no element at all, nothing is read."""
    offsets = np.zeros(6, np.int64)  # five events, no objects
    contents = [np.zeros(0, np.float32), np.zeros(0, np.float32)]
    order = np.zeros(0, np.int64) if sort else None
    x = np.full((5, 6), np.nan, np.float32)
    mask = np.full((5, 3), np.nan, np.float32)
    kernels.Slots([0, 3], 3, 0, offsets, order, contents, [2.0, 0.0], [0.5, 1.0],
                  [-1.0, 4.0]).fill(x, mask, np.arange(5), 0, 5)
    assert (x[:, :3] == np.float32((-1.0 - 2.0) * 0.5)).all() and (x[:, 3:] == 4.0).all()
    assert (mask == 0.0).all()


def test_read_only_and_strided_contents_fill_beside_plain_ones() -> None:
    """A tuple of contents must be of one numba type: odd ones are copied, not refused."""
    offsets = np.array([0, 2, 3], np.int64)
    plain = np.array([1.0, 2.0, 3.0], np.float32)
    frozen = plain.copy() * 10
    frozen.flags.writeable = False
    strided = (plain * 100).repeat(2)[::2]
    x = np.zeros((2, 6), np.float32)
    mask = np.zeros((2, 2), np.float32)
    kernels.Slots([0, 2, 4], 2, 0, offsets, None, [plain, frozen, strided], [0.0] * 3,
                  [1.0] * 3, [0.0] * 3).fill(x, mask, np.array([0, 1]), 0, 2)
    assert x.tolist() == [[1, 2, 10, 20, 100, 200], [3, 0, 30, 0, 300, 0]]
    assert mask.tolist() == [[1, 1], [1, 0]]


def test_slots_leave_the_mask_alone_when_told() -> None:
    offsets = np.array([0, 2, 3], np.int64)
    x = np.zeros((2, 2), np.float32)
    mask = np.full((2, 2), 7.0, np.float32)
    kernels.Slots([0], 2, -1, offsets, None, [np.array([1.0, 2.0, 3.0], np.float32)],
                  [0.0], [2.0], [0.0]).fill(x, mask, np.array([0, 1]), 0, 2)
    assert x.tolist() == [[2.0, 4.0], [6.0, 0.0]]
    assert (mask == 7.0).all()


def test_take_rows_gives_np_take_of_each_field() -> None:
    """The batch gather of the shuffle buffer: one compiled call, the same rows as np.take."""
    kernels.Slots([0], 1, -1, np.zeros(2, np.int64), None, [np.zeros(0, np.float32)],
                  [0.0], [1.0], [0.0]).fill(np.zeros((1, 1), np.float32),
                                            np.zeros((1, 1), np.float32),
                                            np.zeros(1, np.int64), 0, 1)  # numba loaded
    rng = np.random.default_rng(3)
    n = 5000
    fields = (rng.normal(size=(n, 7)).astype(np.float32),
              (rng.random((n, 3)) > 0.5).astype(np.float32),
              rng.integers(0, 2, n).astype(np.float32), rng.random(n).astype(np.float32),
              rng.integers(0, 9, n).astype(np.int32), rng.integers(0, 2**62, n))
    index = rng.permutation(n)[:1024]
    taken = kernels.take_rows(*fields, index)
    assert taken is not None
    for got, field in zip(taken, fields, strict=True):
        assert got.dtype == field.dtype
        np.testing.assert_array_equal(got, np.take(field, index, axis=0))


def test_take_rows_leaves_strided_arrays_to_numpy() -> None:
    x = np.zeros((10, 4), np.float32)[:, ::2]
    one = np.zeros(10, np.float32)
    assert kernels.take_rows(x, x, one, one, np.zeros(10, np.int32), np.zeros(10, np.int64),
                             np.arange(3)) is None


_FORK_RIGHT_AFTER_THE_DATASET = """
import json, sys
from torch.utils.data import DataLoader
from mlaas.data import RootDataset, kernels

d = sys.argv[1]
spec = {"data": {"sources": [{"files": [d + "/signal.root"], "label": 1},
                             {"files": [d + "/background.root"], "label": 0}],
                 "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 3}],
                 "step_size": 1500}}
ds = RootDataset(spec, split="all", batch_size=500)  # starts the numba warm-up thread
warming = bool(kernels._WARMING) and kernels._WARMING[0].is_alive() and not kernels._FILL
loader = DataLoader(ds.torch(), batch_size=None, num_workers=2,
                    multiprocessing_context="fork")
events = sum(len(b["y"]) for b in loader)  # the workers fork now
print(json.dumps({"warming": warming, "events": events, "want": ds.num_events}))
"""


def test_a_dataloader_forked_right_after_the_dataset_gets_a_whole_numba(tmp_path: Path) -> None:
    """The at-fork hook joins the warm-up, so workers never inherit a half-imported numba.

    Without it a worker forked while the warm-up thread imports numba finds
    ``numba`` partially initialised (``numba.njit`` missing) or waits on an
    import lock whose owner thread does not exist in the child: so the
    DataLoader fails or hangs. A fresh interpreter is needed (numba must not
    be imported yet), and a timeout turns a hang into a failure.
    """
    synth.generate(tmp_path, 4000, seed=3)
    child = subprocess.Popen([sys.executable, "-c", _FORK_RIGHT_AFTER_THE_DATASET,
                              str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and its DataLoader workers
        child.communicate()
        pytest.fail("the DataLoader forked during the numba warm-up hung")
    assert child.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["warming"], "the warm-up had finished before the fork: nothing was tested"
    assert result["events"] == result["want"] > 0
