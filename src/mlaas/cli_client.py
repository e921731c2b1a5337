"""The client half of the CLI: commands that talk to an ``mlaas server``.

Registered on the main typer app by :func:`register`, so ``mlaas --help``
lists them beside the local commands.
"""

from __future__ import annotations

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the client commands to ``app``."""
