"""Shared pieces of the platform app tests: a header authenticator, small pipelines, waiting.

``HeaderUsers`` is a real (small) authentication policy, not a stand-in: the
caller names themselves in ``X-User`` and must be one of the configured
principals, otherwise the request is 401. The platform's own multi-user
authenticators come with the auth issue; this one lets the tests act as
several users without them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from starlette.requests import Request

from mlaas.data import synth
from mlaas.errors import Unauthorized
from mlaas.platform.principal import ADMIN_ROLE, Principal

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient  # noqa: F401  (re-exported for the tests)

T = TypeVar("T")

ALICE = Principal(user="alice", groups=("cms",))
BOB = Principal(user="bob", groups=("atlas",))
ROOT = Principal(user="root", groups=("ops",), roles=frozenset({ADMIN_ROLE}))
USERS = {p.user: p for p in (ALICE, BOB, ROOT)}
AS_ALICE = {"X-User": "alice"}
AS_BOB = {"X-User": "bob"}
AS_ROOT = {"X-User": "root"}


class HeaderUsers:
    """Authenticator: the principal named by the ``X-User`` header (401 without one)."""

    def __init__(self, users: dict[str, Principal]) -> None:
        self.users = dict(users)

    def authenticate(self, request: Request) -> Principal:
        name = request.headers.get("x-user")
        if not name:
            raise Unauthorized("no X-User header")
        try:
            return self.users[name]
        except KeyError:
            raise Unauthorized(f"unknown user {name!r}") from None


def make_data(directory: Path, events: int = 1500, seed: int = 3) -> dict[str, Path]:
    """A small signal/background pair: ``{"signal": path, "background": path}``."""
    files = synth.generate(directory, events, seed=seed)["files"]
    return {k: Path(v) for k, v in files.items()}


def pipeline(*, epochs: int = 1, name: str | None = None, model: dict[str, Any] | None = None,
             files: tuple[str, str] = ("data/signal.root", "data/background.root"),
             **train: Any) -> dict[str, Any]:
    """A small pipeline over workspace files ``data/signal.root`` / ``data/background.root``."""
    spec: dict[str, Any] = {
        "data": {
            "sources": [{"name": "signal", "files": [files[0]], "label": 1},
                        {"name": "background", "files": [files[1]], "label": 0}],
            "derived": {"HT": "sum(Jet_pt)"},
            "cut": "MET_pt > 5",
            "features": ["MET_pt", "HT", {"branch": "Jet_pt", "max_len": 4}],
        },
        "model": model or {"builtin": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "batch_size": 256, **train},
    }
    if name is not None:
        spec["name"] = name
    return spec


EVENTS = [{"MET_pt": 20.5, "Jet_pt": [50.0, 31.0, 12.5]},
          {"MET_pt": 2.0, "Jet_pt": [40.0]},  # fails the cut -> null
          {"MET_pt": 80.0, "Jet_pt": []}]


def wait_for(probe: Callable[[], T | None], *, timeout: float = 180.0, every: float = 0.2,
             what: str = "condition") -> T:
    """Poll ``probe`` until it returns something other than None/False (a bounded wait for a
    state change of a real process, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
