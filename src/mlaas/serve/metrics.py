"""Prometheus metrics of the model server, in a registry of their own (one per app).

Layer: serving. Counters ``mlaas_requests_total{route,model,version,status}`` and
``mlaas_errors_total{route,model,version,status}``; histograms
``mlaas_request_seconds{route,model,version}`` and ``mlaas_batch_size{model,version}``
(observed by :class:`mlaas.serve.runtime.Batcher`). ``route`` is the route
template (``/v2/models/{name}/infer``), so label values stay bounded.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest

__all__ = ["Metrics", "BATCH_BUCKETS", "LATENCY_BUCKETS"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class Metrics:
    """The server's metrics; ``registry`` is a private :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mlaas_requests", "Requests answered.",
                                ["route", "model", "version", "status"], registry=self.registry)
        self.errors = Counter("mlaas_errors", "Requests answered with a status >= 400.",
                              ["route", "model", "version", "status"], registry=self.registry)
        self.request_seconds = Histogram("mlaas_request_seconds", "Time to answer a request.",
                                         ["route", "model", "version"], registry=self.registry,
                                         buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("mlaas_batch_size", "Events per ONNX Runtime call.",
                                    ["model", "version"], registry=self.registry,
                                    buckets=BATCH_BUCKETS)
        # Label children by label values: ``labels()`` validates and locks on every call
        # (~2.5 us each, three per request); the children it returns never change.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_request(self, route: str, model: str, version: int | str | None, status: int,
                        seconds: float) -> None:
        """Count one answered request and its duration.

        Args:
            route: the route template; model, version: as resolved ("" when unknown).
            status: the HTTP status; seconds: the time taken.
        """
        v = "" if version is None else str(version)
        self._child(self.requests, route, model, v, str(status)).inc()
        if status >= 400:
            self._child(self.errors, route, model, v, str(status)).inc()
        self._child(self.request_seconds, route, model, v).observe(seconds)

    def observe_batch(self, model: str, version: int | str, events: int) -> None:
        """Record one ONNX Runtime call of ``events`` events."""
        self._child(self.batch_size, model, str(version)).observe(events)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
