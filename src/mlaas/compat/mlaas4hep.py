"""Convert an MLaaS4HEP configuration into an mlaas pipeline spec.

Layer: compat. Defines :class:`Conversion` (the spec dict plus notes on what
could not be carried over), :func:`convert` (from already-read values) and
:func:`convert_files` (from the predecessor's ``params.json``, ``files.txt``,
``labels.txt`` and ``preproc.json``), used by ``mlaas import-mlaas4hep``.

MLaaS4HEP (github.com/vkuznet/MLaaS4HEP) spread one workflow over four files;
what each key meant was read from its ``workflow.py``, ``generator.py``,
``reader.py`` and ``utils.py`` and ``doc/preproc.md``. The mapping:

=============================  ===============================================
MLaaS4HEP                      mlaas spec
=============================  ===============================================
files.txt + labels.txt         ``data.sources``: files with the same label
                               become one source, in first-seen order (globs
                               kept; the first match is peeked at)
``branch``                     ``data.tree`` (missing: ``Events``, the old default)
``selected_branches``          ``data.features`` (jagged branches become
                               ``{branch: NAME}``, max_len by percentile)
``selected_branches: ""``      ``data.features: all``
``exclude_branches``           ``data.exclude`` (only with ``features: all``)
``identifier``                 ``data.identifiers`` (empty: the same defaults)
``redirector``                 ``data.redirector`` (must be ``root://``)
``nevts``                      ``data.max_events`` (now per source, see notes)
``chunk_size``                 ``data.step_size`` as an entry count
min-max scaling (always)       ``data.normalize: minmax``
``epochs batch_size``          ``train.epochs``, ``train.batch_size``
``shuffle``                    always on for training (a note if it was off)
``hist verbose nan metrics``   not mapped: reporting and padding details
preproc ``new_branch``         ``data.derived`` (+ a feature unless ``remove``)
``np.sum(x, axis=1)`` etc.     ``sum(x)`` etc., one value per event (without
                               axis=1 numpy reduced a whole chunk: refused)
``new_branch.*.cut*``          ANDed into ``data.cut``
``keys_to_remove``, ``remove`` left out of the features
preproc ``flat_cut``           ANDed into ``data.cut``
preproc ``jagged_cut``         ``all(...)`` / ``any(...)`` ANDed into ``data.cut``
=============================  ===============================================

Nothing here opens ROOT files except :func:`convert_files`, which peeks at
the first local file (if there is one) to learn which branches are jagged.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlaas import expr
from mlaas.errors import ExpressionError, SpecError

__all__ = ["Conversion", "convert", "convert_files", "translate_expression"]

DEFAULT_TREE = "Events"  # MLaaS4HEP's default for params["branch"]
TRAIN_KEYS = ("epochs", "batch_size", "shuffle")
# Keys the predecessor read that have no counterpart, and why.
IGNORED_KEYS = {
    "hist": "histograms of inputs are not produced by the data pipeline",
    "verbose": "how much a run prints is not part of a pipeline spec",
    "nan": "empty jagged slots are marked by data.features[].pad and the mask",
    "metrics": "mlaas reports loss, accuracy and ROC AUC for every run (see the report)",
}
DATA_KEYS = ("nevts", "chunk_size", "branch", "identifier", "selected_branches",
             "exclude_branches", "redirector")
PREPROC_KEYS = ("new_branch", "flat_cut", "jagged_cut")
NEW_BRANCH_KEYS = ("def", "type", "remove", "keys_to_remove")
_NUMPY_PREFIX = re.compile(r"\b(?:numpy|np)\.([A-Za-z_][A-Za-z0-9_]*)")
# numpy reductions -> ours; along axis 1 (-1) of a jagged chunk they reduce each event's list,
# as ours do. count_nonzero has no name of its own here: it becomes sum((x) != 0).
_NUMPY_REDUCTIONS = {"sum": "sum", "max": "max", "amax": "max", "min": "min", "amin": "min",
                     "mean": "mean", "any": "any", "all": "all", "count_nonzero": "sum"}
_NUMPY_REDUCTION_CALL = re.compile(
    rf"\b(?:numpy|np)\.({'|'.join(sorted(_NUMPY_REDUCTIONS, key=len, reverse=True))})\s*\(")
_KEYWORD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)\s*(.*)$", re.DOTALL)
_PER_EVENT_AXES = ("1", "-1")
# numpy spellings of functions our language has under another name.
_ALIASES = {"absolute": "abs", "fabs": "abs"}
_CONSTANTS = {"pi": repr(math.pi), "e": repr(math.e)}


@dataclass
class Conversion:
    """The converted spec and one sentence per thing that could not be mapped."""

    spec: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        """YAML text with the notes as a header comment, so they travel with the spec."""
        lines = ["# Converted from an MLaaS4HEP configuration by `mlaas import-mlaas4hep`."]
        if self.notes:
            lines.append("# Not mapped (check these by hand):")
            for note in self.notes:
                wrapped = textwrap.wrap(note, width=86) or [""]
                lines.append(f"#   - {wrapped[0]}")
                lines.extend(f"#     {rest}" for rest in wrapped[1:])
        else:
            lines.append("# Everything was mapped.")
        body = yaml.safe_dump(self.spec, sort_keys=False, default_flow_style=False, width=1000)
        return "\n".join(lines) + "\n" + body


@dataclass
class _Preproc:
    """What preproc.json contributes: derived names, cut terms and feature changes."""

    derived: dict[str, str] = field(default_factory=dict)
    cuts: list[str] = field(default_factory=list)
    new_features: list[tuple[str, bool]] = field(default_factory=list)  # (name, jagged)
    removed: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)  # new branches whose def did not translate


# --------------------------------------------------------------------------- expressions


def translate_expression(source: str) -> str:
    """An MLaaS4HEP (uproot alias) expression rewritten in mlaas' expression language.

    The predecessor handed ``def`` strings to uproot, which evaluated them with
    numpy in scope, so users wrote ``np.sqrt(x)`` as often as ``sqrt(x)`` and
    sometimes ROOT's ``&&``/``||``/``!``. Those become ``and``/``or``/``not``,
    not ``&``/``|``/``~``: the words bind more loosely than comparisons, as the
    C++ operators do, so ``a > 1 && b < 2`` keeps its meaning. A numpy
    reduction along ``axis=1`` reduced each event's list, as ours do, so
    ``np.sum(x, axis=1)`` becomes ``sum(x)``; without it numpy reduced the
    whole chunk, so the prefix is kept and the parser refuses it. Otherwise
    only spelling is changed; whether the result is valid is for
    :func:`mlaas.expr.parse` to say.
    """
    text = source.replace("&&", " and ").replace("||", " or ")
    text = re.sub(r"!(?!=)", " not ", text)
    text = _per_event_reductions(text)

    def unprefix(match: re.Match[str]) -> str:
        name = match.group(1)
        if _is_reduction(name):  # np.max(x) reduced over everything, ours per event
            return match.group(0)
        return _CONSTANTS.get(name) or _ALIASES.get(name, name)

    text = _NUMPY_PREFIX.sub(unprefix, text)
    for old, new in _ALIASES.items():
        text = re.sub(rf"\b{old}\s*\(", f"{new}(", text)
    return " ".join(text.split())


def _is_reduction(name: str) -> bool:
    """A numpy name that reduces: kept prefixed (so refused) unless taken along axis 1."""
    return name in _NUMPY_REDUCTIONS or name in expr.REDUCTIONS


def _closing(text: str, start: int) -> int | None:
    """Index of the bracket closing the one at ``start``, or None when it is never closed."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] in "([{":
            depth += 1
        elif text[index] in ")]}":
            depth -= 1
            if depth == 0:
                return index
    return None


def _arguments(text: str) -> list[str]:
    """A call's arguments split at the commas outside any brackets, stripped."""
    args: list[str] = []
    depth = begin = 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            args.append(text[begin:index].strip())
            begin = index + 1
    args.append(text[begin:].strip())
    return [a for a in args if a]


def _per_event_call(name: str, args: list[str]) -> str | None:
    """Ours for ``np.NAME(x, axis=1)`` or ``np.NAME(x, 1)``; None for any other arguments.

    Only axis 1 (or -1) of a chunk is one value per event; without an axis
    (or axis 0/None) numpy reduced the whole chunk, and extra keywords
    (keepdims, initial, ...) have no counterpart, so those stay refused.
    """
    keywords = [m for m in (_KEYWORD.match(a) for a in args) if m]
    data = [a for a in args if not _KEYWORD.match(a)]
    if len(data) == 2 and not keywords:
        data, axis = data[:1], data[1]
    elif len(data) == 1 and [m.group(1) for m in keywords] == ["axis"]:
        axis = keywords[0].group(2).strip()
    else:
        return None
    if axis.replace(" ", "") not in _PER_EVENT_AXES:
        return None
    if name == "count_nonzero":
        return f"sum(({data[0]}) != 0)"
    return f"{_NUMPY_REDUCTIONS[name]}({data[0]})"


def _per_event_reductions(text: str) -> str:
    """``np.sum(x, axis=1)`` and the like rewritten as ours; other numpy calls left as written."""
    pieces: list[str] = []
    position = 0
    while match := _NUMPY_REDUCTION_CALL.search(text, position):
        close = _closing(text, match.end() - 1)
        if close is None:  # unbalanced: left for the parser to report
            break
        args = [_per_event_reductions(a) for a in _arguments(text[match.end():close])]
        ours = _per_event_call(match.group(1), args)
        written = text[match.start():match.end()] + ", ".join(args) + ")"
        pieces += [text[position:match.start()], ours or written]
        position = close + 1
    pieces.append(text[position:])
    return "".join(pieces)


def _parsed(source: str, what: str, notes: list[str]) -> str | None:
    """The translated expression, or None (and a note) when our language cannot say it."""
    text = translate_expression(source)
    try:
        expr.parse(text)
    except ExpressionError as exc:
        reduced = [m.group(1) for m in _NUMPY_PREFIX.finditer(text) if _is_reduction(m.group(1))]
        if reduced:  # kept with its prefix by translate_expression, on purpose
            reason = (f"np.{reduced[0]} reduced over all the events of a chunk there, which "
                      f"has no per-event meaning; only np.{reduced[0]}(x, axis=1), one value "
                      "per event, is translated")
        else:
            reason = re.split(r";? available functions", exc.message.splitlines()[0])[0]
        notes.append(f"{what} {source!r} could not be translated ({reason}); "
                     "write it by hand with the functions in `mlaas.expr`.")
        return None
    return text


# --------------------------------------------------------------------------- files and labels


def _label_value(raw: str | float, labels_name: str) -> float | int:
    """A numeric label; MLaaS4HEP turned labels into ints, so other text is an error."""
    if isinstance(raw, bool):
        raise SpecError(f"label {raw!r} in {labels_name} is not a number")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise SpecError(
            f"label {raw!r} in {labels_name} is not a number; MLaaS4HEP needed one numeric "
            "label per file (a label read from a branch goes in data.label, by hand)"
        ) from None
    return int(value) if value.is_integer() else value


def _repeated_note(sources: list[dict[str, Any]], redirector: str | None,
                   notes: list[str]) -> None:
    """A file listed twice: MLaaS4HEP read it twice; mlaas reads it once or refuses it.

    Under two labels each event would be trained on once per label; the
    converted spec's first read stops with an error naming both sources, so
    say it here. Twice under one label, mlaas reads it once (with a warning).
    Names are compared as mlaas will compare them (``sources.same_file``):
    ``/store/...`` through the redirector, URLs with their paths normalised,
    local names normalised (``a/../b.root`` is ``b.root``; a relative and an
    absolute name of one file are not recognised here, as the spec's
    directory that relative names resolve against is not known yet).
    """
    from mlaas.data import sources as data_sources  # uproot: only when converting

    labels: dict[str, list[Any]] = {}
    for source in sources:
        for name in source["files"]:
            url = f"{redirector}/{name}" if redirector and name.startswith("/store/") else name
            key = data_sources.same_file(url) if "://" in url else os.path.normpath(name)
            labels.setdefault(key, []).append(source["label"])
    for name, found in labels.items():
        if len(set(found)) > 1:
            notes.append(f"{name} is listed with labels {', '.join(map(str, found))}: its "
                         "events would be read once per label, so mlaas refuses a file in two "
                         "sources; keep it under one label.")
        elif len(found) > 1:
            notes.append(f"{name} is listed {len(found)} times with label {found[0]}: "
                         "MLaaS4HEP read its events that many times, mlaas reads them once.")


def _sources(files: list[str], labels: list[str | float], files_name: str,
             labels_name: str) -> list[dict[str, Any]]:
    """Files grouped by label, in first-seen order (the two lists are aligned line by line)."""
    if not files:
        raise SpecError(f"{files_name} lists no files")
    if len(files) != len(labels):
        raise SpecError(
            f"{files_name} lists {len(files)} file(s) but {labels_name} lists "
            f"{len(labels)} label(s); MLaaS4HEP pairs them line by line, so the counts must match"
        )
    groups: dict[float | int, list[str]] = {}
    for name, raw in zip(files, labels):
        groups.setdefault(_label_value(raw, labels_name), []).append(name)
    return [{"files": names, "label": label} for label, names in groups.items()]


def _relative_note(files: list[str], notes: list[str]) -> None:
    relative = [f for f in files if "://" not in f and not f.startswith("/")]
    if relative:
        notes.append(
            f"relative file names (e.g. {relative[0]!r}) were relative to the working directory "
            "in MLaaS4HEP and are relative to the spec file's directory here; save the spec "
            "where they resolve or make them absolute."
        )


# --------------------------------------------------------------------------- params


def _names(value: Any) -> list[str]:
    """A list of names from a JSON list or a comma-separated string ('' means none)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    raise SpecError(f"expected a list of branch names or a comma-separated string, not {value!r}")


def _expand(names: list[str], kinds: dict[str, str] | None, key: str,
            notes: list[str]) -> list[str]:
    """Wildcards (``Jet_*``, which MLaaS4HEP's first reader accepted) expanded against the tree."""
    out: list[str] = []
    for name in names:
        if not glob.has_magic(name):
            out.append(name)
        elif kinds is None and key == "exclude_branches":
            out.append(name)  # data.exclude matches patterns itself, against each tree
        elif kinds is None:
            notes.append(f"{key} pattern {name!r} needs the first file's branch names to be "
                         "expanded, which were not available; list the branches by name.")
        else:
            matches = [b for b in kinds if fnmatch.fnmatchcase(b, name)]
            if not matches:
                notes.append(f"{key} pattern {name!r} matches no branch of the first file.")
            out.extend(m for m in matches if m not in out)
    return out


def _redirector(value: Any, notes: list[str]) -> str | None:
    """A root:// redirector; a bare host gets the scheme, anything else is left out."""
    if not value:
        return None
    text = str(value).strip()
    if text.startswith("root://"):
        return text
    if "://" not in text:
        notes.append(f"redirector {text!r} had no scheme; written as 'root://{text}'.")
        return f"root://{text}"
    notes.append(f"redirector {text!r} is not a root:// URL, which is all data.redirector "
                 "accepts; left out.")
    return None


def _whole(value: Any) -> Any:
    """A numeric string as Python's ``int()`` reads it (``"5"``, ``" 64 "``); else as given.

    MLaaS4HEP passed the integer keys through ``int()``, so a quoted number
    in params.json (common in JSON configs) worked there. ``"5.5"`` and
    ``"big"`` failed there and come back unchanged, for the caller to refuse.
    """
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _max_events(params: dict[str, Any], n_sources: int, notes: list[str]) -> int | None:
    """nevts as a per-source cap: MLaaS4HEP shared ``nevts`` over all files by size."""
    written = params.get("nevts", -1)
    nevts = _whole(written)
    if nevts is None or nevts == -1:
        return None
    if not _is_positive_int(nevts):
        notes.append(f"nevts={written!r} is not a positive event count (-1 means all); "
                     "no limit was set.")
        return None
    if n_sources > 1:
        notes.append(
            f"nevts={nevts} was a total over all files, shared in proportion to their sizes; "
            f"data.max_events caps each of the {n_sources} sources, so up to "
            f"{n_sources * nevts} events are read."
        )
    return nevts


def _step_size(params: dict[str, Any], notes: list[str]) -> int | None:
    """chunk_size was an entry count; -1 (whole file) has no entry-count equivalent."""
    written = params.get("chunk_size")
    chunk = _whole(written)
    if chunk is None:
        return None
    if not _is_positive_int(chunk):
        what = "(whole files)" if chunk == -1 else "is not a positive entry count and"
        notes.append(f"chunk_size={written!r} {what} kept the default step_size "
                     "of 100 MB, which bounds memory instead.")
        return None
    return chunk


def _identifiers(params: dict[str, Any]) -> list[str] | None:
    """identifier; empty means MLaaS4HEP's default, which is also ours, so it is left out."""
    names = _names(params.get("identifier"))
    return names or None


def _train(params: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """epochs and batch_size as the train section; shuffle is always on in mlaas."""
    train: dict[str, Any] = {}
    for key in ("epochs", "batch_size"):
        written = params.get(key)
        value = _whole(written)
        if value is None:
            continue
        if not _is_positive_int(value):
            notes.append(f"{key}={written!r} is not a positive whole number; left at mlaas's "
                         "default.")
            continue
        train[key] = value
    if "shuffle" in params and not params["shuffle"]:
        notes.append(f"shuffle={params['shuffle']!r}: mlaas always shuffles training batches "
                     "(the evaluation splits are read in order); not mapped.")
    return train


def _param_notes(params: dict[str, Any], notes: list[str]) -> None:
    for key, why in IGNORED_KEYS.items():
        if key in params:
            notes.append(f"{key}={params[key]!r} is not mapped: {why}.")
    known = set(TRAIN_KEYS) | set(IGNORED_KEYS) | set(DATA_KEYS)
    for key in params:
        if key not in known:
            notes.append(f"unknown params key {key!r}={params[key]!r} is not an MLaaS4HEP "
                         "option this converter knows; left out.")


# --------------------------------------------------------------------------- preproc


def _is_true(value: Any) -> bool:
    """MLaaS4HEP wrote booleans as the strings "True"/"False"."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _cut_term(name: str, key: str, value: Any, where: str, notes: list[str],
              jagged: bool = True) -> str | None:
    """One cut: a string (flat) or ``[condition, "all"|"any"]`` (jagged).

    On a flat value ``any``/``all`` of the one value is the condition itself,
    so the reduction is left out there (ours refuses flat input).
    """
    what = f"{where}.{name}.{key}"
    if isinstance(value, str):
        return _parsed(value, f"{what}", notes)
    if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and str(value[1]).strip() in ("all", "any")):
        inner = _parsed(value[0], what, notes)
        if inner is None or not jagged:
            return inner
        return f"{str(value[1]).strip()}({inner})"
    notes.append(f"{what}={value!r} is neither a condition string nor "
                 "[condition, 'all'|'any']; left out.")
    return None


def _cuts_of(name: str, entry: dict[str, Any], where: str, notes: list[str],
             jagged: bool = True) -> list[str]:
    """Every ``cut``/``cut_N`` of an entry, in file order."""
    terms = []
    for key, value in entry.items():
        if key.startswith("cut"):
            term = _cut_term(name, key, value, where, notes, jagged)
            if term is not None:
                terms.append(term)
    return terms


def _new_branches(entries: dict[str, Any], out: _Preproc, notes: list[str]) -> None:
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "def" not in entry:
            notes.append(f"new_branch {name!r} has no 'def'; left out.")
            continue
        if not expr.is_identifier(name):
            notes.append(f"new_branch name {name!r} is not a valid name here; left out.")
            continue
        source = _parsed(str(entry["def"]), f"new_branch {name!r}: def", notes)
        if source is None:
            out.failed.add(name)
            cut_keys = [k for k in entry if k.startswith("cut")]
            if cut_keys:
                notes.append(f"new_branch {name!r}: its cuts ({', '.join(cut_keys)}) were "
                             "left out with it.")
            continue
        out.derived[name] = source
        kind = str(entry.get("type", "flat")).strip()
        if kind not in ("flat", "jagged"):
            notes.append(f"new_branch {name!r} has type {kind!r}; treated as flat.")
        out.cuts.extend(_cuts_of(name, entry, "new_branch", notes, kind == "jagged"))
        if _is_true(entry.get("remove")):
            out.removed.append(name)
        else:
            out.new_features.append((name, kind == "jagged"))
        out.removed.extend(str(k) for k in entry.get("keys_to_remove", []) or [])
        for key in entry:
            if key not in NEW_BRANCH_KEYS and not key.startswith("cut"):
                notes.append(f"new_branch {name!r} key {key!r} is unknown; left out.")


def _branch_cuts(where: str, entries: dict[str, Any], out: _Preproc, notes: list[str]) -> None:
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            notes.append(f"{where}.{name}={entry!r} is not a mapping of cuts; left out.")
            continue
        out.cuts.extend(_cuts_of(name, entry, where, notes, where == "jagged_cut"))
        if _is_true(entry.get("remove")):
            out.removed.append(name)
        for key in entry:
            if key != "remove" and not key.startswith("cut"):
                notes.append(f"{where}.{name} key {key!r} is unknown; left out.")


def _preproc(preproc: dict[str, Any], notes: list[str]) -> _Preproc:
    """Derived names and cuts, in the order MLaaS4HEP applied them (flat, jagged, new)."""
    out = _Preproc()
    for key in ("flat_cut", "jagged_cut"):
        _branch_cuts(key, preproc.get(key) or {}, out, notes)
    _new_branches(preproc.get("new_branch") or {}, out, notes)
    for key in preproc:
        if key not in PREPROC_KEYS:
            notes.append(f"unknown preproc key {key!r}; left out.")
    out.cuts = [t for t in out.cuts if not _uses_failed(t, out.failed, notes)]
    return out


def _uses_failed(term: str, failed: set[str], notes: list[str]) -> bool:
    """A cut on a new branch that could not be translated cannot be kept either."""
    lost = sorted(expr.parse(term).names & failed)
    if lost:
        notes.append(f"cut {term!r} uses {', '.join(map(repr, lost))}, whose def could not be "
                     "translated; left out.")
    return bool(lost)


def _unknown_names(data: dict[str, Any], kinds: dict[str, str], notes: list[str]) -> None:
    """Names in defs and the cut that the first file does not have, said now, not at run time."""
    known = set(kinds) | set(data.get("derived", {}))
    used = [*data.get("derived", {}).values(), data.get("cut") or "True"]
    missing = sorted({n for text in used for n in expr.parse(text).names} - known)
    if missing:
        notes.append(f"preproc uses {', '.join(map(repr, missing))}, which the first file's "
                     "tree does not have; reading will fail until they are fixed.")


def _cut(terms: list[str]) -> str | None:
    """Terms ANDed, each in parentheses because ``&`` binds tighter than comparisons."""
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    return " & ".join(f"({t})" for t in terms)


# --------------------------------------------------------------------------- features


def _feature(name: str, jagged: bool) -> str | dict[str, Any]:
    return {"branch": name} if jagged else name


def _listed_features(names: list[str], pre: _Preproc, kinds: dict[str, str] | None,
                     notes: list[str]) -> list[str | dict[str, Any]]:
    """Selected branches (minus removed ones) then new branches, jagged ones as mappings."""
    features: list[str | dict[str, Any]] = []
    removed = set(pre.removed)
    new = dict(pre.new_features)  # name -> jagged, as its type says
    for name in names:
        if name in removed:
            continue
        if name in new:  # a new branch: its declared type, no tree to find it in
            features.append(_feature(name, new[name]))
            continue
        kind = None if kinds is None else kinds.get(name)
        if kinds is not None and kind is None:
            notes.append(f"selected branch {name!r} is not in the first file's tree; "
                         "kept, but reading will fail unless the other files have it.")
        elif kind is not None and kind.startswith("unsupported"):
            notes.append(f"selected branch {name!r} has type {kind.split(':', 1)[1]!r}, "
                         "which is not a number or a list of numbers; left out.")
            continue
        features.append(_feature(name, kind == "jagged"))
    features.extend(_feature(n, j) for n, j in pre.new_features
                    if n not in names and n not in removed)
    return features


def _features(params: dict[str, Any], pre: _Preproc, kinds: dict[str, str] | None,
              notes: list[str]) -> tuple[list[str | dict[str, Any]] | str, list[str]]:
    """``data.features`` and ``data.exclude``, following MLaaS4HEP's precedence.

    selected_branches won over exclude_branches in the predecessor's reader,
    so exclude only survives together with ``features: all``.
    """
    selected = _expand(_names(params.get("selected_branches")), kinds, "selected_branches", notes)
    excluded = _expand(_names(params.get("exclude_branches")), kinds, "exclude_branches", notes)
    if selected:
        if excluded:
            notes.append("exclude_branches is ignored because selected_branches is given, "
                         "as in MLaaS4HEP.")
        features = _listed_features(selected, pre, kinds, notes)
        if not features:
            raise SpecError("no feature is left: every selected branch was removed by preproc")
        if kinds is None and any(isinstance(f, str) for f in features):
            notes.append("without the first file's branch types, jagged branches could not be "
                         "told from flat ones; write each jagged one as {branch: NAME}.")
        return features, []
    exclude = list(dict.fromkeys(excluded + pre.removed))
    return "all", exclude


def _jagged_note(features: list[str | dict[str, Any]] | str, notes: list[str]) -> None:
    if isinstance(features, list) and any(isinstance(f, dict) for f in features):
        notes.append("jagged branches were padded to their largest multiplicity in MLaaS4HEP; "
                     "here max_len defaults to the 95th percentile, set it per branch to keep "
                     "every object.")


# --------------------------------------------------------------------------- entry points


def convert(params: dict[str, Any], files: list[str], labels: list[str | float],
            preproc: dict[str, Any] | None = None, *,
            tree_kinds: dict[str, str] | None = None,
            files_name: str = "files.txt", labels_name: str = "labels.txt") -> Conversion:
    """Convert already-read MLaaS4HEP inputs into a pipeline spec dict.

    Args:
        params (dict): the parsed params.json.
        files (list of str): files.txt's lines, comments and blanks removed.
        labels (list): labels.txt's lines, aligned with ``files``.
        preproc (dict): the parsed preproc.json, if any.
        tree_kinds (dict): branch name -> ``flat``/``jagged``/``unsupported:...``
            (see :func:`mlaas.data.layout.branch_kinds`); without it, jagged
            branches cannot be recognised and a note says so.
        files_name, labels_name (str): how to name the two lists in errors.

    Raises :class:`SpecError` when files and labels do not pair up, a label is
    not a number, or nothing is left to use as a feature.
    """
    notes: list[str] = []
    sources = _sources(list(files), list(labels), files_name, labels_name)
    _relative_note([f for s in sources for f in s["files"]], notes)
    data: dict[str, Any] = {"tree": str(params.get("branch") or DEFAULT_TREE)}
    redirector = _redirector(params.get("redirector"), notes)
    _repeated_note(sources, redirector, notes)
    if redirector:
        data["redirector"] = redirector
    data["sources"] = sources
    pre = _preproc(preproc or {}, notes)
    features, exclude = _features(params, pre, tree_kinds, notes)
    data["features"] = features
    if exclude:
        data["exclude"] = exclude
    identifiers = _identifiers(params)
    if identifiers:
        data["identifiers"] = identifiers
    if pre.derived:
        data["derived"] = dict(pre.derived)
    cut = _cut(pre.cuts)
    if cut:
        data["cut"] = cut
    data["normalize"] = "minmax"  # MLaaS4HEP always scaled to [0, 1] with min/max
    step = _step_size(params, notes)
    if step is not None:
        data["step_size"] = step
    max_events = _max_events(params, len(sources), notes)
    if max_events is not None:
        data["max_events"] = max_events
    if tree_kinds is not None:
        _unknown_names(data, tree_kinds, notes)
    _jagged_note(features, notes)
    _param_notes(params, notes)
    spec: dict[str, Any] = {"version": 1, "data": data}
    train = _train(params, notes)
    if train:
        spec["train"] = train
    return Conversion(spec=spec, notes=notes)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise SpecError(f"{what} {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise SpecError(f"{what} {str(path)!r} must hold a JSON object, "
                        f"not {type(value).__name__}")
    return value


def _read_lines(path: Path) -> list[str]:
    """Non-blank lines that are not ``#`` comments, as MLaaS4HEP's workflow read them."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def _is_remote(name: str) -> bool:
    """A URL, or a logical ``/store/`` name that goes through the redirector."""
    return "://" in name or name.startswith("/store/")


def _local(name: str, *bases: Path) -> Path | None:
    """The existing local file ``name`` refers to: as given (cwd), then against each base."""
    if _is_remote(name):
        return None
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [path, *(b / path for b in bases)]
    return next((p for p in candidates if p.is_file()), None)


def _first_match(name: str, *bases: Path) -> Path | None:
    """The local file ``name`` refers to; for a glob, its first match (as mlaas sorts them).

    The spec keeps the glob (mlaas expands it when reading); only the branch
    kinds are learnt here, from the file the data layer will read first.
    """
    if not glob.has_magic(name):
        return _local(name, *bases)
    if _is_remote(name):
        return None
    path = Path(name).expanduser()
    for candidate in [path] if path.is_absolute() else [path, *(b / path for b in bases)]:
        matches = sorted(m for m in glob.glob(str(candidate)) if os.path.isfile(m))
        if matches:
            return Path(matches[0])
    return None


def _exclude_file(params: dict[str, Any], base: Path) -> dict[str, Any]:
    """exclude_branches may name a file of branch names (one per line) in MLaaS4HEP."""
    value = params.get("exclude_branches")
    if isinstance(value, str) and value and "," not in value:
        path = _local(value, base)
        if path is not None:
            return {**params, "exclude_branches": _read_lines(path)}
    return params


def _tree_kinds(files: list[str], tree: str,
                base: Path) -> tuple[dict[str, str] | None, str | None]:
    """Branch kinds of ``tree`` in the first file, or None and the reason it could not be read."""
    path = _first_match(files[0], base) if files else None
    if path is None:
        if not files:
            return None, None
        if glob.has_magic(files[0]) and not _is_remote(files[0]):
            what = f"pattern {files[0]!r} matches no local file here"
        else:
            what = f"{files[0]!r} is not a local file here"
        return None, f"the first file {what}, so jagged branches were not detected"
    import uproot  # imported here: converting without a file needs no ROOT I/O

    from mlaas.data.layout import branch_kinds

    try:
        with uproot.open(path) as handle:
            if tree not in handle:
                return None, f"the first file {str(path)!r} has no tree {tree!r}"
            return branch_kinds(handle[tree]), None
    except Exception as exc:  # noqa: BLE001 - any unreadable file only costs the detection
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, (f"the first file {str(path)!r} could not be read "
                      f"({type(exc).__name__}: {first})")


def convert_files(params: Path, files: Path, labels: Path,
                  preproc: Path | None = None) -> Conversion:
    """Read the four MLaaS4HEP files and convert them (see :func:`convert`).

    The first file of files.txt is opened, when it is a local file, to learn
    which selected branches are jagged; relative names are tried against the
    working directory (as MLaaS4HEP did) and then files.txt's directory.
    """
    params_dict = _exclude_file(_read_json(Path(params), "params file"), Path(params).parent)
    file_names = _read_lines(Path(files))
    label_lines = _read_lines(Path(labels))
    preproc_dict = _read_json(Path(preproc), "preproc file") if preproc else None
    tree = str(params_dict.get("branch") or DEFAULT_TREE)
    kinds, why = _tree_kinds(file_names, tree, Path(files).parent)
    result = convert(params_dict, file_names, label_lines, preproc_dict, tree_kinds=kinds,
                     files_name=str(files), labels_name=str(labels))
    if why and isinstance(result.spec["data"]["features"], list):
        result.notes.insert(0, why + ".")  # only listed features need the kinds
    return result
