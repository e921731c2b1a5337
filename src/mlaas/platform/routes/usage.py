"""The usage API: GPU-hours, CPU-hours, jobs, preemptions and queue waits per user and group.

Layer: platform (HTTP wiring). The numbers are
:meth:`mlaas.platform.accounting.Accounting.usage`; this module only
decides whose usage a caller may read and translates the query.

Route (see ``docs/platform-api.md``)::

    GET /api/usage      ?since=&until=&user=&group=

Who sees what:

- without ``user`` and ``group``: a user gets their own usage; an admin
  gets everybody's (per user and per group);
- ``group=G``: the whole group's usage, per user, for members of ``G`` (fair
  share is a group matter: members see how their group's hours are spent)
  and admins; anyone else gets 403;
- ``user=U``: that user's usage; only the user themselves and admins (403
  otherwise). ``user`` and ``group`` together narrow to both.

``since`` / ``until`` are ISO 8601 times (UTC when no zone is given) or
durations back from now (``30m``, ``12h``, ``7d``, ``2w``); the window is
``[since, until)``, default all time up to now.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from mlaas.errors import BadRequest, Forbidden, PlatformError
from mlaas.platform.accounting import parse_when
from mlaas.platform.deps import Ctx, CurrentPrincipal
from mlaas.platform.principal import Principal

__all__ = ["usage_router", "UsageOut", "UsageEntry", "WaitOut", "usage_scope"]

_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")
"""A user or group name: 1-255 characters, no control characters."""


class WaitOut(BaseModel):
    """Queue waits of the attempts that started in the window, in seconds."""

    count: int
    mean: float | None
    p50: float | None
    p95: float | None


class UsageEntry(BaseModel):
    """Usage of one user, one group, or the whole selection."""

    gpu_hours: dict[str, float]
    gpu_hours_total: float
    cpu_hours: float
    jobs: int
    attempts: int
    running: int
    outcomes: dict[str, int]
    preemptions: int
    wait_s: WaitOut


class UsageOut(BaseModel):
    """``GET /api/usage``: the window, the selection, the totals, and per user and group."""

    since: str | None
    until: str
    user: str | None
    group: str | None
    total: UsageEntry
    users: dict[str, UsageEntry]
    groups: dict[str, UsageEntry]


def _name(value: str | None, what: str) -> str | None:
    if value is not None and not _NAME.match(value):
        raise BadRequest(f"{what} {value!r} is not a {what} name (1-255 characters, no "
                         "control characters)")
    return value


def usage_scope(principal: Principal, user: str | None,
                group: str | None) -> tuple[str | None, str | None]:
    """The ``(user, group)`` filter the caller gets for the asked ones (see the module).

    Raises :class:`~mlaas.errors.Forbidden` naming what the caller may not read.
    """
    if principal.is_admin:
        return user, group
    if user is not None and user != principal.user:
        raise Forbidden(f"the usage of user {user!r} is readable only by that user and "
                        "admins")
    if group is not None:
        if not principal.in_group(group):
            raise Forbidden(f"the usage of group {group!r} is readable only by its members "
                            "and admins")
        return user, group
    return principal.user, None


def usage_router() -> APIRouter:
    """The ``/api/usage`` route (uses ``Ctx`` and ``CurrentPrincipal`` from deps)."""
    router = APIRouter(prefix="/api/usage", tags=["usage"])

    @router.get("", response_model=UsageOut)
    def get_usage(ctx: Ctx, principal: CurrentPrincipal,
                  since: Annotated[str | None, Query(max_length=64)] = None,
                  until: Annotated[str | None, Query(max_length=64)] = None,
                  user: Annotated[str | None, Query(max_length=255)] = None,
                  group: Annotated[str | None, Query(max_length=255)] = None
                  ) -> dict[str, Any]:
        """GPU-hours by flavor, CPU-hours, jobs, outcomes, preemptions and queue waits,
        in total and per user and group: your own, your group's, or (admins) anyone's."""
        accounting = getattr(ctx, "accounting", None)
        if accounting is None:
            raise PlatformError("this server keeps no accounting")
        who, which = usage_scope(principal, _name(user, "user"), _name(group, "group"))
        now = accounting.clock()
        try:
            start = parse_when(since, now, field="since") if since else None
            end = parse_when(until, now, field="until") if until else None
            usage: dict[str, Any] = accounting.usage(user=who, group=which, since=start,
                                                     until=end)
            return usage
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    return router
