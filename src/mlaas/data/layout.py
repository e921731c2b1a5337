"""The spec read against a real tree: which branches to read and what each feature is.

Layer: data, interpretation side. A :class:`Layout` is built once from the
spec and the first file's tree (its branch names and types, and a small
sample to learn whether a derived expression is jagged). It never opens files
itself: the caller hands it the tree. ``stats``, ``transform`` and the loader
work from the layout, never from the raw spec.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import awkward as ak
import numpy as np
import uproot

from mlaas import expr
from mlaas.data import sources
from mlaas.errors import (
    BranchNotFound,
    ExpressionError,
    SpecError,
    UnsupportedBranch,
    close_names,
)
from mlaas.spec import JaggedFeature, NormalizeKind, Pipeline, collection_of

__all__ = ["Layout", "Feature", "Collection", "resolve_layout", "branch_kinds"]

SAMPLE_ENTRIES = 200


@dataclass(frozen=True)
class Feature:
    """One feature: a flat value per event, or a jagged branch padded to its collection's length."""

    name: str
    expression: expr.Expression
    jagged: bool
    normalize: NormalizeKind
    collection: str | None = None
    pad: float = 0.0


@dataclass
class Collection:
    """Jagged features sharing multiplicity: sorted, truncated and masked together."""

    name: str
    features: list[str] = field(default_factory=list)
    max_len: int | None = None
    sort_by: str | None = None
    #: the spec field that named ``sort_by``, for errors (not kept in bundles)
    sort_by_field: str | None = None


