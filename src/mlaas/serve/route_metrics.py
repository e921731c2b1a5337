"""Request metrics of the registry, raw-event and TFaaS routes (the ``/v2`` routes count their own).

Layer: serving (HTTP wiring). :func:`meter` wraps one route's ASGI app so that
every answer is counted in :class:`~mlaas.serve.metrics.Metrics`
(``Metrics.observe_request``, as the ``/v2`` routes do) with its route
template, model, version, status and latency. The status is read from the
response as it is sent, so an error answered by the app's exception handlers
(a 404 from the registry, a 400 naming an event, a 401 from the platform's
policy) counts with the status the client saw, without a second error map here.

A route says which model and version it served with :func:`served`, as soon
as it has resolved them (before scoring, so an error on a known model still
carries them); until then both labels are empty, so the names of models that
do not exist never become label values (the same rule as the ``/v2`` routes).

Cost per request: two clock reads, one wrapped ``send`` and a tally in
:class:`~mlaas.serve.metrics.Metrics`' plain dicts, a few microseconds; no middleware walks the other routes.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlaas.serve.direct import AsgiRoute
from mlaas.serve.metrics import Metrics

__all__ = ["meter", "served"]

_SERVED = "mlaas.served"  # scope key: (model, version) the route resolved
_NOTHING: tuple[str, int | None] = ("", None)


def served(request: Request, model: str, version: int | None = None) -> None:
    """Label this request's metrics with ``model`` (and ``version``), once they are known."""
    request.scope[_SERVED] = (model, version)


def meter(route: Route, metrics: Metrics) -> None:
    """Count every request ``route`` answers in ``metrics`` (see the module docstring);
    for an :class:`~mlaas.serve.direct.AsgiRoute`, also those its plain ASGI app answers."""
    route.app = _metered(route.app, route.path_format, metrics)
    if isinstance(route, AsgiRoute):
        route.asgi = _metered(route.asgi, route.path_format, metrics)


def _metered(inner: ASGIApp, template: str, metrics: Metrics) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        status = 500  # what the server-error handler answers if nothing was sent

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await inner(scope, receive, sending)
        finally:
            model, version = scope.get(_SERVED, _NOTHING)
            metrics.observe_request(template, model, version, status,
                                    time.perf_counter() - started)

    return app
