"""Who may read a model: ``GET``/``PUT /api/models/{name}/visibility``.

Layer: platform (HTTP wiring). The model server (:mod:`mlaas.serve.app`)
owns the rest of ``/api/models`` and knows only names; ownership and
visibility live in the platform's store (:class:`~mlaas.platform.records.ModelRecord`).
This router is the one way to change them: the owner (or an admin) sets
``private``, ``group:<name>`` (a group they belong to) or ``public``
(:func:`mlaas.platform.visibility.parse_visibility`). Both routes go through
:func:`mlaas.platform.authz.authorize`: a model the caller may not read is a
404, one they may read but do not own is a 403 on ``PUT``.

Routes (see ``docs/platform-api.md``)::

    GET /api/models/{name}/visibility       {"name", "owner", "group", "visibility"}
    PUT /api/models/{name}/visibility       body {"visibility": "group:/cms"}
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from mlaas.errors import NotFound
from mlaas.platform.authz import authorize
from mlaas.platform.deps import Ctx, CurrentPrincipal, PlatformContext
from mlaas.platform.principal import Principal
from mlaas.platform.records import ModelRecord
from mlaas.platform.visibility import format_visibility, parse_visibility

__all__ = ["models_router", "VisibilityIn", "ModelAccessOut", "model_access_out"]


class VisibilityIn(BaseModel):
    """``visibility``: ``private``, ``public`` or ``group:<name>``."""

    model_config = ConfigDict(extra="forbid")
    visibility: str


class ModelAccessOut(BaseModel):
    name: str
    owner: str
    group: str
    visibility: str


def model_access_out(record: ModelRecord) -> dict[str, Any]:
    """The public JSON form of a model's ownership (``visibility`` as users write it)."""
    return {"name": record.name, "owner": record.owner, "group": record.group,
            "visibility": format_visibility(record.visibility, record.group)}


def _record(ctx: PlatformContext, principal: Principal, name: str, action: str) -> ModelRecord:
    """The model's record if the caller may ``action`` it (404 when missing or hidden)."""
    try:
        record: ModelRecord = ctx.store.get_model(name)
    except NotFound:
        raise NotFound(f"no model named {name!r}") from None
    authorize(principal, action, record, kind="model", name=name)  # type: ignore[arg-type]
    return record


def _set(ctx: PlatformContext, principal: Principal, name: str, text: str) -> dict[str, Any]:
    _record(ctx, principal, name, "write")  # 404 / 403 before the value is even looked at
    visibility, group = parse_visibility(text, principal)
    return model_access_out(ctx.store.set_model_visibility(name, visibility, group=group))


def models_router() -> APIRouter:
    """The platform's ``/api/models/{name}/visibility`` routes."""
    router = APIRouter(prefix="/api/models", tags=["models"])

    @router.get("/{name}/visibility", response_model=ModelAccessOut)
    def get_visibility(name: str, ctx: Ctx, principal: CurrentPrincipal) -> dict[str, Any]:
        """Owner, group and visibility of a model the caller may read."""
        return model_access_out(_record(ctx, principal, name, "read"))

    @router.put("/{name}/visibility", response_model=ModelAccessOut,
                responses={403: {"description": "not the owner, or a group you are not in"},
                           422: {"description": "not private, public or group:<name>"}})
    async def set_visibility(name: str, body: VisibilityIn, ctx: Ctx,
                             principal: CurrentPrincipal) -> dict[str, Any]:
        """Share a model: ``private`` (owner and admins), ``group:<name>`` (members of a
        group the caller belongs to) or ``public`` (every signed-in user); owner or admin."""
        return await run_in_threadpool(_set, ctx, principal, name, body.visibility)

    return router
