"""FastAPI dependencies of the platform API: the context and the caller.

Layer: platform (HTTP wiring). Routes never reach for globals: the app's
lifespan puts one :class:`PlatformContext` on ``app.state.platform`` and one
:class:`Authenticator` on ``app.state.authenticator``; routes take them
through the ``Annotated`` aliases below (``Ctx``, ``CurrentPrincipal``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from mlaas.platform.auth.policy import RoutePolicy
from mlaas.platform.principal import LOCAL_USER, Principal

__all__ = ["PlatformContext", "Authenticator", "SingleUser", "Ctx", "CurrentPrincipal",
           "get_context", "get_principal"]


@dataclass
class PlatformContext:
    """Everything a route may use; built once by the app's lifespan."""

    store: Any      # mlaas.platform.records.Store
    storage: Any    # mlaas.platform.storage.Storage
    manager: Any    # mlaas.platform.manager.JobManager
    registry: Any   # mlaas.serve.registry.Registry
    config: Any     # mlaas.platform.config.PlatformConfig
    accounting: Any = None  # mlaas.platform.accounting.Accounting (on the same database)


class Authenticator(Protocol):
    """Turns a request into a Principal, or raises :class:`mlaas.errors.Unauthorized`."""

    def authenticate(self, request: Request) -> Principal: ...


class SingleUser:
    """The embedded default: every request is the local user (who is admin)."""

    def authenticate(self, request: Request) -> Principal:
        return LOCAL_USER


_SCOPES_ONLY = RoutePolicy()


def get_context(request: Request) -> PlatformContext:
    return request.app.state.platform  # type: ignore[no-any-return]


def get_principal(request: Request) -> Principal:
    """The caller, resolved once per request and cached on ``request.state``.

    Also the one place where the route's demands on the caller are checked
    (``app.state.route_policy``: a personal token's scope, the rate limits).
    """
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    principal = request.app.state.authenticator.authenticate(request)
    # token scopes and rate limits (mlaas.platform.auth.policy); an app without a
    # policy of its own (a bare router in a test app) still gets the scopes checked
    policy = getattr(request.app.state, "route_policy", None) or _SCOPES_ONLY
    policy.admit(request, principal)
    request.state.principal = principal
    return principal


Ctx = Annotated[PlatformContext, Depends(get_context)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]
