"""The HTTP app: the model registry API, raw-event predictions and TFaaS compatibility.

Layer: serving (HTTP wiring only). Storage is :mod:`mlaas.serve.registry`,
preprocessing and ONNX Runtime are :class:`mlaas.bundle.Bundle`. Build the app
with :func:`create_app`; nothing is opened at import.

Routes (JSON in and out unless said otherwise):

=========  ======================================  ==========================================
method     path                                    what
=========  ======================================  ==========================================
GET        /healthz                                ``{"status": "ok"}``
POST       /api/models/{name}                      body: the bundle ``.tar.gz`` as raw bytes
                                                   (any content type); 201 with the new
                                                   version's description
GET        /api/models                             ``{"models": [{name, versions, latest,
                                                   aliases}, ...]}``
GET        /api/models/{name}                      versions with metadata, aliases
GET        /api/models/{name}/versions/{v}         one version: created, spec summary,
                                                   metrics, provenance, aliases
DELETE     /api/models/{name}/versions/{v}         also drops aliases pointing at it
PUT        /api/models/{name}/aliases/{alias}      body ``{"version": N}`` or ``N``
DELETE     /api/models/{name}/aliases/{alias}
GET        /api/models/{name}/serving              the model's dynamic batching settings:
                                                   ``{"model", "max_batch_size",
                                                   "max_delay_ms", "set", "versions"}``, the
                                                   two fields as the operator set them or
                                                   else the server's defaults, ``set`` the
                                                   fields the operator set, ``versions``
                                                   what each version batches with (a
                                                   bundle's own ``serving`` counted; for a
                                                   bundle with an invalid one, put there
                                                   by hand, its error with ``field`` and
                                                   ``file_path``). 500 ``ServeError`` naming
                                                   ``file_path`` and ``field`` when the
                                                   model's serving.json was edited by hand
                                                   into something invalid (its batches use
                                                   the bundle's or the server's settings
                                                   meanwhile; see docs/serving.md)
PUT        /api/models/{name}/serving              body ``{"max_batch_size": int >= 1,
                                                   "max_delay_ms": float >= 0}`` (either may
                                                   be left out: back to the default; ``{}``
                                                   clears both); needs write access; applies
                                                   to the next batch, no restart; answers as
                                                   GET. 400 naming the field when invalid
POST       /api/models/{name}/predict              ``?version=N`` or ``?alias=A`` (default:
                                                   alias ``production``, else the latest);
                                                   body rows ``[{...}, ...]``, columns
                                                   ``{"MET_pt": [...], ...}`` or
                                                   ``{"events": ...}``; returns ``{"model",
                                                   "version", "outputs"}``, one entry per
                                                   event: a float, a list per event for
                                                   multiclass, ``null`` off the cut
POST       /json                                   TFaaS: ``{"keys": [...], "values": [...],
                                                   "model": name}``; ``values`` is one event
                                                   (one value per key) or a list of such
                                                   lists; returns a JSON array of scores
GET        /models                                 TFaaS: a JSON array of objects, one per
                                                   model, with TFaaS's ``TFParams`` fields
                                                   (``name``, ``model``, ``inputNode``,
                                                   ``outputNode``, ``description``,
                                                   ``timestamp``, of the version served by
                                                   default) and ``versions``, ``latest``,
                                                   ``aliases``
POST       /upload                                 TFaaS: multipart form with the bundle
                                                   tarball in file field ``model`` (TFaaS's
                                                   name; ``file`` and ``bundle`` also work)
                                                   and the model name in text field ``name``;
                                                   a non-multipart body is the raw tarball
                                                   (``curl --data-binary @x.tar.gz``), named
                                                   by ``?name=``. Without a name: the ``name``
                                                   in the bundle's spec.json, else the file's
                                                   name without ``.tar.gz`` (form file name or
                                                   ``Content-Disposition``), else 400
DELETE     /delete/{model}                         TFaaS: every version of the model
=========  ======================================  ==========================================

Every route that touches a model asks the app's
:class:`~mlaas.serve.access.ModelAccess` first (``app.state.access``; see
:mod:`mlaas.serve.access` for which hook each route calls). Given ``metrics``
(:func:`~mlaas.serve.server.create_server` does), every route here but
``/healthz`` counts its requests, errors and latency in them
(:mod:`mlaas.serve.route_metrics`). Where batching settings come from and how
they are checked: :mod:`mlaas.serve.settings`; the same for users:
``docs/serving.md``.

Errors are JSON ``{"error": <class name>, "message": ..., <context>}``, with
the status from :data:`~mlaas.serve.http_errors.ERROR_STATUS` (unknown
model/version/alias 404; bad bundles, events, names and requests 400; bodies
over ``max_body_bytes`` 413; the access policy's NotFound 404, Forbidden 403,
Unauthorized 401 with ``WWW-Authenticate: Bearer``, RateLimited 429 with
``Retry-After``; anything else 500 with no traceback in the body).
"""

