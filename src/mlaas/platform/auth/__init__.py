"""Authentication of the multi-user platform: who is asking, proven how.

Layer: platform. Each module has one job and none decides access (that is
:mod:`mlaas.platform.authz`):

- :mod:`mlaas.platform.auth.oidc`           OIDC bearer JWTs: validation, claims to Principal
- :mod:`mlaas.platform.auth.proxy`          identity headers from a trusted reverse proxy
- :mod:`mlaas.platform.auth.tokens`         personal API tokens (hashed, scoped, expiring)
- :mod:`mlaas.platform.auth.ratelimit`      per-principal token buckets
- :mod:`mlaas.platform.auth.authenticator`  the request -> Principal entry point
- :mod:`mlaas.platform.auth.jobtoken`       the user's token handed to XRootD in a job
- :mod:`mlaas.platform.auth.policy`         token scopes and rate limits per route

The one entry point here, :func:`authenticator_from_config`, is what
:func:`mlaas.platform.app.create_platform_app` calls when the ``auth``
settings ask for logins; it imports the modules above only when called, so
importing this package costs nothing (``tokens`` pulls in the SQL layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlaas.platform.auth.authenticator import PlatformAuthenticator
    from mlaas.platform.config import PlatformConfig

__all__ = ["authenticator_from_config"]


def authenticator_from_config(config: PlatformConfig, *,
                              open_tokens: bool = True) -> PlatformAuthenticator:
    """The multi-user authenticator for ``config.auth``.

    Args:
        config (PlatformConfig): ``auth.oidc_issuers`` / ``auth.audience``
            enable OIDC bearer tokens, ``auth.trusted_proxies`` the proxy
            headers, ``auth.admin_group`` the admin role. Personal API tokens
            are always on in multi-user mode; they live in the platform
            database (``config.database_url``), which must be migrated.
        open_tokens (bool): open that database for the token store now (its
            own engine, disposed by ``close()``). False leaves ``tokens`` None
            for the caller to attach a :class:`TokenStore` on a database it
            opens later: :func:`mlaas.platform.app.create_platform_app` does so
            in its lifespan, on the platform's own database, and detaches it
            when the lifespan ends.

    Raises :class:`mlaas.errors.ConfigError` for issuers without an audience,
    a non-https issuer, or a malformed CIDR.
    """
    from mlaas.errors import ConfigError
    from mlaas.platform.auth.authenticator import PlatformAuthenticator
    from mlaas.platform.auth.oidc import OidcValidator
    from mlaas.platform.auth.proxy import TrustedProxies
    from mlaas.platform.auth.tokens import TokenStore
    from mlaas.platform.db import Database

    auth = config.auth
    TrustedProxies(auth.trusted_proxies)  # every setting is checked before anything opens
    if auth.oidc_issuers and not auth.audience:
        raise ConfigError("OIDC issuers are configured but no audience: set "
                          "--oidc-audience (auth.audience)", field_path="auth.audience")
    if auth.audience and not auth.oidc_issuers:
        raise ConfigError("auth.audience is set but no OIDC issuer: add --oidc-issuer",
                          field_path="auth.oidc_issuers")
    validator = None
    if auth.oidc_issuers and auth.audience:
        validator = OidcValidator(list(auth.oidc_issuers), auth.audience)
    return PlatformAuthenticator(validator=validator,
                                 tokens=TokenStore(Database(config.database_url))
                                 if open_tokens else None,
                                 trusted_proxies=list(auth.trusted_proxies),
                                 admin_group=auth.admin_group)
