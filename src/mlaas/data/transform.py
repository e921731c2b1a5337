"""Chunks of branches in, ML-ready float32 arrays out: cut, derive, split, sort, pad, scale.

Layer: data, interpretation side. Everything here works on whole chunks with
numpy and awkward; there is no Python loop over events. The functions never
open files: the loader hands them arrays read by ``sources``.

Order of operations, per chunk: derived names (in spec order), the cut, the
split, label and weight, the features (jagged collections sorted, then
truncated and padded with numpy offsets), NaN policy, normalisation.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import awkward as ak
import numpy as np

from mlaas.data.layout import Layout, as_float64, is_jagged_array
from mlaas.errors import BadValues, DataError
from mlaas.spec import Pipeline

__all__ = [
    "Chunk",
    "Columns",
    "Transform",
    "pad_jagged",
    "split_codes",
    "uniform_hash",
    "SPLITS",
    "evaluate_env",
]

SPLITS = {"train": 0, "validation": 1, "test": 2}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Chunk:
    """Arrays read from one entry range of one file, with where they came from."""

    arrays: Mapping[str, Any]
    file_index: int
    file_key: str
    source: int
    entry_start: int
    url: str


@dataclass
class Columns:
    """Preprocessed events: ``x`` [n, features], ``mask`` [n, slots], ``y``, ``w``, ids."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    mask: np.ndarray
    file: np.ndarray
    entry: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, index: np.ndarray | slice) -> Columns:
        return Columns(self.x[index], self.y[index], self.w[index], self.mask[index],
                       self.file[index], self.entry[index])

    @staticmethod
    def concat(parts: list[Columns]) -> Columns:
        return Columns(*(np.concatenate([getattr(p, k) for p in parts]) for k in
                         ("x", "y", "w", "mask", "file", "entry")))

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"x": self.x, "y": self.y, "w": self.w, "mask": self.mask,
                "file": self.file, "entry": self.entry}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform_hash(key: str, entries: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per entry, a pure function of (file name, entry, seed, stream).

    This is what makes splits independent of chunking, worker count and run.
    """
    base = np.uint64((zlib.crc32(key.encode()) << 32) ^ (seed & 0xFFFFFFFF))
    salt = _splitmix64(np.array([base ^ np.uint64(stream)], dtype=np.uint64))[0]
    h = _splitmix64(entries.astype(np.uint64) ^ salt)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def split_codes(key: str, entries: np.ndarray, validation: float, test: float,
                seed: int) -> np.ndarray:
    """0 train, 1 validation, 2 test, per entry."""
    u = uniform_hash(key, entries, seed)
    codes = np.zeros(len(entries), dtype=np.int8)
    codes[u < validation + test] = SPLITS["test"]
    codes[u < validation] = SPLITS["validation"]
    return codes


class SlotIndex:
    """Where each kept object of a collection goes in the padded [n, max_len] block.

    Computed once per collection and chunk from the shared counts, then reused
    for every branch of the collection: numpy offsets only, no per-event loop.
    """

    def __init__(self, counts: np.ndarray, max_len: int) -> None:
        n = len(counts)
        kept = np.minimum(counts, max_len)
        starts = np.cumsum(counts) - counts
        first = np.cumsum(kept) - kept
        rows = np.repeat(np.arange(n), kept)
        cols = np.arange(rows.size) - np.repeat(first, kept)
        self.shape = (n, max_len)
        self.target = rows * max_len + cols  # flat position in the block
        self.source = np.repeat(starts, kept) + cols  # position in the content
        self.whole = bool(np.array_equal(kept, counts))  # nothing truncated
        mask = np.zeros(n * max_len, dtype=np.float32)
        mask[self.target] = 1.0
        self.mask = mask.reshape(self.shape)

    def fill(self, content: np.ndarray, pad: float) -> np.ndarray:
        out = np.full(self.shape[0] * self.shape[1], pad, dtype=np.float64)
        out[self.target] = content if self.whole else content[self.source]
        return out.reshape(self.shape)


def pad_jagged(content: np.ndarray, counts: np.ndarray, max_len: int,
               pad: float) -> tuple[np.ndarray, np.ndarray]:
    """Pad or truncate lists given as flat ``content`` and ``counts``.

    Returns values [n, max_len] (float64) and mask [n, max_len] (bool).
    """
    index = SlotIndex(counts, max_len)
    return index.fill(content, pad), index.mask.astype(bool)


def evaluate_env(layout: Layout, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """The branches plus every derived name, evaluated in spec order."""
    env: dict[str, Any] = dict(arrays)
    for name, e in layout.derived:
        env[name] = e.evaluate(env)
    return env


def selection(layout: Layout, env: Mapping[str, Any], n: int, url: str) -> np.ndarray:
    """The cut as a boolean vector (all True without a cut)."""
    if layout.cut is None:
        return np.ones(n, dtype=bool)
    value = layout.cut.evaluate(env)
    if is_jagged_array(value):
        raise DataError(
            f"the cut {layout.cut.source!r} gives a list per event; reduce it with any(...) "
            "or all(...)", file_path=url, field_path="data.cut",
        )
    out = as_float64(value, n)
    return out != 0


def sorted_collections(layout: Layout, env: Mapping[str, Any], url: str) -> dict[str, Any]:
    """Each jagged feature's values, its collection sorted once by the collection's key."""
    values: dict[str, Any] = {}
    for coll in layout.collections.values():
        order = None
        if coll.sort_by is not None:
            key = env[coll.sort_by]
            order = ak.argsort(key, axis=1, ascending=False, stable=True)
        counts = None
        for name in coll.features:
            arr = env[name] if name in env else None
            if arr is None:
                f = next(f for f in layout.features if f.name == name)
                arr = f.expression.evaluate(env)
            if order is not None:
                if not ak.all(ak.num(arr, axis=1) == ak.num(order, axis=1)):
                    raise DataError(
                        f"jagged branch {name!r} and its sort key {coll.sort_by!r} have different "
                        "multiplicities in some events; sort_by must be in the same collection",
                        file_path=url, branch=name,
                    )
                arr = arr[order]
            n_here = ak.to_numpy(ak.num(arr, axis=1))
            if counts is None:
                counts = n_here
            elif not np.array_equal(counts, n_here):
                raise DataError(
                    f"branches of collection {coll.name!r} ({', '.join(coll.features)}) have "
                    "different multiplicities; name them so that one collection shares one "
                    "length", file_path=url, branch=name,
                )
            values[name] = arr
    return values


def flat_values(arr: Any) -> tuple[np.ndarray, np.ndarray]:
    """Content (float64) and counts of a jagged awkward array."""
    counts = ak.to_numpy(ak.num(arr, axis=1)).astype(np.int64)
    content = ak.to_numpy(ak.flatten(arr, axis=1)).astype(np.float64, copy=False)
    return content, counts


class Transform:
    """Turns chunks into :class:`Columns` with the constants of pass 1.

    Args:
        pipeline (Pipeline): the spec (split, NaN policy, labels).
        layout (Layout): the spec bound to the tree, with every max_len known.
        shift, scale (np.ndarray): per-column normalisation: ``(raw - shift) * scale``.
    """

    def __init__(self, pipeline: Pipeline, layout: Layout, shift: np.ndarray,
                 scale: np.ndarray) -> None:
        self.pipeline = pipeline
        self.layout = layout
        self.shift = shift
        self.scale = scale
        self.n_columns = len(layout.column_names())
        self.n_mask = len(layout.mask_names())

    def empty(self) -> Columns:
        """No events, with the right widths."""
        return Columns(np.zeros((0, self.n_columns), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.float32), np.zeros((0, self.n_mask), np.float32),
                       np.zeros(0, np.int32), np.zeros(0, np.int64))

    def split_of(self, chunk: Chunk, n: int) -> np.ndarray:
        s = self.pipeline.data.split
        entries = np.arange(chunk.entry_start, chunk.entry_start + n, dtype=np.int64)
        return split_codes(chunk.file_key, entries, s.validation, s.test, s.seed)

    def __call__(self, chunk: Chunk, split: str | None) -> Columns:
        """Preprocess one chunk, keeping events of ``split`` (None: every split)."""
        n = len(next(iter(chunk.arrays.values()))) if chunk.arrays else 0
        keep = np.ones(n, dtype=bool)
        if split is not None:
            keep &= self.split_of(chunk, n) == SPLITS[split]
        env = evaluate_env(self.layout, chunk.arrays)
        keep &= selection(self.layout, env, n, chunk.url)
        index = np.flatnonzero(keep)
        env = {k: (v[index] if _is_array(v) else v) for k, v in env.items()}
        m = len(index)
        y = self._label(env, chunk, m)
        w = self._weight(env, chunk, m)
        x, mask = self._features(env, chunk, m)
        return Columns(
            x=x, y=y, w=w, mask=mask,
            file=np.full(m, chunk.file_index, dtype=np.int32),
            entry=(index + chunk.entry_start).astype(np.int64),
        )

    def _label(self, env: Mapping[str, Any], chunk: Chunk, m: int) -> np.ndarray:
        label_expr = self.layout.label
        if label_expr is None:
            value = self.pipeline.data.sources[chunk.source].label
            assert value is not None
            return np.full(m, value, dtype=np.float32)
        y = as_float64(label_expr.evaluate(env), m)
        self._finite(y, "the label", "data.label", chunk)
        return y.astype(np.float32)

    def _weight(self, env: Mapping[str, Any], chunk: Chunk, m: int) -> np.ndarray:
        if self.layout.weight is None:
            return np.ones(m, dtype=np.float32)
        w = as_float64(self.layout.weight.evaluate(env), m)
        self._finite(w, "the weight", "data.weight", chunk)
        return w.astype(np.float32)

    def _finite(self, values: np.ndarray, what: str, path: str, chunk: Chunk) -> None:
        bad = ~np.isfinite(values)
        if bad.any():
            raise BadValues(f"{what} is NaN or infinite for {int(bad.sum())} events",
                            file_path=chunk.url, field_path=path)

    def _features(self, env: Mapping[str, Any], chunk: Chunk,
                  m: int) -> tuple[np.ndarray, np.ndarray]:
        """Fill ``x`` block by block, normalising each block as it is written.

        Writing into one preallocated float32 array avoids a float64 copy of
        the whole chunk (memory and time were both dominated by it).
        """
        layout = self.layout
        jagged = sorted_collections(layout, env, chunk.url)
        x = np.empty((m, self.n_columns), dtype=np.float32)
        slots: dict[str, SlotIndex] = {}
        col = 0
        for f in layout.features:
            if f.jagged:
                assert f.collection is not None
                content, counts = flat_values(jagged[f.name])
                if f.collection not in slots:
                    max_len = layout.collections[f.collection].max_len
                    assert max_len is not None
                    slots[f.collection] = SlotIndex(counts, max_len)
                block = slots[f.collection].fill(self._clean(content, f.name, chunk), f.pad)
            else:
                value = as_float64(f.expression.evaluate(env), m)
                block = self._clean(value, f.name, chunk)[:, None]
            width = block.shape[1]
            x[:, col:col + width] = (block - self.shift[col:col + width]) * self.scale[col:col + width]
            col += width
        masks = [slots[c].mask for c in layout.collections]
        mask = np.concatenate(masks, axis=1) if masks else np.zeros((m, 0), dtype=np.float32)
        return x, mask

    def _clean(self, values: np.ndarray, name: str, chunk: Chunk) -> np.ndarray:
        bad = ~np.isfinite(values)
        if not bad.any():
            return values
        policy = self.pipeline.data.nan
        if policy.policy == "error":
            raise BadValues(
                f"feature {name!r} has {int(np.isnan(values).sum())} NaN and "
                f"{int(np.isinf(values).sum())} infinite values in this chunk; set "
                "data.nan: {policy: replace, value: 0} to replace them",
                file_path=chunk.url, branch=name, field_path="data.nan",
            )
        values = values.copy()
        values[bad] = policy.value
        return values


def _is_array(value: Any) -> bool:
    return isinstance(value, (ak.Array, np.ndarray)) and getattr(value, "ndim", 0) >= 1
