"""Model bundles: load one, turn events into scores with exactly the training preprocessing.

Layer: inference. A bundle is a directory (or a ``.tar.gz`` of one) written by
:func:`mlaas.train.export.export_bundle`::

    model.onnx        the network, normalisation folded in; input ``x`` (raw padded
                      features), ``mask`` when the model uses it; output ``score``
    spec.json         task, labels, feature and mask names, inputs/outputs, the
                      layout (branches, derived names, cut, features, collections,
                      branch kinds and dtypes), NaN policy, tree name, step size
    metrics.json      test-split metrics of the run
    provenance.json   input files, spec, package versions, times, host
    plots/            the run's plots

Everything that turns events into the model's inputs lives here, in
:class:`Preprocessor`, and is shared by ``mlaas predict``
(:func:`predict_file`), ``mlaas apply`` (:mod:`mlaas.apply`) and the server:
the derived names, the cut, sorting, truncation and padding of collections and
the NaN policy are the training code's own functions (``mlaas.data.transform``)
applied to a :class:`~mlaas.data.layout.Layout` rebuilt from spec.json. The
normalisation is inside the ONNX graph, so it cannot drift from training.

Scores are float32 ``[n_events, n_outputs]``: the signal probability (binary),
class probabilities (multiclass) or the prediction (regression). **Events that
fail the cut get NaN scores** (``None`` in :func:`predict_file`'s JSON), so
outputs stay aligned with inputs, entry by entry.

Loading a ``.tar.gz`` never trusts it: members with absolute paths, ``..``,
links, devices or FIFOs are refused, and so are members above a size limit,
all before anything is written; extraction goes to a private temporary
directory that is removed once the model is in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from itertools import chain
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import awkward as ak
import numpy as np

from mlaas.data.layout import Layout, as_float64
from mlaas.data.transform import (SlotIndex, evaluate_env, flat_values,
                                  jagged_values, selection)
from mlaas.errors import BadValues, BundleError, DataError, close_names

__all__ = [
    "Bundle",
    "Preprocessor",
    "Prepared",
    "InvalidEvent",
    "predict_file",
    "FORMAT_VERSION",
    "MAX_MEMBER_BYTES",
    "MAX_TOTAL_BYTES",
    "MAX_MEMBERS",
    "SPEC_FILE",
    "MODEL_FILE",
]

FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
MODEL_FILE = "model.onnx"
MAX_MEMBER_BYTES = 2 * 1024**3  # one file of a bundle archive
MAX_TOTAL_BYTES = 4 * 1024**3  # all files of a bundle archive together
MAX_MEMBERS = 10_000
RUN_BATCH = 65_536  # events per ONNX Runtime call: bounds the memory of the inputs
_COPY_BLOCK = 1 << 20


class InvalidEvent(DataError):
    """An input event that cannot be scored: a missing field or a value of the wrong kind.

    ``event`` (index in the input, or None for a whole column) and ``field``
    are attributes, and part of :meth:`to_dict`, so an HTTP API can point at
    the offending value.
    """


# -- preprocessing (shared by predict, apply and the server) ------------------------------


@dataclass
class Prepared:
    """The model's inputs for the events that pass the cut.

    ``x`` float32 [m, n_features] raw padded features (not normalised: the
    graph does that), ``mask`` float32 [m, n_slots], ``index`` [m] the
    positions of these events in the input, ``n`` the number of input events.
    """

    x: np.ndarray
    mask: np.ndarray
    index: np.ndarray
    n: int


class Preprocessor:
    """Arrays of branches in, raw model inputs out: derived names, cut, features, NaN policy.

    The same operations as :class:`mlaas.data.transform.Transform` with an
    identity normalisation, built from the training code's own functions.

    Args:
        layout (Layout): the layout (from spec.json via :meth:`Layout.from_dict`).
        nan_policy (str): ``error`` or ``replace``.
        nan_value (float): the replacement under ``replace``.
    """

    def __init__(self, layout: Layout, nan_policy: str = "error", nan_value: float = 0.0) -> None:
        self.layout = layout
        self.nan_policy = nan_policy
        self.nan_value = float(nan_value)
        self.feature_names = layout.column_names()
        self.mask_names = layout.mask_names()

    def __call__(self, arrays: Mapping[str, Any], where: str = "<events>") -> Prepared:
        layout = self.layout
        missing = [b for b in layout.branches if b not in arrays]
        if missing:
            raise DataError(f"no array for branch(es) {', '.join(map(repr, missing))}; the "
                            f"model reads {', '.join(layout.branches)}", file_path=where)
        n = len(arrays[layout.branches[0]]) if layout.branches else 0
        env = evaluate_env(layout, arrays)
        keep = selection(layout, env, n, where)
        index = np.flatnonzero(keep)
        jagged = jagged_values(layout, env, keep, where)
        return self._assemble(jagged, index, n, where,
                              lambda f: as_float64(f.expression.evaluate(env), n)[index])

    def _assemble(self, jagged: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  index: np.ndarray, n: int, where: str,
                  flat_value: Callable[[Any], np.ndarray]) -> Prepared:
        """The padded x and mask from the selected events' values, shared by both paths
        (awkward and numpy columns) so they cannot drift apart; ``flat_value(feature)``
        gives a flat feature's float64 values for the selected events."""
        layout = self.layout
        m = len(index)
        blocks: list[np.ndarray] = []
        slots: dict[str, SlotIndex] = {}
        for f in layout.features:
            if f.jagged:
                assert f.collection is not None
                content, counts = jagged[f.name]
                if f.collection not in slots:
                    max_len = layout.collections[f.collection].max_len
                    assert max_len is not None
                    slots[f.collection] = SlotIndex(counts, max_len)
                rows = np.repeat(np.arange(m), counts)
                content = self._clean(content, f.name, index, rows, where)
                blocks.append(slots[f.collection].fill(content, f.pad))
            else:
                blocks.append(self._clean(flat_value(f), f.name, index, None, where)[:, None])
        x = (np.concatenate(blocks, axis=1).astype(np.float32) if blocks
             else np.zeros((m, 0), dtype=np.float32))
        masks = [slots[c].mask for c in layout.collections]
        mask = np.concatenate(masks, axis=1) if masks else np.zeros((m, 0), dtype=np.float32)
        return Prepared(x=x, mask=mask, index=index, n=n)

    def prepare_events(self, events: Any, branch_types: Mapping[str, Mapping[str, str]],
                       where: str = "<events>") -> Prepared:
        """:meth:`__call__` on JSON-like events (rows, columns or ``{"events": ...}``, as
        :func:`events_to_arrays` takes them): the same :class:`Prepared`, bit for bit.

        Why: for the small batches of a server, building one awkward array per
        branch and reading it back cost far more than the arithmetic (a fixed
        ~0.1 ms per awkward call). Here, when every value is a plain JSON number
        (or a list of them for a jagged branch), each branch becomes a numpy
        column at once (flat values, or flat content + counts), collections are
        sorted and padded with the same numpy functions as training, and
        awkward arrays are built only for the branches the derived names, the
        cut or a feature expression read. Anything unusual (a missing field, a
        string, a bool, a float in an integer branch, ...) takes the general
        path, whose errors name the event and the field.
        """
        columns = _numpy_columns(events, branch_types)
        if columns is None:
            return self(events_to_arrays(events, branch_types), where)
        return self._from_columns(columns, where)

    def _from_columns(self, columns: dict[str, Any], where: str) -> Prepared:
        """:meth:`__call__` on numpy columns (see :meth:`prepare_events`); the same steps
        in the same order, so the same values and the same errors."""
        layout = self.layout
        n = _column_length(columns[layout.branches[0]]) if layout.branches else 0
        env = _LazyEnv(columns)
        for name, e in layout.derived:
            env[name] = e.evaluate(env)
        keep = selection(layout, env, n, where)
        index = np.flatnonzero(keep)
        jagged = self._jagged_from_columns(env, keep, where)

        def flat_value(f: Any) -> np.ndarray:
            raw = env.raw(f.expression.source)
            if isinstance(raw, np.ndarray):  # a branch as it is: what as_float64 gives
                return np.asarray(raw, dtype=np.float64)[index]
            return as_float64(f.expression.evaluate(env), n)[index]

        return self._assemble(jagged, index, n, where, flat_value)

    def _jagged_from_columns(self, env: _LazyEnv, keep: np.ndarray, where: str
                             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:func:`mlaas.data.transform.jagged_values` reading raw jagged branches from
        their numpy columns (content and counts as ``flat_values`` would give them)."""
        layout = self.layout

        def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
            raw = env.raw(name)
            if isinstance(raw, tuple):
                return raw[0].astype(np.float64, copy=False), raw[1]
            if name in env or name in env.columns:
                return flat_values(env[name])
            feature = next(f for f in layout.features if f.name == name)
            return flat_values(feature.expression.evaluate(env))

        return jagged_values(layout, env, keep, where, flat=flat)

    def _clean(self, values: np.ndarray, name: str, index: np.ndarray, rows: np.ndarray | None,
               where: str) -> np.ndarray:
        bad = ~np.isfinite(values)
        if not bad.any():
            return values
        if self.nan_policy == "error":
            first = int(np.flatnonzero(bad)[0])
            event = int(index[rows[first] if rows is not None else first])
            raise BadValues(
                f"feature {name!r} is {values[first]!r} in event {event} ({int(bad.sum())} NaN "
                "or infinite values in all); the model was trained with data.nan: error",
                file_path=where, branch=name, event=event, field=name,
            )
        values = values.copy()
        values[bad] = self.nan_value
        return values


# -- events given as JSON-like data ---------------------------------------------------------


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "a list"
    return f"a {type(value).__name__}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _number(value: Any, dtype: np.dtype, event: int, field: str, element: int | None) -> Any:
    where = f"element {element} of field {field!r}" if element is not None else f"field {field!r}"
    if dtype.kind == "b" and isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (bool, np.bool_)):
        return int(value)  # true/false as 1/0, as numpy would
    if not _is_number(value):
        what = _kind_of(value)
        expected = "a number" if element is not None else "a number (one value per event)"
        if isinstance(value, (list, tuple)) and element is None:
            raise InvalidEvent(f"event {event}: {where} is a list, but {field!r} holds one "
                               "number per event", event=event, field=field)
        raise InvalidEvent(f"event {event}: {where} is {what}, not {expected}",
                           event=event, field=field)
    if dtype.kind in "iub" and float(value) != int(value):
        raise InvalidEvent(f"event {event}: {where} is {value!r}, but {field!r} holds integers",
                           event=event, field=field)
    return value


def _column(values: Sequence[Any], name: str, kind: str, dtype: np.dtype) -> ak.Array:
    """One branch from per-event Python values, each checked, as the file would give it."""
    if kind == "jagged":
        counts = np.zeros(len(values), dtype=np.int64)
        content: list[Any] = []
        for i, v in enumerate(values):
            if not isinstance(v, (list, tuple, np.ndarray)):
                raise InvalidEvent(f"event {i}: field {name!r} is {_kind_of(v)}, but {name!r} "
                                   "holds a list of numbers per event", event=i, field=name)
            counts[i] = len(v)
            content.extend(_number(e, dtype, i, name, j) for j, e in enumerate(v))
        flat = np.asarray(content, dtype=dtype) if content else np.zeros(0, dtype=dtype)
        return ak.unflatten(flat, counts)
    checked = [_number(v, dtype, i, name, None) for i, v in enumerate(values)]
    return ak.Array(np.asarray(checked, dtype=dtype) if checked else np.zeros(0, dtype=dtype))


def _missing_field(name: str, available: Any, event: int | None) -> InvalidEvent:
    near = close_names(name, [str(k) for k in available])
    hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
    where = f"event {event} has no field" if event is not None else "no column for field"
    return InvalidEvent(f"{where} {name!r}, which the model needs{hint}", event=event, field=name)


def events_to_arrays(events: Any, branch_types: Mapping[str, Mapping[str, str]]
                     ) -> dict[str, ak.Array]:
    """Rows ``[{"MET_pt": 20.1, "Jet_pt": [50.2, 31.0]}, ...]`` or columns
    ``{"MET_pt": [...], "Jet_pt": [[...], ...]}`` as awkward arrays of exactly the
    branches in ``branch_types`` (``{name: {"kind": flat|jagged, "dtype": ...}}``).

    Extra fields are ignored. Errors are :class:`InvalidEvent` naming the event
    index and the field.
    """
    if isinstance(events, Mapping) and set(events) == {"events"} and "events" not in branch_types:
        events = events["events"]
    columns: dict[str, Sequence[Any]] = {}
    if isinstance(events, Mapping):
        n: int | None = None
        first = ""
        for name in branch_types:
            if name not in events:
                raise _missing_field(name, events, None)
            col = events[name]
            if not isinstance(col, (list, tuple, np.ndarray)):
                raise InvalidEvent(f"column {name!r} is {_kind_of(col)}, not a list with one "
                                   "value per event", field=name)
            if n is None:
                n, first = len(col), name
            elif len(col) != n:
                raise InvalidEvent(f"column {name!r} has {len(col)} values but column "
                                   f"{first!r} has {n}; give one value per event in each",
                                   field=name)
            columns[name] = col
    elif isinstance(events, Sequence) and not isinstance(events, (str, bytes)):
        for i, row in enumerate(events):
            if not isinstance(row, Mapping):
                raise InvalidEvent(f"event {i} is {_kind_of(row)}, not an object of fields",
                                   event=i)
            for name in branch_types:
                if name not in row:
                    raise _missing_field(name, row, i)
        columns = {name: [row[name] for row in events] for name in branch_types}
    else:
        raise InvalidEvent(f"events are {_kind_of(events)}; give a list of objects (one per "
                           "event) or an object of lists (one per field)")
    return {name: _column(columns[name], name, t["kind"], np.dtype(t["dtype"]))
            for name, t in branch_types.items()}


# -- the numpy path for JSON-like events (Preprocessor.prepare_events) ----------------------

#: a branch as numpy: flat values, or (flat content, counts int64) for a jagged branch
_Column = Any
_NUMBERS = frozenset({int, float})
_LISTS = frozenset({list, tuple})


def _column_length(column: Any) -> int:
    return len(column[1]) if isinstance(column, tuple) else len(column)


def _numbers(values: list[Any], dtype: np.dtype) -> np.ndarray | None:
    """``values`` as ``dtype`` exactly as :func:`_column` converts them, or None when any
    value needs :func:`_number`'s checks (a bool, a string, a float in an integer branch)."""
    kinds = set(map(type, values))
    if not kinds <= _NUMBERS or dtype.kind == "b":
        return None
    try:
        if dtype.kind != "f" and float in kinds:  # integral floats only, as _number checks
            as_float = np.asarray(values, dtype=np.float64)
            if not (np.isfinite(as_float).all() and (as_float == np.trunc(as_float)).all()):
                return None
        return np.asarray(values, dtype=dtype)
    except (OverflowError, ValueError, TypeError):
        return None


def _numpy_column(values: Any, kind: str, dtype: np.dtype) -> Any:
    """One branch as numpy (see ``_Column``), or None to leave it to :func:`_column`."""
    if type(values) is not list or not values:
        return None
    if kind != "jagged":
        return _numbers(values, dtype)
    if not set(map(type, values)) <= _LISTS:
        return None
    counts = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    content = list(chain.from_iterable(values))
    flat = _numbers(content, dtype) if content else np.zeros(0, dtype=dtype)
    return None if flat is None else (flat, counts)


def _numpy_columns(events: Any, branch_types: Mapping[str, Mapping[str, str]]
                   ) -> dict[str, Any] | None:
    """The branches of JSON-like ``events`` as numpy columns, or None when any value
    is not a plain number (list) where the branch wants one, or the events are not
    a non-empty list of objects or object of equal-length lists: the general path
    (:func:`events_to_arrays`) then takes the request and names what is wrong."""
    if isinstance(events, Mapping) and set(events) == {"events"} and "events" not in branch_types:
        events = events["events"]
    if type(events) is list:
        if not events or not set(map(type, events)) <= {dict}:
            return None
        try:
            raw = {name: [row[name] for row in events] for name in branch_types}
        except KeyError:
            return None
    elif type(events) is dict:
        raw = {}
        for name in branch_types:
            col = events.get(name)
            if type(col) is not list:
                return None
            raw[name] = col
        if len({len(c) for c in raw.values()}) > 1:
            return None
    else:
        return None
    columns: dict[str, Any] = {}
    for name, t in branch_types.items():
        column = _numpy_column(raw[name], t["kind"], np.dtype(t["dtype"]))
        if column is None:
            return None
        columns[name] = column
    return columns


class _LazyEnv(dict):  # type: ignore[type-arg]
    """The expression environment of the numpy path: derived names as they are set,
    and each raw branch as the awkward array :func:`_column` would build, made only
    when an expression reads it."""

    def __init__(self, columns: dict[str, Any]) -> None:
        super().__init__()
        self.columns = columns
        self.derived: set[str] = set()

    def __missing__(self, name: str) -> Any:
        column = self.columns.get(name)
        if column is None:
            raise KeyError(name)
        value = (ak.unflatten(column[0], column[1]) if isinstance(column, tuple)
                 else ak.Array(column))
        dict.__setitem__(self, name, value)
        return value

    def __setitem__(self, name: str, value: Any) -> None:  # a derived name
        self.derived.add(name)
        dict.__setitem__(self, name, value)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in self.columns

    def keys(self) -> Any:  # for "did you mean" in expression errors
        return list(dict.keys(self)) + [k for k in self.columns if not dict.__contains__(self, k)]

    def raw(self, name: str) -> Any:
        """The numpy column of branch ``name``, or None (not a branch, or a derived
        name shadows it)."""
        return None if name in self.derived else self.columns.get(name)


# -- safe archive extraction ----------------------------------------------------------------


def _check_member(member: tarfile.TarInfo, max_member_bytes: int) -> None:
    name = member.name
    path = PurePosixPath(name)
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"bundle archive member {name!r} has an absolute path; refused")
    if ".." in path.parts or "\\" in name:
        raise BundleError(f"bundle archive member {name!r} points outside the bundle; refused")
    if member.issym() or member.islnk():
        raise BundleError(f"bundle archive member {name!r} is a link (to "
                          f"{member.linkname!r}); refused")
    if not (member.isreg() or member.isdir()):
        raise BundleError(f"bundle archive member {name!r} is a device, FIFO or other special "
                          "file; refused")
    if member.size > max_member_bytes:
        raise BundleError(f"bundle archive member {name!r} is {member.size} bytes, above the "
                          f"limit of {max_member_bytes}; refused")


