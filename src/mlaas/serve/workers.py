"""Raw-event scoring in a worker process, so preprocessing does not share the server's GIL.

Layer: serving, runtime only. Preprocessing JSON-like events (awkward
arrays, expressions) is Python-heavy; in a thread of the server it takes
the GIL from the event loop that parses and answers HTTP, so the two never
run at once. :class:`ProcessScorer` runs
:func:`mlaas.serve.runtime.score_event_batch` in spawned worker processes
instead; each loads a bundle from its directory once (reloading when the
directory's inode or mtime changes) and keeps it.

Exceptions come back as (module, class, message, context) and are rebuilt
in the server as the same :mod:`mlaas.errors` class with the same context
(``event``, ``field``), so the HTTP answers do not change; anything else
becomes :class:`~mlaas.errors.InferenceError`. A worker that dies is
replaced on the next batch, and the batch it was running fails with
:class:`~mlaas.errors.InferenceError`.

Workers are started with ``spawn`` (forking a process that runs ONNX
Runtime and event-loop threads is unsafe), so, as for any ``spawn`` pool,
the program's main module must not start a server when merely imported
(``if __name__ == "__main__":``); ``mlaas serve`` and uvicorn's CLI are fine.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mlaas.errors import InferenceError, MlaasError

__all__ = ["ProcessScorer", "score_in_worker"]

_BUNDLES: dict[str, tuple[Any, Any]] = {}  # in a worker: bundle dir -> (ident, Bundle)


def _bundle(path: str, ident: Any, threads: int | None) -> Any:
    hit = _BUNDLES.get(path)
    if hit is not None and hit[0] == ident:
        return hit[1]
    from mlaas.bundle import Bundle

    loaded = Bundle.load(path, threads=threads)
    _BUNDLES[path] = (ident, loaded)
    return loaded


def _portable(exc: BaseException) -> tuple[str | None, str | None, str, dict[str, Any]]:
    if isinstance(exc, MlaasError):
        return type(exc).__module__, type(exc).__qualname__, exc.message, dict(exc.context)
    return None, None, f"{type(exc).__name__}: {exc}", {}


def _rebuild(desc: tuple[str | None, str | None, str, dict[str, Any]]) -> Exception:
    module, name, message, context = desc
    if module is not None and name is not None:
        try:
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, MlaasError):
                return cls(message, **context)
        except Exception:  # noqa: BLE001 - fall through to a plain InferenceError
            pass
    return InferenceError(f"scoring failed in a worker process: {message}", **context)


def score_in_worker(path: str, ident: Any, threads: int | None, payloads: list[Any]
                    ) -> list[tuple[bool, Any]]:
    """In a worker: score one batch with the bundle at ``path`` (``threads``: ONNX Runtime
    intra-op threads); ``(True, scores)`` or ``(False, portable error)`` per request."""
    from mlaas.serve.runtime import _runner, score_event_batch

    try:
        bundle = _bundle(path, ident, threads)
    except Exception as exc:  # noqa: BLE001 - every request of the batch gets it
        return [(False, _portable(exc))] * len(payloads)
    results = score_event_batch(bundle, _runner(bundle), payloads)
    return [(False, _portable(r)) if isinstance(r, BaseException) else (True, r)
            for r in results]


class ProcessScorer:
    """A pool of spawned worker processes scoring raw-event batches.

    Args:
        processes: how many workers (each holds its own copy of the bundles it
            served, and ONNX Runtime's threads).
    """

    def __init__(self, processes: int = 1) -> None:
        self.processes = max(1, int(processes))
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.processes,
                                             mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def score(self, path: str, ident: Any, threads: int | None, payloads: list[Any]
                    ) -> list[Any]:
        """One batch (see :func:`mlaas.serve.runtime.score_event_batch`) with the bundle at
        ``path`` (directory ``ident``: inode and mtime): scores or exceptions, one per
        request."""
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            results = await loop.run_in_executor(pool, score_in_worker, path, ident, threads,
                                                 payloads)
        except BrokenProcessPool as exc:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise InferenceError(f"the scoring worker process died on a batch of "
                                 f"{len(payloads)} requests ({exc}); it is restarted for the "
                                 "next one", file_path=path) from None
        return [value if ok else _rebuild(value) for ok, value in results]

    def close(self) -> None:
        """Stop the workers."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
