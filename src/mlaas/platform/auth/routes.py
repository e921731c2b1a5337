"""The personal API token routes: ``/api/tokens`` (create, list, revoke).

Layer: platform (HTTP wiring for :mod:`mlaas.platform.auth.tokens`).
:func:`mlaas.platform.app.create_platform_app` adds these routes; the store
is the authenticator's (``app.state.authenticator.tokens``, attached on the
platform database while the app's lifespan runs), so tokens are created in
the same table they are verified from. Scopes a personal token needs here
(``read`` to list, ``submit`` to revoke) are in :mod:`mlaas.platform.auth.policy`. In single-user mode there is no
token store and these routes answer 409 (:class:`~mlaas.errors.Conflict`):
every request is already the local user.

- ``POST /api/tokens`` ``{"name", "scopes": [...], "expires_in_days"}`` ->
  201 with the secret in ``token``, shown this once (``Cache-Control:
  no-store``); only a login, not another token, may create one (403).
- ``GET /api/tokens`` -> the caller's tokens, never their secrets.
- ``DELETE /api/tokens/{token_id}`` -> revoked; another user's id is 404.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mlaas.errors import Conflict, SpecError
from mlaas.platform.auth.tokens import TokenInfo, TokenStore
from mlaas.platform.deps import CurrentPrincipal

__all__ = ["tokens_router", "TokenCreate", "TokenOut", "NewTokenOut", "TokenList", "Revoked"]


class TokenCreate(BaseModel):
    """What a new token may do and for how long."""

    name: str = Field(description="A label for the owner (``ci``, ``laptop``).")
    scopes: list[str] = Field(description="A non-empty subset of read, submit, predict.")
    expires_in_days: float | None = Field(default=None, description=(
        "Lifetime in days; default 30, at most 365."))


class TokenOut(BaseModel):
    """A token as its owner sees it: everything but the secret."""

    id: str
    name: str
    owner: str
    scopes: list[str]
    groups: list[str]
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None

    @classmethod
    def of(cls, info: TokenInfo) -> TokenOut:
        return cls(id=info.id, name=info.name, owner=info.owner, scopes=list(info.scopes),
                   groups=list(info.groups), created_at=info.created_at,
                   expires_at=info.expires_at, last_used_at=info.last_used_at)


class NewTokenOut(TokenOut):
    """A token just created; ``token`` is the secret, shown this once."""

    token: str


class TokenList(BaseModel):
    tokens: list[TokenOut]


class Revoked(BaseModel):
    revoked: str


def _store(request: Request) -> TokenStore:
    tokens = getattr(request.app.state.authenticator, "tokens", None)
    if tokens is None:
        raise Conflict("personal API tokens need a multi-user server (--oidc-issuer or "
                       "--trust-proxy-from); in single-user mode every request is the local "
                       "user already")
    return tokens  # type: ignore[no-any-return]


def tokens_router() -> APIRouter:
    """The ``/api/tokens`` routes (they need ``CurrentPrincipal`` and the app's authenticator)."""
    router = APIRouter(prefix="/api/tokens", tags=["tokens"])

    @router.post("", status_code=201, response_model=NewTokenOut)
    async def create_token(body: TokenCreate, request: Request, response: Response,
                           principal: CurrentPrincipal) -> NewTokenOut:
        """Create a personal API token; the answer is the only time its secret is shown."""
        store = _store(request)
        expires_in = None
        if body.expires_in_days is not None:
            if not body.expires_in_days > 0 or body.expires_in_days > 3650:
                raise SpecError(f"token lifetime {body.expires_in_days!r} days is not allowed",
                                [("expires_in_days", "give a positive number of days")])
            expires_in = timedelta(days=body.expires_in_days)
        new = await run_in_threadpool(lambda: store.create(
            principal, name=body.name, scopes=body.scopes, expires_in=expires_in))
        response.headers["Cache-Control"] = "no-store"
        return NewTokenOut(token=new.secret, **TokenOut.of(new.info).model_dump())

    @router.get("", response_model=TokenList)
    def list_tokens(request: Request, principal: CurrentPrincipal) -> TokenList:
        """The caller's own tokens, newest first (expired ones until revoked)."""
        return TokenList(tokens=[TokenOut.of(t) for t in _store(request).list_tokens(principal)])

    @router.delete("/{token_id}", response_model=Revoked)
    def revoke_token(token_id: str, request: Request, principal: CurrentPrincipal) -> Revoked:
        """Revoke one of the caller's tokens (admins: anyone's); others' ids answer 404."""
        return Revoked(revoked=_store(request).revoke(principal, token_id).id)

    return router
