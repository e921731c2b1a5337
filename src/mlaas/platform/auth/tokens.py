"""Personal API tokens: long-lived bearer secrets for scripts and CI.

Layer: platform (authentication, persistence of its own table). A token is
``mlaas_`` followed by 43 URL-safe characters (32 random bytes from
:mod:`secrets`); it is shown once, when created, and only its SHA-256 hash
is stored.

Why a fast hash and not bcrypt/argon2: slow password hashes exist to make
guessing *low-entropy* secrets expensive after a database leak. A token
carries 256 random bits, so guessing is hopeless at any hash speed, and
SHA-256 lets :meth:`TokenStore.verify` find the row by an indexed equality
lookup on every request instead of spending ~100 ms of CPU per call. The
lookup by hash also means no secret is ever compared byte by byte.

A token stands for its owner with a snapshot of their groups at creation
time and a subset of :data:`~mlaas.platform.principal.SCOPES`; it never
carries the admin role (admins manage the platform from a login), and only
a full login (not another token) may create one.

The table is declared on the store's :data:`mlaas.platform.db.Base`; its
schema comes from the migration ``0002_api_tokens``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from mlaas.errors import Forbidden, NotFound, QuotaExceeded, SpecError, Unauthorized
from mlaas.platform.db import Base, Database, UTCDateTime, utcnow
from mlaas.platform.principal import SCOPES, Principal

__all__ = ["TokenStore", "TokenInfo", "NewToken", "ApiTokenRow", "TOKEN_PREFIX",
           "hash_token", "is_personal_token"]

TOKEN_PREFIX = "mlaas_"
_SECRET_BYTES = 32
_NAME_RE = re.compile(r"^[\w .:@/+-]{1,100}$")
_TOKEN_RE = re.compile(r"^mlaas_[A-Za-z0-9_-]{43}$")
_LAST_USED_EVERY = timedelta(minutes=5)  # at most one write per token per 5 min of use


class ApiTokenRow(Base):
    """One personal API token (the secret's hash, never the secret)."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    owner: Mapped[str] = mapped_column(sa.String(255))
    display_name: Mapped[str] = mapped_column(sa.String(255))
    groups: Mapped[list[str]] = mapped_column(sa.JSON)
    scopes: Mapped[list[str]] = mapped_column(sa.JSON)
    name: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (sa.Index("ix_api_tokens_owner", "owner"),)


@dataclass(frozen=True)
class TokenInfo:
    """What the owner may see about a token: everything but the secret."""

    id: str
    name: str
    owner: str
    scopes: tuple[str, ...]
    groups: tuple[str, ...]
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "owner": self.owner,
                "scopes": list(self.scopes), "groups": list(self.groups),
                "created_at": self.created_at.isoformat(),
                "expires_at": self.expires_at.isoformat(),
                "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None}


@dataclass(frozen=True)
class NewToken:
    """A token just created: ``secret`` is shown to the user once and never again."""

    secret: str
    info: TokenInfo

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"NewToken(secret='mlaas_...', info={self.info!r})"


def hash_token(secret: str) -> str:
    """Hex SHA-256 of the whole token string (prefix included)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def is_personal_token(secret: str) -> bool:
    """True if ``secret`` looks like one of ours (the ``mlaas_`` prefix)."""
    return secret.startswith(TOKEN_PREFIX)


class TokenStore:
    """Create, list, revoke and verify personal API tokens in the platform database.

    Args:
        db (Database): the platform database, already migrated.
        clock (callable): timezone-aware "now"; tests pass a fake clock.
        default_lifetime (timedelta): expiry when the caller gives none.
        max_lifetime (timedelta): the longest expiry a user may ask for.
        max_per_user (int): tokens one user may hold (expired ones included
            until revoked).
    """

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = utcnow,
                 default_lifetime: timedelta = timedelta(days=30),
                 max_lifetime: timedelta = timedelta(days=365),
                 max_per_user: int = 50) -> None:
        self.db = db
        self._clock = clock
        self.default_lifetime = default_lifetime
        self.max_lifetime = max_lifetime
        self.max_per_user = max_per_user

    # ------------------------------------------------------------- create
    def create(self, principal: Principal, *, name: str, scopes: Iterable[str],
               expires_in: timedelta | None = None) -> NewToken:
        """A new token for ``principal`` (a full login), valid for ``expires_in``.

        Raises:
            Forbidden: ``principal`` is itself a personal token.
            SpecError: bad ``name``, ``scopes`` or ``expires_in`` (field named).
            QuotaExceeded: the user already holds ``max_per_user`` tokens.
        """
        if principal.scopes is not None:
            raise Forbidden("a personal API token cannot create tokens; log in (OIDC) to "
                            "create one")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise SpecError(f"token name {name!r} is not valid",
                            [("name", "use 1-100 letters, digits, spaces or ._:@/+-")],
                            field_path="name")
        wanted = sorted(set(scopes))
        unknown = [s for s in wanted if s not in SCOPES]
        if unknown or not wanted:
            raise SpecError(f"token scopes {unknown or wanted!r} are not allowed",
                            [("scopes", f"choose one or more of {sorted(SCOPES)}")],
                            field_path="scopes")
        lifetime = self.default_lifetime if expires_in is None else expires_in
        if lifetime <= timedelta(0) or lifetime > self.max_lifetime:
            raise SpecError(f"token lifetime {lifetime} is not allowed",
                            [("expires_in", f"must be positive and at most {self.max_lifetime}")],
                            field_path="expires_in")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        now = self._clock()
        row = ApiTokenRow(id=secrets.token_hex(8), token_hash=hash_token(secret),
                          owner=principal.user,
                          display_name=principal.display_name or principal.user,
                          groups=list(principal.groups), scopes=wanted, name=name,
                          created_at=now, expires_at=now + lifetime, last_used_at=None)
        with self.db.write() as session:
            held = session.scalar(sa.select(sa.func.count()).select_from(ApiTokenRow)
                                  .where(ApiTokenRow.owner == principal.user))
            if held is not None and held >= self.max_per_user:
                raise QuotaExceeded(f"user {principal.user!r} already holds {held} API tokens "
                                    f"(limit {self.max_per_user}); revoke some first")
            session.add(row)
            session.flush()
            info = _info(row)
        return NewToken(secret=secret, info=info)

    # -------------------------------------------------------- list/revoke
    def list_tokens(self, principal: Principal) -> list[TokenInfo]:
        """The caller's own tokens, newest first (expired ones included, marked by date)."""
        with self.db.read() as session:
            rows = session.scalars(sa.select(ApiTokenRow)
                                   .where(ApiTokenRow.owner == principal.user)
                                   .order_by(ApiTokenRow.created_at.desc(),
                                             ApiTokenRow.id)).all()
            return [_info(r) for r in rows]

    def revoke(self, principal: Principal, token_id: str) -> TokenInfo:
        """Delete token ``token_id``; its owner or an admin only.

        Anyone else gets :class:`NotFound`, exactly as for an id that does not
        exist, so token ids cannot be probed.
        """
        with self.db.write() as session:
            row = session.get(ApiTokenRow, token_id) if isinstance(token_id, str) else None
            if row is None or not (row.owner == principal.user or principal.is_admin):
                raise NotFound(f"no API token with id {token_id!r}")
            info = _info(row)
            session.delete(row)
        return info

    # ------------------------------------------------------------- verify
    def verify(self, secret: str) -> Principal:
        """The Principal a presented token stands for, with its scopes.

        Raises :class:`Unauthorized` for a malformed, unknown, revoked or
        expired token; the message never contains the token.
        """
        if not _TOKEN_RE.match(secret):
            raise Unauthorized("personal API token is malformed (expected mlaas_ and 43 "
                               "URL-safe characters)")
        digest = hash_token(secret)
        now = self._clock()
        with self.db.read() as session:
            row = session.scalar(sa.select(ApiTokenRow)
                                 .where(ApiTokenRow.token_hash == digest))
            if row is None:
                raise Unauthorized("personal API token is unknown or revoked")
            if row.expires_at <= now:
                raise Unauthorized(f"personal API token {row.id!r} expired at "
                                   f"{row.expires_at.isoformat()}")
            principal = Principal(user=row.owner, groups=tuple(row.groups),
                                  roles=frozenset(), display_name=row.display_name,
                                  scopes=frozenset(row.scopes))
            stale = row.last_used_at is None or now - row.last_used_at >= _LAST_USED_EVERY
            token_id = row.id
        if stale:
            with self.db.write() as session:
                session.execute(sa.update(ApiTokenRow).where(ApiTokenRow.id == token_id)
                                .values(last_used_at=now))
        return principal


def _info(row: ApiTokenRow) -> TokenInfo:
    return TokenInfo(id=row.id, name=row.name, owner=row.owner, scopes=tuple(row.scopes),
                     groups=tuple(row.groups), created_at=row.created_at,
                     expires_at=row.expires_at, last_used_at=row.last_used_at)
