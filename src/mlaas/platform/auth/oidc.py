"""OIDC bearer tokens: validate a JWT from a configured issuer, map its claims.

Layer: platform (authentication). This module only turns a token string into
verified claims and claims into a :class:`~mlaas.platform.principal.Principal`;
it never decides what the principal may do (that is
:mod:`mlaas.platform.authz`).

Validation order, chosen so an attacker controls as little as possible:

1. parse the header and the *unverified* payload; reject an algorithm that
   is not on the allow-list (``none`` and every HMAC algorithm can never be,
   so a token "signed" with the issuer's public key as an HMAC secret fails);
2. the unverified ``iss`` must be one of the configured issuers, checked
   before any network access: an unknown issuer from an unverified token is
   never fetched (no server-side request forgery through ``iss``);
3. keys come from the issuer's discovery document (``jwks_uri``), cached per
   issuer; an unknown ``kid`` refetches the JWKS (key rotation), at most
   once per ``min_refetch_interval_s`` per issuer, so a flood of made-up
   kids cannot hammer the identity provider;
4. PyJWT verifies the signature with that one key and algorithm, then
   ``iss``, ``aud``, ``exp``, ``nbf`` and ``iat`` with ``leeway_s``.

Every failure is :class:`mlaas.errors.Unauthorized`; messages name the
failed check and the issuer, never the token.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

from mlaas.errors import ConfigError, Unauthorized
from mlaas.platform.principal import ADMIN_ROLE, Principal

__all__ = ["OidcValidator", "claims_to_principal", "user_id", "DEFAULT_ALGORITHMS",
           "SUPPORTED_ALGORITHMS"]

DEFAULT_ALGORITHMS = ("RS256", "ES256")
SUPPORTED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                                  "PS256", "PS384", "PS512", "EdDSA"})
"""Asymmetric algorithms only: a symmetric one would need a shared secret."""

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass
class _IssuerKeys:
    jwks_uri: str | None = None
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # kid -> JWK
    fetched_at: float | None = None  # clock() of the last JWKS fetch attempt
    last_error: str | None = None    # why that attempt failed, if it did
    lock: threading.Lock = field(default_factory=threading.Lock)


class OidcValidator:
    """Validates bearer JWTs from a fixed set of issuers for one audience.

    Args:
        issuers (list of str): issuer URLs exactly as they appear in ``iss``
            (``https://iam.cloud.infn.it/``); ``https`` is required except
            for loopback hosts (tests, a local IdP).
        audience (str): the value ``aud`` must be (or contain).
        algorithms (tuple of str): allow-list; asymmetric algorithms only.
        leeway_s (float): clock skew tolerated on ``exp``, ``nbf``, ``iat``.
        http (httpx.Client or None): used for discovery and JWKS; one with a
            10 s timeout is made when not given (and closed by :meth:`close`).
        min_refetch_interval_s (float): an issuer's JWKS is fetched at most
            once per this interval, however many unknown ``kid`` s arrive.
        jwks_max_age_s (float): a JWKS older than this is refetched on the
            next token even if its kid is known, so retired keys disappear.
        clock (callable): monotonic seconds; tests pass a fake clock.
    """

    def __init__(self, issuers: list[str], audience: str, *,
                 algorithms: Iterable[str] = DEFAULT_ALGORITHMS, leeway_s: float = 30,
                 http: httpx.Client | None = None, min_refetch_interval_s: float = 30.0,
                 jwks_max_age_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not issuers:
            raise ConfigError("OIDC needs at least one issuer", field_path="auth.oidc_issuers")
        for url in issuers:
            _check_issuer_url(url)
        if len(set(issuers)) != len(issuers):
            raise ConfigError(f"OIDC issuer listed twice in {issuers!r}",
                              field_path="auth.oidc_issuers")
        if not audience:
            raise ConfigError("OIDC needs an audience (the value tokens' 'aud' must carry)",
                              field_path="auth.audience")
        algs = tuple(algorithms)
        bad = [a for a in algs if a not in SUPPORTED_ALGORITHMS]
        if bad or not algs:
            raise ConfigError(f"OIDC algorithms {bad or algs!r} not allowed; use asymmetric "
                              f"ones from {sorted(SUPPORTED_ALGORITHMS)}",
                              field_path="auth.algorithms")
        self.issuers = list(issuers)
        self.audience = audience
        self.algorithms = algs
        self.leeway_s = leeway_s
        self.min_refetch_interval_s = min_refetch_interval_s
        self.jwks_max_age_s = jwks_max_age_s
        self._clock = clock
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=10.0, follow_redirects=False)
        self._state = {url: _IssuerKeys() for url in self.issuers}

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    @property
    def namespaced(self) -> bool:
        """True when user ids carry their issuer (more than one issuer configured)."""
        return len(self.issuers) > 1

    # ------------------------------------------------------------ validate
    def validate(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``; raises Unauthorized on any failure."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"bearer token is not a well-formed JWT ({_reason(exc)})"
                               ) from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthorized(f"token algorithm {alg!r} is not allowed; accepted: "
                               f"{list(self.algorithms)}")
        iss = unverified.get("iss")
        if not isinstance(iss, str) or iss not in self._state:
            raise Unauthorized(f"token issuer {_short(iss)!r} is not one of the configured "
                               f"issuers {self.issuers}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized(f"token header 'kid' is not a string (issuer {iss})")
        jwk = self._key_for(iss, kid)
        if jwk.get("alg") not in (None, alg):
            raise Unauthorized(f"token algorithm {alg!r} does not match key {kid!r} "
                               f"({jwk.get('alg')!r}) of issuer {iss}")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"key {kid!r} of issuer {iss} cannot verify {alg} tokens "
                               f"({_reason(exc)})") from None
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[alg], audience=self.audience, issuer=iss,
                leeway=self.leeway_s,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized(f"token expired (issuer {iss})") from None
        except jwt.ImmatureSignatureError as exc:
            raise Unauthorized(f"token not yet valid: {_reason(exc)} (issuer {iss})") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"token audience is not {self.audience!r} (issuer {iss})"
                               ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the {exc.claim!r} claim (issuer {iss})") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized(f"token signature does not verify with key {kid!r} of "
                               f"issuer {iss}") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token rejected: {_reason(exc)} (issuer {iss})") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise Unauthorized(f"token 'sub' claim is empty or not a string (issuer {iss})")
        return claims

    def principal(self, token: str, admin_group: str | None = None) -> Principal:
        """Validate ``token`` and map its claims (see :func:`claims_to_principal`)."""
        return claims_to_principal(self.validate(token), admin_group,
                                   namespaced=self.namespaced)

    # ---------------------------------------------------------------- keys
    def _key_for(self, iss: str, kid: str | None) -> dict[str, Any]:
        state = self._state[iss]
        with state.lock:
            now = self._clock()
            stale = (state.fetched_at is None
                     or now - state.fetched_at >= self.jwks_max_age_s)
            if stale or (_pick(state.keys, kid) is None and self._may_refetch(state, now)):
                state.fetched_at = now  # counts even on failure: a dead IdP is not hammered
                try:
                    self._refresh(iss, state)
                    state.last_error = None
                except Unauthorized as exc:
                    state.last_error = exc.message
                    raise
            jwk = _pick(state.keys, kid)
            last_error = state.last_error
        if jwk is None and last_error is not None:
            raise Unauthorized(f"keys of issuer {iss} are unavailable (last fetch failed: "
                               f"{last_error})")
        if jwk is None:
            raise Unauthorized(f"token key id {_short(kid)!r} is not among the keys of "
                               f"issuer {iss}" if kid is not None else
                               f"token has no key id and issuer {iss} has several keys")
        return jwk

    def _may_refetch(self, state: _IssuerKeys, now: float) -> bool:
        return state.fetched_at is None or now - state.fetched_at >= self.min_refetch_interval_s

    def _refresh(self, iss: str, state: _IssuerKeys) -> None:
        if state.jwks_uri is None:
            doc = self._get_json(f"{iss.rstrip('/')}/.well-known/openid-configuration", iss)
            if doc.get("issuer") != iss:
                raise Unauthorized(f"discovery document of {iss} names issuer "
                                   f"{_short(doc.get('issuer'))!r}, not itself")
            uri = doc.get("jwks_uri")
            if not isinstance(uri, str):
                raise Unauthorized(f"discovery document of {iss} has no jwks_uri")
            _check_issuer_url(uri, what="jwks_uri")
            state.jwks_uri = uri
        jwks = self._get_json(state.jwks_uri, iss)
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise Unauthorized(f"JWKS of issuer {iss} at {state.jwks_uri} has no 'keys' list")
        state.keys = {str(k.get("kid", "")): k for k in keys
                      if isinstance(k, dict) and k.get("use", "sig") == "sig"}

    def _get_json(self, url: str, iss: str) -> dict[str, Any]:
        try:
            response = self._http.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unauthorized(f"cannot fetch {url} for issuer {iss}: "
                               f"{type(exc).__name__}: {exc}") from None
        if not isinstance(body, dict):
            raise Unauthorized(f"{url} for issuer {iss} is not a JSON object")
        return body


def user_id(issuer: str, sub: str, *, namespaced: bool) -> str:
    """The platform user id for ``sub`` from ``issuer``.

    With one issuer it is ``sub`` itself. With several, two identity
    providers could hand out the same ``sub`` to different people, so the id
    becomes ``sub@<issuer without scheme and trailing slash>``
    (``8f3c...@iam.cloud.infn.it``, ``42@idp.example/realms/cms``). The part
    after the last ``@`` is always the issuer (issuer URLs carry no ``@``),
    so the mapping cannot collide.
    """
    if not namespaced:
        return sub
    parts = urllib.parse.urlsplit(issuer)
    return f"{sub}@{parts.netloc}{parts.path.rstrip('/')}"


def claims_to_principal(claims: Mapping[str, Any], admin_group: str | None = None, *,
                        namespaced: bool = False) -> Principal:
    """Map verified token claims to a Principal.

    Args:
        claims (mapping): claims of a validated token.
        admin_group (str or None): members of this group get the admin role.
        namespaced (bool): make the user id ``sub@issuer`` (see :func:`user_id`);
            :meth:`OidcValidator.principal` sets it when several issuers are configured.

    ``user`` is ``sub``; ``display_name`` is ``preferred_username`` (else
    ``sub``); groups come from ``wlcg.groups`` (WLCG profile: ``/cms``,
    ``/cms/higgs``; a list or one space-separated string), else ``groups``,
    in the token's order, duplicates dropped. A login carries every scope
    (``scopes=None``).
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("token 'sub' claim is empty or not a string")
    iss = claims.get("iss")
    if namespaced and not isinstance(iss, str):
        raise Unauthorized("token has no 'iss' claim to namespace its user")
    raw = claims.get("wlcg.groups")
    if raw is None:
        raw = claims.get("groups")
    groups = parse_groups(raw, sep=None)
    display = claims.get("preferred_username")
    roles = frozenset({ADMIN_ROLE}) if admin_group and admin_group in groups else frozenset()
    return Principal(user=user_id(str(iss), sub, namespaced=namespaced), groups=groups,
                     roles=roles,
                     display_name=display if isinstance(display, str) and display else sub)


def parse_groups(raw: Any, *, sep: str | None) -> tuple[str, ...]:
    """Group names from a claim or header: a list, or a string split on ``sep``.

    Non-string entries and empty names are dropped; order is kept, duplicates
    removed.
    """
    if isinstance(raw, str):
        items: list[Any] = raw.split(sep)
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        return ()
    seen: dict[str, None] = {}
    for item in items:
        if isinstance(item, str) and item.strip():
            seen.setdefault(item.strip(), None)
    return tuple(seen)


def _pick(keys: dict[str, dict[str, Any]], kid: str | None) -> dict[str, Any] | None:
    if kid is not None:
        return keys.get(kid)
    return next(iter(keys.values())) if len(keys) == 1 else None


def _check_issuer_url(url: str, *, what: str = "issuer") -> None:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host or "@" in parts.netloc:
        raise ConfigError(f"OIDC {what} {url!r} is not an http(s) URL without user info",
                          field_path="auth.oidc_issuers")
    if parts.scheme == "http" and host not in _LOOPBACK_HOSTS:
        raise ConfigError(f"OIDC {what} {url!r} must use https (plain http is only "
                          f"accepted on a loopback address)", field_path="auth.oidc_issuers")


def _short(value: Any, limit: int = 80) -> Any:
    """Attacker-chosen values are quoted in messages, but never at length."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def _reason(exc: Exception) -> str:
    return _short(str(exc) or type(exc).__name__, 120)  # type: ignore[no-any-return]
