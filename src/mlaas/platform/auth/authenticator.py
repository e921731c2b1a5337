"""The multi-user authenticator: a request's credentials to a Principal.

Layer: platform (authentication, HTTP side). Implements
:class:`mlaas.platform.deps.Authenticator`; the app puts one on
``app.state.authenticator`` (single-user mode keeps
:class:`mlaas.platform.deps.SingleUser`). Precedence:

1. ``Authorization: Bearer mlaas_...``: a personal API token;
2. ``Authorization: Bearer <JWT>``: an OIDC access token;
3. from a peer inside ``--trust-proxy-from`` only: ``X-Forwarded-Access-Token``
   (validated like 2), else ``X-Forwarded-User`` / ``X-Forwarded-Groups``;
4. nothing: :class:`~mlaas.errors.Unauthorized`.

Every :class:`Unauthorized` raised here carries ``headers`` with the
RFC 6750 challenge (``WWW-Authenticate: Bearer realm="mlaas"``, plus
``error="invalid_token"`` when a token was presented); the app's handler
for Unauthorized copies ``exc.headers`` into the 401 response.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request

from mlaas.errors import Unauthorized
from mlaas.platform.auth.oidc import OidcValidator
from mlaas.platform.auth.proxy import TrustedProxies
from mlaas.platform.auth.tokens import TokenStore, is_personal_token
from mlaas.platform.principal import Principal

__all__ = ["PlatformAuthenticator", "REALM", "challenge", "www_authenticate"]

REALM = "mlaas"


def www_authenticate(error: str | None = None) -> str:
    """The ``WWW-Authenticate`` value: ``Bearer realm="mlaas"[, error="..."]``."""
    value = f'Bearer realm="{REALM}"'
    return value + f', error="{error}"' if error else value


def challenge(message: str, *, token_given: bool) -> Unauthorized:
    """An Unauthorized whose ``headers`` carry the bearer challenge for the 401."""
    exc = Unauthorized(message)
    exc.headers = {  # type: ignore[attr-defined]
        "WWW-Authenticate": www_authenticate("invalid_token" if token_given else None)}
    return exc


class PlatformAuthenticator:
    """OIDC bearer tokens, personal API tokens and a trusted proxy, in that order.

    Args:
        validator (OidcValidator or None): None disables OIDC bearer tokens.
        tokens (TokenStore or None): None disables personal API tokens.
        trusted_proxies (list of str): CIDRs whose peers may set
            ``X-Forwarded-*`` identity headers; empty trusts nobody.
        admin_group (str or None): members get the admin role (OIDC and proxy
            logins; personal tokens never carry it).
    """

    def __init__(self, *, validator: OidcValidator | None, tokens: TokenStore | None,
                 trusted_proxies: list[str], admin_group: str | None) -> None:
        self.validator = validator
        self.tokens = tokens
        self.proxies = TrustedProxies(trusted_proxies)
        self.admin_group = admin_group

    def close(self) -> None:
        """Close the validator's HTTP client and the token store's connections (at shutdown)."""
        if self.validator is not None:
            self.validator.close()
        if self.tokens is not None:
            self.tokens.db.dispose()

    def __repr__(self) -> str:
        return (f"PlatformAuthenticator(oidc={self.validator.issuers if self.validator else None}"
                f", tokens={self.tokens is not None}, proxies={self.proxies!r}, "
                f"admin_group={self.admin_group!r})")

    def authenticate(self, request: Request) -> Principal:
        """The caller of ``request``; raises Unauthorized (with ``headers``) otherwise."""
        headers = request.headers
        authorization = headers.get("authorization")
        if authorization:
            scheme, _, credentials = authorization.strip().partition(" ")
            if scheme.lower() != "bearer":
                named = (f"authorization scheme {scheme!r} is not supported"
                         if scheme.isalpha() and len(scheme) <= 20  # never echo a bare token
                         else "the Authorization header is malformed")
                raise challenge(f"{named}; send 'Authorization: Bearer <token>'",
                                token_given=False)
            return self._bearer(request, credentials.strip())
        peer = request.client.host if request.client is not None else None
        forwarded = self.proxies.identity(peer, headers)
        if forwarded is not None:
            if forwarded.access_token:
                return self._oidc(request, forwarded.access_token)
            principal = forwarded.principal(self.admin_group)
            if principal is not None:
                return principal
        raise challenge("no credentials: send 'Authorization: Bearer <token>' (an OIDC access "
                        "token or a personal mlaas_ token)", token_given=False)

    def _bearer(self, request: Request, token: str) -> Principal:
        if not token:
            raise challenge("empty bearer token", token_given=True)
        if is_personal_token(token):
            if self.tokens is None:
                raise challenge("personal API tokens are not enabled on this server",
                                token_given=True)
            return self._checked(self.tokens.verify, token)
        return self._oidc(request, token)

    def _oidc(self, request: Request, token: str) -> Principal:
        validator = self.validator
        if validator is None:
            raise challenge("OIDC bearer tokens are not enabled on this server "
                            "(no --oidc-issuer)", token_given=True)
        principal = self._checked(lambda t: validator.principal(t, self.admin_group), token)
        request.state.access_token = token  # for job_token_env, when the server passes it on
        return principal

    @staticmethod
    def _checked(verify: Callable[[str], Principal], token: str) -> Principal:
        try:
            return verify(token)
        except Unauthorized as exc:
            raise challenge(exc.message, token_given=True) from None
