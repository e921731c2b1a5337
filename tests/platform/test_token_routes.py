"""/api/tokens on the real platform app, with OIDC logins from the test issuer.

The app is built from its settings (``auth.oidc_issuers``), as ``mlaas
server`` builds it: the router is part of the app, and the token store is
attached in the lifespan on the platform's own database. Tokens made through
the routes are then used as bearer credentials on the app's own routes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.oidc_issuer import OidcIssuer

from mlaas.platform.app import create_platform_app
from mlaas.platform.auth.tokens import hash_token
from mlaas.platform.config import PlatformConfig

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.network

AUD = "mlaas-tokens"


@pytest.fixture(scope="module")
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer(audience=AUD) as iss:
        iss.add_user("alice", "pw", sub="alice", wlcg_groups=["/cms"], lifetime_s=3600)
        iss.add_user("bob", "pw", sub="bob", wlcg_groups=["/cms"], lifetime_s=3600)
        iss.add_user("root", "pw", sub="root", wlcg_groups=["/admins"], lifetime_s=3600)
        yield iss


@pytest.fixture
def client(tmp_path: Path, issuer: OidcIssuer) -> Iterator[TestClient]:
    config = PlatformConfig(data_dir=tmp_path, cpus=1, auth={
        "oidc_issuers": [issuer.url], "audience": AUD, "admin_group": "/admins"})
    app = create_platform_app(config)
    assert app.state.authenticator.tokens is None  # nothing opens before the lifespan
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    assert app.state.authenticator.tokens is None  # detached with the platform database


def login(issuer: OidcIssuer, user: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + issuer.password_token(user, "pw")}


def test_create_use_list_revoke(client: TestClient, issuer: OidcIssuer) -> None:
    alice = login(issuer, "alice")
    r = client.post("/api/tokens", json={"name": "ci", "scopes": ["read", "submit"],
                                         "expires_in_days": 7}, headers=alice)
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    created = r.json()
    secret = created["token"]
    assert secret.startswith("mlaas_") and created["scopes"] == ["read", "submit"]
    assert created["owner"] == "alice" and created["groups"] == ["/cms"]

    as_token = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/files", headers=as_token).status_code == 200
    assert client.put("/api/files/x.txt", content=b"x", headers=as_token).status_code == 201
    assert client.get("/api/files/x.txt", headers=alice).content == b"x"  # same user

    listed = client.get("/api/tokens", headers=alice).json()["tokens"]
    assert [t["id"] for t in listed] == [created["id"]]
    assert secret not in str(listed) and hash_token(secret) not in str(listed)
    assert listed[0]["last_used_at"] is not None

    r = client.delete(f"/api/tokens/{created['id']}", headers=alice)
    assert r.status_code == 200 and r.json() == {"revoked": created["id"]}
    r = client.get("/api/files", headers=as_token)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="mlaas", error="invalid_token"'
    assert client.get("/api/tokens", headers=alice).json()["tokens"] == []


def test_others_cannot_see_or_revoke(client: TestClient, issuer: OidcIssuer) -> None:
    alice, bob, root = (login(issuer, u) for u in ("alice", "bob", "root"))
    created = client.post("/api/tokens", json={"name": "ci", "scopes": ["read"]},
                          headers=alice).json()
    assert client.get("/api/tokens", headers=bob).json()["tokens"] == []  # same group, still
    r = client.delete(f"/api/tokens/{created['id']}", headers=bob)
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    missing = client.delete("/api/tokens/0000000000000000", headers=bob).json()["message"]
    assert r.json()["message"].replace(created["id"], "X") == missing.replace(
        "0000000000000000", "X")
    assert client.delete(f"/api/tokens/{created['id']}", headers=root).status_code == 200


def test_a_token_cannot_mint_tokens(client: TestClient, issuer: OidcIssuer) -> None:
    secret = client.post("/api/tokens", json={"name": "ci", "scopes": ["read", "submit"]},
                         headers=login(issuer, "alice")).json()["token"]
    r = client.post("/api/tokens", json={"name": "more", "scopes": ["read"]},
                    headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"


@pytest.mark.parametrize("body, field", [
    ({"name": "x", "scopes": ["admin"]}, "scopes"),
    ({"name": "x", "scopes": []}, "scopes"),
    ({"name": "", "scopes": ["read"]}, "name"),
    ({"name": "x", "scopes": ["read"], "expires_in_days": 0}, "expires_in_days"),
    ({"name": "x", "scopes": ["read"], "expires_in_days": 1e12}, "expires_in_days"),
    ({"name": "x", "scopes": ["read"], "expires_in_days": 400}, "expires_in"),
])
def test_bad_requests_name_the_field(client: TestClient, issuer: OidcIssuer,
                                     body: dict[str, object], field: str) -> None:
    r = client.post("/api/tokens", json=body, headers=login(issuer, "alice"))
    assert r.status_code == 422, r.text
    assert r.json()["problems"][0][0] == field


def test_anonymous_gets_a_challenge(client: TestClient) -> None:
    for method, path in (("GET", "/api/tokens"), ("POST", "/api/tokens"),
                         ("DELETE", "/api/tokens/abc")):
        r = client.request(method, path, json={"name": "x", "scopes": ["read"]})
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer realm="mlaas"'


def test_single_user_mode_has_no_tokens(tmp_path: Path) -> None:
    app = create_platform_app(PlatformConfig(data_dir=tmp_path, cpus=1))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/api/tokens", json={"name": "x", "scopes": ["read"]})
        assert r.status_code == 409 and "single-user" in r.json()["message"]
        assert c.get("/api/tokens").status_code == 409
