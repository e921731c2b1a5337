"""The farm API: queues (read by everyone, replaced by admins), nodes, the scaling signal.

Layer: platform (HTTP wiring). The state is the job manager's scheduler
snapshot (:mod:`mlaas.platform.manager`); validation of a new queue list is
:func:`mlaas.platform.farm.validate_queues`; this module only translates
HTTP and decides who sees what:

- ``GET /api/queues``: every signed-in user sees every queue's definition,
  quotas, usage and pending/running counts (what they need to pick a queue
  and to see why they wait); admins also get the job ids in each queue.
- ``PUT /api/queues``: admins only (403); a bad list answers 422 with every
  problem by field path (``queues.0.quotas.nvidia-t4.nominal``); the new list replaces the queues at
  once and is kept in ``DATA_DIR/queues.json`` for the next start.
- ``GET /api/nodes``: nodes with their flavors, capacity and what is free
  (admins also see the running job ids).
- ``GET /api/scaling``: for an external provisioner (docs/scheduler.md).

Routes (see ``docs/platform-api.md``)::

    GET /api/queues
    PUT /api/queues          JSON {"queues": [QueueConfig, ...]}
    GET /api/nodes
    GET /api/scaling
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from mlaas.errors import Forbidden
from mlaas.platform.config import QueueConfig
from mlaas.platform.deps import Ctx, CurrentPrincipal, PlatformContext
from mlaas.platform.farm import save_queue_file, validate_queues
from mlaas.platform.principal import Principal

__all__ = ["queues_router", "QueuesIn"]


class QuotaOut(BaseModel):
    nominal: int | None
    borrowing_limit: int | None


class QueueOut(BaseModel):
    name: str
    group: str
    cohort: str | None
    strategy: str
    priority_classes: dict[str, int]
    preempt_within_queue: bool
    quotas: dict[str, QuotaOut]
    usage: dict[str, int]
    pending: int
    running: int
    pending_jobs: list[str] | None = None
    running_jobs: list[str] | None = None
    mine: bool


class QueueList(BaseModel):
    queues: list[QueueOut]
    configured: list[QueueConfig]
    policy: str


class QueuesIn(BaseModel):
    """The body of ``PUT /api/queues``: the whole new queue list (empty: the default queue)."""

    queues: list[dict[str, Any]]


class FlavorOut(BaseModel):
    capacity: int
    free: int


class NodeOut(BaseModel):
    name: str
    cpus: float
    free_cpus: float
    memory_gib: float
    flavors: dict[str, FlavorOut]
    running: int
    running_jobs: list[str] | None = None


class NodeList(BaseModel):
    nodes: list[NodeOut]
    executor: str


class ScalingOut(BaseModel):
    pending: dict[str, int]
    waiting_jobs: int
    unplaceable: list[dict[str, Any]]
    pending_jobs: int
    running_jobs: int
    capacity: dict[str, int]
    free: dict[str, int]
    idle_nodes: list[str]
    drainable_nodes: list[str]


def _queues(ctx: PlatformContext, principal: Principal) -> dict[str, Any]:
    manager = ctx.manager
    views = manager.queues_view(with_jobs=principal.is_admin)
    for v in views:
        v["mine"] = manager.may_use(principal, v["name"])
    return {"queues": views, "configured": manager.queue_config,
            "policy": manager.policy.name}


def _set_queues(ctx: PlatformContext, principal: Principal, body: QueuesIn) -> dict[str, Any]:
    if not principal.is_admin:
        raise Forbidden(f"only admins may change the queues; {principal.user!r} is not one")
    queues: list[QueueConfig] = validate_queues(body.queues, ctx.manager.known_flavors)
    ctx.manager.set_queues(queues)  # Conflict (409) if a busy queue would go
    save_queue_file(ctx.config.data_dir, queues)
    return _queues(ctx, principal)


def queues_router() -> APIRouter:
    """``/api/queues``, ``/api/nodes`` and ``/api/scaling``."""
    router = APIRouter(prefix="/api", tags=["farm"])

    @router.get("/queues", response_model=QueueList)
    def get_queues(ctx: Ctx, principal: CurrentPrincipal) -> dict[str, Any]:
        """Every queue: quotas, usage, pending and running counts (admins: job ids too)."""
        return _queues(ctx, principal)

    @router.put("/queues", response_model=QueueList,
                responses={403: {"description": "not an admin"},
                           409: {"description": "a queue with jobs would be removed"},
                           422: {"description": "invalid queues (problems by field path)"}})
    async def put_queues(body: QueuesIn, ctx: Ctx, principal: CurrentPrincipal
                         ) -> dict[str, Any]:
        """Replace the queue configuration (admins); kept across restarts."""
        return await run_in_threadpool(_set_queues, ctx, principal, body)

    @router.get("/nodes", response_model=NodeList)
    def get_nodes(ctx: Ctx, principal: CurrentPrincipal) -> dict[str, Any]:
        """The pool's nodes: flavors with capacity and free devices, CPUs, memory."""
        return {"nodes": ctx.manager.nodes_view(with_jobs=principal.is_admin),
                "executor": getattr(ctx.config, "executor", "local")}

    @router.get("/scaling", response_model=ScalingOut)
    def get_scaling(ctx: Ctx, principal: CurrentPrincipal) -> dict[str, Any]:
        """Pending demand per flavor no node has room for, and idle nodes that could go."""
        return ctx.manager.scaling_view()  # type: ignore[no-any-return]

    return router

