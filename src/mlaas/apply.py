"""``mlaas apply``: score whole ROOT files with a bundle, writing friend trees.

Layer: inference. For each input file (a local path or a ``root://`` /
``https://`` URL) this streams the branches the model reads chunk by chunk
(the bundle's ``step_size``, by default 100 MB of those branches), runs the
bundle's preprocessing and model (:meth:`mlaas.bundle.Bundle.predict_arrays`)
and appends the scores to::

    OUTDIR/<stem>_friend.root

where ``<stem>`` is the input's file name without ``.root``. The output holds
one tree with the SAME NAME as the input tree and the same number of entries
in the same order, so it can be attached as a friend
(``tree.AddFriend("Events", "x_friend.root")``, or zipped with uproot entry by
entry). Branches: ``<name>`` for a single-output model (default ``score``),
``<name>_<label>`` per class for multiclass; float32; NaN for events that fail
the bundle's cut.

Every input is opened and checked (tree and branches) before anything is
written; each output is written under a temporary name and renamed into place
when complete, so an interrupted run leaves no truncated friend file. The
next chunk is read in a background thread while the current one is scored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uproot

from mlaas._progress import event_progress
from mlaas.bundle import Bundle
from mlaas.data import sources
from mlaas.data.chunks import bounds
from mlaas.data.layout import branch_kinds
from mlaas.errors import BranchNotFound, DataError, SourceError, close_names
from mlaas.spec import RetrySpec

__all__ = ["apply_files", "friend_path", "DEFAULT_STEP"]

DEFAULT_STEP = "100 MB"
FRIEND_SUFFIX = "_friend.root"


@dataclass
class _Input:
    url: str
    entries: int
    ranges: list[tuple[int, int]]  # entry ranges read one at a time (cluster-aligned)
    output: Path


def friend_path(url: str, outdir: Path) -> Path:
    """``OUTDIR/<stem>_friend.root`` for an input path or URL."""
    name = str(url).rstrip("/").rsplit("/", 1)[-1]
    stem = name[:-5] if name.endswith(".root") else name
    return outdir / f"{stem}{FRIEND_SUFFIX}"


def _url(file: str | os.PathLike[str]) -> str:
    text = os.fspath(file)
    if sources.is_remote(text):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise SourceError(f"input file {text!r} does not exist", file_path=str(path))
    return str(path.resolve())


def _plan(bundle: Bundle, url: str, outdir: Path, retry: RetrySpec) -> _Input:
    tree = sources.open_tree(url, bundle.tree, retry)
    kinds = branch_kinds(tree)
    for name in bundle.layout.branches:
        if name not in kinds:
            near = close_names(name, kinds)
            hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
            raise BranchNotFound(f"no branch {name!r}, which the model reads{hint}",
                                 file_path=url, tree=bundle.tree, branch=name)
        want = bundle.branch_types[name]["kind"]
        if kinds[name] != want:
            raise DataError(f"branch {name!r} is {kinds[name]} here but {want} in the "
                            "training data", file_path=url, tree=bundle.tree, branch=name)
    step_size = bundle.step_size or DEFAULT_STEP
    step = sources.entries_per_step(tree, bundle.layout.branches, step_size)
    clusters = (sources.cluster_starts(tree, bundle.layout.branches)
                if isinstance(step_size, str) else [])
    entries = int(tree.num_entries)
    tree.file.close()
    return _Input(url, entries, bounds(entries, step, clusters), friend_path(url, outdir))


def _chunks(item: _Input, bundle: Bundle, retry: RetrySpec) -> Iterator[dict[str, Any]]:
    """The input's chunks, the next one read in a thread while the caller scores this one."""
    ranges = item.ranges
    trees = sources.OpenTrees()  # the file opened once for all its chunks

    def read(r: tuple[int, int]) -> dict[str, Any]:
        return sources.read_range(item.url, bundle.tree, bundle.layout.branches, r[0], r[1],
                                  retry, trees)

    if len(ranges) < 2:
        with trees:
            yield from map(read, ranges)
        return
    with trees, sources.read_pool(trees, 1, "mlaas-apply") as pool:
        future = pool.submit(read, ranges[0])
        for nxt in ranges[1:]:
            current = future.result()
            future = pool.submit(read, nxt)
            yield current
        yield future.result()


def _nbytes(arrays: dict[str, Any]) -> int:
    return int(sum(getattr(a, "nbytes", 0) for a in arrays.values()))


def apply_files(bundle_path: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]],
                outdir: str | os.PathLike[str], name: str = "score",
                progress: bool = True) -> list[Path]:
    """Score every entry of ``files`` with the bundle; write one friend file per input.

    Args:
        bundle_path: a bundle directory or ``bundle.tar.gz``.
        files: ROOT files (local paths or root:// / https:// URLs) with the
            training tree.
        outdir: where ``<stem>_friend.root`` files go (created).
        name: the score branch name (``name_<label>`` per class for multiclass).
        progress: draw a progress bar with events/s on stderr.

    Returns the friend files, in input order.
    """
    if not name.isidentifier():
        raise DataError(f"branch name {name!r} must be an identifier (letters, digits, _)")
    bundle = Bundle.load(bundle_path)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    retry = RetrySpec()
    items = [_plan(bundle, _url(f), out, retry) for f in files]
    seen: dict[Path, str] = {}
    for item in items:
        if item.output in seen:
            raise DataError(f"inputs {seen[item.output]!r} and {item.url!r} would both be "
                            f"written to {item.output.name}; apply them into different "
                            "output directories", file_path=item.url)
        seen[item.output] = item.url
    columns = bundle.column_names(name)
    total = sum(i.entries for i in items)
    with event_progress("apply", total, progress) as advance:
        for item in items:
            _apply_one(bundle, item, columns, retry, advance)
    return [i.output for i in items]


def _apply_one(bundle: Bundle, item: _Input, columns: list[str], retry: RetrySpec,
               advance: Any) -> None:
    partial = item.output.with_name(f".{item.output.name}.partial")
    written = 0
    try:
        with uproot.recreate(partial) as file:
            tree = file.mktree(bundle.tree, {c: np.float32 for c in columns},
                               title=f"mlaas scores ({', '.join(columns)})")
            for arrays in _chunks(item, bundle, retry):
                scores, _ = bundle.predict_arrays(arrays, item.url)
                tree.extend({c: np.ascontiguousarray(scores[:, k])
                             for k, c in enumerate(columns)})
                written += len(scores)
                advance(len(scores), _nbytes(arrays))
        if written != item.entries:
            raise DataError(f"read {written} entries but the tree has {item.entries}",
                            file_path=item.url, tree=bundle.tree)
        os.replace(partial, item.output)
    finally:
        partial.unlink(missing_ok=True)
