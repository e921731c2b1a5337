"""A SIGTERM that has arrived but not yet stopped the run.

Layer: shared by the train and platform layers. Signal handlers raise to stop
at once, but Python drops an exception raised while a ``__del__`` runs (seen:
uproot's file finalizer during pass 1) and ``except Exception`` blocks can eat
one too. So every SIGTERM handler of a run also notes the request here; the
trainer and the run's edges look at it, and whoever finally stops the run as
preempted clears it.
"""

from __future__ import annotations

__all__ = ["note", "pending", "clear"]

_pending = False


def note() -> None:
    global _pending
    _pending = True


def pending() -> bool:
    return _pending


def clear() -> None:
    global _pending
    _pending = False
