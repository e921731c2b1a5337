"""Identity headers from a reverse proxy are trusted only from --trust-proxy-from peers.

In-process tests build real Starlette requests with a chosen peer address;
the end-to-end test runs a real uvicorn server on 127.0.0.1 and sends
spoofed headers over TCP, once with 127.0.0.1 trusted and once not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from servers import free_port
from starlette.requests import Request as StarletteRequest
from support.oidc_issuer import OidcIssuer

from mlaas.errors import ConfigError, Unauthorized
from mlaas.platform.auth.authenticator import PlatformAuthenticator
from mlaas.platform.auth.oidc import OidcValidator
from mlaas.platform.auth.proxy import TrustedProxies
from mlaas.platform.deps import CurrentPrincipal

AUD = "mlaas-test"
SPOOF = {"X-Forwarded-User": "admin", "X-Forwarded-Groups": "/ops,/cms",
         "X-Forwarded-Preferred-Username": "The Admin"}


def make_request(peer: str | None, headers: dict[str, str]) -> StarletteRequest:
    scope: dict[str, Any] = {
        "type": "http", "method": "GET", "path": "/whoami", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": (peer, 40000) if peer is not None else None,
    }
    return StarletteRequest(scope)


# ------------------------------------------------------------ TrustedProxies


@pytest.mark.parametrize("cidrs, peer, trusted", [
    (["10.1.0.0/16"], "10.1.2.3", True),
    (["10.1.0.0/16"], "11.0.0.1", False),
    (["10.0.0.5"], "10.0.0.5", True),
    (["10.0.0.5"], "10.0.0.6", False),
    (["192.168.1.0/24", "127.0.0.1/32"], "127.0.0.1", True),
    (["127.0.0.1/32"], "::ffff:127.0.0.1", True),  # IPv4-mapped IPv6 peer
    (["fd00::/8"], "fd00::1", True),
    (["fd00::/8"], "fe80::1%eth0", False),
    (["10.1.0.0/16"], "testclient", False),
    (["10.1.0.0/16"], "", False),
    (["10.1.0.0/16"], None, False),
    ([], "10.1.2.3", False),
])
def test_trust_by_peer_address(cidrs: list[str], peer: str | None, trusted: bool) -> None:
    assert TrustedProxies(cidrs).trusts(peer) is trusted


@pytest.mark.parametrize("cidr", ["10.0.0.5/8", "not-an-ip", "10.1.0.0/33", "", "*"])
def test_bad_cidr_is_a_config_error(cidr: str) -> None:
    with pytest.raises(ConfigError, match="trust-proxy-from") as info:
        TrustedProxies([cidr])
    assert info.value.field_path == "auth.trusted_proxies"


def test_identity_from_trusted_peer_parses_groups() -> None:
    proxies = TrustedProxies(["10.1.0.0/16"])
    headers = make_request("10.1.0.1", {"X-Forwarded-User": " alice ",
                                        "X-Forwarded-Groups": "/cms, /cms/higgs,,/cms"}).headers
    identity = proxies.identity("10.1.0.1", headers)
    assert identity is not None
    principal = identity.principal(admin_group="/cms/higgs")
    assert principal is not None
    assert principal.user == "alice" and principal.groups == ("/cms", "/cms/higgs")
    assert principal.is_admin and principal.display_name == "alice"
    assert proxies.identity("8.8.8.8", headers) is None


# -------------------------------------------------- through the authenticator


def test_spoofed_headers_from_untrusted_peer_are_ignored() -> None:
    auth = PlatformAuthenticator(validator=None, tokens=None,
                                 trusted_proxies=["10.1.0.0/16"], admin_group="/ops")
    with pytest.raises(Unauthorized, match="no credentials") as info:
        auth.authenticate(make_request("203.0.113.7", SPOOF))
    challenge = info.value.headers  # type: ignore[attr-defined]
    assert challenge == {"WWW-Authenticate": 'Bearer realm="mlaas"'}


def test_headers_ignored_when_no_proxy_is_trusted() -> None:
    auth = PlatformAuthenticator(validator=None, tokens=None, trusted_proxies=[],
                                 admin_group="/ops")
    for peer in ("127.0.0.1", "10.1.0.1", None):
        with pytest.raises(Unauthorized):
            auth.authenticate(make_request(peer, SPOOF))


def test_trusted_proxy_user_and_groups() -> None:
    auth = PlatformAuthenticator(validator=None, tokens=None,
                                 trusted_proxies=["10.1.0.0/16"], admin_group="/ops")
    principal = auth.authenticate(make_request("10.1.9.9", SPOOF))
    assert principal.user == "admin" and principal.groups == ("/ops", "/cms")
    assert principal.is_admin and principal.display_name == "The Admin"
    assert principal.scopes is None


def test_groups_without_user_are_not_a_login() -> None:
    auth = PlatformAuthenticator(validator=None, tokens=None,
                                 trusted_proxies=["10.1.0.0/16"], admin_group="/ops")
    with pytest.raises(Unauthorized):
        auth.authenticate(make_request("10.1.0.1", {"X-Forwarded-Groups": "/ops"}))


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer(audience=AUD) as iss:
        iss.add_user("alice", "pw", sub="sub-alice", wlcg_groups=["/cms"])
        yield iss


@pytest.fixture
def validator(issuer: OidcIssuer) -> Iterator[OidcValidator]:
    v = OidcValidator([issuer.url], AUD)
    yield v
    v.close()


def test_forwarded_access_token_is_validated_and_wins(issuer: OidcIssuer,
                                                      validator: OidcValidator) -> None:
    auth = PlatformAuthenticator(validator=validator, tokens=None,
                                 trusted_proxies=["10.1.0.0/16"], admin_group=None)
    token = issuer.password_token("alice", "pw")
    request = make_request("10.1.0.1", {**SPOOF, "X-Forwarded-Access-Token": token})
    principal = auth.authenticate(request)
    assert principal.user == "sub-alice" and principal.groups == ("/cms",)  # not 'admin'
    assert request.state.access_token == token


def test_forwarded_bad_token_is_refused_not_downgraded(issuer: OidcIssuer,
                                                       validator: OidcValidator) -> None:
    """A trusted proxy that forwards an invalid token does not fall back to X-Forwarded-User."""
    auth = PlatformAuthenticator(validator=validator, tokens=None,
                                 trusted_proxies=["10.1.0.0/16"], admin_group=None)
    issuer.add_user("old", "pw", lifetime_s=-3600)
    token = issuer.password_token("old", "pw")
    with pytest.raises(Unauthorized, match="expired") as info:
        auth.authenticate(make_request("10.1.0.1", {**SPOOF,
                                                    "X-Forwarded-Access-Token": token}))
    challenge = info.value.headers["WWW-Authenticate"]  # type: ignore[attr-defined]
    assert 'error="invalid_token"' in challenge
    assert token not in str(info.value)


def test_forwarded_token_from_untrusted_peer_is_ignored(issuer: OidcIssuer,
                                                        validator: OidcValidator) -> None:
    auth = PlatformAuthenticator(validator=validator, tokens=None,
                                 trusted_proxies=["10.1.0.0/16"], admin_group=None)
    token = issuer.password_token("alice", "pw")
    with pytest.raises(Unauthorized, match="no credentials"):
        auth.authenticate(make_request("192.0.2.1", {"X-Forwarded-Access-Token": token}))
    assert issuer.hits["/jwks"] == 0


def test_authorization_header_beats_proxy_headers(issuer: OidcIssuer,
                                                  validator: OidcValidator) -> None:
    auth = PlatformAuthenticator(validator=validator, tokens=None,
                                 trusted_proxies=["10.1.0.0/16"], admin_group="/ops")
    token = issuer.password_token("alice", "pw")
    principal = auth.authenticate(make_request(
        "10.1.0.1", {**SPOOF, "Authorization": f"Bearer {token}"}))
    assert principal.user == "sub-alice" and not principal.is_admin


# ------------------------------------------------------ over real HTTP (uvicorn)


class LiveApp:
    """A FastAPI app behind uvicorn on 127.0.0.1; the authenticator can be swapped.

    ``proxy_headers=False`` is how ``mlaas server`` must run uvicorn: with
    uvicorn's default (True), a peer on 127.0.0.1 may rewrite the address
    the app sees through ``X-Forwarded-For`` (see the last test).
    """

    def __init__(self, *, proxy_headers: bool = False) -> None:
        app = FastAPI()

        @app.get("/whoami")
        def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
            return {"user": principal.user, "groups": list(principal.groups),
                    "admin": principal.is_admin}

        @app.exception_handler(Unauthorized)
        async def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
            return JSONResponse(exc.to_dict(), status_code=401,
                                headers=getattr(exc, "headers", None))

        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off",
                                                    proxy_headers=proxy_headers))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveApp:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start on 127.0.0.1")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.mark.network
def test_spoofed_headers_over_tcp() -> None:
    with LiveApp() as live:
        url = f"http://127.0.0.1:{live.port}/whoami"
        live.app.state.authenticator = PlatformAuthenticator(
            validator=None, tokens=None, trusted_proxies=["10.1.0.0/16"], admin_group="/ops")
        r = httpx.get(url, headers=SPOOF)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="mlaas"'
        assert r.json()["error"] == "Unauthorized"
        # X-Forwarded-For is the client's to write: it must not make the peer trusted
        r = httpx.get(url, headers={**SPOOF, "X-Forwarded-For": "10.1.0.1",
                                    "X-Real-IP": "10.1.0.1"})
        assert r.status_code == 401

        live.app.state.authenticator = PlatformAuthenticator(
            validator=None, tokens=None, trusted_proxies=["127.0.0.1/32"], admin_group="/ops")
        r = httpx.get(url, headers=SPOOF)
        assert r.status_code == 200
        assert r.json() == {"user": "admin", "groups": ["/ops", "/cms"], "admin": True}


@pytest.mark.network
def test_why_uvicorn_must_run_without_proxy_headers() -> None:
    """With uvicorn's default proxy_headers=True, X-Forwarded-For from 127.0.0.1 picks the peer.

    Any local user could then claim to be a trusted proxy; so ``mlaas server``
    runs uvicorn with ``proxy_headers=False`` and the peer is the socket's.
    """
    with LiveApp(proxy_headers=True) as live:
        live.app.state.authenticator = PlatformAuthenticator(
            validator=None, tokens=None, trusted_proxies=["10.1.0.0/16"], admin_group="/ops")
        r = httpx.get(f"http://127.0.0.1:{live.port}/whoami",
                      headers={**SPOOF, "X-Forwarded-For": "10.1.0.1"})
        assert r.status_code == 200 and r.json()["user"] == "admin"  # spoofed through
