"""Prometheus metrics of the model server, in a registry of their own (one per app).

Layer: serving. Counters ``mlaas_requests_total{route,model,version,status}`` and
``mlaas_errors_total{route,model,version,status}``; histograms
``mlaas_request_seconds{route,model,version}`` and ``mlaas_batch_size{model,version}``
(observed by :class:`mlaas.serve.runtime.Batcher`). ``route`` is the route
template (``/v2/models/{name}/infer``, ``/api/models/{name}/predict``, ``/json``),
so label values stay bounded. The ``/v2`` routes observe their own requests;
every other model route of the server is observed by
:mod:`mlaas.serve.route_metrics`.

Every request of every model route is observed, so observing is kept to plain
dict and list updates (~1 us) and the Prometheus families are built only when
``/metrics`` is read. ``prometheus_client``'s own Counter and Histogram take a
lock per update: ~7 us per request for the three of them, a few percent of a
single-event prediction. Observations come from the event loop's thread
(routes and batchers run there); :meth:`Metrics.render` may run in any thread,
since it reads copies.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = ["Metrics", "BATCH_BUCKETS", "LATENCY_BUCKETS"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)

_REQUEST_LABELS = ["route", "model", "version", "status"]
_LATENCY_LABELS = ["route", "model", "version"]
_BATCH_LABELS = ["model", "version"]


def _tally(tallies: dict[Any, list[float]], key: Any, value: float,
           bounds: Sequence[float]) -> None:
    """Add ``value`` to the histogram tally ``[count, sum, n per bucket..., n above]``."""
    tally = tallies.get(key)
    if tally is None:
        tally = tallies[key] = [0.0] * (len(bounds) + 3)
    tally[0] += 1
    tally[1] += value
    tally[2 + bisect_left(bounds, value)] += 1  # the first bucket with value <= bound


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def _histogram(name: str, doc: str, labels: list[str], tallies: dict[Any, list[float]],
               bounds: Sequence[float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    merged: dict[tuple[str, ...], list[float]] = {}  # version 1 and "1" are one label value
    for key, tally in tallies.copy().items():
        into = merged.setdefault(tuple(_label(v) for v in key), [0.0] * len(tally))
        for i, n in enumerate(list(tally)):
            into[i] += n
    for values, tally in sorted(merged.items()):
        cumulative, buckets = 0.0, []
        for bound, n in zip([*map(floatToGoString, bounds), "+Inf"], tally[2:]):
            cumulative += n
            buckets.append((bound, cumulative))
        family.add_metric(list(values), buckets, tally[1])
    return family


class _Collector:
    """Builds the families from a :class:`Metrics`' tallies when the registry is read."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily("mlaas_requests", "Requests answered.",
                                       labels=_REQUEST_LABELS)
        errors = CounterMetricFamily("mlaas_errors", "Requests answered with a status >= 400.",
                                     labels=_REQUEST_LABELS)
        counts: dict[tuple[str, ...], float] = {}
        for key, n in m._requests.copy().items():
            values = tuple(_label(v) for v in key)
            counts[values] = counts.get(values, 0) + n
        for values, n in sorted(counts.items()):
            requests.add_metric(list(values), n)
            if int(values[3]) >= 400:
                errors.add_metric(list(values), n)
        yield requests
        yield errors
        yield _histogram("mlaas_request_seconds", "Time to answer a request.", _LATENCY_LABELS,
                         m._latency, LATENCY_BUCKETS)
        yield _histogram("mlaas_batch_size", "Events per ONNX Runtime call.", _BATCH_LABELS,
                         m._batches, BATCH_BUCKETS)


class Metrics:
    """The server's metrics; ``registry`` is a private :class:`CollectorRegistry` (other
    collectors may be registered on it: the platform adds its own)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # (route, model, version, status) -> requests; errors are the rows with status >= 400
        self._requests: dict[tuple[str, str, int | str | None, int], int] = {}
        self._latency: dict[tuple[str, str, int | str | None], list[float]] = {}
        self._batches: dict[tuple[str, int | str], list[float]] = {}
        self.registry.register(_Collector(self))

    def observe_request(self, route: str, model: str, version: int | str | None, status: int,
                        seconds: float) -> None:
        """Count one answered request and its duration.

        Args:
            route: the route template; model, version: as resolved ("" when unknown).
            status: the HTTP status; seconds: the time taken.
        """
        key = (route, model, version, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        _tally(self._latency, (route, model, version), seconds, LATENCY_BUCKETS)

    def observe_batch(self, model: str, version: int | str, events: int) -> None:
        """Record one ONNX Runtime call of ``events`` events."""
        _tally(self._batches, (model, version), events, BATCH_BUCKETS)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