from __future__ import annotations

import email.message
import gc
import logging
import math
import re
from collections.abc import (AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping,
                             Sequence)
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlaas.bundle import MODEL_FILE, SPEC_FILE, Bundle
from mlaas.errors import BadRequest, MlaasError, RequestTooLarge
from mlaas.serve import access as hooks
from mlaas.serve import jsonio
from mlaas.serve.access import AllowAll, ModelAccess
from mlaas.serve.direct import AsgiRoute, error_response, read_body
from mlaas.serve.http_errors import (ERROR_STATUS, headers_of, http_error, internal_error,
                                     redact, status_of, validation_error)
from mlaas.serve.metrics import Metrics
from mlaas.serve.registry import (DEFAULT_ALIAS, NAME_PATTERN, ModelNotFound, Registry,
                                  archive_model_name)
from mlaas.serve.route_metrics import meter, served
from mlaas.serve.settings import Batching, effective, parse_settings

__all__ = ["create_app", "BadRequest", "RequestTooLarge", "ERROR_STATUS", "MAX_BODY_BYTES",
           "PREDICT_PATH"]

log = logging.getLogger("mlaas.serve")

MAX_BODY_BYTES = 64 * 1024**2


def _error_body(exc: MlaasError) -> dict[str, Any]:
    return jsonable_encoder(exc.to_dict())  # type: ignore[no-any-return]


async def _mlaas_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MlaasError)
    exc = redact(exc, hooks.access_of(request))
    assert isinstance(exc, MlaasError)
    status = status_of(exc)
    if status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
    return JSONResponse(_error_body(exc), status_code=status, headers=headers_of(exc))


