"""Label counts of the training split, for ``class_weights: balanced``.

Layer: train, reading through the data layer's public pieces (the chunk plan,
:func:`mlaas.data.sources.read_range`, the split hash). Pass 1
(:mod:`mlaas.data.stats`) counts label values over every split together,
and per source and split only when the sources carry the labels. With
labels from ``data.label`` the training split's counts need a pass of their
own: it reads only the branches the cut and the label need (through derived
names; usually a few flat branches, a small part of what training reads),
keeps the events the loader assigns to the training split (the same entry
hash) and counts their labels, cast to float32 as the loader casts them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from mlaas._progress import event_progress
from mlaas.data import sources
from mlaas.data.layout import Layout, as_float64
from mlaas.data.transform import SPLITS, selection, split_codes
from mlaas.spec import Pipeline

__all__ = ["expression_inputs", "train_label_counts"]


def expression_inputs(layout: Layout,
                      names: Iterable[str]) -> tuple[list[str], list[tuple[str, Any]]]:
    """The branches, and the derived names in spec order, that reading ``names`` needs.

    ``names`` are what expressions refer to (branches or derived names); a
    derived name pulls in what its own expression reads, so a reader can
    fetch only these branches and evaluate only these derived names.
    """
    needed = set(names)
    kept: list[tuple[str, Any]] = []
    for name, e in reversed(layout.derived):
        if name in needed:
            needed |= set(e.names)
            kept.append((name, e))
    return sorted(n for n in needed if n in layout.branches), kept[::-1]


def train_label_counts(pipeline: Pipeline, dataset: Any,
                       progress: bool = False) -> dict[float, float]:
    """Events per label value in the training split, labels from ``data.label``.

    Args:
        pipeline (Pipeline): the spec; ``data.label`` must be set.
        dataset (RootDataset): any split of the run (its layout and chunk plan are used).
        progress (bool): draw a bar on stderr (a pass over the label's branches).
    """
    layout: Layout = dataset.layout
    label = layout.label
    if label is None:
        raise ValueError("train_label_counts needs data.label")
    cut_names = set(layout.cut.names) if layout.cut is not None else set()
    branches, derived = expression_inputs(layout, set(label.names) | cut_names)
    counts: dict[float, float] = {}
    chunks = list(dataset.chunks)
    with event_progress("class counts", sum(c.entries for c in chunks), progress) as advance:
        for c in chunks:
            y = _train_labels(pipeline, layout, c, branches, derived)
            values, n = np.unique(y, return_counts=True)
            for v, k in zip(values.tolist(), n.tolist(), strict=True):
                counts[float(v)] = counts.get(float(v), 0.0) + float(k)
            advance(c.entries, c.compressed_bytes)
    return counts


def _train_labels(pipeline: Pipeline, layout: Layout, chunk: Any, branches: list[str],
                  derived: list[tuple[str, Any]]) -> np.ndarray:
    """The labels of one chunk's training events (the loader's split hash and cut)."""
    arrays = sources.read_range(chunk.url, layout.tree, branches, chunk.start, chunk.stop,
                                pipeline.data.retries)
    env: dict[str, Any] = dict(arrays)
    for name, e in derived:
        env[name] = e.evaluate(env)
    n = chunk.entries
    s = pipeline.data.split
    entries = np.arange(chunk.start, chunk.stop, dtype=np.int64)
    keep = split_codes(chunk.key, entries, s.validation, s.test, s.seed) == SPLITS["train"]
    keep &= selection(layout, env, n, chunk.url)
    assert layout.label is not None
    return as_float64(layout.label.evaluate(env), n).astype(np.float32)[keep]
