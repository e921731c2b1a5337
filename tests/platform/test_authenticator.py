"""PlatformAuthenticator: Bearer dispatch (personal token vs OIDC), 401 challenges.

Real parts: the test OIDC issuer on 127.0.0.1 and a migrated SQLite
database for personal tokens; requests are real Starlette requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from support.oidc_issuer import OidcIssuer

from mlaas.errors import ConfigError, Unauthorized
from mlaas.platform.auth import authenticator_from_config
from mlaas.platform.auth.authenticator import PlatformAuthenticator, www_authenticate
from mlaas.platform.auth.oidc import OidcValidator
from mlaas.platform.auth.tokens import TokenStore
from mlaas.platform.config import PlatformConfig
from mlaas.platform.db import Database
from mlaas.platform.principal import Principal

AUD = "mlaas-test"
ALICE = Principal(user="sub-alice", groups=("/cms",), display_name="alice")


def request(headers: dict[str, str], peer: str = "192.0.2.10") -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "query_string": b"",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                    "client": (peer, 1234)})


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer(audience=AUD) as iss:
        iss.add_user("alice", "pw", sub="sub-alice", wlcg_groups=["/cms", "/ops"])
        yield iss


@pytest.fixture
def tokens(sqlite_url: str) -> Iterator[TokenStore]:
    db = Database(sqlite_url)
    db.migrate()
    yield TokenStore(db)
    db.dispose()


@pytest.fixture
def auth(issuer: OidcIssuer, tokens: TokenStore) -> Iterator[PlatformAuthenticator]:
    validator = OidcValidator([issuer.url], AUD)
    yield PlatformAuthenticator(validator=validator, tokens=tokens, trusted_proxies=[],
                                admin_group="/ops")
    validator.close()


def _challenge(exc: Unauthorized) -> str:
    return exc.headers["WWW-Authenticate"]  # type: ignore[attr-defined, no-any-return]


def test_oidc_bearer(issuer: OidcIssuer, auth: PlatformAuthenticator) -> None:
    token = issuer.password_token("alice", "pw")
    req = request({"Authorization": f"Bearer {token}"})
    principal = auth.authenticate(req)
    assert principal.user == "sub-alice" and principal.is_admin
    assert principal.groups == ("/cms", "/ops") and principal.scopes is None
    assert req.state.access_token == token


def test_scheme_is_case_insensitive(issuer: OidcIssuer, auth: PlatformAuthenticator) -> None:
    token = issuer.password_token("alice", "pw")
    assert auth.authenticate(request({"Authorization": f"bearer {token}"})).user == "sub-alice"


def test_personal_token_bearer(auth: PlatformAuthenticator, tokens: TokenStore,
                               issuer: OidcIssuer) -> None:
    new = tokens.create(ALICE, name="ci", scopes=["predict"])
    req = request({"Authorization": f"Bearer {new.secret}"})
    principal = auth.authenticate(req)
    assert principal.user == "sub-alice" and principal.scopes == frozenset({"predict"})
    assert not hasattr(req.state, "access_token")  # an mlaas_ token is never passed to jobs
    assert issuer.hits["/jwks"] == 0  # never sent to the OIDC validator


def test_revoked_personal_token(auth: PlatformAuthenticator, tokens: TokenStore) -> None:
    new = tokens.create(ALICE, name="ci", scopes=["read"])
    tokens.revoke(ALICE, new.info.id)
    with pytest.raises(Unauthorized, match="unknown or revoked") as info:
        auth.authenticate(request({"Authorization": f"Bearer {new.secret}"}))
    assert _challenge(info.value) == 'Bearer realm="mlaas", error="invalid_token"'
    assert new.secret not in str(info.value)


def test_no_credentials(auth: PlatformAuthenticator) -> None:
    with pytest.raises(Unauthorized, match="no credentials") as info:
        auth.authenticate(request({}))
    assert _challenge(info.value) == 'Bearer realm="mlaas"'


@pytest.mark.parametrize("headers, match, invalid_token", [
    ({"Authorization": "Basic YWxpY2U6cHc="}, "scheme 'Basic' is not supported", False),
    ({"Authorization": "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"}, "malformed", False),
    ({"Authorization": "mlaas_" + "b" * 43}, "malformed", False),
    ({"Authorization": "Bearer"}, "empty bearer token", True),
    ({"Authorization": "Bearer    "}, "empty bearer token", True),
    ({"Authorization": "Bearer not-a-jwt"}, "not a well-formed JWT", True),
    ({"Authorization": "Bearer mlaas_nope"}, "malformed", True),
])
def test_bad_authorization_headers(auth: PlatformAuthenticator, headers: dict[str, str],
                                   match: str, invalid_token: bool) -> None:
    with pytest.raises(Unauthorized, match=match) as info:
        auth.authenticate(request(headers))
    assert ('error="invalid_token"' in _challenge(info.value)) is invalid_token
    credentials = headers["Authorization"].split()[-1]
    assert len(credentials) < 7 or credentials[:8] not in str(info.value)


def test_expired_oidc_token_challenge(issuer: OidcIssuer, auth: PlatformAuthenticator) -> None:
    issuer.add_user("old", "pw", lifetime_s=-3600)
    token = issuer.password_token("old", "pw")
    with pytest.raises(Unauthorized, match="expired") as info:
        auth.authenticate(request({"Authorization": f"Bearer {token}"}))
    assert _challenge(info.value) == www_authenticate("invalid_token")
    assert token not in str(info.value)


def test_disabled_modes(issuer: OidcIssuer) -> None:
    auth = PlatformAuthenticator(validator=None, tokens=None, trusted_proxies=[],
                                 admin_group=None)
    jwt_token = issuer.password_token("alice", "pw")
    with pytest.raises(Unauthorized, match="OIDC bearer tokens are not enabled"):
        auth.authenticate(request({"Authorization": f"Bearer {jwt_token}"}))
    with pytest.raises(Unauthorized, match="personal API tokens are not enabled"):
        auth.authenticate(request({"Authorization": "Bearer mlaas_" + "a" * 43}))


# ------------------------------------------------------------ from the config


def test_authenticator_from_config(tmp_path: Path, issuer: OidcIssuer) -> None:
    config = PlatformConfig(data_dir=tmp_path, auth={
        "oidc_issuers": [issuer.url], "audience": AUD, "admin_group": "/ops",
        "trusted_proxies": ["10.1.0.0/16"]})
    db = Database(config.database_url)
    db.migrate()
    db.dispose()
    auth = authenticator_from_config(config)
    try:
        _check_configured(auth, issuer)
    finally:
        auth.close()


def _check_configured(auth: PlatformAuthenticator, issuer: OidcIssuer) -> None:
    assert auth.validator is not None and auth.validator.issuers == [issuer.url]
    assert auth.tokens is not None and auth.admin_group == "/ops"
    token = issuer.password_token("alice", "pw")
    assert auth.authenticate(request({"Authorization": f"Bearer {token}"})).is_admin
    new = auth.tokens.create(ALICE, name="ci", scopes=["read"])
    assert auth.authenticate(request({"Authorization": f"Bearer {new.secret}"})).user == \
        "sub-alice"


@pytest.mark.parametrize("settings, field", [
    ({"oidc_issuers": ["https://iam.example/"]}, "auth.audience"),
    ({"audience": "x", "trusted_proxies": ["10.1.0.0/16"]}, "auth.oidc_issuers"),
    ({"oidc_issuers": ["http://iam.example/"], "audience": "x"}, "auth.oidc_issuers"),
    ({"trusted_proxies": ["10.0.0.1/8"]}, "auth.trusted_proxies"),
])
def test_bad_auth_config(tmp_path: Path, settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        authenticator_from_config(PlatformConfig(data_dir=tmp_path, auth=settings))
    assert info.value.field_path == field