class _BodyLimit:
    """ASGI middleware: refuse bodies above ``max_bytes`` by Content-Length and by count.

    The declared length is checked before the app runs (413 at once); the
    bytes actually received are counted as the app reads them, and
    :class:`RequestTooLarge` is raised when they pass the limit, so no
    handler ever holds more than ``max_bytes`` of body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None) -> RequestTooLarge:
        got = f"{size} bytes" if size is not None else "more"
        return RequestTooLarge(f"request body is {got}, above the limit of {self.max_bytes} "
                               "bytes", limit=self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    response = JSONResponse(_error_body(self._too_large(declared)),
                                            status_code=413)
                    await response(scope, receive, send)
                    return
        total = 0

        async def limited() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise self._too_large(None)
            return message

        await self.app(scope, limited, send)


# -- helpers -----------------------------------------------------------------------------


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def _json(request: Request) -> Any:
    body = await read_body(request)
    try:
        return jsonio.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def _outputs(scores: np.ndarray) -> list[Any]:
    """float32 [n, k] -> one float (k == 1) or list per event; NaN (off the cut) -> null."""
    rows: list[Any] = []
    for row in scores.tolist():
        clean = [None if (v is None or math.isnan(v)) else v for v in row]
        rows.append(clean[0] if len(clean) == 1 else clean)
    return rows


PREDICT_PATH = "/api/models/{name}/predict"
"""The raw-event predict route (the server hands it its requests directly)."""
_VERSION = TypeAdapter(int)  # as FastAPI validates ``version: int`` (lax: "3", "3.0")


def _version_and_alias(scope: Scope) -> tuple[int | None, str | None]:
    """``?version=`` and ``?alias=`` of the predict route, bound as FastAPI binds
    ``version: int | None, alias: str | None``: the last value of a repeated parameter;
    a version that is not an integer (an empty one too) is the same 400 naming
    ``query.version``."""
    if not scope["query_string"]:
        return None, None
    query = QueryParams(scope["query_string"])
    version, alias = query.get("version"), query.get("alias")
    if version is None:
        return None, alias
    try:
        return _VERSION.validate_python(version), alias
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("query", "version")} for e in exc.errors()]) from None


def _predict(request: Request, name: str, version: int | None, alias: str | None,
             events: Any) -> dict[str, Any]:
    v, bundle = _registry(request).bundle(name, version, alias)
    served(request, name, v)
    # Without a Runtime (create_app alone) events are scored one request at a time;
    # mlaas.serve.server.create_server batches them.
    scores = bundle.predict_events(events)
    return {"model": name, "version": v, "outputs": _outputs(scores)}


def _tfaas_events(bundle: Bundle, keys: list[str], values: list[Any]) -> list[dict[str, Any]]:
    """TFaaS ``keys``/``values`` as rows: ``values`` is one event or a list of events.

    One event when every value has the shape its branch needs (a number for a
    flat branch, a list of numbers for a jagged one); otherwise each element
    of ``values`` must be one event's list of values.
    """
    kinds = {k: t.get("kind") for k, t in bundle.branch_types.items()}

    def fits(value: Any, kind: str | None) -> bool:
        if kind == "jagged":
            return isinstance(value, list) and not any(isinstance(e, list) for e in value)
        if kind == "flat":
            return not isinstance(value, list)
        return True

    one = len(values) == len(keys) and all(fits(v, kinds.get(k)) for k, v in zip(keys, values))
    events = [values] if one else values
    rows = []
    for i, event in enumerate(events):
        if not isinstance(event, list) or len(event) != len(keys):
            raise BadRequest(f"values[{i}] must be a list of {len(keys)} values (one per key), "
                             f"or values one list of {len(keys)} values for a single event",
                             event=i)
        rows.append(dict(zip(keys, event)))
    return rows


def _tfaas_rows(bundle: Bundle, sent: tuple[list[str], list[Any]]) -> list[dict[str, Any]]:
    """``/json``'s ``prepare`` for :meth:`~mlaas.serve.runtime.Runtime.predict_events`:
    the request's ``(keys, values)`` read as rows once the model is known."""
    keys, values = sent
    return _tfaas_events(bundle, keys, values)


def _tfaas_request(body: Any) -> tuple[list[str], list[Any], str | None]:
    """``(keys, values, model)`` of a TFaaS ``/json`` body, checked."""
    if not isinstance(body, Mapping):
        raise BadRequest('give {"keys": [...], "values": [...], "model": name}')
    keys, values, name = body.get("keys"), body.get("values"), body.get("model")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise BadRequest('"keys" must be a list of branch names', field="keys")
    if not isinstance(values, list):
        raise BadRequest('"values" must be a list', field="values")
    if name is not None and not isinstance(name, str):
        raise BadRequest('"model" must be a string', field="model")
    return keys, values, name


def _tfaas_predict(request: Request, name: str, keys: list[str], values: list[Any]
                   ) -> list[Any]:
    v, bundle = _registry(request).bundle(name)
    served(request, name, v)
    return _outputs(bundle.predict_events(_tfaas_events(bundle, keys, values)))


