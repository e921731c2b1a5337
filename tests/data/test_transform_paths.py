"""The transform's fast paths give exactly what the plain numpy route gives.

The per-collection sort packs (event, key) into one uint64 and the jagged
branches are gathered once through a slot index; these tests pin both to the
straightforward definitions, including ties, -0.0, NaN, truncated elements
and the NaN policy.
"""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from mlaas.data import RootDataset
from mlaas.data.transform import _descending_order_32, descending_order
from mlaas.errors import BadValues


@pytest.mark.parametrize("dtype", ["float32", "int32", "int16", "uint8", "bool"])
def test_packed_sort_equals_the_lexsort(dtype: str) -> None:
    rng = np.random.default_rng(11)
    for _ in range(10):
        counts = rng.poisson(4, 3000)
        n = int(counts.sum())
        if dtype == "float32":
            specials = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, 1e30, -1e-30], np.float32)
            key = np.where(rng.random(n) < 0.5, rng.choice(specials, n),
                           (rng.normal(size=n) * 100).astype(np.float32))
        elif dtype == "bool":
            key = rng.random(n) < 0.5
        else:
            info = np.iinfo(dtype)
            key = rng.integers(info.min, info.max, n, endpoint=True).astype(dtype)
        fast = _descending_order_32(key, counts)
        assert fast is not None
        np.testing.assert_array_equal(fast, descending_order(key.astype(np.float64), counts))


def test_packed_sort_declines_nan_and_wide_keys() -> None:
    counts = np.array([3])
    assert _descending_order_32(np.array([1, np.nan, 2], np.float32), counts) is None
    assert _descending_order_32(np.array([1.0, 2.0, 3.0]), counts) is None
    assert _descending_order_32(np.array([1, 2, 3], np.int64), counts) is None


def _jagged_file(path: Path, pt: list[list[float]]) -> str:
    with uproot.recreate(path) as f:
        f.mktree("t", {"Jet_pt": ak.Array(pt).type, "lab": np.float64})
        f["t"].extend({"Jet_pt": ak.Array(pt), "lab": np.arange(len(pt)) % 2.0})
    return str(path)


def _spec(path: str, **data: object) -> dict:
    spec = {"data": {"sources": [{"files": [path]}], "label": "lab",
                     "features": [{"branch": "Jet_pt", "max_len": 2, "sort_by": "Jet_pt",
                                   "pad": -5.0}],
                     "normalize": "none"}}
    spec["data"].update(data)
    return spec


def test_sorted_padded_jagged_values_and_mask(tmp_path: Path) -> None:
    path = _jagged_file(tmp_path / "j.root", [[1.0, 3.0, 2.0], [], [7.0], [-0.0, 0.0, 4.0]])
    cols = RootDataset(_spec(path), split="all", shuffle=False).columns()
    np.testing.assert_array_equal(cols.x, [[3.0, 2.0], [-5.0, -5.0], [7.0, -5.0], [4.0, -0.0]])
    np.testing.assert_array_equal(cols.mask, [[1, 1], [0, 0], [1, 0], [1, 1]])


def test_nan_in_a_truncated_slot_still_fails_by_default(tmp_path: Path) -> None:
    # the NaN never reaches x (third jet, max_len 2), but policy "error" reports it as before
    path = _jagged_file(tmp_path / "n.root", [[3.0, 2.0, float("nan")], [1.0]] * 10)
    spec = _spec(path)
    spec["data"]["features"][0].pop("sort_by")  # a NaN sort key would be a different error
    lenient = _spec(path, nan={"policy": "replace", "value": 0})
    lenient["data"]["features"][0].pop("sort_by")
    stats = RootDataset(lenient, split="all").stats
    with pytest.raises(BadValues, match=r"feature 'Jet_pt' has 10 NaN"):
        RootDataset(spec, split="all", shuffle=False, stats=stats).columns()


def test_nan_replace_fills_the_slot_it_lands_in(tmp_path: Path) -> None:
    path = _jagged_file(tmp_path / "r.root", [[float("nan"), 2.0], [1.0]] * 3)
    spec = _spec(path, nan={"policy": "replace", "value": -1.0})
    spec["data"]["features"][0].pop("sort_by")
    cols = RootDataset(spec, split="all", shuffle=False).columns()
    np.testing.assert_array_equal(cols.x, [[-1.0, 2.0], [1.0, -5.0]] * 3)


def test_shared_counts_are_never_another_arrays() -> None:
    """flat_values shares counts between arrays of one offsets memory; arrays taken apart
    by awkward (option types) have fresh offsets, whose memory and id a later array may
    reuse: each must still get its own counts."""
    from mlaas.data.transform import flat_values

    rng = np.random.default_rng(0)
    for _ in range(100):
        seen: dict = {}
        arrays = []
        for _ in range(4):
            counts = rng.integers(0, 4, 5)
            arr = ak.unflatten(ak.Array(rng.normal(size=int(counts.sum()))), counts)
            arrays.append((ak.mask(arr, arr > -5), counts))  # an option type: awkward's path
        for arr, counts in arrays:
            np.testing.assert_array_equal(flat_values(arr, seen)[1], counts)
