"""Running ONNX Runtime sessions for the server: dynamic batching per model version.

Layer: serving, runtime only. No HTTP and no request decoding
(:mod:`mlaas.serve.protocol` does that). :class:`Batcher` merges concurrent
requests for one model into one ONNX Runtime call, off the event loop;
:class:`Runtime` keeps one batcher per (model, version) of a registry and
turns raw arrays or JSON-like events into scores.

Errors raised by ONNX Runtime are re-raised as :class:`InferenceError`
(a :class:`~mlaas.errors.ServeError`) at this boundary; a full queue is
:class:`Overloaded` (HTTP 503).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mlaas.bundle import events_to_arrays
from mlaas.errors import InferenceError, MlaasError, Overloaded, ProtocolError

__all__ = [
    "Batcher",
    "Runtime",
    "Overloaded",
    "InferenceError",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_DELAY_MS",
    "DEFAULT_MAX_QUEUE",
]

DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_DELAY_MS = 2.0
DEFAULT_MAX_QUEUE = 1024

RunFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass
class _Waiting:
    x: np.ndarray
    mask: np.ndarray | None
    future: asyncio.Future[np.ndarray]
    since: float


class Batcher:
    """Merge concurrent requests for one model into batches run off the event loop.

    Args:
        run: ``run(x, mask) -> scores`` on whole batches (rows along axis 0).
        max_batch_size: most events (rows) in one call; a larger request runs alone.
        max_delay_ms: longest wait after the first waiting request for others to join.
        executor: where ``run`` is called (one call per batch).
        max_queue: most requests allowed to wait; more raise :class:`Overloaded`.
        on_batch: called with the number of events of each batch (metrics).
    """

    def __init__(self, run: RunFn, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_delay_ms: float = DEFAULT_MAX_DELAY_MS, executor: Executor,
                 max_queue: int = DEFAULT_MAX_QUEUE,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {max_batch_size!r}")
        self.run = run
        self.max_batch_size = int(max_batch_size)
        self.max_delay = max(0.0, float(max_delay_ms)) / 1000.0
        self.executor = executor
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self._queue: deque[_Waiting] = deque()
        self._rows = 0
        self._worker: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting to be batched."""
        return len(self._queue)

    async def submit(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """Score ``x`` (and ``mask``) as part of a batch; returns this request's rows.

        Args:
            x: float32 ``[n, n_features]``.
            mask: float32 ``[n, n_mask]`` or None when the model takes no mask.
        """
        n = len(x)
        if n == 0:
            return await self._call(x, mask)
        if n > self.max_batch_size:
            return await self._call(x, mask)
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"{len(self._queue)} requests are already waiting for this model "
                             f"(limit {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        item = _Waiting(x, mask, loop.create_future(), loop.time())
        self._queue.append(item)
        self._rows += n
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        elif self._rows >= self.max_batch_size:
            self._wake()
        return await item.future

    async def _call(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.executor, self.run, x, mask)
        if self.on_batch is not None:
            self.on_batch(len(x))
        return out

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            # 1. wait for a full batch or the first waiting request's deadline
            deadline = self._queue[0].since + self.max_delay
            while self._rows < self.max_batch_size:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wakeup = loop.create_future()
                try:
                    await asyncio.wait({self._wakeup}, timeout=left)
                finally:
                    self._wakeup = None
            # 2. take requests in order while they fit
            batch: list[_Waiting] = []
            rows = 0
            while self._queue and rows + len(self._queue[0].x) <= self.max_batch_size:
                item = self._queue.popleft()
                self._rows -= len(item.x)
                if item.future.done():  # the caller went away
                    continue
                batch.append(item)
                rows += len(item.x)
            if not batch:
                continue
            # 3. run once off the loop, split the result back
            x = batch[0].x if len(batch) == 1 else np.concatenate([b.x for b in batch])
            masks = [b.mask for b in batch]
            mask: np.ndarray | None
            if any(m is None for m in masks):
                mask = None
            else:
                mask = masks[0] if len(masks) == 1 else np.concatenate(masks)  # type: ignore[arg-type]
            try:
                out = await loop.run_in_executor(self.executor, self.run, x, mask)
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(rows)
            start = 0
            for b in batch:
                stop = start + len(b.x)
                if not b.future.done():
                    b.future.set_result(out[start:stop])
                start = stop


# -- the runtime over a registry --------------------------------------------------------------


class _Registry(Protocol):
    def resolve(self, name: str, version: int | None = None, alias: str | None = None
                ) -> tuple[int, Any]: ...

    def bundle(self, name: str, version: int) -> Any: ...  # Bundle or (version, Bundle)


def _runner(bundle: Any) -> RunFn:
    """``bundle.run`` with foreign (ONNX Runtime) errors mapped to :class:`InferenceError`."""

    def run(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if mask is None:
            mask = np.zeros((len(x), 0), dtype=np.float32)
        try:
            out: np.ndarray = bundle.run(x, mask)
        except MlaasError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise InferenceError(f"ONNX Runtime failed on a batch of {len(x)} events: "
                                 f"{type(exc).__name__}: {exc}",
                                 file_path=str(getattr(bundle, "path", "")) or None) from exc
        return out

    return run


def _check(bundle: Any, x: np.ndarray, mask: np.ndarray | None) -> None:
    widths = {"x": len(bundle.spec["feature_names"]), "mask": len(bundle.spec["mask_names"])}
    for name, arr in (("x", x), ("mask", mask)):
        if name not in bundle.input_names:
            continue
        if arr is None:
            raise ProtocolError(f"missing input {name!r}", tensor=name)
        if arr.ndim != 2 or arr.shape[1] != widths[name]:
            raise ProtocolError(f"input {name!r}: shape {list(arr.shape)} does not match the "
                                f"model's [-1, {widths[name]}]", tensor=name)
    if mask is not None and "mask" in bundle.input_names and len(mask) != len(x):
        raise ProtocolError(f"input 'mask' has {len(mask)} rows but 'x' has {len(x)}",
                            tensor="mask")


class Runtime:
    """Score requests against a registry's bundles with one :class:`Batcher` per version.

    Args:
        registry: has ``resolve(name, version=None, alias=None) -> (version, path)`` and
            ``bundle(name, version) -> Bundle`` (raising ``KeyError`` for unknowns).
        max_batch_size, max_delay_ms: defaults, overridden per bundle by spec.json's
            ``serving`` object (``max_batch_size``, ``max_delay_ms``).
        threads: executor threads for ONNX Runtime calls (each batch uses one).
        max_queue: requests allowed to wait per model version.
        metrics: an optional :class:`mlaas.serve.metrics.Metrics` (batch sizes).
    """

    def __init__(self, registry: _Registry, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_delay_ms: float = DEFAULT_MAX_DELAY_MS, threads: int = 2,
                 max_queue: int = DEFAULT_MAX_QUEUE, metrics: Any = None) -> None:
        self.registry = registry
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.max_queue = max_queue
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=max(1, threads),
                                           thread_name_prefix="mlaas-ort")
        self._batchers: dict[tuple[str, int], tuple[Any, Batcher]] = {}

    def close(self) -> None:
        """Stop the executor (waits for running batches)."""
        self._batchers.clear()
        self.executor.shutdown(wait=True)

    def lookup(self, name: str, version: int | None, alias: str | None) -> tuple[int, Any]:
        """``(version, bundle)`` from the registry (blocking: it may load the bundle).

        Accepts registries whose ``bundle`` returns the bundle or ``(version, bundle)``.
        """
        resolved, _ = self.registry.resolve(name, version, alias)
        got = self.registry.bundle(name, resolved)
        return resolved, (got[1] if isinstance(got, tuple) else got)

    async def batcher(self, name: str, version: int | None = None, alias: str | None = None
                      ) -> tuple[int, Any, Batcher]:
        """``(version, bundle, batcher)`` for a model; a new batcher when the registry's
        bundle object changed. The registry is asked in a worker thread, since a
        bundle not yet in its cache is loaded from disk."""
        resolved, bundle = await asyncio.to_thread(self.lookup, name, version, alias)
        key = (name, resolved)
        cached = self._batchers.get(key)
        if cached is not None and cached[0] is bundle:
            return resolved, bundle, cached[1]
        serving = (bundle.spec.get("serving") or {}) if isinstance(bundle.spec, dict) else {}
        on_batch = None
        if self.metrics is not None:
            metrics = self.metrics

            def on_batch(n: int) -> None:
                metrics.observe_batch(name, resolved, n)

        batcher = Batcher(_runner(bundle),
                          max_batch_size=int(serving.get("max_batch_size", self.max_batch_size)),
                          max_delay_ms=float(serving.get("max_delay_ms", self.max_delay_ms)),
                          executor=self.executor, max_queue=self.max_queue, on_batch=on_batch)
        self._batchers[key] = (bundle, batcher)
        return resolved, bundle, batcher

    async def infer(self, name: str, version: int | None, alias: str | None,
                    inputs: Mapping[str, np.ndarray]) -> tuple[int, np.ndarray]:
        """Scores of raw model inputs (``x``, and ``mask`` when the model takes it).

        Returns ``(version, scores)``, scores float32 ``[n, n_outputs]``. Raises
        ``KeyError`` (from the registry) for an unknown model or version and
        :class:`ProtocolError` for inputs that do not fit the model.
        """
        resolved, bundle, batcher = await self.batcher(name, version, alias)
        return resolved, await self.score(bundle, batcher, inputs)

    @staticmethod
    async def score(bundle: Any, batcher: Batcher, inputs: Mapping[str, np.ndarray]
                    ) -> np.ndarray:
        """Check raw inputs against ``bundle`` and score them through ``batcher``
        (both from :meth:`batcher`)."""
        x = inputs.get("x")
        if x is None:
            raise ProtocolError("missing input 'x'", tensor="x")
        x = np.ascontiguousarray(x, dtype=np.float32)
        mask = inputs.get("mask")
        if mask is not None:
            mask = np.ascontiguousarray(mask, dtype=np.float32)
        _check(bundle, x, mask)
        if "mask" not in bundle.input_names:
            mask = None
        return await batcher.submit(x, mask)

    async def predict_events(self, name: str, version: int | None, alias: str | None,
                             events: Any) -> tuple[int, np.ndarray]:
        """Scores of JSON-like events (see :meth:`mlaas.bundle.Bundle.predict_events`).

        Preprocessing runs in a worker thread; the model call goes through the
        batcher, so concurrent event requests are batched too. Events failing
        the cut get NaN scores. Returns ``(version, scores)``.
        """
        resolved, bundle, batcher = await self.batcher(name, version, alias)

        def prepare() -> Any:
            return bundle.preprocessor(events_to_arrays(events, bundle.branch_types))

        prep = await asyncio.to_thread(prepare)
        scores = np.full((prep.n, bundle.n_outputs), np.nan, dtype=np.float32)
        if len(prep.index):
            mask = prep.mask if "mask" in bundle.input_names else None
            scores[prep.index] = await batcher.submit(prep.x, mask)
        return resolved, scores
