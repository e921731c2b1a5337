"""The inference server: registry routes, KServe v2 with dynamic batching, /metrics.

Layer: serve, wiring only. ``create_app`` (``serve/app.py``) serves the
registry, raw events and the TFaaS routes; this module adds the v2 router
over a batching :class:`~mlaas.serve.runtime.Runtime` and the Prometheus
endpoint, and is what ``mlaas serve`` runs (and what the platform will mount).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Response

from mlaas.serve.app import MAX_BODY_BYTES, create_app
from mlaas.serve.metrics import Metrics
from mlaas.serve.registry import Registry
from mlaas.serve.routes_v2 import v2_router
from mlaas.serve.runtime import Runtime

__all__ = ["create_server"]


def create_server(models_dir: str | Path, *, max_batch_size: int = 256,
                  max_delay_ms: float = 2.0, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The whole serving app over the registry at ``models_dir``.

    Args:
        models_dir: the registry root (created if missing).
        max_batch_size, max_delay_ms: default dynamic batching of v2 requests;
            a bundle's ``serving`` entry in spec.json overrides them.
        max_body_bytes: the largest request body (413 above).
    """
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    registry = Registry(root)
    metrics = Metrics()
    runtime = Runtime(registry, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                      metrics=metrics)
    app = create_app(root, registry=registry, max_body_bytes=max_body_bytes,
                     extra_routers=[v2_router(runtime, registry, metrics)])
    app.state.runtime = runtime
    app.state.metrics = metrics

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
