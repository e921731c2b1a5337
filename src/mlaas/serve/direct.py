"""Hot routes answered as plain ASGI apps: the v2 infer routes and raw-event predict.

Layer: serving (HTTP wiring). FastAPI does a lot per request that these
routes need not: dependency solving (query parameters bound and validated
by pydantic), two exit stacks, a Response object, the router's walk over
every route and the exception middleware. On the single-event predict
benchmark that was about half of the event loop's time (a py-spy profile,
BENCHMARKS.md, "Serving"). An :class:`AsgiRoute` is still a documented
FastAPI route (in the OpenAPI schema, matched, ``scope["route"]`` set for
the platform's token scopes), but answers its methods with a plain
``asgi(scope, receive, send)``; :class:`DirectRoutes` hands the requests
those routes fully match straight to them. The handlers answer their own
errors with the app's exception handlers (:func:`error_response`), so a
client sees the same status and body either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["AsgiRoute", "DirectRoutes", "read_body", "header", "error_response"]


class AsgiRoute(APIRoute):
    """An APIRoute answered by a plain ASGI app.

    It is documented in the OpenAPI schema from ``endpoint``'s signature,
    matched, and sets ``scope["route"]`` (which the platform's token scopes
    read) like any route, also when its router is included or its routes are
    copied into another app; but a request of its methods goes straight to
    ``asgi(scope, receive, send)``, with the path parameters in
    ``scope["path_params"]``. Exceptions ``asgi`` lets through reach the app's
    exception handlers, as from any route.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], asgi: ASGIApp,
                 **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.asgi = asgi

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] in self.methods:
            await self.asgi(scope, receive, send)
        else:
            await super().handle(scope, receive, send)  # 405


class DirectRoutes:
    """ASGI middleware: a request for one of ``routes`` is handed to it at once.

    Added innermost of the app's own middleware (inside its body limit), it
    skips what the app would do between it and the route: the exception
    middleware (the handlers answer their own errors, and anything else
    still reaches the server-error handler, as before), the exit stack and
    the router's walk. The route's own ``matches`` decides, so a request it
    would not fully match (another method, another path) goes on to the app
    unchanged. ~10 us of the ~65 us of Python a 1024-event infer request cost
    on the event loop.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], router: Any = None) -> None:
        self.app = app
        self.routes = list(routes)
        self.router = router
        # what each path ends with after its last parameter ("/infer", "/predict"): other
        # requests pass on after one str.endswith
        self.tails = tuple(getattr(r, "path", "").rpartition("}")[2] for r in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith(self.tails):
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    if self.router is not None and "router" not in scope:
                        scope["router"] = self.router  # as the router would set it
                    await route.handle(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def read_body(request: Request) -> bytes:
    """The request body, as ``await request.body()`` (which it uses when something read
    the body already), with one join instead of Starlette's async generator."""
    if hasattr(request, "_body"):
        return await request.body()
    chunks: list[bytes] = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # as Request.body() keeps it
    return body


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), as ``request.headers.get`` gives it,
    without building the headers object."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def error_response(request: Request, exc: Exception) -> Response:
    """What the app's exception handlers answer to ``exc`` (its class or the nearest base
    class with a handler, as Starlette looks them up), for a handler that
    :class:`DirectRoutes` reached past the exception middleware. ``exc`` is raised
    again when only the server-error handler (``Exception``) would take it: the
    server-error middleware answers it then, and logs it, as for any route."""
    handlers: dict[Any, Any] = getattr(request.app, "exception_handlers", {})
    for cls in type(exc).__mro__:
        if cls is Exception:
            break
        handler = handlers.get(cls)
        if handler is not None:
            if inspect.iscoroutinefunction(handler):
                response: Response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
            return response
    raise exc
