"""HTTP status and headers of each mlaas error, for every route of the model server.

Layer: serving (HTTP wiring). One table, :data:`ERROR_STATUS`, so the
registry routes (``{"error", "message", ...}`` bodies) and the KServe v2
routes (``{"error": message}`` bodies) answer the same error with the same
status; the most specific class in an error's MRO wins. Errors raised by a
:class:`~mlaas.serve.access.ModelAccess` policy (the platform's families)
are in the table too.
"""

from __future__ import annotations

import logging
import math

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from mlaas.errors import (
    BadRequest,
    BundleError,
    Conflict,
    DataError,
    Forbidden,
    InferenceError,
    InvalidName,
    MlaasError,
    ModelNotFound,
    NotFound,
    Overloaded,
    PathError,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    ServeError,
    SpecError,
    Unauthorized,
)

__all__ = ["ERROR_STATUS", "status_of", "headers_of", "redact", "validation_error",
           "http_error", "internal_error"]

log = logging.getLogger("mlaas.http")

ERROR_STATUS: dict[type[MlaasError], int] = {
    ModelNotFound: 404,
    RequestTooLarge: 413,
    InvalidName: 400,
    BadRequest: 400,
    ProtocolError: 400,
    Overloaded: 503,
    InferenceError: 500,
    BundleError: 400,
    DataError: 400,  # includes InvalidEvent and BadValues
    SpecError: 400,
    NotFound: 404,
    Forbidden: 403,
    Unauthorized: 401,
    RateLimited: 429,
    Conflict: 409,
    QuotaExceeded: 413,
    PathError: 400,
    ServeError: 500,
    MlaasError: 500,
}


def status_of(exc: BaseException) -> int:
    """The HTTP status of ``exc``: from :data:`ERROR_STATUS`, 404 for a bare ``KeyError``
    (what a registry says for an unknown model), 400 for a ``ValueError``, else 500."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    if isinstance(exc, KeyError):
        return 404
    if isinstance(exc, ValueError):
        return 400
    return 500


def headers_of(exc: BaseException) -> dict[str, str]:
    """Headers the status needs: ``WWW-Authenticate`` on 401, ``Retry-After`` on 429."""
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        retry_after = getattr(exc, "retry_after", None)
        try:
            seconds = max(1, math.ceil(float(retry_after)))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            seconds = 1
        return {"Retry-After": str(seconds)}
    return {}


def redact(exc: Exception, access: object) -> Exception:
    """``exc`` as the caller may see it: without the registry's "did you mean" model
    names unless the access policy says names may be shown (``reveal_names``, True
    for :class:`~mlaas.serve.access.AllowAll`), since the suggestions come from every
    model in the registry, including ones the caller may not see."""
    if (isinstance(exc, ModelNotFound) and "did_you_mean" in exc.context
            and not getattr(access, "reveal_names", False)):
        return ModelNotFound(f"no model {exc.context.get('model')!r}",
                             model=exc.context.get("model"))
    return exc


# -- handlers shared by the model server and the platform app, so a client sees
# -- one error shape whichever app answers

async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """400 for a request FastAPI could not bind; ``problems`` as ``[[path, message], ...]``,
    the same shape as a :class:`~mlaas.errors.SpecError`'s."""
    assert isinstance(exc, RequestValidationError)
    problems = [[".".join(str(p) for p in e.get("loc", ())), str(e.get("msg"))]
                for e in exc.errors()]
    text = "; ".join(f"{p}: {m}" for p, m in problems)
    return JSONResponse({"error": "BadRequest", "message": f"invalid request: {text}",
                         "problems": problems}, status_code=400)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"error": "HTTPError", "message": str(exc.detail)},
                        status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """500 without a traceback in the body; the traceback goes to the server log."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "InternalServerError",
                         "message": "internal server error; see the server log"},
                        status_code=500)
