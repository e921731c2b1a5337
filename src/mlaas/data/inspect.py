"""``mlaas inspect``: what is in a ROOT file, before writing a spec for it.

Layer: data. Trees, entries, compression, and for each branch its type,
whether it is flat or jagged (or unusable as a feature), and the
multiplicity of jagged branches on a sample of entries (``sample``: the
first :data:`SAMPLE`). RNTuples are named, not described: mlaas reads TTrees.
"""

from __future__ import annotations

from typing import Any

import awkward as ak
import numpy as np

from mlaas.data import sources
from mlaas.data.layout import branch_kinds
from mlaas.errors import TreeNotFound
from mlaas.spec import RetrySpec

__all__ = ["inspect_file"]

SAMPLE = 10_000


def _compression(file: Any) -> str:
    comp = file.file.compression
    if comp is not None:
        return "none" if comp.level == 0 else f"{type(comp).__name__}({comp.level})"
    # Algorithm 0 ("global default", e.g. fCompress=1 in older files) is ZLIB in ROOT;
    # uproot reports it as None, which is not "uncompressed".
    level = int(getattr(file.file, "fCompress", 0) or 0) % 100
    return f"ZLIB({level})" if level else "none"


def inspect_file(url: str, tree: str | None = None, sample: int = SAMPLE,
                 retry: RetrySpec | None = None) -> dict[str, Any]:
    """Describe ``url``: every tree when ``tree`` is None, else just that tree.

    Args:
        url (str): local path, ``root://`` or ``https://`` URL.
        tree (str): only this tree.
        sample (int): entries read to measure jagged multiplicities.
    """
    retry = retry or RetrySpec()
    with sources.with_retries(url, lambda: sources.open_file(url, retry), retry) as file:
        rntuples = _rntuples(file)
        if tree in rntuples:
            raise TreeNotFound(
                f"{tree!r} is an RNTuple ({rntuples[tree]}), which mlaas does not read yet "
                f"(trees here: {', '.join(sources.trees_in(file)) or 'none'})",
                file_path=url, tree=tree)
        # no TTree at all (an RNTuple, histograms): open_tree's error says what the file holds
        names: list[str | None] = [tree] if tree else [*sources.trees_in(file)] or [None]
        out: dict[str, Any] = {"file": url, "compression": _compression(file), "trees": {}}
        if rntuples and not tree:
            out["rntuples"] = rntuples
        for name in names:
            t = sources.open_tree(url, name, retry)
            try:
                with sources.read_errors(url, name):
                    out["trees"][name] = _describe(t, sample)
            finally:
                t.file.close()
    return out


def _rntuples(file: Any) -> dict[str, str]:
    """The file's RNTuples and their class: listed as such, since mlaas reads only TTrees.

    They were left out silently, so a file with RNTuple ``Events`` and TTree
    ``Empty`` looked as if it held ``Empty`` only.
    """
    classes = {k.split(";")[0]: cls for k, cls in file.classnames().items()}
    return {name: classes[name] for name in sources.trees_in(file, rntuples=True)}


def _describe(tree: Any, sample: int) -> dict[str, Any]:
    kinds = branch_kinds(tree)
    jagged = [n for n, k in kinds.items() if k == "jagged"]
    stop = min(sample, tree.num_entries)
    counts: dict[str, np.ndarray] = {}
    if jagged and stop:
        wanted = set(jagged)
        arrays = tree.arrays(filter_name=lambda n: n in wanted, entry_stop=stop, library="ak",
                             how=dict)
        counts = {n: ak.to_numpy(ak.num(a, axis=1)) for n, a in arrays.items()}
    branches = []
    for name, kind in kinds.items():
        b = tree[name]
        row: dict[str, Any] = {
            "name": name,
            "type": b.typename,
            "kind": kind.split(":", 1)[0],
            "compressed_bytes": int(b.compressed_bytes),
            "uncompressed_bytes": int(b.uncompressed_bytes),
        }
        if name in counts:
            c = counts[name]
            row["multiplicity_mean"] = float(c.mean()) if c.size else 0.0
            row["multiplicity_max"] = int(c.max()) if c.size else 0
        branches.append(row)
    return {"entries": int(tree.num_entries), "sample": stop, "branches": branches}
