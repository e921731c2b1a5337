"""The inference server: registry routes, KServe v2 with dynamic batching, /metrics.

Layer: serve, wiring only. ``create_app`` (``serve/app.py``) serves the
registry, raw events and the TFaaS routes; this module adds the v2 router
over a batching :class:`~mlaas.serve.runtime.Runtime` and the Prometheus
endpoint, and is what ``mlaas serve`` runs (and what the platform will mount).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Response
from starlette.middleware import Middleware

from mlaas.serve.access import ModelAccess
from mlaas.serve.app import MAX_BODY_BYTES, PREDICT_PATH, create_app
from mlaas.serve.metrics import Metrics
from mlaas.serve.registry import Registry
from mlaas.serve.direct import DirectRoutes
from mlaas.serve.routes_v2 import INFER_PATHS, v2_router
from mlaas.serve.runtime import DEFAULT_INLINE_ROWS, Runtime

__all__ = ["create_server"]


def create_server(models_dir: str | Path | None, *, max_batch_size: int = 256,
                  max_delay_ms: float = 2.0, max_body_bytes: int = MAX_BODY_BYTES,
                  access: ModelAccess | None = None,
                  registry: Registry | None = None, event_workers: int = 0,
                  ort_threads: int | None = 1, freeze_gc: bool = True,
                  inline_rows: int = DEFAULT_INLINE_ROWS) -> FastAPI:
    """The whole serving app over the registry at ``models_dir``.

    Args:
        models_dir: the registry root (created if missing); may be None when
            ``registry`` is given.
        max_batch_size, max_delay_ms: default dynamic batching of v2 and predict
            requests; a bundle's ``serving`` entry in spec.json overrides them for its
            version, and the operator's ``PUT /api/models/{name}/serving`` for the
            whole model (see :mod:`mlaas.serve.settings`).
        max_body_bytes: the largest request body (413 above).
        access: who may use which model; called on every model route (see
            :mod:`mlaas.serve.access`). Default: everything allowed.
        registry: an existing :class:`Registry` to share (the platform's), used
            instead of opening ``models_dir``.
        event_workers: worker processes for raw-event preprocessing (see
            :class:`~mlaas.serve.runtime.Runtime`); 0 keeps it in threads.
        ort_threads: ONNX Runtime intra-op threads per loaded bundle when the
            registry is opened here (see :class:`Registry`); None for the bundle's
            default (min(2, CPUs)). Default 1: the server already runs batches on
            two executor threads, and ORT's intra-op pool spin-waits after every
            call, which on small batches burned ~0.4 ms of CPU per single-event
            request (40% of the server's CPU) and was no faster on 1024 events
            (BENCHMARKS.md, "Serving").
        freeze_gc: ``gc.freeze()`` at startup (see :func:`~mlaas.serve.app.create_app`);
            pass False when the app shares its process with other work.
        inline_rows: the largest v2 request (rows, at least ``max_batch_size``) scored
            on the event loop's thread when it is the only request in flight, saving
            the thread hop (see :meth:`Runtime.score <mlaas.serve.runtime.Runtime.score>`);
            a request arriving meanwhile waits for it, so keep it to a few ms of the
            model's time. 0: always the executor.
    """
    if registry is None:
        if models_dir is None:
            raise TypeError("create_server needs models_dir or registry")
        root = Path(models_dir)
        root.mkdir(parents=True, exist_ok=True)
        registry = Registry(root, threads=ort_threads)
    metrics = Metrics()
    runtime = Runtime(registry, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                      metrics=metrics, event_workers=event_workers, inline_rows=inline_rows)
    app = create_app(registry.root, registry=registry, max_body_bytes=max_body_bytes,
                     access=access, extra_routers=[v2_router(runtime, registry, metrics)],
                     freeze_gc=freeze_gc, metrics=metrics)
    app.state.runtime = runtime
    app.state.metrics = metrics
    # The v2 infer and raw-event predict routes are handed to directly by the innermost
    # middleware (see mlaas.serve.direct): a 1024-event request's fixed cost and a single
    # event's whole cost are mostly HTTP machinery (BENCHMARKS.md, "Serving", (a), (c)).
    # Only in this app: an app that copies the routes (the platform) serves them through
    # its router.
    hot = INFER_PATHS | {PREDICT_PATH}
    direct = [route for route in app.router.routes if getattr(route, "path", None) in hot]
    app.user_middleware.append(Middleware(DirectRoutes, routes=direct, router=app.router))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