async def _visible_models(request: Request) -> list[dict[str, Any]]:
    """The registry listing, filtered by the access policy."""
    models = await run_in_threadpool(_registry(request).list)
    names = await hooks.visible(request, [m["name"] for m in models])
    keep = set(names)
    return [m for m in models if m["name"] in keep]


def _tfaas_params(registry: Registry, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``GET /models`` as TFaaS answered it: one ``TFParams`` object per model (``name``,
    ``model``, ``inputNode``, ``outputNode``, ``description``, ``timestamp``, all
    strings as in TFaaS, describing the version served by default), plus the
    registry's ``versions``, ``latest`` and ``aliases``. TFaaS's ``labels`` and
    ``options`` named files and flags that bundles do not have, so they are left out."""
    out = []
    for m in models:
        version = m["aliases"].get(DEFAULT_ALIAS, m["latest"])
        try:
            info = registry.summary(m["name"], version)  # the two files read here, once
        except ModelNotFound:
            continue  # deleted since the listing
        spec = info["spec"]
        tensors = {key: [t.get("name") for t in spec.get(key) or () if isinstance(t, dict)]
                   for key in ("inputs", "outputs")}
        out.append({
            "name": m["name"],
            "model": MODEL_FILE,
            "inputNode": ",".join(map(str, tensors["inputs"])),
            "outputNode": ",".join(map(str, tensors["outputs"])),
            "description": f"mlaas bundle {spec.get('name') or m['name']!s}, task "
                           f"{spec.get('task')}, version {version}",
            "timestamp": info.get("created") or "",
            "versions": m["versions"],
            "latest": m["latest"],
            "aliases": m["aliases"],
        })
    return out


_ARCHIVE_SUFFIX = re.compile(r"\.(tar\.gz|tgz|tar)$")
_MODEL_NAME = re.compile(NAME_PATTERN)


def _name_from_file(filename: str | None) -> str | None:
    """A model name from an uploaded file's name (``higgs.tar.gz`` -> ``higgs``), if valid."""
    if not filename:
        return None
    stem = _ARCHIVE_SUFFIX.sub("", filename.replace("\\", "/").rsplit("/", 1)[-1])
    return stem if _MODEL_NAME.fullmatch(stem) else None


def _disposition_filename(header: str | None) -> str | None:
    """The ``filename`` of a ``Content-Disposition`` header (RFC 2231 forms included)."""
    if not header:
        return None
    message = email.message.Message()
    message["content-disposition"] = header
    return message.get_filename()


async def _upload(request: Request, name: str, metadata: dict[str, Any],
                  read: Callable[[], Awaitable[bytes]]) -> JSONResponse:
    """Read the archive and create the next version of ``name``, once the policy's
    ``on_upload`` has allowed it (giving ``metadata``). The policy's ``after_upload``
    hears how it ended whatever happens, reading the body included: a body over the
    limit fails there, after ``on_upload`` may have claimed the name."""
    version = None
    try:
        data = await read()
        info = await run_in_threadpool(_registry(request).upload, name, data, metadata)
        version = info["version"]
    finally:
        await hooks.after_upload(request, name, version)
    served(request, name, version)
    return JSONResponse(jsonable_encoder({"model": name, **info}), status_code=201)


def _serving(request: Request, name: str) -> dict[str, Any]:
    """The answer of ``GET /api/models/{name}/serving`` (blocking: reads the registry).

    An invalid serving.json raises (from :meth:`Registry.serving`): the operator
    asked what the settings are, and the honest answer is the file to fix. A
    version whose bundle's own ``serving`` is invalid is one entry among the
    versions, shown as its error (the error body's fields, and the file), so the
    other versions' settings are still answered."""
    registry = _registry(request)
    stored = registry.serving(name)
    runtime = getattr(request.app.state, "runtime", None)
    defaults: Batching = runtime.defaults if runtime is not None else Batching()
    versions: dict[str, Any] = {}
    for described in registry.get(name)["versions"]:
        key = str(described["version"])
        try:
            versions[key] = effective(stored, described["spec"], defaults).to_dict()
        except MlaasError as exc:  # a bundle put in the directory by hand with bad settings
            versions[key] = {**exc.to_dict(), "file_path": f"{name}/{key}/{SPEC_FILE}"}
    return {"model": name, **defaults.to_dict(), **stored, "set": sorted(stored),
            "versions": versions}


async def _refresh(request: Request, name: str) -> None:
    """Let the full server's runtime see a model's new state now: its batchers of deleted
    versions go, new batching settings apply to the next batch (nothing without one)."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None:
        await runtime.refresh(name)


def _alias_version(body: Any) -> int:
    if isinstance(body, Mapping):
        body = body.get("version")
    if isinstance(body, bool) or not isinstance(body, int):
        raise BadRequest('give the version as {"version": N} or a bare integer', field="version")
    return body


# -- routes ------------------------------------------------------------------------------


def _health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    router.add_api_route("/healthz", healthz, methods=["GET"])
    return router


def _models_router() -> APIRouter:
    router = APIRouter(prefix="/api/models", tags=["models"])

    async def list_models(request: Request) -> dict[str, Any]:
        return {"models": await _visible_models(request)}

    async def upload(name: str, request: Request) -> JSONResponse:
        metadata = await hooks.on_upload(request, name)  # before reading the body
        return await _upload(request, name, metadata, request.body)

    async def get_model(name: str, request: Request) -> dict[str, Any]:
        await hooks.check(request, "read", name)
        info = await run_in_threadpool(_registry(request).get, name)
        served(request, name)
        return info

    async def get_version(name: str, version: int, request: Request) -> dict[str, Any]:
        await hooks.check(request, "read", name)
        info = await run_in_threadpool(_registry(request).version, name, version)
        served(request, name, version)
        return {"model": name, **info}

    async def delete_version(name: str, version: int, request: Request) -> dict[str, Any]:
        await hooks.check(request, "write", name)
        await run_in_threadpool(_registry(request).delete_version, name, version)
        await _refresh(request, name)
        served(request, name, version)
        return {"model": name, "deleted": version}

    async def set_alias(name: str, alias: str, request: Request) -> dict[str, Any]:
        await hooks.check(request, "write", name)
        version = _alias_version(await _json(request))
        aliases = await run_in_threadpool(_registry(request).set_alias, name, alias, version)
        served(request, name, version)
        return {"model": name, "alias": alias, "version": version, "aliases": aliases}

    async def delete_alias(name: str, alias: str, request: Request) -> dict[str, Any]:
        await hooks.check(request, "write", name)
        aliases = await run_in_threadpool(_registry(request).delete_alias, name, alias)
        served(request, name)
        return {"model": name, "aliases": aliases}

    async def get_serving(name: str, request: Request) -> dict[str, Any]:
        await hooks.check(request, "read", name)
        answer = await run_in_threadpool(_serving, request, name)
        served(request, name)
        return answer

    async def set_serving(name: str, request: Request) -> dict[str, Any]:
        await hooks.check(request, "write", name)
        settings = parse_settings(await _json(request))  # 400 naming the field
        await run_in_threadpool(_registry(request).set_serving, name, settings)
        await _refresh(request, name)
        served(request, name)
        return await run_in_threadpool(_serving, request, name)

    async def predict(scope: Scope, receive: Receive, send: Send) -> None:
        # The server's hottest route, a plain ASGI handler (see mlaas.serve.direct): the
        # same answers and errors as a FastAPI endpoint, without its per-request machinery.
        request = Request(scope, receive, send)
        name: str = scope["path_params"]["name"]
        try:
            version, alias = _version_and_alias(scope)
            await hooks.check(request, "read", name)
            events = await _json(request)
            runtime = getattr(request.app.state, "runtime", None)
            if runtime is not None:  # the full server: batched with concurrent requests
                v, scores = await runtime.predict_events(
                    name, version, alias, events, on_resolved=partial(served, request, name))
                answer = {"model": name, "version": v, "outputs": _outputs(scores)}
            else:
                answer = await run_in_threadpool(_predict, request, name, version, alias,
                                                 events)
            # plain JSON types already: no jsonable_encoder
            content = jsonio.dumps(answer)
        except Exception as exc:  # noqa: BLE001 - answered as the app answers it
            response = await error_response(request, exc)
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(content)).encode()),
                                (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content})

    async def predict_endpoint(name: str, request: Request, version: int | None = None,
                               alias: str | None = None) -> Any:
        """Score raw events (rows or columns of branches) with a model version."""
        raise AssertionError("answered by predict()")  # pragma: no cover - documentation

    router.add_api_route("", list_models, methods=["GET"])
    router.add_api_route("/{name}", upload, methods=["POST"], status_code=201)
    router.add_api_route("/{name}", get_model, methods=["GET"])
    router.add_api_route("/{name}/versions/{version}", get_version, methods=["GET"])
    router.add_api_route("/{name}/versions/{version}", delete_version, methods=["DELETE"])
    router.add_api_route("/{name}/aliases/{alias}", set_alias, methods=["PUT"])
    router.add_api_route("/{name}/aliases/{alias}", delete_alias, methods=["DELETE"])
    router.add_api_route("/{name}/serving", get_serving, methods=["GET"])
    router.add_api_route("/{name}/serving", set_serving, methods=["PUT"])
    router.routes.append(AsgiRoute(PREDICT_PATH, predict_endpoint, predict, methods=["POST"],
                                   tags=router.tags))
    return router


_UPLOAD_FILE_FIELDS = ("model", "file", "bundle")


def _tfaas_router() -> APIRouter:
    router = APIRouter(tags=["tfaas"])

    async def predict_json(request: Request) -> Any:
        await hooks.authenticate(request)  # the model name is in the body: caller first
        keys, values, name = _tfaas_request(await _json(request))
        if name is None:
            names = [m["name"] for m in await _visible_models(request)]
            if len(names) != 1:
                raise BadRequest(f'give "model" (models: {", ".join(names) or "none"})',
                                 field="model")
            name = names[0]
        await hooks.check(request, "read", name)
        runtime = getattr(request.app.state, "runtime", None)
        if runtime is None:
            return await run_in_threadpool(_tfaas_predict, request, name, keys, values)
        # the full server: batched with concurrent requests, as /api/models/{name}/predict
        _, scores = await runtime.predict_events(
            name, None, None, (keys, values), on_resolved=partial(served, request, name),
            prepare=_tfaas_rows)
        return Response(jsonio.dumps(_outputs(scores)), media_type="application/json")

    async def models(request: Request) -> list[dict[str, Any]]:
        listing = await _visible_models(request)
        return await run_in_threadpool(_tfaas_params, _registry(request), listing)

    async def delete(model: str, request: Request) -> dict[str, Any]:
        await hooks.check(request, "write", model)
        versions = await run_in_threadpool(_registry(request).delete_model, model)
        await _refresh(request, model)
        served(request, model)
        return {"model": model, "deleted": versions}

    async def upload(request: Request) -> JSONResponse:
        await hooks.authenticate(request)  # before the form is parsed (on_upload needs its name)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            async with request.form() as form:
                files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
                texts = {k: v for k, v in form.multi_items() if isinstance(v, str)}
                chosen = next((v for f in _UPLOAD_FILE_FIELDS for k, v in files if k == f),
                              files[0][1] if files else None)
                if chosen is None:
                    raise BadRequest("the form has no file; send the bundle tarball as file "
                                     "field 'model' (or 'file')", field="model")
                data = await chosen.read()
                filename = chosen.filename
            name = texts.get("name") or texts.get("model")
        else:
            data = await request.body()
            name = request.query_params.get("name")
            filename = _disposition_filename(request.headers.get("content-disposition"))
        if not name:  # TFaaS clients may send a bare tarball: the bundle names itself
            name = await run_in_threadpool(archive_model_name, data) or _name_from_file(filename)
        if not name:
            raise BadRequest("give the model name as form field 'name' (or ?name= with a raw "
                             "tarball body): the bundle's spec.json has no valid name and the "
                             "upload no file name to take it from", field="name")
        metadata = await hooks.on_upload(request, name)

        async def read() -> bytes:
            return data

        return await _upload(request, name, metadata, read)

    router.add_api_route("/json", predict_json, methods=["POST"])
    router.add_api_route("/models", models, methods=["GET"])
    router.add_api_route("/delete/{model}", delete, methods=["DELETE"])
    router.add_api_route("/upload", upload, methods=["POST"], status_code=201)
    return router


# -- the app -----------------------------------------------------------------------------


def create_app(models_dir: str | Path, *, max_body_bytes: int = MAX_BODY_BYTES,
               extra_routers: Iterable[APIRouter] = (),
               registry: Registry | None = None,
               access: ModelAccess | None = None, freeze_gc: bool = False,
               metrics: Metrics | None = None) -> FastAPI:
    """Build the serving app over the registry at ``models_dir``.

    Args:
        models_dir: the registry root (see :class:`~mlaas.serve.registry.Registry`).
        max_body_bytes: the largest request body accepted (413 above).
        extra_routers: more APIRouters to include as given (e.g. the KServe v2 routes).
        registry: an existing Registry to use instead of opening ``models_dir``.
        access: who may use which model (:class:`~mlaas.serve.access.ModelAccess`,
            called on every model route); default :class:`~mlaas.serve.access.AllowAll`.
        freeze_gc: at startup, ``gc.freeze()`` everything allocated so far (the
            imported libraries), so the garbage collector's full passes
            no longer walk it: they paused the single-event benchmark for ~125 ms
            twice per 10k requests, which set its p99; frozen, ~2 ms. Process-wide,
            so only for an app that owns its process (``create_server`` does).
        metrics: when given, every model route here (registry, raw events, TFaaS)
            counts its requests, errors and latency in it by route template, model,
            version and status (:mod:`mlaas.serve.route_metrics`); ``extra_routers``
            count their own.

    The registry is ``app.state.registry``; bundles load lazily on first use
    and are dropped when the lifespan ends.
    """
    reg = registry if registry is not None else Registry(Path(models_dir))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if freeze_gc:  # O(1); no gc.collect() first: startup leaves little garbage
            gc.freeze()
        yield
        if freeze_gc:
            gc.unfreeze()
        reg.clear_cache()
        workers = getattr(getattr(app.state, "runtime", None), "workers", None)
        if workers is not None:  # worker processes of the full server; restarted on use
            workers.close()

    Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
    handlers: dict[int | type[Exception], Handler] = {cls: _mlaas_error for cls in ERROR_STATUS}
    handlers[RequestValidationError] = validation_error
    handlers[StarletteHTTPException] = http_error
    handlers[Exception] = internal_error
    app = FastAPI(title="mlaas serving", lifespan=lifespan, exception_handlers=handlers)
    app.state.registry = reg
    app.state.access = access if access is not None else AllowAll()
    app.state.max_body_bytes = max_body_bytes
    model_routers = [_models_router(), _tfaas_router()]
    if metrics is not None:
        for route in (r for router in model_routers for r in router.routes):
            assert isinstance(route, APIRoute)
            meter(route, metrics)
    routers: Sequence[APIRouter] = [_health_router(), *model_routers, *extra_routers]
    for router in routers:
        # The routes themselves, not include_router: an included router is walked
        # (its route list versioned and re-matched) on every request, which was a
        # tenth of the event loop's time on the single-event predict benchmark.
        # These routers carry no dependencies or callbacks that including would add.
        app.router.routes.extend(router.routes)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    return app