def safe_extract(archive: str | os.PathLike[str], dest: Path, *,
                 max_member_bytes: int = MAX_MEMBER_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES,
                 max_members: int = MAX_MEMBERS) -> None:
    """Extract a bundle archive into ``dest`` after checking every member.

    All members are checked before anything is written; any problem raises
    :class:`BundleError` naming the member.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = []
            total = 0
            for member in tar:
                members.append(member)
                if len(members) > max_members:
                    raise BundleError(f"bundle archive has more than {max_members} members")
                _check_member(member, max_member_bytes)
                total += member.size
                if total > max_total_bytes:
                    raise BundleError(f"bundle archive is larger than {max_total_bytes} bytes "
                                      f"unpacked (at member {member.name!r}); refused")
            for member in members:
                target = dest.joinpath(*PurePosixPath(member.name).parts)
                try:
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None
                    with source, open(target, "xb") as out:
                        shutil.copyfileobj(source, out, _COPY_BLOCK)
                except OSError as exc:
                    raise BundleError(f"cannot extract bundle archive member {member.name!r}: "
                                      f"{exc}") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{os.fspath(archive)!r} is not a readable bundle archive "
                          f"(.tar.gz): {exc}") from exc


def bundle_root(directory: Path) -> Path:
    """The directory holding spec.json: ``directory`` or its only subdirectory."""
    if (directory / SPEC_FILE).exists():
        return directory
    subdirs = [p for p in directory.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / SPEC_FILE).exists():
        return subdirs[0]
    return directory


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"the bundle has no {what} ({path.name})", file_path=str(path)) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path.name} of the bundle is not valid JSON: {exc}",
                          file_path=str(path)) from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path.name} of the bundle must hold an object", file_path=str(path))
    return data


def _session(model: bytes, threads: int | None, where: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's problem
    # ORT's intra-op threads spin-wait after every call; on a small shared node
    # that burns a core between batches (measured: ~40% of a server's CPU)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise BundleError(f"model.onnx cannot be loaded by ONNX Runtime: {exc}",
                          file_path=where) from exc


def _safe_label(label: str) -> str:
    text = "".join(c if c.isalnum() or c == "_" else "_" for c in str(label))
    return text or "class"


# -- the bundle -----------------------------------------------------------------------------


class Bundle:
    """A loaded model bundle: its spec, metrics, provenance and an ONNX Runtime session.

    Use :meth:`load`. Attributes: ``path``, ``spec`` (spec.json), ``metrics``,
    ``provenance``, ``task``, ``label_names``, ``n_outputs``, ``layout``,
    ``preprocessor``, ``tree`` (the tree name), ``branch_types`` and ``input_names``.
    """

    def __init__(self, path: Path, spec: dict[str, Any], model: bytes, metrics: dict[str, Any],
                 provenance: dict[str, Any], threads: int | None = None) -> None:
        self.path = path
        self.spec = spec
        self.metrics = metrics
        self.provenance = provenance
        where = str(path)
        version = spec.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"bundle format_version {version!r} is not supported by this "
                              f"mlaas (it reads version {FORMAT_VERSION})", file_path=where)
        try:
            self.task: str = spec["task"]
            self.label_names: list[str] = [str(n) for n in spec["label_names"]]
            self.n_outputs = int(spec["n_outputs"])
            layout_dict = spec["layout"]
            self.layout = Layout.from_dict(layout_dict)
            self.branch_types: dict[str, dict[str, str]] = dict(layout_dict["branch_types"])
            nan = spec.get("nan", {})
            self.preprocessor = Preprocessor(self.layout, nan.get("policy", "error"),
                                             nan.get("value", 0.0))
            declared = [str(i["name"]) for i in spec["inputs"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"spec.json of the bundle is incomplete or malformed: "
                              f"{type(exc).__name__}: {exc}", file_path=where) from exc
        self.tree: str = self.layout.tree
        self.step_size = spec.get("step_size", "100 MB")
        self.session = _session(model, threads, where)
        self.input_names = [i.name for i in self.session.get_inputs()]
        if self.input_names != declared:
            raise BundleError(f"model.onnx takes inputs {self.input_names} but spec.json "
                              f"declares {declared}; the bundle is inconsistent", file_path=where)
        outputs = [o.name for o in self.session.get_outputs()]
        if "score" not in outputs:
            raise BundleError(f"model.onnx has no output 'score' (outputs: {outputs})",
                              file_path=where)
        widths = {"x": len(self.preprocessor.feature_names),
                  "mask": len(self.preprocessor.mask_names)}
        for i in self.session.get_inputs():
            width = i.shape[1] if len(i.shape) == 2 else None
            if i.name in widths and isinstance(width, int) and width != widths[i.name]:
                raise BundleError(f"model.onnx input {i.name!r} has {width} columns but the "
                                  f"layout in spec.json gives {widths[i.name]}", file_path=where)
        if self.branch_types.keys() != set(self.layout.branches):
            raise BundleError("spec.json's layout.branch_types does not list the branches the "
                              "layout reads", file_path=where)

    # -- loading

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, threads: int | None = None,
             max_member_bytes: int = MAX_MEMBER_BYTES,
             max_total_bytes: int = MAX_TOTAL_BYTES) -> Bundle:
        """Load a bundle directory or a ``.tar.gz`` of one.

        Args:
            path: the bundle directory (holding spec.json and model.onnx) or an archive.
            threads: ONNX Runtime intra-op threads; default min(2, CPUs).
            max_member_bytes, max_total_bytes: limits for archives.

        Raises :class:`BundleError` for a missing, unsafe, corrupt or inconsistent bundle.
        """
        p = Path(path)
        if p.is_dir():
            return cls._from_dir(p, p, threads)
        if not p.exists():
            raise BundleError(f"no bundle at {str(p)!r} (give the bundle directory or "
                              "bundle.tar.gz)", file_path=str(p))
        with tempfile.TemporaryDirectory(prefix="mlaas-bundle-") as tmp:
            safe_extract(p, Path(tmp), max_member_bytes=max_member_bytes,
                         max_total_bytes=max_total_bytes)
            return cls._from_dir(bundle_root(Path(tmp)), p, threads)

    @classmethod
    def _from_dir(cls, directory: Path, origin: Path, threads: int | None) -> Bundle:
        spec = _read_json(directory / SPEC_FILE, "spec")
        try:
            model = (directory / MODEL_FILE).read_bytes()
        except FileNotFoundError:
            raise BundleError(f"the bundle has no {MODEL_FILE}", file_path=str(origin)) from None
        metrics = _read_json(directory / "metrics.json", "metrics") \
            if (directory / "metrics.json").exists() else {}
        prov = _read_json(directory / "provenance.json", "provenance") \
            if (directory / "provenance.json").exists() else {}
        return cls(origin, spec, model, metrics, prov, threads)

    # -- outputs

    def column_names(self, name: str = "score") -> list[str]:
        """Output column names: ``name`` for one output, ``name_<label>`` per class otherwise."""
        if self.n_outputs == 1:
            return [name]
        labels = self.label_names if len(self.label_names) == self.n_outputs \
            else [str(k) for k in range(self.n_outputs)]
        return [f"{name}_{_safe_label(label)}" for label in labels]

    # -- inference

    def run(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The ONNX model on raw inputs, in batches; float32 [m, n_outputs]."""
        out = np.empty((len(x), self.n_outputs), dtype=np.float32)
        for start in range(0, len(x), RUN_BATCH):
            rows = slice(start, start + RUN_BATCH)
            feeds = {"x": np.ascontiguousarray(x[rows], dtype=np.float32)}
            if "mask" in self.input_names:
                feeds["mask"] = np.ascontiguousarray(mask[rows], dtype=np.float32)
            (score,) = self.session.run(["score"], feeds)
            out[rows] = score.reshape(len(feeds["x"]), self.n_outputs)
        return out

    def predict_arrays(self, arrays: Mapping[str, Any], where: str = "<events>"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of events given as awkward/numpy arrays of the layout's branches.

        Returns ``(scores, passed)``: float32 ``[n, n_outputs]`` (NaN for events
        failing the cut) and bool ``[n]`` (the cut).
        """
        prep = self.preprocessor(arrays, where)
        scores = np.full((prep.n, self.n_outputs), np.nan, dtype=np.float32)
        if len(prep.index):
            scores[prep.index] = self.run(prep.x, prep.mask)
        passed = np.zeros(prep.n, dtype=bool)
        passed[prep.index] = True
        return scores, passed

    def predict_events(self, events: Any) -> np.ndarray:
        """Scores of JSON-like events, float32 ``[n, n_outputs]``; NaN for events failing the cut.

        ``events`` is a list of rows ``[{"MET_pt": 20.1, "Jet_pt": [50.2, 31.0]}, ...]``
        or columns ``{"MET_pt": [...], "Jet_pt": [[...], ...]}`` (optionally
        wrapped as ``{"events": ...}``); exactly the branches the model reads
        are needed, extra fields are ignored. A missing field, a non-numeric
        value, or a list where a number is expected (or the reverse) raises
        :class:`InvalidEvent` naming the event index and the field.
        """
        prep = self.preprocessor.prepare_events(events, self.branch_types)
        scores = np.full((prep.n, self.n_outputs), np.nan, dtype=np.float32)
        if len(prep.index):
            scores[prep.index] = self.run(prep.x, prep.mask)
        return scores


def _jsonable(scores: np.ndarray) -> list[Any]:
    rows: list[Any] = []
    for row in scores.tolist():
        clean = [None if v != v else v for v in row]  # NaN -> null (JSON has no NaN)
        rows.append(clean[0] if len(clean) == 1 else clean)
    return rows


def predict_file(bundle_path: str | os.PathLike[str], input_json_path: str | os.PathLike[str]
                 ) -> list[Any]:
    """Score the events of a JSON file (``-`` for stdin) with a bundle, for ``mlaas predict``.

    The file holds rows, columns or ``{"events": ...}`` (see
    :meth:`Bundle.predict_events`). Returns one entry per event: a float for
    single-output models, a list of floats (one per class) for multiclass;
    ``None`` for events failing the cut.
    """
    bundle = Bundle.load(bundle_path)
    try:
        if os.fspath(input_json_path) == "-":
            events = json.load(sys.stdin)
        else:
            with open(input_json_path) as f:
                events = json.load(f)
    except OSError as exc:
        raise DataError(f"cannot read events file: {exc}",
                        file_path=os.fspath(input_json_path)) from exc
    except ValueError as exc:
        raise DataError(f"events file is not valid JSON: {exc}",
                        file_path=os.fspath(input_json_path)) from exc
    return _jsonable(bundle.predict_events(events))
