"""The predecessor's data path, re-implemented for comparison: per-event Python.

MLaaS4HEP (github.com/vkuznet/MLaaS4HEP, ``src/python/MLaaS4HEP/reader.py``
``RootDataReader`` and ``generator.py`` ``RootDataGenerator``) turned ROOT
trees into training arrays in two passes:

1. "specs": read the tree in chunks of ``chunk_size`` events; per branch keep
   the global min and max (jagged branches flattened), and per jagged branch
   the largest multiplicity ``jdim`` seen, found by a Python loop over events
   (``dim_jarr``). Specs of several files are merged (min of mins, max of
   maxes, max of dims).
2. per event (``RootDataReader.next``): pick the event's value of every
   branch, min-max scale it (``(x - min) / (max - min)``, left alone when
   ``max == min``), pad each jagged list with NaN up to ``jdim``
   (``add_dim``), chain everything into one list, derive the mask with
   ``isnan`` and return ``np.array``s. The generator (``next_mix_files``)
   takes events from each file in proportion to its size, appends the
   per-event arrays to lists and stacks them with ``np.array`` per chunk.

This module does the same work in the same per-event Python style; it is
written from that description, not copied. One deliberate kindness: the
predecessor ran on uproot 3, whose ``JaggedArray[i]`` returned a numpy view
of one event's list. Indexing an awkward 2 array per event is far slower
(tens of microseconds), which would exaggerate the predecessor's cost, so
each chunk's jagged branch is wrapped in :class:`JaggedView`, which gives
the same numpy view per event at uproot 3's price.

Keys are ordered as the predecessor ordered them: sorted flat keys, then
sorted jagged keys.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import awkward as ak
import numpy as np
import uproot

__all__ = ["JaggedView", "Specs", "first_pass", "PredecessorReader", "run"]


class JaggedView:
    """One chunk of a jagged branch; ``view[i]`` is event i's list as a numpy view (uproot 3)."""

    def __init__(self, array: ak.Array) -> None:
        counts = ak.to_numpy(ak.num(array, axis=1)).astype(np.int64)
        self.offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offsets[1:])
        self.content = ak.to_numpy(ak.flatten(array, axis=1))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.content[self.offsets[i]:self.offsets[i + 1]]

    def flatten(self) -> np.ndarray:
        return self.content


def _chunks(path: str, tree: str, branches: Sequence[str], chunk_size: int,
            nevts: int) -> Iterator[dict[str, object]]:
    """``tree.iterate(branches, entrysteps=chunk_size)`` with jagged branches as JaggedViews."""
    t = uproot.open(path)[tree]
    stop = min(nevts, t.num_entries) if nevts >= 0 else t.num_entries
    for arrays in t.iterate(list(branches), step_size=chunk_size, entry_stop=stop,
                            library="ak", how=dict):
        out: dict[str, object] = {}
        for key, value in arrays.items():
            if value.ndim > 1:
                out[key] = JaggedView(value)
            else:
                out[key] = ak.to_numpy(value)
        yield out


def _dim_jarr(arr: JaggedView) -> int:
    """The predecessor's ``dim_jarr``: the largest list length, by a Python loop over events."""
    jdim = 0
    for i in range(len(arr)):
        n = len(arr[i])
        if jdim < n:
            jdim = n
    return jdim


@dataclass
class Specs:
    """What the predecessor's first pass wrote to ``specs-*.json``."""

    fkeys: list[str]
    jkeys: list[str]
    minv: dict[str, float] = field(default_factory=dict)
    maxv: dict[str, float] = field(default_factory=dict)
    jdim: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Specs) -> None:
        for k, v in other.minv.items():
            self.minv[k] = min(self.minv.get(k, v), v)
        for k, v in other.maxv.items():
            self.maxv[k] = max(self.maxv.get(k, v), v)
        for k, v in other.jdim.items():
            self.jdim[k] = max(self.jdim.get(k, 0), v)

    @property
    def width(self) -> int:
        return len(self.fkeys) + sum(self.jdim[k] for k in self.jkeys)


def first_pass(path: str, tree: str, flat: Sequence[str], jagged: Sequence[str],
               chunk_size: int, nevts: int) -> Specs:
    """Min, max and largest multiplicity of every branch over the first ``nevts`` events."""
    specs = Specs(sorted(flat), sorted(jagged))
    for chunk in _chunks(path, tree, [*flat, *jagged], chunk_size, nevts):
        for key, value in chunk.items():
            values = value.flatten() if isinstance(value, JaggedView) else value
            if len(values):
                lo, hi = float(np.min(values)), float(np.max(values))
            else:
                lo, hi = 1e15, -1e15
            specs.minv[key] = min(specs.minv.get(key, lo), lo)
            specs.maxv[key] = max(specs.maxv.get(key, hi), hi)
            if isinstance(value, JaggedView):
                specs.jdim[key] = max(specs.jdim.get(key, 0), _dim_jarr(value))
    return specs


