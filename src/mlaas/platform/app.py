"""The platform's HTTP app: jobs and files, the model server, /metrics, /healthz.

Layer: platform (HTTP wiring). :func:`create_platform_app` assembles one
FastAPI app from explicit parts: the route groups (files, jobs, and every
route of :func:`mlaas.serve.server.create_server` over the same registry,
with :class:`~mlaas.platform.model_access.PlatformModelAccess` as its
policy), one exception-handler map and one lifespan. Long-lived resources
(database, store, executor, job manager) open in the lifespan and close
when it ends; nothing happens at import. The app state holds:

- ``app.state.platform``: the :class:`~mlaas.platform.deps.PlatformContext`
  (while the lifespan runs);
- ``app.state.authenticator``: who the caller is (single-user by default);
  in multi-user mode its personal-token store is attached, on the
  platform's own database, while the lifespan runs;
- ``app.state.route_policy``: what each route asks of the caller beyond who
  they are (a personal token's scope, the per-user rate limits), checked by
  :func:`mlaas.platform.deps.get_principal`;
- ``app.state.registry``, ``runtime``, ``metrics``, ``access``: the model
  server's, shared with its routes.

Errors are JSON ``{"error": <class>, "message": ..., <context>}`` with the
status from :data:`ERROR_STATUS`; ``SpecError`` answers 422 with
``problems`` as ``[[field_path, message], ...]``; 401 carries
``WWW-Authenticate`` and 429 ``Retry-After``. No traceback reaches a body.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlaas.errors import MlaasError, SpecError
from mlaas.platform.config import PlatformConfig
from mlaas.platform.deps import Authenticator, PlatformContext, SingleUser
from mlaas.platform.model_access import PlatformModelAccess
from mlaas.platform.records import JobState
from mlaas.serve.http_errors import ERROR_STATUS as SERVE_ERROR_STATUS
from mlaas.serve.http_errors import headers_of, http_error, internal_error, validation_error

__all__ = ["create_platform_app", "ERROR_STATUS", "SINGLE_USER_NOTICE", "MULTI_USER_NOTICE"]

log = logging.getLogger("mlaas.platform")

SINGLE_USER_NOTICE = "single-user mode: every request is the local admin user"
MULTI_USER_NOTICE = "multi-user mode"

_FASTAPI_OWN = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def _metrics_router(auth: Authenticator, metrics_from: list[str], metrics: Any) -> Any:
    """``GET /metrics``: open in single-user mode; with logins, only for admins and for
    peers in ``metrics_from`` (a local Prometheus), since its labels name every model
    and queue. Anyone else gets the 404 of an unknown path, so the route is not probed.

    A peer that is one of the authenticator's trusted proxies does not count as a
    scraper: behind a proxy on the same host, every user would otherwise pass.
    """
    import ipaddress

    from fastapi import APIRouter

    from mlaas.platform.deps import get_principal

    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in metrics_from]

    def scraper(peer: str | None) -> bool:
        proxies = getattr(auth, "proxies", None)
        if not peer or (proxies is not None and proxies.trusts(peer)):
            return False
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False  # a Unix socket, a test client's name
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in networks)

    def admin(request: Request) -> bool:
        try:
            return get_principal(request).is_admin
        except MlaasError:  # anonymous, a bad or personal token, rate limited
            return False

    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        if not isinstance(auth, SingleUser):
            peer = request.client.host if request.client is not None else None
            if not scraper(peer) and not await run_in_threadpool(admin, request):
                raise StarletteHTTPException(status_code=404, detail="Not Found")
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return router
"""Routes every FastAPI app adds itself; the platform app has its own."""

ERROR_STATUS: dict[type[MlaasError], int] = {**SERVE_ERROR_STATUS, SpecError: 422}
"""The model server's table (platform families included), with invalid specs as 422."""

def _status_of(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def _error_body(exc: MlaasError) -> dict[str, Any]:
    body = exc.to_dict()
    if isinstance(exc, SpecError):
        body["problems"] = [[path, msg] for path, msg in exc.problems]
    return jsonable_encoder(body)  # type: ignore[no-any-return]


async def _mlaas_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MlaasError)
    status = _status_of(exc)
    if status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
    return JSONResponse(_error_body(exc), status_code=status, headers=_headers(exc))


