"""Pass 1: streaming statistics of every feature over the whole selection.

Layer: data, interpretation side. Moments are merged chunk by chunk with
Chan's parallel formula in float64, so the constants are those of the whole
selected dataset, not of a prefix, and do not depend on the chunk size
beyond rounding. Jagged branches are pooled over all their elements (before
truncation) and also give a multiplicity histogram, whose 95th percentile is
the default ``max_len``.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlaas.data import chunks as chunking
from mlaas.data import sources
from mlaas.data.layout import Layout, as_float64
from mlaas.data.transform import (
    SPLITS,
    evaluate_env,
    jagged_values,
    selection,
    split_codes,
)
from mlaas.errors import BadValues, DataError, SpecError
from mlaas.spec import Pipeline, canonical_data

__all__ = ["Moments", "FeatureStats", "Stats", "compute", "normalization", "percentile_length"]

Progress = Callable[[int, int], None]


@dataclass
class Moments:
    """Count, NaN/inf counts, min, max, mean and M2 of the finite values seen so far."""

    count: int = 0
    nan: int = 0
    inf: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: np.ndarray) -> bool:
        """Merge ``values`` in; True when some of them are NaN or infinite.

        The NaN and inf counts are only taken when a value is not finite, so
        clean data (the usual case) costs one ``isfinite`` pass.
        """
        finite = np.isfinite(values)
        clean = bool(finite.all())
        if not clean:
            self.nan += int(np.isnan(values).sum())
            self.inf += int(np.isinf(values).sum())
        v = values if clean else values[finite]
        n = int(v.size)
        if n == 0:
            return not clean
        mean = float(v.mean())
        m2 = float(((v - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        return not clean

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count else 0.0


@dataclass
class FeatureStats:
    """Statistics of one feature (a jagged one pooled over all its elements)."""

    name: str
    jagged: bool
    moments: Moments = field(default_factory=Moments)
    multiplicity: list[int] = field(default_factory=list)

    def add_counts(self, counts: np.ndarray) -> None:
        hist = np.bincount(counts, minlength=len(self.multiplicity))
        if len(self.multiplicity) < len(hist):
            self.multiplicity.extend([0] * (len(hist) - len(self.multiplicity)))
        self.multiplicity = [int(a + b) for a, b in zip(self.multiplicity, hist, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        m = self.moments
        out: dict[str, Any] = {
            "jagged": self.jagged, "count": m.count, "nan": m.nan, "inf": m.inf,
            "min": m.min if m.count else None, "max": m.max if m.count else None,
            "mean": m.mean, "std": m.std, "m2": m.m2,
        }
        if self.jagged:
            out["multiplicity"] = self.multiplicity
            out["multiplicity_p95"] = percentile_length(self.multiplicity)
            events = sum(self.multiplicity)
            out["multiplicity_mean"] = (
                sum(i * c for i, c in enumerate(self.multiplicity)) / events if events else 0.0
            )
        return out

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> FeatureStats:
        m = Moments(count=d["count"], nan=d["nan"], inf=d["inf"],
                    min=d["min"] if d["min"] is not None else float("inf"),
                    max=d["max"] if d["max"] is not None else float("-inf"),
                    mean=d["mean"], m2=d["m2"])
        return cls(name, d["jagged"], m, list(d.get("multiplicity", [])))


def percentile_length(hist: list[int], q: float = 0.95) -> int:
    """Smallest length that holds every object of at least ``q`` of the events (at least 1)."""
    total = sum(hist)
    if total == 0:
        return 1
    cum = np.cumsum(hist)
    return max(1, int(np.searchsorted(cum, q * total - 1e-9)))


@dataclass
class Stats:
    """The outcome of pass 1, serialisable to ``stats.json``."""

    features: dict[str, FeatureStats]
    sources: list[dict[str, Any]]
    splits: dict[str, int]
    label: dict[str, Any]
    max_len: dict[str, int]
    warnings: list[str]
    seconds: float = 0.0
    entries: int = 0
    compressed_bytes: int = 0
    #: the spec fields pass 1 depends on (:func:`spec_of`), to refuse another spec's stats
    spec: dict[str, Any] | None = None
    #: the tree pass 1 read, as resolved (``data.tree`` may be left to the file)
    tree: str | None = None

    @property
    def selected(self) -> int:
        return sum(s["selected"] for s in self.sources)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "selected": self.selected,
            "seconds": round(self.seconds, 3),
            "compressed_bytes": self.compressed_bytes,
            "sources": self.sources,
            "splits": self.splits,
            "label": self.label,
            "max_len": self.max_len,
            "features": {k: v.to_dict() for k, v in self.features.items()},
            "warnings": self.warnings,
            "spec": self.spec,
            "tree": self.tree,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        return cls(
            features={k: FeatureStats.from_dict(k, v) for k, v in d["features"].items()},
            sources=d["sources"], splits=d["splits"], label=d["label"], max_len=d["max_len"],
            warnings=d["warnings"], seconds=d.get("seconds", 0.0), entries=d.get("entries", 0),
            compressed_bytes=d.get("compressed_bytes", 0), spec=d.get("spec"),
            tree=d.get("tree"),
        )

    def check_fits(self, pipeline: Pipeline, layout: Layout,
                   files: list[chunking.FileInfo]) -> None:
        """Refuse statistics of another selection or other files (``RootDataset(stats=...)``).

        Given another spec's pass 1 (one with a cut, for a spec without),
        a dataset counted the wrong events and normalised with the wrong
        constants, silently; a feature the stats lacked was a bare KeyError.
        """
        found = self.misfit(pipeline, layout, files)
        if found is not None:
            reason, field_path = found
            raise SpecError(f"the pass-1 statistics given {reason}; run pass 1 for this spec "
                            "and these files (mlaas stats SPEC -o stats.json)",
                            field_path=field_path)

    def misfit(self, pipeline: Pipeline, layout: Layout,
               files: list[chunking.FileInfo]) -> tuple[str, str] | None:
        """Why these statistics are not this spec's on these files, and the field; or None.

        Only what changes pass 1's numbers is compared (:func:`pass1_key`):
        ``max_len``, ``pad``, ``sort_by``, the order of features, names of
        sources and where the files lie may all differ. Statistics written
        before they recorded their spec are checked by features and files only.
        """
        if self.spec is not None:
            now, then = pass1_key(spec_of(pipeline)), pass1_key(self.spec)
            differ = [k for k in now if _json(now[k]) != _json(then.get(k))]
            if differ:
                return ("were computed for another spec: data." + ", data.".join(differ)
                        + " differ", "data." + differ[0])
        tree = self.tree if self.tree is not None else (self.spec or {}).get("tree")
        if tree is not None and tree != layout.tree:  # a file may hold several trees
            return f"were computed on tree {tree!r}, this spec reads {layout.tree!r}", "data.tree"
        missing = [f.name for f in layout.features if f.name not in self.features]
        if missing:
            return f"have no feature {', '.join(map(repr, missing))}", "data.features"
        if len(self.sources) != len(pipeline.data.sources):
            return (f"have {len(self.sources)} sources, this spec {len(pipeline.data.sources)}",
                    "data.sources")
        for i, src in enumerate(self.sources):
            name = pipeline.data.sources[i].name or f"source{i}"
            reason = _other_files(src, name, [f for f in files if f.ref.source == i])
            if reason is not None:
                return f"were computed over other files: {reason}", f"data.sources[{i}].files"
        return None


def _other_files(src: dict[str, Any], name: str, here: list[chunking.FileInfo]) -> str | None:
    """How a source's files differ from those pass 1 read: base name, ROOT UUID, entries read.

    The base name seeds each event's split and the UUID names the file's
    content, so a directory moved or copied elsewhere still fits while a
    file written anew under its old name does not. The entries read tell
    which events pass 1 saw: ``max_events`` spends its budget in file
    order, so the same files in another order are other events; and a file
    that grew in place (ROOT's UPDATE mode keeps the UUID) has more.
    Statistics without UUIDs (written before they recorded them) compare
    full URLs; without ``file_entries``, the entries are not compared.
    ``name`` is the source's name in this spec (a report may rename it).
    """
    urls, uuids, counts = src.get("files") or [], src.get("uuids"), src.get("file_entries")
    if not urls:
        return None
    by_uuid = uuids is not None and len(uuids) == len(urls)
    if by_uuid:
        theirs = [(sources.split_key(u), d) for u, d in zip(urls, uuids, strict=True)]
        ours = [(f.ref.key, f.identity.get("uuid")) for f in here]
    else:
        theirs, ours = [(u,) for u in urls], [(f.ref.url,) for f in here]
    same_files = Counter(theirs) == Counter(ours)
    if same_files and counts is not None and len(counts) == len(urls):
        read = dict(zip(theirs, counts, strict=True))  # were the same entries read?
        for f, o in zip(here, ours, strict=True):
            if read[o] != f.entries:
                return (f"file {f.ref.url} of source {name!r}: pass 1 read {read[o]:,} of "
                        f"its entries, this spec reads {f.entries:,} (data.max_events "
                        "spends its budget in file order, or the file has grown)")
    if same_files:
        return None
    theirs_set, ours_set = set(theirs), set(ours)  # sets: a source may hold thousands of files
    new = [f.ref.url for f, o in zip(here, ours, strict=True) if o not in theirs_set]
    gone = [u for u, t in zip(urls, theirs, strict=True) if t not in ours_set]
    if new and not by_uuid:
        return (f"file {new[0]} of source {name!r} is not among them (statistics from before "
                "files' UUIDs were recorded compare full paths: a file moved is another file "
                "to them)")
    if new:
        same_name = sources.split_key(new[0]) in {key for key, _ in theirs}
        return (f"file {new[0]} of source {name!r} is not among them"
                + (" (a file of that name is, with other content)" if same_name else ""))
    if gone:
        return f"their file {gone[0]} of source {name!r} is not among this spec's files"
    return f"source {name!r} has {len(ours)} files here against {len(theirs)}"


#: The data fields that decide what pass 1 counts (not normalize, balance, step_size,
#: cache, nan, retries: the counts and moments are the same under any of them).
_PASS1_FIELDS = {"tree", "redirector", "sources", "label", "features", "exclude", "identifiers",
                 "derived", "cut", "weight", "split", "max_events"}


def spec_of(pipeline: Pipeline) -> dict[str, Any]:
    """The spec fields pass 1 depends on, as written (JSON values), recorded in stats.json."""
    return pipeline.data.model_dump(mode="json", include=_PASS1_FIELDS)


def pass1_key(spec: dict[str, Any]) -> dict[str, Any]:
    """Of a recorded :func:`spec_of`, what decides pass 1's numbers, in a fixed order.

    Left out as they are checked otherwise: the files as written and the
    redirector (the resolved files are compared by content), the tree (the
    one resolved is compared: ``tree: null`` and the name of a file's only
    tree are the same tree); the features, exclude and identifiers (each
    feature of this spec must have its statistics, whatever else they hold;
    a feature's moments do not depend on its max_len, pad or sort_by, as
    pass 1 pools every element). Source names only label reports.
    ``derived`` is compared in its order (:func:`mlaas.spec.canonical_data`).
    """
    return {
        "cut": spec.get("cut"),
        "derived": canonical_data({"derived": spec.get("derived") or {}})["derived"],
        "label": spec.get("label"),
        "weight": spec.get("weight"),
        "sources": [s.get("label") for s in spec.get("sources") or []],
        "split": spec.get("split"),
        "max_events": spec.get("max_events"),
    }


def _json(value: Any) -> str:
    """A comparable text of a JSON value: NaN equals NaN here (a `pad: .nan` of the spec)."""
    return json.dumps(value, sort_keys=True)


class _LabelStats:
    """Distinct label values while they are few (classification), else moments."""

    LIMIT = 64

    def __init__(self) -> None:
        self.values: dict[float, int] | None = {}
        self.moments = Moments()

    def update(self, y: np.ndarray) -> None:
        self.moments.update(y)
        if self.values is None:
            return
        uniq, counts = np.unique(y, return_counts=True)
        for u, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            self.values[u] = self.values.get(u, 0) + c
        if len(self.values) > self.LIMIT:
            self.values = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": self.moments.mean, "std": self.moments.std}
        if self.values is not None:
            out["counts"] = {_label_key(k): v for k, v in sorted(self.values.items())}
        return out


def _label_dict(labels: _LabelStats, train: _LabelStats) -> dict[str, Any]:
    """Label moments and counts over every split, and the training split's counts."""
    out = labels.to_dict()
    if "counts" in out:
        out["train_counts"] = train.to_dict().get("counts", {})
    return out


def _label_key(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def compute(pipeline: Pipeline, layout: Layout, files: list[chunking.FileInfo],
            plan: list[chunking.ChunkRange], progress: Progress | None = None) -> Stats:
    """Run pass 1 over every planned chunk.

    Args:
        pipeline (Pipeline): the spec.
        layout (Layout): the spec bound to the tree.
        files, plan: from :func:`mlaas.data.chunks.plan`.
        progress (callable): called with ``(events, compressed_bytes)`` per chunk.
    """
    started = time.perf_counter()
    feats = {f.name: FeatureStats(f.name, f.jagged) for f in layout.features}
    per_source = [
        {"name": s.name or f"source{i}", "label": s.label, "files": [], "uuids": [],
         "file_entries": [], "entries": 0, "selected": 0, "splits": {k: 0 for k in SPLITS}}
        for i, s in enumerate(pipeline.data.sources)
    ]
    if layout.weight is not None:
        for src in per_source:
            src["sum_weights"] = 0.0
    for info in files:
        per_source[info.ref.source]["files"].append(info.ref.url)
        per_source[info.ref.source]["uuids"].append(info.identity.get("uuid"))
        per_source[info.ref.source]["file_entries"].append(info.entries)
    labels = _LabelStats()
    train_labels = _LabelStats()  # class_weights: balanced weighs the training split
    split = pipeline.data.split
    first_bad: str | None = None  # the first file with a NaN or infinite feature value
    targets = {"label": _NonFinite(), "weight": _NonFinite()}  # per event, not per feature
    with sources.OpenTrees() as trees:  # each file opened once per reading thread
        for c, chunk in chunking.read_ahead(pipeline, layout, plan, trees):
            n = c.entries
            env = evaluate_env(layout, chunk.arrays)
            keep = selection(layout, env, n, c.url)
            index = np.flatnonzero(keep)
            codes = split_codes(c.key, index + c.start, split.validation, split.test, split.seed)
            src = per_source[c.source]
            src["entries"] += n
            src["selected"] += int(index.size)
            for name, code in SPLITS.items():
                src["splits"][name] += int((codes == code).sum())
            if _update_features(layout, env, feats, keep, c.url) and first_bad is None:
                first_bad = c.url
            if layout.label is not None:
                y = as_float64(layout.label.evaluate(env), n)[index]
                targets["label"].update(y, c.url)
            else:
                y = np.full(index.size, float(pipeline.data.sources[c.source].label))
            if layout.weight is not None:
                w = as_float64(layout.weight.evaluate(env), n)[index]
                targets["weight"].update(w, c.url)
                # the yield a physicist checks first (and a NaN weight fails pass 1 below)
                src["sum_weights"] += float(w.sum())
            labels.update(y)
            train_labels.update(y[codes == SPLITS["train"]])
            if progress:
                progress(n, c.compressed_bytes)
    stats = Stats(
        features=feats, sources=per_source,
        splits={k: sum(s["splits"][k] for s in per_source) for k in SPLITS},
        label=_label_dict(labels, train_labels), max_len={}, warnings=list(layout.warnings),
        entries=sum(s["entries"] for s in per_source),
        compressed_bytes=sum(c.compressed_bytes for c in plan), spec=spec_of(pipeline),
        tree=layout.tree,
    )
    # complete before any check fails: the errors carry these stats for mlaas stats -o
    stats.max_len = resolve_lengths(layout, stats)
    stats.seconds = time.perf_counter() - started
    _check(pipeline, layout, stats)
    # in stats.json and the tables of mlaas stats, not a Python warning: a one-class file
    # can be meant (applying a model, a sample of one process)
    stats.warnings.extend(_one_class(pipeline, stats))
    for note in _zero_variance(stats):
        stats.warnings.append(note)
        warnings.warn(note, UserWarning, stacklevel=2)
    # the notes first: the stats a failing check carries (mlaas stats -o) hold them too
    _check_targets(pipeline, stats, targets)
    _check_finite(pipeline, stats, first_bad)
    return stats


def _update_features(layout: Layout, env: dict[str, Any], feats: dict[str, FeatureStats],
                     keep: np.ndarray, url: str) -> bool:
    """Add one chunk's selected values; True when one of them is NaN or infinite.

    The answer comes from the scan the moments make anyway, so finding the
    first file with a bad value costs nothing on clean chunks.
    """
    jagged = jagged_values(layout, env, keep, url) if layout.collections else {}
    bad = False
    for f in layout.features:
        if f.jagged:
            content, counts = jagged[f.name]
            bad |= feats[f.name].moments.update(content)
            feats[f.name].add_counts(counts)
        else:
            value = as_float64(f.expression.evaluate(env), len(keep))[keep]
            bad |= feats[f.name].moments.update(value)
    return bad


def _check(pipeline: Pipeline, layout: Layout, stats: Stats) -> None:
    """Fail on no entries or nothing selected; warn about a source the cut empties."""
    if stats.entries == 0:
        raise DataError(f"tree {layout.tree!r} has no entries in any input file")
    if stats.selected == 0:
        raise DataError(
            f"the cut {pipeline.data.cut!r} selects no events out of {stats.entries}",
            field_path="data.cut",
        )
    for s_index, s in enumerate(stats.sources):
        if s["selected"] == 0:  # said aloud: its class is missing from every batch
            note = (f"source {s['name']} (data.sources[{s_index}]) has no events after the "
                    f"cut {pipeline.data.cut!r}: its events will be in no batch")
            stats.warnings.append(note)
            warnings.warn(note, UserWarning, stacklevel=3)


_REDUCES = re.compile(r"\b(max|min|mean)\s*\(")


class _NonFinite:
    """NaN and infinite values of the label or the weight, and the first file with one."""

    def __init__(self) -> None:
        self.nan = self.inf = 0
        self.first: str | None = None

    def update(self, values: np.ndarray, url: str) -> None:
        if np.isfinite(values).all():
            return
        self.nan += int(np.isnan(values).sum())
        self.inf += int(np.isinf(values).sum())
        self.first = self.first or url


def _check_targets(pipeline: Pipeline, stats: Stats, targets: dict[str, _NonFinite]) -> None:
    """Fail in pass 1 on a NaN or infinite label or weight of a selected event.

    No ``data.nan`` policy applies to them (a replaced label would teach the
    wrong answer). Found here, the error counts every file and quotes the
    expression; found later by the transform, it counted one shuffle
    piece's events, after pass 1 had passed and training had begun.
    """
    for what, found in targets.items():
        if not (found.nan or found.inf):
            continue
        expression = str(getattr(pipeline.data, what))
        hint = ("max, min and mean of an empty collection are NaN unless given the value "
                "for it, as in max(Jet_pt, 0); or " if _REDUCES.search(expression) else "")
        counts = " and ".join(f"{kind} for {n}" for kind, n in
                              (("NaN", found.nan), ("infinite", found.inf)) if n)
        error = BadValues(
            f"the {what} {expression!r} is {counts} "
            f"selected events of all files, the first in the file below; {hint}data.cut "
            "can leave such events out",
            file_path=found.first, field_path=f"data.{what}",
        )
        error.stats = stats
        raise error


def _check_finite(pipeline: Pipeline, stats: Stats, first_bad: str | None) -> None:
    """Fail on non-finite values under ``nan: error``, with the counts of every feature.

    ``first_bad`` is the first file where a NaN or infinity was seen: the
    counts cover every file, the file says where to start looking. The
    error carries the finished statistics (``stats``), so ``mlaas stats``
    still shows and writes them.
    """
    bad = {k: (f.moments.nan, f.moments.inf) for k, f in stats.features.items()
           if f.moments.nan or f.moments.inf}
    if bad and pipeline.data.nan.policy == "error":
        listed = "; ".join(f"{k!r}: {n} NaN, {i} inf" for k, (n, i) in bad.items())
        error = BadValues(
            f"non-finite feature values in the selected events of all files ({listed}), "
            "the first in the file below; set data.nan: {policy: replace, value: 0} to "
            "replace them", file_path=first_bad, field_path="data.nan",
        )
        error.stats = stats  # the counts are what the user needs to see: keep them
        raise error


def _one_class(pipeline: Pipeline, stats: Stats) -> list[str]:
    """A ``data.label`` with one value in every selected event: nothing to learn.

    Only for a label expression: with per-source labels one class means one
    source (as deliberate as it is plain in the spec) or a source the cut
    empties, which :func:`_check` reports already.
    """
    counts = stats.label.get("counts") or {}
    if pipeline.data.label is None or len(counts) != 1:
        return []
    value = next(iter(counts))
    return [f"the label is {value} for every selected event ({stats.selected:,}): a classifier "
            "needs events of at least two classes (check data.label and data.cut)"]


def _zero_variance(stats: Stats) -> list[str]:
    """A note per constant feature: it carries no information, and its scale stays 1.

    Warned about (``UserWarning``) as well as kept in ``stats.warnings``, so
    a Python user of ``RootDataset`` and ``mlaas run`` see it, not only ``mlaas stats``.
    """
    return [
        f"feature {k!r} has zero variance (always {f.moments.min:g}) over "
        f"{f.moments.count} values: it carries no information; its scale is left at 1"
        for k, f in stats.features.items() if f.moments.count and f.moments.std == 0.0
    ]


def resolve_lengths(layout: Layout, stats: Stats) -> dict[str, int]:
    """Fill each collection's max_len: the spec's, else the 95th percentile of pass 1."""
    out: dict[str, int] = {}
    for coll in layout.collections.values():
        if coll.max_len is None:
            coll.max_len = percentile_length(stats.features[coll.features[0]].multiplicity)
        out[coll.name] = coll.max_len
    return out


def normalization(pipeline: Pipeline, layout: Layout,
                  stats: Stats) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``shift`` and ``scale`` so that ``(raw - shift) * scale`` is normalised.

    A jagged branch uses one pair of constants for all its slots (pooled over
    its elements), so slot 5 of a rarely filled collection is not blown up by
    a tiny variance. A constant feature keeps scale 1.
    """
    shift: list[float] = []
    scale: list[float] = []
    for f in layout.features:
        m = stats.features[f.name].moments
        if f.normalize == "standard" and m.count:
            a, b = m.mean, (1.0 / m.std if m.std > 0 else 1.0)
        elif f.normalize == "minmax" and m.count:
            span = m.max - m.min
            a, b = m.min, (1.0 / span if span > 0 else 1.0)
        else:
            a, b = 0.0, 1.0
        width = layout.collections[f.collection].max_len if f.jagged and f.collection else 1
        assert width is not None
        shift.extend([a] * width)
        scale.extend([b] * width)
    return np.array(shift, dtype=np.float64), np.array(scale, dtype=np.float64)