class PredecessorReader:
    """``RootDataReader.next``: one event at a time, scaled and NaN-padded in Python."""

    def __init__(self, path: str, tree: str, specs: Specs, chunk_size: int, nevts: int) -> None:
        self.specs = specs
        self.keys = specs.fkeys + specs.jkeys
        self.n_flat = len(specs.fkeys)
        self.min_list = [specs.minv[k] for k in self.keys]
        self.max_list = [specs.maxv[k] for k in self.keys]
        self.dimension_list = [1] * self.n_flat + [specs.jdim[k] for k in specs.jkeys]
        self._chunks = _chunks(path, tree, self.keys, chunk_size, nevts)
        self.read_seconds = 0.0

    def _add_dim(self, elem: np.ndarray, index: int) -> list[float]:
        a = np.empty(self.dimension_list[index]) * np.nan
        a[:elem.shape[0]] = elem
        return a.tolist()

    def events(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            t0 = time.perf_counter()
            branches = next(self._chunks, None)
            self.read_seconds += time.perf_counter() - t0
            if branches is None:
                return
            n = len(branches[self.keys[0]])  # type: ignore[arg-type]
            for idx in range(n):
                yield self._event(branches, idx)

    def _event(self, branches: dict[str, object], idx: int) -> tuple[np.ndarray, np.ndarray]:
        rec = [branches[key][idx] for key in self.keys]  # type: ignore[index]
        result = [x1 if x3 == x2 else (x1 - x2) / (x3 - x2)
                  for (x1, x2, x3) in zip(rec, self.min_list, self.max_list)]
        result = [[result[i]] if i < self.n_flat
                  else result[i].tolist() if len(result[i]) == self.dimension_list[i]
                  else self._add_dim(result[i], i)
                  for i in range(len(result))]
        xdf = list(itertools.chain.from_iterable(result))
        mask = list(np.isnan(xdf) * 1)
        return np.array(xdf), np.array(mask)


def run(files: Sequence[str], labels: Sequence[int], *, events: int, tree: str = "Events",
        flat: Sequence[str], jagged: Sequence[str], chunk_size: int = 10_000,
        batch_size: int = 1024) -> dict[str, float]:
    """Both passes over ``events`` events split evenly across ``files``; timings and sizes.

    Batches are formed as the predecessor's generator did: per chunk, events
    from each file in turn are appended to Python lists and stacked with
    ``np.array``; the stacked chunk is then cut into ``batch_size`` batches.
    """
    per_file = [events // len(files) + (1 if i < events % len(files) else 0)
                for i in range(len(files))]
    t0 = time.perf_counter()
    specs: Specs | None = None
    for path, n in zip(files, per_file, strict=True):
        s = first_pass(path, tree, flat, jagged, chunk_size, n)
        if specs is None:
            specs = s
        else:
            specs.merge(s)
    assert specs is not None
    specs_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    readers = [PredecessorReader(p, tree, specs, chunk_size, n)
               for p, n in zip(files, per_file, strict=True)]
    streams = [r.events() for r in readers]
    shares = [max(1, round(chunk_size * n / events)) for n in per_file]
    done = 0
    batches = 0
    width = 0
    live = list(range(len(files)))
    while live:
        data: list[np.ndarray] = []
        mask: list[np.ndarray] = []
        ys: list[int] = []
        for i in list(live):
            got = 0
            for xdf, mdf in itertools.islice(streams[i], shares[i]):
                data.append(xdf)
                mask.append(mdf)
                got += 1
            ys.extend([labels[i]] * got)
            if got < shares[i]:
                live.remove(i)
        if not data:
            break
        x = np.array(data)
        m = np.array(mask)
        y = np.array(ys, dtype=np.int64)
        width = x.shape[1]
        for s in range(0, len(x), batch_size):
            _ = (x[s:s + batch_size], m[s:s + batch_size], y[s:s + batch_size])
            batches += 1
        done += len(x)
    convert_seconds = time.perf_counter() - t0
    return {
        "events": done,
        "specs_seconds": specs_seconds,
        "convert_seconds": convert_seconds,
        "read_seconds": sum(r.read_seconds for r in readers),
        "width": width,
        "jdim": dict(specs.jdim),
        "batches": batches,
    }
