"""Small ROOT files written by the tests themselves, with uproot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import awkward as ak
import uproot


def write_ttrees(path: Path, trees: dict[str, dict[str, Any]]) -> Path:
    """``{tree: {branch: array}}`` as TTrees (a plain dict would make uproot 5.7 write an
    RNTuple), flat numpy arrays and jagged awkward ones alike."""
    with uproot.recreate(path) as f:
        for name, branches in trees.items():
            f.mktree(name, {k: (v.type if isinstance(v, ak.Array) else v.dtype)
                            for k, v in branches.items()})
            f[name].extend(branches)
    return path
