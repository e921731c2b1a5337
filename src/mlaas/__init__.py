"""mlaas: Machine Learning as a Service for High Energy Physics.

Entry points (documented by their home module):

- ``mlaas.spec.load``: read and validate a pipeline spec.
- ``mlaas.data.RootDataset``: stream a split of ROOT events as float32 batches.
- ``mlaas.errors``: the exception tree (``MlaasError`` and below).

Importing ``mlaas`` stays light: the data layer (uproot, awkward) loads only
when ``RootDataset`` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlaas import errors
from mlaas.errors import (
    BranchNotFound,
    DataError,
    ExpressionError,
    MlaasError,
    SourceError,
    SpecError,
    TreeNotFound,
)

if TYPE_CHECKING:
    from mlaas.data.loader import RootDataset

__version__ = "0.1.0"
__all__ = [
    "BranchNotFound",
    "DataError",
    "ExpressionError",
    "MlaasError",
    "RootDataset",
    "SourceError",
    "SpecError",
    "TreeNotFound",
    "errors",
    "load",
]


def load(source: Any, **kwargs: Any) -> Any:
    """Shortcut for :func:`mlaas.spec.load`."""
    from mlaas.spec import load as _load

    return _load(source, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "RootDataset":
        from mlaas.data.loader import RootDataset

        return RootDataset
    raise AttributeError(f"module 'mlaas' has no attribute {name!r}")
