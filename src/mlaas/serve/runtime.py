"""Running ONNX Runtime sessions for the server: dynamic batching per model version.

Layer: serving, runtime only. No HTTP and no request decoding
(:mod:`mlaas.serve.protocol` does that). :class:`Batcher` merges concurrent
requests of raw arrays for one model into one ONNX Runtime call, off the
event loop; :class:`EventBatcher` does the same for JSON-like events, with
the preprocessing (whose fixed cost per call dominates small requests) run
once per batch too. :class:`Runtime` keeps one of each per (model, version)
of a registry. A raw-input request that fills a batch by itself and is the
only request in flight is scored right on the event loop's thread instead
(:meth:`Runtime.score`): there is nothing to batch it with, and the thread hop
cost ~0.05 ms of a ~0.7 ms 1024-event request.

Errors raised by ONNX Runtime are re-raised as :class:`InferenceError`
(a :class:`~mlaas.errors.ServeError`) at this boundary; a full queue is
:class:`Overloaded` (HTTP 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mlaas.errors import InferenceError, MlaasError, Overloaded, ProtocolError
from mlaas.serve.settings import (DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS, Batching,
                                  bundle_settings, combine)

__all__ = [
    "Batcher",
    "EventBatcher",
    "Runtime",
    "score_events",
    "score_event_batch",
    "Overloaded",
    "InferenceError",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_DELAY_MS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_INLINE_ROWS",
]

log = logging.getLogger("mlaas.serve")

DEFAULT_MAX_QUEUE = 1024
#: The largest request run on the event loop's thread when alone (~2 ms of the benchmark MLP).
DEFAULT_INLINE_ROWS = 4096
#: The longest call allowed on the event loop's thread, judged from the model's
#: measured seconds per row: a heavier model (a deep set over many objects, a
#: big network) is not scored on the loop however few its rows.
INLINE_BUDGET_S = 0.003

RunFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass
class _Waiting:
    payload: Any
    rows: int
    future: asyncio.Future[Any]
    since: float


class _BatchQueue:
    """Requests waiting for one model, merged into batches that run off the event loop.

    Subclasses say how a batch runs (:meth:`_run_batch`, called in the
    executor with the waiting payloads in order, returning one result or
    exception per payload) and how one request runs alone (:meth:`_run_alone`).
    The worker task waits for ``max_batch_size`` rows or ``max_delay_ms`` after
    the first waiting request, runs one batch, and loops while requests wait;
    a batch running in the executor lets the next one fill up meanwhile.

    Under load the wait is counted from the end of the previous batch when
    that is later: the callers just answered send their next requests within
    a millisecond or so, and letting them join the requests that queued
    during the batch makes one full batch instead of two half ones. Each
    call has a large fixed cost (preprocessing above all), so this is most of
    the throughput at a fixed number of connections. A request still waits
    at most one running batch plus ``max_delay_ms``.
    """

    def __init__(self, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_delay_ms: float = DEFAULT_MAX_DELAY_MS, executor: Executor,
                 max_queue: int = DEFAULT_MAX_QUEUE,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.executor = executor
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self._queue: deque[_Waiting] = deque()
        self._rows = 0
        self._worker: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._free_since = 0.0  # loop time the previous batch finished
        self._running = 0  # calls of this queue in the executor (or a worker) right now
        self.configure(Batching(max_batch_size, max_delay_ms))

    @property
    def waiting(self) -> int:
        """Requests waiting to be batched."""
        return len(self._queue)

    def configure(self, batching: Batching) -> None:
        """Batch with ``batching`` from the next batch on (a wait under way keeps its
        deadline; requests already waiting that now fill a batch run at once)."""
        if batching.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {batching.max_batch_size!r}")
        self.max_batch_size = int(batching.max_batch_size)
        self.max_delay = max(0.0, float(batching.max_delay_ms)) / 1000.0
        if self._rows >= self.max_batch_size:
            self._wake()

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running for this model."""
        return not self._queue and self._running == 0

    def _run_batch(self, payloads: list[Any]) -> list[Any]:
        raise NotImplementedError

    def _run_alone(self, payload: Any) -> Any:
        raise NotImplementedError

    async def _call_batch(self, payloads: list[Any]) -> list[Any]:
        """Run one batch off the loop (in ``executor``); one result or exception each."""
        loop = asyncio.get_running_loop()
        results: list[Any] = await loop.run_in_executor(self.executor, self._run_batch,
                                                        payloads)
        return results

    async def _call_alone(self, payload: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run_alone, payload)

    async def _alone(self, payload: Any, rows: int) -> Any:
        self._running += 1
        try:
            out = await self._call_alone(payload)
        finally:
            self._running -= 1
        if self.on_batch is not None:
            self.on_batch(rows)
        return out

    async def _enqueue(self, payload: Any, rows: int) -> Any:
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"{len(self._queue)} requests are already waiting for this model "
                             f"(limit {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        item = _Waiting(payload, rows, loop.create_future(), loop.time())
        self._queue.append(item)
        self._rows += rows
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        elif self._rows >= self.max_batch_size:
            self._wake()
        return await item.future

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            # 1. wait for a full batch or the deadline (see the class docstring)
            deadline = max(self._queue[0].since, self._free_since) + self.max_delay
            while self._rows < self.max_batch_size:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wakeup = loop.create_future()
                try:
                    await asyncio.wait({self._wakeup}, timeout=left)
                finally:
                    self._wakeup = None
            # 2. take requests in order while they fit (the first one always: it may be
            # larger than a max_batch_size lowered while it waited)
            batch: list[_Waiting] = []
            rows = 0
            while self._queue and (not batch or
                                   rows + self._queue[0].rows <= self.max_batch_size):
                item = self._queue.popleft()
                self._rows -= item.rows
                if item.future.done():  # the caller went away
                    continue
                batch.append(item)
                rows += item.rows
            if not batch:
                continue
            # 3. run once off the loop, hand each caller its result
            self._running += 1
            try:
                results = await self._call_batch([b.payload for b in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(exc)
                continue
            finally:
                self._running -= 1
                self._free_since = loop.time()
            if self.on_batch is not None:
                self.on_batch(rows)
            for b, result in zip(batch, results):
                if b.future.done():
                    continue
                if isinstance(result, BaseException):
                    b.future.set_exception(result)
                else:
                    b.future.set_result(result)


class Batcher(_BatchQueue):
    """Merge concurrent requests of raw model inputs into batches run off the event loop.

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
        super().__init__(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                         executor=executor, max_queue=max_queue, on_batch=on_batch)
        self.run = run
        self.row_seconds: float | None = None  # measured cost per row (moving average)

    async def submit(self, x: np.ndarray, mask: np.ndarray | None, *,
                     inline_rows: int = 0) -> np.ndarray:
        """Score ``x`` (and ``mask``) as part of a batch; returns this request's rows.

        Args:
            x: float32 ``[n, n_features]``.
            mask: float32 ``[n, n_mask]`` or None when the model takes no mask.
            inline_rows: when ``x`` fills a batch by itself (``max_batch_size`` rows or
                more, at most ``inline_rows``) and nothing waits or runs for this model,
                call ``run`` right here on the event loop's thread instead of in the
                executor: it would run alone anyway, and the thread hop (queue the
                call, wake a thread, wake the loop when it is done) was ~0.05 ms of a
                ~0.9 ms request of 1024 events. The caller says when that is safe (no
                other request of the server in flight: the loop is blocked meanwhile),
                and only a model measured to score those rows within
                :data:`INLINE_BUDGET_S` qualifies. 0: never.
        """
        n = len(x)
        if self.max_batch_size <= n <= inline_rows and self.idle and self._cheap(n):
            out: np.ndarray = self._timed_run(x, mask)
            if self.on_batch is not None:
                self.on_batch(n)
            return out
        if n == 0 or n > self.max_batch_size:
            out = await self._alone((x, mask), n)
            return out
        out = await self._enqueue((x, mask), n)
        return out

    def _cheap(self, rows: int) -> bool:
        """Whether ``rows`` rows are known to score within :data:`INLINE_BUDGET_S`.

        Unknown until the model has run once (in the executor): the first
        large request of a model never blocks the loop.
        """
        return self.row_seconds is not None and rows * self.row_seconds <= INLINE_BUDGET_S

    def _timed_run(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        start = time.perf_counter()
        out: np.ndarray = self.run(x, mask)
        per_row = (time.perf_counter() - start) / max(1, len(x))
        old = self.row_seconds
        self.row_seconds = per_row if old is None else 0.8 * old + 0.2 * per_row
        return out

    def _run_alone(self, payload: Any) -> np.ndarray:
        return self._timed_run(*payload)

    def _run_batch(self, payloads: list[Any]) -> list[Any]:
        xs = [p[0] for p in payloads]
        masks = [p[1] for p in payloads]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        mask: np.ndarray | None
        if any(m is None for m in masks):
            mask = None
        else:
            mask = masks[0] if len(masks) == 1 else np.concatenate(masks)
        out = self._timed_run(x, mask)
        results = []
        start = 0
        for part in xs:
            results.append(out[start:start + len(part)])
            start += len(part)
        return results


def _as_rows(events: Any, branch_types: Mapping[str, Any]) -> list[Any] | None:
    """``events`` as a list of rows that can join other requests' rows, or None when the
    request is better run alone (an unusual shape: its own errors then name its events)."""
    if isinstance(events, Mapping) and set(events) == {"events"} and "events" not in branch_types:
        events = events["events"]
    if isinstance(events, list):
        return events if all(isinstance(row, Mapping) for row in events) else None
    if isinstance(events, Mapping) and branch_types:
        names = list(branch_types)
        columns = [events.get(name) for name in names]
        if not all(isinstance(c, list) for c in columns):
            return None
        if len({len(c) for c in columns}) != 1:  # type: ignore[arg-type]
            return None
        return [dict(zip(names, values)) for values in zip(*columns)]  # type: ignore[call-overload]
    return None


def score_events(bundle: Any, run: RunFn, events: Any) -> np.ndarray:
    """Scores of JSON-like ``events`` with ``bundle``'s preprocessing and ``run``;
    NaN for events failing the cut (as :meth:`mlaas.bundle.Bundle.predict_events`)."""
    prep = bundle.preprocessor.prepare_events(events, bundle.branch_types)
    scores = np.full((prep.n, bundle.n_outputs), np.nan, dtype=np.float32)
    if len(prep.index):
        mask = prep.mask if "mask" in bundle.input_names else None
        scores[prep.index] = run(prep.x, mask)
    return scores


def score_event_batch(bundle: Any, run: RunFn, payloads: list[tuple[Any, list[Any] | None]]
                      ) -> list[Any]:
    """Score several requests' events with one preprocessing and one model call.

    ``payloads`` are ``(events, rows)``: the request as sent and its events as
    rows (:func:`_as_rows`). Returns one score array or exception per request;
    if the merged batch fails, each request is scored alone so its error names
    its own events.
    """
    if len(payloads) > 1:
        merged = [row for _, rows in payloads for row in (rows or ())]
        try:
            scores = score_events(bundle, run, merged)
        except MlaasError:
            pass  # some request is faulty: run each alone so errors name their own events
        else:
            results: list[Any] = []
            start = 0
            for _, rows in payloads:
                n = len(rows or ())
                results.append(scores[start:start + n])
                start += n
            return results
    results = []
    for events, _ in payloads:
        try:
            results.append(score_events(bundle, run, events))
        except Exception as exc:  # noqa: BLE001 - handed to that request's caller
            results.append(exc)
    return results


class EventBatcher(_BatchQueue):
    """Merge concurrent raw-event requests (JSON-like events) for one bundle.

    Preprocessing (events to arrays, derived names, cut, padding) has a large
    fixed cost per call, so it runs once per batch, with the ONNX Runtime call,
    off the event loop (:func:`score_event_batch`). If the merged batch fails
    on an event (a missing field, a non-numeric value, NaN under
    ``nan: error``), each request of the batch is run again alone, so every
    error names its own request's event index and only the faulty request fails.

    Args:
        bundle: the :class:`~mlaas.bundle.Bundle` (``preprocessor``,
            ``branch_types``, ``input_names``, ``n_outputs``, ``path``).
        run: ``run(x, mask) -> scores`` (ONNX Runtime errors already mapped).
        workers: a :class:`~mlaas.serve.workers.ProcessScorer` to run batches in a
            worker process (the bundle loaded there from ``bundle.path``) instead
            of a thread of this one; None for a thread.
        worker_threads: ONNX Runtime intra-op threads of the worker's copy (None:
            the bundle's default).
        other arguments: as :class:`Batcher`; ``max_batch_size`` counts events.
    """

    def __init__(self, bundle: Any, run: RunFn, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_delay_ms: float = DEFAULT_MAX_DELAY_MS, executor: Executor,
                 max_queue: int = DEFAULT_MAX_QUEUE,
                 on_batch: Callable[[int], None] | None = None, workers: Any = None,
                 worker_threads: int | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                         executor=executor, max_queue=max_queue, on_batch=on_batch)
        self.bundle = bundle
        self.run = run
        self.workers = workers if getattr(bundle, "path", None) is not None else None
        self._where: tuple[str, Any, int | None] | None = None
        if self.workers is not None:
            path = str(bundle.path)
            st = os.stat(path)
            self._where = (path, (st.st_ino, st.st_mtime_ns), worker_threads)

    async def submit(self, events: Any) -> np.ndarray:
        """Scores of ``events`` (see :meth:`mlaas.bundle.Bundle.predict_events`): float32
        ``[n, n_outputs]``, NaN for events failing the cut."""
        rows = _as_rows(events, self.bundle.branch_types)
        if rows is None or not rows or len(rows) > self.max_batch_size:
            out: np.ndarray = await self._alone(events, len(rows) if rows else 0)
            return out
        out = await self._enqueue((events, rows), len(rows))
        return out

    def _run_alone(self, payload: Any) -> np.ndarray:
        return score_events(self.bundle, self.run, payload)

    def _run_batch(self, payloads: list[Any]) -> list[Any]:
        return score_event_batch(self.bundle, self.run, payloads)

    async def _call_batch(self, payloads: list[Any]) -> list[Any]:
        if self.workers is None or self._where is None:
            return await super()._call_batch(payloads)
        results: list[Any] = await self.workers.score(*self._where, payloads)
        return results

    async def _call_alone(self, payload: Any) -> Any:
        if self.workers is None:
            return await super()._call_alone(payload)
        (result,) = await self._call_batch([(payload, None)])
        if isinstance(result, BaseException):
            raise result
        return result


# -- the runtime over a registry --------------------------------------------------------------


class _Registry(Protocol):
    def resolve(self, name: str, version: int | None = None, alias: str | None = None
                ) -> tuple[int, Any]: ...

    def bundle(self, name: str, version: int) -> Any: ...  # Bundle or (version, Bundle)


@dataclass
class _Held:
    """The batchers of one model version, the bundle they run, the bundle's own batching
    settings (``own``, parsed once when the version is held: they cannot change without
    a new bundle object) and the settings the batchers run with now (``batching``)."""

    bundle: Any
    batcher: Batcher
    events: EventBatcher
    own: dict[str, Any]
    batching: Batching

    def configure(self, batching: Batching) -> None:
        """Both batchers batch with ``batching`` from their next batch on; nothing is
        done when that is what they run with already (the common case: every request
        that cannot reuse a resolution applies the model's state again)."""
        if batching != self.batching:
            self.batching = batching
            self.batcher.configure(batching)
            self.events.configure(batching)


@dataclass(frozen=True)
class _ModelState:
    """What the registry said of a model: its ``versions`` (None: it cannot list them)
    and the operator's batching settings (``stored``); ``read`` numbers the readings in
    the order they started, so an older one that finishes late is not applied."""

    read: int
    versions: frozenset[int] | None
    stored: dict[str, Any]


def _spec(bundle: Any) -> dict[str, Any] | None:
    spec = getattr(bundle, "spec", None)
    return spec if isinstance(spec, dict) else None


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
    """Score requests against a registry's bundles with batchers per model version.

    Args:
        registry: has ``resolve(name, version=None, alias=None) -> (version, path)`` and
            ``bundle(name, version) -> Bundle`` (raising ``KeyError`` for unknowns);
            optionally ``state_token(name)`` (see :meth:`Registry.state_token
            <mlaas.serve.registry.Registry.state_token>`), which lets a request for
            an unchanged model skip the registry (and the thread hop) entirely;
            optionally ``versions(name)``, the versions it has now, so that the batchers
            (and ONNX sessions) of deleted versions are let go (see :meth:`refresh`),
            and ``serving(name)``, the model's batching settings. A registry with
            ``versions`` takes that list back as ``resolve(..., versions=...)`` and
            ``serving(name, versions=...)`` (as :class:`~mlaas.serve.registry.Registry`
            does), so a request it cannot cache lists the model's directory once.
        max_batch_size, max_delay_ms: defaults, overridden per model by the operator's
            settings (``serving(name)`` of the registry, when it has it) and per version
            by the bundle's own ``serving`` object (see :mod:`mlaas.serve.settings`).
        threads: executor threads for ONNX Runtime calls (each batch uses one).
        max_queue: requests allowed to wait per model version.
        metrics: an optional :class:`mlaas.serve.metrics.Metrics` (batch sizes).
        event_workers: worker processes that preprocess and score raw-event batches
            (:mod:`mlaas.serve.workers`); 0 (the default) does it in ``threads``.
            One worker lets the event loop and the preprocessing use two cores.
        inline_rows: the largest raw-input request scored on the event loop's thread
            when it is the only request in flight (see :meth:`score` and
            :meth:`Batcher.submit`); 0 never does.

    Whenever a model's state token changes (a version added or deleted, an alias
    or the batching settings changed), the next request for it asks the registry
    again and :meth:`refresh` is applied on the way; the routes that delete
    versions or change settings call :meth:`refresh` themselves.

    ``active`` counts the requests being answered (the v2 infer route holds
    :meth:`request` from its start, :meth:`predict_events` while it scores):
    a request scored on the loop's thread blocks every other one meanwhile, so
    that is only done when it is alone.
    """

    def __init__(self, registry: _Registry, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_delay_ms: float = DEFAULT_MAX_DELAY_MS, threads: int = 2,
                 max_queue: int = DEFAULT_MAX_QUEUE, metrics: Any = None,
                 event_workers: int = 0, inline_rows: int = DEFAULT_INLINE_ROWS) -> None:
        self.registry = registry
        self.inline_rows = int(inline_rows)
        self.active = 0
        self._last_client: Any = None
        self.max_batch_size = max_batch_size
        self.max_delay_ms = max_delay_ms
        self.max_queue = max_queue
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=max(1, threads),
                                           thread_name_prefix="mlaas-ort")
        self.workers: Any = None
        if event_workers > 0:
            from mlaas.serve.workers import ProcessScorer

            self.workers = ProcessScorer(event_workers)
        self._held: dict[tuple[str, int], _Held] = {}  # (name, version) -> its batchers
        self._reads = itertools.count()  # numbers _model_state's readings
        self._bad_settings: dict[str, str] = {}  # name -> the invalid settings last warned of
        # name -> the newest reading applied (names the registry has had, not every name
        # a client asked for)
        self._applied: dict[str, int] = {}
        # (name, version, alias) -> (registry state token, version, bundle, batchers)
        self._resolved: dict[tuple[str, int | None, str | None],
                             tuple[Any, int, Any, Batcher, EventBatcher]] = {}

    @property
    def defaults(self) -> Batching:
        """The server's batching settings, for models and bundles that set none."""
        return Batching(int(self.max_batch_size), float(self.max_delay_ms))

    def held(self) -> list[tuple[str, int]]:
        """The (model, version) pairs the runtime keeps batchers, and so a bundle and its
        ONNX Runtime session, for."""
        return sorted(self._held)

    def close(self) -> None:
        """Stop the executor (waits for running batches)."""
        self._held.clear()
        self._resolved.clear()
        self.executor.shutdown(wait=True)
        if self.workers is not None:
            self.workers.close()

    def lookup(self, name: str, version: int | None, alias: str | None, *,
               versions: list[int] | None = None) -> tuple[int, Any]:
        """``(version, bundle)`` from the registry (blocking: it may load the bundle).

        Accepts registries whose ``bundle`` returns the bundle or ``(version, bundle)``.
        ``versions``, the model's versions just listed by the registry's ``versions``,
        is handed to its ``resolve`` so the model directory is not listed again.
        """
        if versions is None:
            resolved, _ = self.registry.resolve(name, version, alias)
        else:
            resolved, _ = self.registry.resolve(name, version, alias,  # type: ignore[call-arg]
                                                versions=versions)
        got = self.registry.bundle(name, resolved)
        return resolved, (got[1] if isinstance(got, tuple) else got)

    def _token(self, name: str) -> Any:
        state_token = getattr(self.registry, "state_token", None)
        return state_token(name) if callable(state_token) else None

    def _model_state(self, name: str) -> _ModelState:
        """What the registry says of ``name`` now (blocking: it lists the model's directory,
        once: ``serving`` is told the versions so it does not list them again)."""
        read = next(self._reads)
        versions_of = getattr(self.registry, "versions", None)
        serving_of = getattr(self.registry, "serving", None)
        listed = sorted(versions_of(name)) if callable(versions_of) else None
        versions = frozenset(listed) if listed is not None else None
        stored: dict[str, Any] = {}
        if callable(serving_of) and versions != frozenset():
            stored = self._stored(serving_of, name, listed)
        return _ModelState(read, versions, stored)

    def _stored(self, serving_of: Callable[..., dict[str, Any]], name: str,
                listed: list[int] | None) -> dict[str, Any]:
        """The operator's settings of ``name``, or ``{}`` when the model was deleted
        meanwhile or its settings file is invalid (edited by hand). Then the model is
        batched with its bundle's or the server's settings and a warning naming the
        file and field is logged, once per problem: a slip in a tuning file should
        not stop a model from being served (``GET /api/models/{name}/serving``
        answers the error, so the operator sees what to fix)."""
        try:
            stored = serving_of(name, versions=listed) if listed else serving_of(name)
        except KeyError:
            return {}
        except MlaasError as exc:
            problem = str(exc)
            if self._bad_settings.get(name) != problem:
                self._bad_settings[name] = problem
                log.warning("model %r is batched with its bundle's or the server's settings, "
                            "not its own: %s", name, problem)
            return {}
        self._bad_settings.pop(name, None)
        return stored

    def _look(self, name: str, version: int | None, alias: str | None
              ) -> tuple[_ModelState, tuple[int, Any] | Exception]:
        """The model's state and ``lookup``'s answer or error, in one trip to a thread
        and one listing of the model's directory."""
        state = self._model_state(name)
        try:
            listed = sorted(state.versions) if state.versions else None
            return state, self.lookup(name, version, alias, versions=listed)
        except Exception as exc:  # noqa: BLE001 - raised again on the loop, by the caller
            return state, exc

    def _apply(self, name: str, state: _ModelState, token: Any) -> bool:
        """Bring what the runtime holds for ``name`` in line with ``state``: let go of the
        batchers of versions the registry no longer has (nothing else refers to their
        bundles and ONNX sessions then: a deleted version's were kept forever before),
        give the others the model's current batching settings, and forget resolutions
        made under another state ``token``.

        Returns False, changing nothing, when a newer reading was applied already
        (a request's reading can finish after a delete's refresh started later)."""
        if state.read < self._applied.get(name, -1):
            return False
        versions, stored = state.versions, state.stored
        if versions != frozenset() or name in self._applied:
            self._applied[name] = state.read  # not for names that never existed
        for key in [k for k, hit in self._resolved.items()
                    if k[0] == name and (token is None or hit[0] != token)]:
            del self._resolved[key]
        defaults = self.defaults
        for key in [k for k in self._held if k[0] == name]:
            held = self._held[key]
            if versions is not None and key[1] not in versions:
                del self._held[key]
                continue
            held.configure(combine(stored, held.own, defaults))
        return True

    async def refresh(self, name: str) -> None:
        """Ask the registry for ``name``'s versions and batching settings now and apply
        them (see :meth:`_apply`): the routes that delete versions or change settings
        call it, so a deleted version's session is let go at once and new settings
        apply to the next batch. A request does the same whenever the model's state
        token changed (other processes' changes included)."""
        token = self._token(name)
        state = await asyncio.to_thread(self._model_state, name)
        self._apply(name, state, token)

    async def _batchers_for(self, name: str, version: int | None, alias: str | None
                            ) -> tuple[int, Any, Batcher, EventBatcher]:
        key = (name, version, alias)
        token = self._token(name)
        if token is not None:
            hit = self._resolved.get(key)
            if hit is not None and hit[0] == token:
                return hit[1], hit[2], hit[3], hit[4]
        state, found = await asyncio.to_thread(self._look, name, version, alias)
        fresh = self._apply(name, state, token)
        if isinstance(found, Exception):
            raise found
        resolved, bundle = found
        held = self._held.get((name, resolved))
        if held is None or held.bundle is not bundle:
            held = self._hold(name, resolved, bundle, state.stored)
            if fresh:  # else the version may be gone since: this request's batchers only
                self._held[(name, resolved)] = held
        if token is not None and fresh:
            self._resolved[key] = (token, resolved, bundle, held.batcher, held.events)
        return resolved, bundle, held.batcher, held.events

    def _hold(self, name: str, version: int, bundle: Any, stored: dict[str, Any]) -> _Held:
        """New batchers for a model version, with its batching settings; the bundle's own
        are parsed here, once (a bad ``serving`` in a bundle planted by hand raises
        :class:`~mlaas.errors.BundleError` naming the field, as before)."""
        own = bundle_settings(_spec(bundle))
        batching = combine(stored, own, self.defaults)
        on_batch = None
        if self.metrics is not None:
            metrics = self.metrics

            def on_batch(n: int) -> None:
                metrics.observe_batch(name, version, n)

        options: dict[str, Any] = dict(
            max_batch_size=batching.max_batch_size, max_delay_ms=batching.max_delay_ms,
            executor=self.executor, max_queue=self.max_queue, on_batch=on_batch)
        run = _runner(bundle)
        return _Held(bundle, Batcher(run, **options),
                     EventBatcher(bundle, run, workers=self.workers,
                                  worker_threads=getattr(self.registry, "threads", None),
                                  **options), own, batching)

    async def batcher(self, name: str, version: int | None = None, alias: str | None = None
                      ) -> tuple[int, Any, Batcher]:
        """``(version, bundle, batcher)`` for a model; a new batcher when the registry's
        bundle object changed. The registry is asked in a worker thread (a bundle
        not yet in its cache is loaded from disk), unless its state token shows the
        model unchanged since the last request for the same (name, version, alias)."""
        resolved, bundle, batcher, _ = await self._batchers_for(name, version, alias)
        return resolved, bundle, batcher

    async def infer(self, name: str, version: int | None, alias: str | None,
                    inputs: Mapping[str, np.ndarray]) -> tuple[int, np.ndarray]:
        """Scores of raw model inputs (``x``, and ``mask`` when the model takes it).

        Returns ``(version, scores)``, scores float32 ``[n, n_outputs]``. Raises
        ``KeyError`` (from the registry) for an unknown model or version and
        :class:`ProtocolError` for inputs that do not fit the model.
        """
        with self.request():
            resolved, bundle, batcher = await self.batcher(name, version, alias)
            return resolved, await self.score(bundle, batcher, inputs, inline=True)

    @contextlib.contextmanager
    def request(self, client: Any = None) -> Iterator[bool]:
        """Count a request in :attr:`active` while the block runs.

        Yields whether the request the runtime saw start before this one came
        from the same ``client`` (the ASGI scope's ``"client"``, host and port:
        one connection; None when unknown, never the same), for :meth:`alone`.
        """
        again = client is not None and client == self._last_client
        self._last_client = client
        self.active += 1
        try:
            yield again
        finally:
            self.active -= 1

    async def alone(self, again: bool = False) -> bool:
        """Whether the calling request (counted in :attr:`active`) is the only one.

        When ``again`` (from :meth:`request`: the previous request came over the
        same connection, so one client sends one request after another), that is
        the answer. Otherwise it is asked after two turns of the event loop: a
        request whose bytes arrived while the loop was busy is read and started
        in those turns, so it is counted before this one decides to block the
        loop. Without them, with 2 or 4 connections each request saw itself alone
        (the others waited in the socket buffers while the previous one scored on
        the loop) and the server no longer overlapped receiving with scoring:
        4 connections, 1.43M events/s against 2.03M with them; 2 connections,
        1.51M with none, 1.54M with one turn, 1.92M with two. With several
        connections consecutive requests come over different ones, so they take
        the turns; a single stream skips them (~8 us of its ~0.7 ms requests).
        """
        if self.active != 1:
            return False
        if again:
            return True
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return self.active == 1

    async def score(self, bundle: Any, batcher: Batcher, inputs: Mapping[str, np.ndarray], *,
                    inline: bool = False, again: bool = False) -> np.ndarray:
        """Check raw inputs against ``bundle`` and score them through ``batcher``
        (both from :meth:`batcher`).

        With ``inline``, a request of ``max_batch_size`` to :attr:`inline_rows` rows
        that is :meth:`alone` while nothing waits or runs for its model is scored on
        the event loop's thread (see :meth:`Batcher.submit`); the caller must count
        itself in :attr:`active` (:meth:`request`, whose value is ``again``).
        """
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
        inline_rows = 0
        if (inline and batcher.max_batch_size <= len(x) <= self.inline_rows and batcher.idle
                and await self.alone(again)):
            inline_rows = self.inline_rows
        return await batcher.submit(x, mask, inline_rows=inline_rows)

    async def predict_events(self, name: str, version: int | None, alias: str | None,
                             events: Any, *, on_resolved: Callable[[int], None] | None = None,
                             prepare: Callable[[Any, Any], Any] | None = None
                             ) -> tuple[int, np.ndarray]:
        """Scores of JSON-like events (see :meth:`mlaas.bundle.Bundle.predict_events`).

        Args:
            name, version, alias: the model, as :meth:`batcher` finds it.
            events: the events as the client sent them.
            on_resolved: called with the version once it is known, before anything is
                scored: the HTTP routes label their metrics with it there, so that an
                error in the events still counts against a known model version.
            prepare: ``prepare(bundle, events)`` gives the events to score, for a
                request that needs the model to read them (TFaaS ``keys``/``values``
                become rows by the branch kinds); called after ``on_resolved``, and
                its errors are the request's.

        Concurrent event requests for one model version are merged by an
        :class:`EventBatcher`: preprocessing and the model call run once per
        batch in a worker thread. Events failing the cut get NaN scores.
        Returns ``(version, scores)``.
        """
        with self.request():
            resolved, events_batcher = await self.event_batcher(name, version, alias)
            if on_resolved is not None:
                on_resolved(resolved)
            if prepare is not None:
                events = prepare(events_batcher.bundle, events)
            return resolved, await events_batcher.submit(events)

    async def event_batcher(self, name: str, version: int | None = None,
                            alias: str | None = None) -> tuple[int, EventBatcher]:
        """``(version, event batcher)`` of a model, found as :meth:`batcher` finds its
        batcher. A route that must know the version before the events are scored
        (to label its metrics, also when scoring fails) gives :meth:`predict_events`
        its ``on_resolved``."""
        resolved, _, _, events_batcher = await self._batchers_for(name, version, alias)
        return resolved, events_batcher