def _headers(exc: MlaasError) -> dict[str, str]:
    """The status's headers (``WWW-Authenticate``, ``Retry-After``), then any the raiser set
    on ``exc.headers`` (an authenticator's exact bearer challenge)."""
    extra = getattr(exc, "headers", None)
    return {**headers_of(exc), **(extra if isinstance(extra, dict) else {})}


Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]


def _handlers() -> dict[int | type[Exception], Handler]:
    handlers: dict[int | type[Exception], Handler] = {MlaasError: _mlaas_error}
    handlers[RequestValidationError] = validation_error
    handlers[StarletteHTTPException] = http_error
    handlers[Exception] = internal_error
    return handlers


class _JobGauges(Collector):
    """``mlaas_jobs{state}``: jobs per state, read from the store at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("mlaas_jobs", "Jobs by state.", labels=["state"])
        ctx: PlatformContext | None = getattr(self.app.state, "platform", None)
        if ctx is not None:
            counts = _job_counts(ctx.store)
            for state in JobState:
                gauge.add_metric([state.value], counts.get(state.value, 0))
        yield gauge


def _job_counts(store: Any) -> dict[str, int]:
    counter = getattr(store, "count_jobs", None)
    if callable(counter):
        return {getattr(k, "value", k): int(v) for k, v in counter().items()}
    return dict(Counter(job.state.value for job in store.list_jobs()))


def _default_authenticator(config: PlatformConfig) -> Authenticator:
    if config.auth.single_user:
        return SingleUser()
    from mlaas.platform.auth import authenticator_from_config  # OIDC, tokens, proxy

    # the token store opens with the platform's database, in the lifespan
    return authenticator_from_config(config, open_tokens=False)


def _open(config: PlatformConfig, storage: Any, registry: Any,
          observer: Any = None) -> tuple[PlatformContext, Any]:
    """Database (migrated), store, accounting, executor and job manager (recovered and
    started); returns the context and the database (to dispose of when the lifespan ends).
    ``observer`` hears of each job attempt (the farm's Prometheus metrics)."""
    from mlaas.platform.accounting import Accounting
    from mlaas.platform.auth.jobtoken import RemovesJobTokens, remove_tokens_of_final_jobs
    from mlaas.platform.db import Database
    from mlaas.platform.farm import QUEUES_FILE, load_queue_file
    from mlaas.platform.manager import JobManager
    from mlaas.platform.store import SqlStore

    db = Database(config.database_url)
    try:
        db.migrate()
    except BaseException:
        db.dispose()
        raise
    store = SqlStore(db)
    accounting = Accounting(db, observer=observer)  # on the platform's database and engine
    executor = _executor(config, storage)
    defaults = {k: v for k, v in config.jobs.model_dump().items() if v is not None}
    # queues set through PUT /api/queues win over the config file's
    queues = load_queue_file(config.data_dir, config.known_flavors)
    if queues is not None:
        log.info("queues from %s (set through the API)", config.data_dir / QUEUES_FILE)
    # the manager's store deletes a job's token file when the job becomes final
    manager = JobManager(RemovesJobTokens(store, storage.job_dir), storage, executor, registry,
                         poll_interval=config.poll_interval, grace_s=config.grace_s,
                         defaults=defaults,
                         queues=config.queues if queues is None else queues,
                         flavors=config.flavors, gpu_flavor=config.gpu_flavor,
                         policy=config.scheduler.policy_config())
    manager.accounting = accounting  # attempts recovered below are accounted too
    manager.recover()
    remove_tokens_of_final_jobs(store, Path(storage.root) / "jobs")  # left by a killed server
    manager.start()
    ctx = PlatformContext(store=store, storage=storage, manager=manager, registry=registry,
                          config=config, accounting=accounting)
    return ctx, db


def _executor(config: PlatformConfig, storage: Any) -> Any:
    """The local executor (this machine's slots), or the Ray cluster's nodes."""
    if config.executor == "ray":
        from mlaas.platform.executors.ray_executor import RayExecutor

        return RayExecutor(address=str(config.ray_address), storage_root=Path(storage.root),
                           limit_grace_s=config.grace_s)
    from mlaas.platform.executors.local import LocalExecutor

    return LocalExecutor(cpus=config.cpus, gpu_devices=list(config.gpu_devices))


def _close(ctx: PlatformContext, db: Any) -> None:
    try:
        ctx.manager.stop(terminate_jobs=True)  # they checkpoint, exit 75 and resume later
    finally:
        db.dispose()


def create_platform_app(config: PlatformConfig, *,
                        authenticator: Authenticator | None = None) -> FastAPI:
    """Build the platform server's ASGI app.

    Args:
        config (PlatformConfig): where state lives and how jobs run.
        authenticator (Authenticator or None): turns each request into a
            Principal; default: from ``config.auth``, which by default is
            single-user mode (every request is the local admin).

    Creates the data directory and the model registry's directory; the
    database, executor and job manager open when the lifespan starts (run the
    app under uvicorn, or ``with TestClient(app)``).
    """
    from mlaas.platform.auth.policy import policy_from_config
    from mlaas.platform.auth.routes import tokens_router
    from mlaas.platform.routes.files import files_router
    from mlaas.platform.metrics import PlatformMetrics
    from mlaas.platform.routes.jobs import jobs_router
    from mlaas.platform.routes.models import models_router
    from mlaas.platform.routes.queues import queues_router
    from mlaas.platform.routes.usage import usage_router
    from mlaas.platform.storage import Storage
    from mlaas.serve.registry import Registry
    from mlaas.serve.server import create_server

    auth = authenticator if authenticator is not None else _default_authenticator(config)
    attach_tokens = authenticator is None and not config.auth.single_user
    policy = policy_from_config(config.auth.rate_limit_per_minute)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    storage = Storage(config.data_dir)
    registry = Registry(storage.models_dir)
    serving = create_server(None, registry=registry, access=PlatformModelAccess(),
                            max_body_bytes=config.max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(auth, SingleUser):
            log.warning(SINGLE_USER_NOTICE)
        else:
            log.info("%s: %r; %r", MULTI_USER_NOTICE, auth, policy)
        ctx, db = await run_in_threadpool(_open, config, storage, registry, farm_metrics)
        if attach_tokens:
            from mlaas.platform.auth.tokens import TokenStore

            auth.tokens = TokenStore(db)  # type: ignore[attr-defined]
        app.state.platform = ctx
        log.info("platform ready: data in %s, database %s, %d CPU slot(s)%s",
                 storage.root, db.display_url, config.cpus,
                 f", GPUs {','.join(config.gpu_devices)}" if config.gpu_devices else "")
        try:
            async with serving.router.lifespan_context(serving):
                yield
        finally:
            if attach_tokens:
                auth.tokens = None  # type: ignore[attr-defined]  # its database closes now
            await run_in_threadpool(_close, ctx, db)
            del app.state.platform
            runtime = getattr(serving.state, "runtime", None)
            if runtime is not None:
                runtime.close()
            close = getattr(auth, "close", None)
            if authenticator is None and callable(close):
                close()  # ours to close: built here from the config

    app = FastAPI(title="mlaas platform", lifespan=lifespan, exception_handlers=_handlers())
    app.state.authenticator = auth
    app.state.route_policy = policy
    for key in ("registry", "runtime", "metrics", "access", "max_body_bytes"):
        if hasattr(serving.state, key):
            setattr(app.state, key, getattr(serving.state, key))
    serving.state.metrics.registry.register(_JobGauges(app))
    farm_metrics = PlatformMetrics(serving.state.metrics.registry,
                                   lambda: getattr(app.state, "platform", None))

    # The model server's routes, /healthz and /metrics included (its metrics registry
    # carries the job gauges too), then the platform's own groups. The routes are
    # added as they are, not with include_router, which re-walks an included router on
    # every request; the routers have no router-level dependencies to lose.
    routes = [r for r in serving.router.routes
              if getattr(r, "path", None) not in _FASTAPI_OWN | {"/metrics"}]
    routes.extend(_metrics_router(auth, config.metrics_from, serving.state.metrics).routes)
    for router in (files_router(), jobs_router(), tokens_router(), queues_router(), usage_router(),
                   models_router()):
        routes.extend(router.routes)
    app.router.routes.extend(routes)
    app.user_middleware.extend(serving.user_middleware)  # the request-body limit
    return app