@dataclass
class Layout:
    """Everything needed to turn chunks of branches into feature arrays."""

    tree: str
    branches: list[str]
    derived: list[tuple[str, expr.Expression]]
    cut: expr.Expression | None
    label: expr.Expression | None
    weight: expr.Expression | None
    features: list[Feature]
    collections: dict[str, Collection]
    warnings: list[str] = field(default_factory=list)

    def column_names(self) -> list[str]:
        """Names of the columns of ``x``: jagged features expand to ``Jet_pt_0 ...``."""
        names: list[str] = []
        for f in self.features:
            if f.jagged:
                n = self._max_len(f)
                names.extend(f"{f.name}_{i}" for i in range(n))
            else:
                names.append(f.name)
        return names

    def mask_names(self) -> list[str]:
        """Names of the columns of ``mask``: one per slot of each collection."""
        return [f"{c.name}_{i}" for c in self.collections.values() for i in range(self._len(c))]

    def _max_len(self, f: Feature) -> int:
        assert f.collection is not None
        return self._len(self.collections[f.collection])

    @staticmethod
    def _len(c: Collection) -> int:
        if c.max_len is None:
            raise RuntimeError(f"max_len of collection {c.name!r} is not known before pass 1")
        return c.max_len

    def to_dict(self) -> dict[str, Any]:
        return {
            "tree": self.tree,
            "branches": self.branches,
            "features": [
                {"name": f.name, "expression": f.expression.source, "jagged": f.jagged,
                 "normalize": f.normalize, "collection": f.collection, "pad": f.pad}
                for f in self.features
            ],
            "collections": {
                c.name: {"features": c.features, "max_len": c.max_len, "sort_by": c.sort_by}
                for c in self.collections.values()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        """Rebuild a layout without a tree: :meth:`to_dict` plus ``derived`` and ``cut``.

        ``derived`` is a list of ``[name, expression]`` pairs in spec order;
        ``cut``, ``label`` and ``weight`` are expression strings or absent.
        Used by model bundles, which must preprocess events with no ROOT file.
        Their expressions are read without the refusals that guard new specs
        (``strict=False``): a bundle means what it meant when it was trained.
        """
        def parse(source: str, path: str) -> expr.Expression:
            return expr.parse(source, field_path=path, strict=False)

        def optional(source: str | None, path: str) -> expr.Expression | None:
            return None if source is None else parse(source, path)

        derived = [(str(name), parse(source, f"data.derived.{name}"))
                   for name, source in d.get("derived", [])]
        features = [
            Feature(name=f["name"], expression=parse(f["expression"], f["name"]),
                    jagged=bool(f["jagged"]), normalize=f.get("normalize", "none"),
                    collection=f.get("collection"), pad=float(f.get("pad", 0.0)))
            for f in d["features"]
        ]
        collections = {
            name: Collection(name, list(c["features"]),
                             None if c.get("max_len") is None else int(c["max_len"]),
                             c.get("sort_by"))
            for name, c in d.get("collections", {}).items()
        }
        return cls(tree=d["tree"], branches=list(d["branches"]), derived=derived,
                   cut=optional(d.get("cut"), "data.cut"),
                   label=optional(d.get("label"), "data.label"),
                   weight=optional(d.get("weight"), "data.weight"), features=features,
                   collections=collections)


#: The kind of a branch whose name has a dot (shown by ``inspect``, said by ``features: all``).
DOTTED = "a name with a dot, which expressions cannot name"


def branch_kinds(tree: Any) -> dict[str, str]:
    """Each branch as ``flat``, ``jagged`` or ``unsupported:<type>``, from its interpretation."""
    kinds: dict[str, str] = {}
    for name, branch in tree.items(filter_typename=None):
        if "/" in name:  # a sub-branch by its path: the same branch as by its own name
            continue
        if "." in name:  # a split object's member (Delphes' Jet.PT): no expression names it
            kinds[name] = f"unsupported:{DOTTED}"
            continue
        try:
            interp = branch.interpretation
        except Exception:  # noqa: BLE001 - uproot raises several kinds for unknown types
            kinds[name] = f"unsupported:{branch.typename}"
            continue
        kinds[name] = _kind(interp, branch.typename)
    return kinds


def _kind(interp: Any, typename: str) -> str:
    if isinstance(interp, uproot.interpretation.numerical.AsDtype):
        return "flat" if interp.inner_shape == () else f"unsupported:{typename}"
    if isinstance(interp, uproot.interpretation.jagged.AsJagged):
        content = interp.content
        if isinstance(content, uproot.interpretation.numerical.AsDtype) and content.inner_shape == ():
            return "jagged"
    return f"unsupported:{typename}"


class _Missing:
    """Names that are neither a branch nor a derived name defined so far, over every field.

    Collected, then raised as one error (:meth:`raise_found`): a spec with
    two typos said one per run. Each message is the expression language's
    own (closest names, then the names that do exist), so a typo can be
    fixed without opening the file.
    """

    def __init__(self, url: str, tree: str, derived: Iterable[str]) -> None:
        self.url, self.tree, self.derived = url, tree, set(derived)
        self.found: list[tuple[str, str, str]] = []  # field path, message, names that exist

    def check(self, names: set[str], available: Mapping[str, Any], field_path: str,
              source: str, defining: str | None = None) -> None:
        """``defining``: the derived name whose expression this is (it cannot read itself)."""
        unknown = {name for name in names if name not in available}
        if not unknown:
            return
        head, _, names = expr.unknown_names_message(unknown, available, source).partition(
            " available names: ")
        if defining in unknown:
            head += (f" {defining!r} reads itself: a derived expression sees the names "
                     "defined before it (and a branch of its own name, if there is one);")
        later = sorted(unknown & self.derived - {defining})
        if later:  # defined, but after the expression that reads it
            head += (f" {', '.join(map(repr, later))} is defined later in data.derived, which "
                     "is evaluated in order: move it before its first use;")
        self.found.append((field_path, head, names))

    def raise_found(self) -> None:
        """One error: the first problem in full, the others without the list of names."""
        if not self.found:
            return
        (path, head, names), *rest = self.found
        more = "".join(f"\n  and at spec field {p}: {h.rstrip(';')}" for p, h, _ in rest)
        raise BranchNotFound(f"{head} available names: {names}{more}", file_path=self.url,
                             tree=self.tree, field_path=path)


def _parse(source: str, path: str) -> expr.Expression:
    return expr.parse(source, field_path=path)


def resolve_layout(pipeline: Pipeline, tree: Any, url: str) -> Layout:
    """Bind the spec to ``tree`` (the first input file's tree).

    Args:
        pipeline (Pipeline): the validated spec.
        tree (uproot TTree): a tree with the schema every input file shares.
        url (str): where ``tree`` came from, for error messages.
    """
    data = pipeline.data
    kinds = branch_kinds(tree)
    tree_name = sources.tree_path(tree)
    available: dict[str, str] = dict(kinds)
    notes: list[str] = []

    missing = _Missing(url, tree_name, data.derived)
    derived: list[tuple[str, expr.Expression]] = []
    for name, source in data.derived.items():
        e = _parse(source, f"data.derived.{name}")
        missing.check(set(e.names), available, f"data.derived.{name}", source, defining=name)
        if name in kinds:  # meant at times (units), but a cut on it then cuts the new value
            notes.append(f"data.derived.{name} replaces the branch {name!r}: the derived names "
                         f"after it, the cut, the label, the weight and the features read "
                         f"{source!r} under that name")
        derived.append((name, e))
        available[name] = "derived"

    def bound(source: str | None, path: str) -> expr.Expression | None:
        if source is None:
            return None
        e = _parse(source, path)
        missing.check(set(e.names), available, path, source)
        return e

    cut = bound(data.cut, "data.cut")
    label = bound(data.label, "data.label")
    weight = bound(data.weight, "data.weight")

    if data.features == "all":
        missing.raise_found()  # the derived names are evaluated on a sample next
        jagged = _jagged_derived(derived, kinds, tree, url, tree_name)
        items = _all_features(data, kinds, _answer_inputs(label, weight, dict(derived)), notes,
                              jagged)
    else:
        items = list(data.features)

    features, collections = _features(pipeline, items, available, kinds, dict(derived),
                                      missing)
    missing.raise_found()
    if not features:
        for note in notes:  # why each candidate was left out, before the error
            warnings.warn(note, UserWarning, stacklevel=2)
        left = (" (features: all found no numeric branch and no derived name left after "
                "exclude, the identifiers and the label's and weight's inputs)"
                if data.features == "all" else "")
        raise SpecError(f"no features to train on{left}", file_path=url,
                        field_path="data.features")
    _check_names_of_features(data, features, available, notes)
    exprs = [e for _, e in derived] + [e for e in (cut, label, weight) if e is not None]
    exprs += [f.expression for f in features]
    needed: set[str] = set()
    for e in exprs:
        needed |= set(e.names)
    for c in collections.values():
        if c.sort_by:
            needed.add(c.sort_by)
    branches = sorted(n for n in needed if n in kinds)
    if not branches:  # nothing to read, so no chunk would have a length: say so
        raise SpecError(f"the pipeline reads no branch of tree {tree_name!r}: its features, "
                        "cut, label and weight are constants, the same for every event; "
                        "name at least one branch", file_path=url, field_path="data.features")
    for name in branches:
        if kinds[name].startswith("unsupported"):
            raise _unsupported(name, kinds[name], url, tree_name)
    layout = Layout(tree=tree_name, branches=branches, derived=derived, cut=cut, label=label,
                    weight=weight, features=features, collections=collections, warnings=notes)
    _check_kinds_on_sample(layout, tree, url)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return layout


def _unsupported(name: str, kind: str, url: str, tree_name: str) -> UnsupportedBranch:
    return UnsupportedBranch(
        f"branch {name!r} has type {kind.split(':', 1)[1]!r}, which is not a number or a "
        "list of numbers", file_path=url, tree=tree_name, branch=name)


def _inputs_of(exprs: list[expr.Expression], derived: Mapping[str, expr.Expression]) -> set[str]:
    """Every name ``exprs`` are computed from, following derived names down to branches."""
    seen: set[str] = set()
    todo = [name for e in exprs for name in e.names]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            if name in derived:
                todo.extend(derived[name].names)
    return seen


#: Why ``features: all`` leaves out what each answer field is computed from.
_ANSWER_REASONS = {
    "data.label": "a feature must not hand the model the answer",
    "data.weight": "the weight describes the sample, not the event",
}


def _answer_inputs(label: expr.Expression | None, weight: expr.Expression | None,
                   derived: Mapping[str, expr.Expression]) -> dict[str, list[str]]:
    """Each name the label or the weight is computed from, with the fields that read it."""
    readers: dict[str, list[str]] = {}
    for path, e in (("data.label", label), ("data.weight", weight)):
        if e is not None:
            for name in sorted(_inputs_of([e], derived)):
                readers.setdefault(name, []).append(path)
    return readers


def _answer_note(what: str, name: str, fields: list[str]) -> str:
    """The warning for a name ``features: all`` leaves out because ``fields`` read it.

    Said aloud because leaving a branch out silently looks like a lost
    feature: the user should learn that the label or weight took it.
    """
    reasons = "; ".join(_ANSWER_REASONS[f] for f in fields)
    return (f"features: all leaves out {what} {name!r}: {' and '.join(fields)} "
            f"{'is' if len(fields) == 1 else 'are'} computed from it ({reasons})")


def _jagged_derived(derived: list[tuple[str, expr.Expression]], kinds: Mapping[str, str],
                    tree: Any, url: str, tree_name: str) -> set[str]:
    """The derived names that give a list per event, learnt on a few entries.

    ``features: all`` takes derived names too; one made from a collection
    (``Jet_px: Jet_pt * cos(Jet_phi)``) is padded like a jagged branch.
    """
    if not derived or tree.num_entries == 0:
        return set()
    inputs = _inputs_of([e for _, e in derived], dict(derived))
    branches = sorted(n for n in inputs if n in kinds)
    for name in branches:
        if kinds[name].startswith("unsupported"):  # as for any other use of the branch
            raise _unsupported(name, kinds[name], url, tree_name)
    env = _sample(tree, url, tree_name, branches, derived)
    return {name for name, _ in derived if is_jagged_array(env[name])}


def _sample(tree: Any, url: str, tree_name: str, branches: list[str],
            derived: list[tuple[str, expr.Expression]]) -> dict[str, Any]:
    """``branches`` and every derived name, on the tree's first few entries."""
    stop = min(SAMPLE_ENTRIES, tree.num_entries)
    with sources.read_errors(url, tree_name):  # a damaged first basket names its branch
        env: dict[str, Any] = sources.read_open(tree, url, branches, 0, stop)
    with _in_file(url, tree_name):
        for name, e in derived:
            env[name] = e.evaluate(env)
    return env


@contextlib.contextmanager
def _in_file(url: str, tree_name: str) -> Iterator[None]:
    """An expression that fails on the first file's sample names that file and tree."""
    try:
        yield
    except ExpressionError as exc:
        if "file_path" in exc.context:
            raise
        raise ExpressionError(exc.message, file_path=url, tree=tree_name,
                              field_path=exc.context.get("field_path")) from exc


def _all_features(data: Any, kinds: dict[str, str], answer: dict[str, list[str]],
                  notes: list[str], jagged_derived: set[str] | None = None
                  ) -> list[str | JaggedFeature]:
    """Every numeric branch and derived name, except identifiers, ``exclude`` and ``answer``.

    ``answer`` maps what the label and the weight are computed from to the
    fields that read it: as a feature, the label (or a branch it is made of)
    hands the model the answer, and the weight describes the sample, not the
    event. Each such name, and each branch of a type we cannot read, gets a
    note (warned about by :func:`resolve_layout`); names the user left out
    (``exclude``, ``identifiers``) are left out quietly.
    """
    skip = _excluded(data.exclude)
    ids = {name.lower() for name in data.identifiers}  # Zmumu's Run and Event are ids too
    items: list[str | JaggedFeature] = []
    for name, kind in kinds.items():
        if skip(name) or name.lower() in ids:
            continue
        if name in answer:
            notes.append(_answer_note("branch", name, answer[name]))
            continue
        if kind.startswith("unsupported"):
            why = kind.split(":", 1)[1]
            notes.append(f"features: all skips branch {name!r} " + (
                f"({why})" if why == DOTTED else f"of unsupported type {why!r}"))
            continue
        items.append(JaggedFeature(branch=name) if kind == "jagged" else name)
    for name in data.derived:
        if skip(name):
            continue
        if name in answer:
            notes.append(_answer_note("derived name", name, answer[name]))
        else:
            items.append(JaggedFeature(branch=name) if name in (jagged_derived or ())
                         else name)
    return items


def _excluded(names: list[str]) -> Callable[[str], bool]:
    """Whether ``data.exclude`` leaves a name out: by name, or by a shell pattern
    (``HLT_*``: NanoAOD has hundreds of trigger bits), matched case-sensitively."""
    exact = {n for n in names if not glob.has_magic(n)}
    patterns = [n for n in names if glob.has_magic(n)]
    return lambda name: name in exact or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _features(pipeline: Pipeline, items: list[str | JaggedFeature], available: dict[str, str],
              kinds: dict[str, str], derived: Mapping[str, expr.Expression], missing: _Missing,
              ) -> tuple[list[Feature], dict[str, Collection]]:
    norm = pipeline.data.normalize
    features: list[Feature] = []
    collections: dict[str, Collection] = {}
    for i, item in enumerate(items):
        path = f"data.features[{i}]"
        if isinstance(item, str):
            e = _parse(item, path)
            missing.check(set(e.names), available, path, item)
            if expr.is_identifier(item) and kinds.get(item) == "jagged":
                raise SpecError(
                    f"feature {item!r} is a jagged branch; write it as "
                    f"{{branch: {item}, max_len: 6, pad: 0.0}} to pad or truncate it",
                    field_path=path,
                )
            features.append(Feature(item, e, False, norm.per_feature.get(item, norm.default)))
            continue
        e = _parse(item.branch, f"{path}.branch")
        missing.check(set(e.names), available, f"{path}.branch", item.branch)
        coll_name = _collection_of(item, e, derived, kinds)
        coll = collections.setdefault(coll_name, Collection(coll_name))
        _agrees(coll, item, path, features)
        coll.features.append(item.branch)
        coll.max_len = coll.max_len or item.max_len
        if coll.sort_by is None and item.sort_by is not None:
            coll.sort_by, coll.sort_by_field = item.sort_by, f"{path}.sort_by"
        if item.sort_by is not None:
            missing.check({item.sort_by}, available, f"{path}.sort_by", item.sort_by)
            if kinds.get(item.sort_by) == "flat":
                raise SpecError(_flat_sort_key(item.sort_by, item.branch),
                                field_path=f"{path}.sort_by")
        features.append(Feature(item.branch, e, True,
                                norm.per_feature.get(item.branch, norm.default),
                                collection=coll_name, pad=item.pad))
    return features, collections


def _collection_of(item: JaggedFeature, e: expr.Expression,
                   derived: Mapping[str, expr.Expression], kinds: Mapping[str, str]) -> str:
    """A jagged feature's collection: the spec's, else its inputs', else its name's prefix.

    A derived name (or an expression) computed from one collection's
    branches belongs to it, whatever its name: ``log_Jet_pt`` and
    ``log_Muon_pt`` (MLaaS4HEP's naming) are Jet and Muon, not one
    collection "log" of two multiplicities.
    """
    if item.collection is not None:
        return item.collection
    if item.branch in derived or not expr.is_identifier(item.branch):
        inputs = _inputs_of([e], derived)
        found = {collection_of(n) for n in inputs if kinds.get(n) == "jagged"}
        if len(found) == 1:
            return found.pop()
    return collection_of(item.branch)


def _agrees(coll: Collection, item: JaggedFeature, path: str, features: list[Feature]) -> None:
    """One collection is padded and sorted as one: its features must not ask otherwise."""
    first = next((f.name for f in features if f.collection == coll.name), None)
    if first is None:
        return
    if item.max_len is not None and coll.max_len is not None and item.max_len != coll.max_len:
        raise SpecError(f"max_len differs within collection {coll.name!r}: {first} has "
                        f"{coll.max_len}, {item.branch} has {item.max_len}; one collection is "
                        "padded as one", field_path=f"{path}.max_len")
    if item.sort_by is not None and coll.sort_by is not None and item.sort_by != coll.sort_by:
        raise SpecError(f"sort_by differs within collection {coll.name!r}: {first} has "
                        f"{coll.sort_by!r}, {item.branch} has {item.sort_by!r}; one collection "
                        "is sorted as one", field_path=f"{path}.sort_by")


def _flat_sort_key(key: str, branch: str) -> str:
    return (f"sort_by {key!r} has one value per event, so it cannot order the objects of "
            f"{branch!r}; use a jagged branch of the same collection (e.g. {branch!r} itself)")


def _check_names_of_features(data: Any, features: list[Feature], available: Mapping[str, str],
                             notes: list[str]) -> None:
    """Typos in ``exclude`` and ``normalize.per_feature`` are said aloud, not ignored.

    A ``per_feature`` name that is no feature would leave a feature scaled
    otherwise than asked: an error. An ``exclude`` name that is no branch
    may be a typo (the branch it meant stays a feature) or a list written
    for other files, as imported MLaaS4HEP configurations are: a warning.
    """
    for i, name in enumerate(data.exclude):
        if glob.has_magic(name):
            if not any(fnmatch.fnmatchcase(n, name) for n in available):
                notes.append(f"data.exclude[{i}] is the pattern {name!r}, which matches no "
                             "branch or derived name in this tree")
        elif name not in available:
            near = close_names(name, sorted(available))
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            notes.append(f"data.exclude[{i}] names {name!r}, which is no branch or derived "
                         f"name in this tree{hint}")
    if data.exclude and data.features != "all":
        notes.append("data.exclude applies to features: all only; with a list of features "
                     "it changes nothing (leave the names out of the list instead)")
    names = {f.name for f in features}
    for name in data.normalize.per_feature:
        if name not in names:
            near = close_names(name, sorted(names))
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise SpecError(
                f"normalize.per_feature names {name!r}, which is not a feature of this "
                f"pipeline{hint} (a jagged feature is named by its branch, e.g. Jet_pt, "
                "not by its columns Jet_pt_0 ...)",
                field_path=f"data.normalize.per_feature.{name}")


def _check_kinds_on_sample(layout: Layout, tree: Any, url: str) -> None:
    """Evaluate derived names and features on a few entries to learn flat vs jagged.

    Types of expressions are only known by evaluating them; doing it on a
    small sample turns a wrong declaration into an error before pass 1.
    """
    if tree.num_entries == 0:
        return
    env = _sample(tree, url, layout.tree, layout.branches, layout.derived)
    with _in_file(url, layout.tree):
        for path, e in (("data.cut", layout.cut), ("data.label", layout.label),
                        ("data.weight", layout.weight)):
            if e is not None and is_jagged_array(e.evaluate(env)):
                raise SpecError(
                    f"{path} {e.source!r} gives a list of values per event, not one; reduce "
                    "the list, e.g. with max(...), sum(...), count(...) or any(...)",
                    field_path=path)
        for coll in layout.collections.values():
            if coll.sort_by is not None and not is_jagged_array(env[coll.sort_by]):
                raise SpecError(_flat_sort_key(coll.sort_by, coll.features[0]),
                                field_path=coll.sort_by_field or "data.features")
        for i, f in enumerate(layout.features):
            value = f.expression.evaluate(env)
            is_jagged = is_jagged_array(value)
            if f.jagged and not is_jagged:
                raise SpecError(
                    f"feature {f.name!r} is declared jagged (with max_len) but has one value "
                    "per event; list it as a plain name", field_path=f"data.features[{i}]",
                )
            if not f.jagged and is_jagged:
                raise SpecError(
                    f"feature {f.name!r} has a list of values per event; write it as "
                    f"{{branch: {f.name}, max_len: N}} or reduce it, e.g. max({f.name}, 0)",
                    field_path=f"data.features[{i}]",
                )


def is_jagged_array(value: Any) -> bool:
    """True for an awkward array with a variable-length list per event."""
    if not isinstance(value, ak.Array):
        return False
    return value.ndim > 1


def as_float64(value: Any, n: int) -> np.ndarray:
    """A per-event value (numpy, flat awkward, or scalar) as a float64 vector of length ``n``.

    A plain awkward array of numbers (what uproot gives for a flat branch) is
    taken as its numpy buffer: ``ak.fill_none`` builds its fill value through
    an ArrayBuilder on every call, 7% of a streamed epoch's CPU for three
    flat features. Only arrays that can hold None go through it.
    """
    if isinstance(value, ak.Array):
        layout = value.layout
        if isinstance(layout, ak.contents.NumpyArray) and layout.data.ndim == 1:
            value = layout.data
        else:
            # missing values (Jet_pt[1] of a one-jet event) as NaN, integers and booleans too
            value = ak.to_numpy(ak.fill_none(ak.values_astype(value, np.float64), np.nan))
    with np.errstate(invalid="ignore"):  # a signalling NaN (damaged bytes) is counted later
        arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    return arr
