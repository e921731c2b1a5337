"""What SIGTERM does outside the training loop: end the process at once, as preempted.

Layer: shared by the train and platform layers. While the trainer trains, its
SIGTERM handler only sets a flag, and the trainer checkpoints at the next
batch boundary. Outside training (imports, pass 1, evaluation, export) there
is nothing to save: a resumed run simply redoes that work. The handler there
used to raise an exception, but Python runs a handler between any two
bytecodes of the main thread, so the raise could land anywhere, and some
places cannot survive one. Seen in CI: it landed in importlib's module-lock
callback after the import lock was taken and before the ``try`` that releases
it; the import lock stayed held, numba's warm-up thread waited for it forever
holding numba's compiler lock, the batch thread waited for that, and the job
ignored SIGTERM until the executor's SIGKILL.

So the handler here never raises. :func:`exit_preempted` says why on stderr,
runs the hooks registered with :func:`on_preempted` (the job process writes
its ``exit.json``), and ends the process with ``os._exit(75)``: exit code 75
(``EX_TEMPFAIL``) like a preempted trainer, without running ``finally``
blocks, ``atexit`` functions or thread joins, any of which could be the thing
that hangs. Nothing is lost: checkpoints, caches and bundles are written
atomically (temporary name, then rename), so a half-written one is never
mistaken for a whole one, and DataLoader workers end when their parent does.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

__all__ = ["PREEMPTED_EXIT_CODE", "exit_preempted", "on_preempted", "handler"]

#: Exit code of a preempted run: 75 is ``EX_TEMPFAIL`` of sysexits.h (retry later).
PREEMPTED_EXIT_CODE = 75

_hooks: list[Callable[[str], None]] = []


def on_preempted(hook: Callable[[str], None]) -> Callable[[], None]:
    """Call ``hook(reason)`` just before :func:`exit_preempted` ends the process.

    Returns a function that unregisters it. Hooks must be quick and must not
    wait for locks another thread may hold; an exception in one is printed
    and the others still run.
    """
    _hooks.append(hook)

    def remove() -> None:
        if hook in _hooks:
            _hooks.remove(hook)

    return remove


def exit_preempted(reason: str) -> NoReturn:
    """Say ``Preempted: reason`` on stderr, run the hooks, and end the process with 75."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a stream interrupted mid-write refuses; go on
            pass
    _say(f"Preempted: {reason}\n")
    for hook in list(_hooks):
        try:
            hook(reason)
        except BaseException as exc:  # noqa: BLE001 - the process ends either way
            _say(f"[mlaas] warning: while stopping: {type(exc).__name__}: {exc}\n")
    os._exit(PREEMPTED_EXIT_CODE)


def handler(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler for code outside the training loop (see the module docstring)."""
    exit_preempted(f"received {signal.Signals(signum).name} outside training; "
                   "nothing to checkpoint")


def _say(text: str) -> None:
    """Write to fd 2 directly: ``sys.stderr`` may be locked by the interrupted write."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass
