"""Optional dependencies, each imported through one function.

Layer: support. A module that needs an optional library calls the function
here instead of importing it, so a missing library becomes one
:class:`ModuleNotFoundError` whose message is the exact install command,
raised where the feature is used (``mlaas server --executor ray``,
``mlaas node join``) and never when :mod:`mlaas` is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["ray"]


def _require(module: str, extra: str, feature: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the library is there but one of *its* imports is missing
        raise ModuleNotFoundError(
            f"{feature} needs the {module!r} package, which is not installed; install it with\n"
            f"    pip install 'mlaas[{extra}]'", name=module) from exc


def ray() -> ModuleType:
    """The ``ray`` package (the Ray executor and ``mlaas node join``): ``pip install 'mlaas[ray]'``."""
    return _require("ray", "ray", "the Ray executor")
