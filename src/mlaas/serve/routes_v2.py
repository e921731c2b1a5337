"""The Open Inference Protocol (KServe v2) routes: health, model metadata, readiness, infer.

Layer: serving, HTTP wiring only. Bodies are decoded and encoded by
:mod:`mlaas.serve.protocol`, models run in :mod:`mlaas.serve.runtime`. The
raw body is read so the binary tensor data extension works. Every model
route asks the app's access policy (``check(request, "read", name)``, see
:mod:`mlaas.serve.access`) first. Errors are answered KServe style,
``{"error": message}``, with the status of
:mod:`mlaas.serve.http_errors`: unknown model or version 404, a bad request
400 (a version in the path that is not an integer too, as on
``/api/models/{name}/versions/{v}``), a full queue 503, an inference failure
500, and the policy's 401, 403, 404 and 429.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from mlaas.errors import BadRequest, MlaasError
from mlaas.serve import access as hooks
from mlaas.serve.direct import AsgiRoute, header, read_body
from mlaas.serve.http_errors import headers_of, redact, status_of
from mlaas.serve.metrics import Metrics
from mlaas.serve.protocol import (
    HEADER_LENGTH,
    TensorSpec,
    decode_infer_request,
    encode_infer_response,
    model_metadata,
    model_tensors,
)
from mlaas.serve.runtime import Runtime

__all__ = ["v2_router", "INFER_PATHS"]


def _error(exc: Exception) -> JSONResponse:
    return JSONResponse({"error": _message(exc)}, status_code=status_of(exc),
                        headers=headers_of(exc))


def _message(exc: Exception) -> str:
    if isinstance(exc, MlaasError):
        return str(exc)
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return f"{type(exc).__name__}: {exc}"


_TENSORS: weakref.WeakKeyDictionary[Any, tuple[list[TensorSpec], list[TensorSpec]]] = (
    weakref.WeakKeyDictionary())


def _tensors(bundle: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """:func:`model_tensors` of ``bundle``, kept while the bundle lives (the same lists for
    every request: the decoder's remembered headers are keyed by them)."""
    got = _TENSORS.get(bundle)
    if got is None:
        got = _TENSORS[bundle] = model_tensors(bundle)
    return got


def _version(name: str, v: str) -> int:
    """The version number in a path: 400 when it is not an integer (as
    ``/api/models/{name}/versions/{v}`` answers), 404 when it cannot exist."""
    try:
        number = int(v)
    except ValueError:
        raise BadRequest(f"version {v!r} of model {name!r} is not an integer (versions are "
                         "1, 2, ...)", field="version", version=v) from None
    if number < 1:
        raise KeyError(f"model {name!r} has no version {v!r} (versions are 1, 2, ...)")
    return number


def _versions(registry: Any, name: str, resolved: int) -> list[int]:
    """Every version of ``name`` when the registry can list them, else the resolved one."""
    listing = getattr(registry, "list", None)
    if callable(listing):
        for model in listing():
            if isinstance(model, dict) and model.get("name") == name:
                return [int(v) for v in model.get("versions", [])] or [resolved]
    return [resolved]


_INFER = "/v2/models/{name}/infer"
_INFER_VERSION = "/v2/models/{name}/versions/{v}/infer"
INFER_PATHS = frozenset({_INFER, _INFER_VERSION})
"""The paths of the infer routes (the server puts them first in its route list)."""
_JSON = b"application/json"
_BINARY = b"application/octet-stream"
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()


def v2_router(runtime: Runtime, registry: Any, metrics: Metrics | None = None) -> APIRouter:
    """The ``/v2`` routes over ``runtime`` and ``registry``.

    Args:
        runtime: runs the models (:class:`mlaas.serve.runtime.Runtime`).
        registry: ``resolve(name, version=None, alias=None)`` and ``bundle(name, version)``;
            ``list()`` (optional) gives every version for the metadata.
        metrics: counts requests and times them when given.
    """
    router = APIRouter(prefix="/v2", tags=["v2"])

    async def answer(route: str, request: Request, name: str,
                     handler: Callable[[dict[str, Any]], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        seen: dict[str, Any] = {"model": "", "version": None}
        try:
            await hooks.check(request, "read", name)
            response = await handler(seen)
        except (KeyError, MlaasError) as exc:
            response = _error(redact(exc, hooks.access_of(request)))
        if metrics is not None:
            metrics.observe_request(route, seen["model"], seen["version"], response.status_code,
                                    time.perf_counter() - started)
        return response

    @router.get("/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @router.get("/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": True})

    async def metadata(route: str, request: Request, name: str, version: int | str | None
                       ) -> Response:
        async def handler(seen: dict[str, Any]) -> Response:
            v = None if version is None else _version(name, str(version))
            resolved, bundle, _ = await runtime.batcher(name, v)
            seen.update(model=name, version=resolved)
            inputs, outputs = model_tensors(bundle)
            versions = [resolved] if v is not None else _versions(registry, name, resolved)
            return JSONResponse(model_metadata(name, versions, inputs, outputs))
        return await answer(route, request, name, handler)

    @router.get("/models/{name}")
    async def model(name: str, request: Request) -> Response:
        return await metadata("/v2/models/{name}", request, name, None)

    @router.get("/models/{name}/versions/{v}")
    async def model_version(name: str, v: str, request: Request) -> Response:
        return await metadata("/v2/models/{name}/versions/{v}", request, name, v)

    async def readiness(route: str, request: Request, name: str, version: str | None
                        ) -> Response:
        async def handler(seen: dict[str, Any]) -> Response:
            v = None if version is None else _version(name, version)
            resolved, _, _ = await runtime.batcher(name, v)
            seen.update(model=name, version=resolved)
            return JSONResponse({"name": name, "version": str(resolved), "ready": True})
        return await answer(route, request, name, handler)

    @router.get("/models/{name}/ready")
    async def model_ready(name: str, request: Request) -> Response:
        return await readiness("/v2/models/{name}/ready", request, name, None)

    @router.get("/models/{name}/versions/{v}/ready")
    async def model_version_ready(name: str, v: str, request: Request) -> Response:
        return await readiness("/v2/models/{name}/versions/{v}/ready", request, name, v)

    async def infer(scope: Scope, receive: Receive, send: Send) -> None:
        # A plain ASGI handler (see mlaas.serve.direct) doing what a FastAPI endpoint would,
        # without dependency solving, two exit stacks and a Response object per request.
        params = scope["path_params"]
        name: str = params["name"]
        version: str | None = params.get("v")
        request = Request(scope, receive, send)
        started = time.perf_counter()
        model, resolved = "", None
        error: JSONResponse | None = None
        with runtime.request(scope.get("client")) as again:
            try:
                await hooks.check(request, "read", name)
                v = None if version is None else _version(name, version)
                resolved, bundle, batcher = await runtime.batcher(name, v)
                model = name
                inputs, outputs = _tensors(bundle)
                body = await read_body(request)
                req = decode_infer_request(body, inputs, outputs,
                                           header_length=header(scope, _HEADER_LENGTH))
                scores = await runtime.score(bundle, batcher, req.inputs, inline=True,
                                             again=again)
                results = {n: scores for n in req.outputs}  # one output, "score"
                content, header_length = encode_infer_response(
                    name, resolved, results, request_id=req.id, binary=req.binary)
            except (KeyError, MlaasError) as exc:
                error = _error(redact(exc, hooks.access_of(request)))
        status = 200 if error is None else error.status_code
        if metrics is not None:
            route = _INFER_VERSION if version is not None else _INFER
            metrics.observe_request(route, model, resolved, status, time.perf_counter() - started)
        if error is not None:
            await error(scope, receive, send)
            return
        headers = [(b"content-length", str(len(content)).encode()),
                   (b"content-type", _JSON if header_length is None else _BINARY)]
        if header_length is not None:
            headers.append((_HEADER_LENGTH, str(header_length).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def model_infer(name: str, request: Request) -> Response:
        """Score a batch (KServe v2 infer; JSON or binary tensor data)."""
        raise AssertionError("answered by infer()")  # pragma: no cover - documentation only

    async def model_version_infer(name: str, v: str, request: Request) -> Response:
        """Score a batch with one version of the model (KServe v2 infer)."""
        raise AssertionError("answered by infer()")  # pragma: no cover - documentation only

    for path, endpoint in ((_INFER, model_infer), (_INFER_VERSION, model_version_infer)):
        router.routes.append(AsgiRoute(path, endpoint, infer, methods=["POST"], tags=["v2"]))

    return router
