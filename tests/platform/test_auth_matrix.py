"""The authorisation matrix: every endpoint x every kind of caller -> expected status.

The whole platform app (``create_platform_app``) runs with the multi-user
``PlatformAuthenticator``; callers log in with real OIDC tokens from the
test issuer on 127.0.0.1 (password grant):

- ``anonymous``: no credentials; ``expired``: an expired token from the issuer;
- ``other``: carol, group ``/atlas``;
- ``member``: bob, group ``/cms`` like the owner;
- ``owner``: alice, group ``/cms``; she owns every object below;
- ``admin``: root, member of the ``--admin-group`` ``/admins``.

Alice's job and models are ``group``-visible, set through the API: the job
is submitted with ``"visibility": "group:/cms"`` (its model inherits that on
registration) and her uploaded models get ``PUT /api/models/{name}/visibility``;
her workspace files are private. :func:`test_public_objects` checks that a
``public`` model and job are readable by every signed-in caller and still
changeable by nobody but their owner and admins. The table
:data:`MATRIX` has one row per (method, path) of the OpenAPI schema, and
:func:`test_every_endpoint_is_in_the_matrix` fails when the schema has an
endpoint the table lacks (or the other way round), so a new endpoint cannot
be forgotten.

Destructive calls (deletes) get one target per caller, so every caller
meets an object in the same state.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.oidc_issuer import OidcIssuer

from mlaas.platform.app import create_platform_app
from mlaas.platform.auth.authenticator import PlatformAuthenticator, www_authenticate
from mlaas.platform.auth.oidc import OidcValidator
from mlaas.platform.auth.policy import PUBLIC_ROUTES, ROUTE_RULES
from mlaas.platform.auth.tokens import TokenStore
from mlaas.platform.config import PlatformConfig
from mlaas.platform.db import Database
from mlaas.platform.principal import Principal

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.network, pytest.mark.slow]

AUD = "mlaas-matrix"
ROLES = ("anonymous", "expired", "other", "member", "owner", "admin")
USERS = {  # role -> (username, groups)
    "other": ("carol", ["/atlas"]),
    "member": ("bob", ["/cms"]),
    "owner": ("alice", ["/cms"]),
    "admin": ("root", ["/admins"]),
}
MODEL = "matrix-model"
JOB_WAIT_S = 240.0


@dataclass
class World:
    client: TestClient
    headers: dict[str, dict[str, str]]
    job_id: str
    token_ids: dict[str, str]
    bundle: bytes
    v2_body: dict[str, Any]
    store: Any
    tokens: TokenStore


def _pipeline() -> dict[str, Any]:
    from platform_support import pipeline

    return pipeline(name=MODEL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from platform_support import make_data

    tmp = tmp_path_factory.mktemp("matrix")
    with OidcIssuer(audience=AUD) as issuer:
        for role, (name, groups) in USERS.items():
            issuer.add_user(name, f"pw-{name}", sub=f"sub-{name}", lifetime_s=3600,
                            wlcg_groups=groups)
        issuer.add_user("late", "pw-late", sub="sub-alice", wlcg_groups=["/cms"],
                        lifetime_s=-3600)
        headers = {role: {"Authorization": "Bearer " + issuer.password_token(name, f"pw-{name}")}
                   for role, (name, _) in USERS.items()}
        headers["anonymous"] = {}
        headers["expired"] = {"Authorization": "Bearer " + issuer.password_token("late",
                                                                                 "pw-late")}
        config = PlatformConfig(data_dir=tmp / "platform", cpus=1, poll_interval=0.2)
        validator = OidcValidator([issuer.url], AUD)
        tokens_db = Database(config.database_url)
        auth = PlatformAuthenticator(validator=validator, tokens=TokenStore(tokens_db),
                                     trusted_proxies=[], admin_group="/admins")
        app = create_platform_app(config, authenticator=auth)
        try:
            with TestClient(app, raise_server_exceptions=False) as client:
                yield _populate(client, headers, make_data(tmp / "data"),
                                app.state.platform.store, auth.tokens)
        finally:
            validator.close()
            tokens_db.dispose()


def _ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, f"{response.request.method} " \
        f"{response.request.url.path}: {response.status_code} {response.text[:300]}"
    return response


def _populate(client: TestClient, headers: dict[str, dict[str, str]],
              data: dict[str, Path], store: Any, tokens: Any) -> World:
    alice = headers["owner"]
    for kind in ("signal", "background"):
        _ok(client.put(f"/api/files/data/{kind}.root", content=data[kind].read_bytes(),
                       headers=alice), 201)
    job = _ok(client.post("/api/jobs", json={"name": "matrix", "spec": _pipeline(),
                                             "visibility": "group:/cms"},
                          headers=alice), 201).json()
    deadline = time.monotonic() + JOB_WAIT_S
    while True:
        state = _ok(client.get(f"/api/jobs/{job['id']}", headers=alice)).json()["state"]
        if state in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job still {state} after {JOB_WAIT_S} s"
        time.sleep(0.3)
    assert state == "succeeded", _ok(client.get(f"/api/jobs/{job['id']}/logs",
                                                headers=alice)).text[-2000:]
    assert store.get_job(job["id"]).visibility == "group"
    model = store.get_model(MODEL)  # registered by the job: its visibility and group
    assert (model.visibility, model.group) == ("group", "/cms")
    bundle = _ok(client.get(f"/api/jobs/{job['id']}/artifacts/bundle.tar.gz",
                            headers=alice)).content
    token_ids = {}
    alice_principal = Principal(user="sub-alice", groups=("/cms",))
    for role in ROLES:  # one target per caller for every destructive call
        token_ids[role] = tokens.create(alice_principal, name=f"revoke {role}",
                                        scopes=["read"]).info.id
        _ok(client.put(f"/api/files/del/{role}.txt", content=b"x", headers=alice), 201)
        for prefix in ("delver", "delall"):
            _ok(client.post(f"/api/models/{prefix}-{role}", content=bundle, headers=alice), 201)
            _ok(client.put(f"/api/models/{prefix}-{role}/visibility",
                           json={"visibility": "group:/cms"}, headers=alice))
        _ok(client.put(f"/api/models/{MODEL}/aliases/a-{role}", json={"version": 1},
                       headers=alice))
    meta = _ok(client.get(f"/v2/models/{MODEL}", headers=alice)).json()
    inputs = []
    for tensor in meta["inputs"]:
        shape = [1 if d < 0 else d for d in tensor["shape"]]
        size = 1
        for d in shape:
            size *= d
        inputs.append({"name": tensor["name"], "shape": shape, "datatype": tensor["datatype"],
                       "data": [0] * size})
    return World(client=client, headers=headers, job_id=job["id"], token_ids=token_ids,
                 bundle=bundle,
                 v2_body={"inputs": inputs}, store=store, tokens=tokens)


# -- expectations ------------------------------------------------------------------------

PUBLIC = dict.fromkeys(ROLES, 200)


def signed_in(status: int) -> dict[str, int]:
    """Any caller with a valid login gets ``status``; no or a bad token gets 401."""
    return {"anonymous": 401, "expired": 401, **dict.fromkeys(USERS, status)}


def group_read(status: int = 200) -> dict[str, int]:
    """A group-visible object: hidden (404) from other groups."""
    return {"anonymous": 401, "expired": 401, "other": 404, "member": status,
            "owner": status, "admin": status}


def group_write(status: int = 200) -> dict[str, int]:
    """Changing a group-visible object: members see it but may not change it (403)."""
    return {"anonymous": 401, "expired": 401, "other": 404, "member": 403,
            "owner": status, "admin": status}


def private(status: int = 200) -> dict[str, int]:
    """A private object: only its owner and admins."""
    return {"anonymous": 401, "expired": 401, "other": 404, "member": 404,
            "owner": status, "admin": status}


@dataclass(frozen=True)
class Row:
    """One endpoint: the expected status per role and how to call it."""

    expect: dict[str, int]
    params: Callable[[str, World], dict[str, Any]] = lambda role, w: {}
    body: Callable[[str, World], dict[str, Any]] = lambda role, w: {}
    after: Callable[[str, World, Any], None] | None = None


def _job(role: str, w: World) -> dict[str, Any]:
    return {"job_id": w.job_id}


def _model(role: str, w: World) -> dict[str, Any]:
    return {"name": MODEL}


def _of_alice(role: str, w: World) -> dict[str, Any]:
    return {"params": {"owner": "sub-alice"}}  # another user's workspace is named by ?owner=


def _dead_job_spec(role: str, w: World) -> dict[str, Any]:
    spec = _pipeline()
    spec.pop("name")
    dead = "root://127.0.0.1:9//nothing.root"  # nobody listens on port 9: it fails at once
    for source in spec["data"]["sources"]:
        source["files"] = [dead]
    return {"json": {"name": f"submitted-by-{role}", "spec": spec}}


def _cancel_own(role: str, w: World, response: Any) -> None:
    if response.status_code == 201:
        w.client.post(f"/api/jobs/{response.json()['id']}/cancel", headers=w.headers[role])


def _predict_body(role: str, w: World) -> dict[str, Any]:
    return {"json": [{"MET_pt": 20.0, "Jet_pt": [30.0, 10.0]}]}


def _tfaas_body(role: str, w: World) -> dict[str, Any]:
    return {"json": {"model": MODEL, "keys": ["MET_pt", "Jet_pt"], "values": [[20.0, [30.0]]]}}


MATRIX: dict[tuple[str, str], Row] = {
    ("GET", "/healthz"): Row(PUBLIC),
    ("GET", "/v2/health/live"): Row(PUBLIC),
    ("GET", "/v2/health/ready"): Row(PUBLIC),
    # workspace files (private to their owner)
    ("GET", "/api/files"): Row(signed_in(200)),
    ("PUT", "/api/files/{path}"): Row(signed_in(201),  # always the caller's own workspace
                                      params=lambda r, w: {"path": f"mine/{r}.txt"},
                                      body=lambda r, w: {"content": b"hello"}),
    ("GET", "/api/files/{path}"): Row(private(), params=lambda r, w: {"path": "data/signal.root"},
                                      body=_of_alice),
    ("DELETE", "/api/files/{path}"): Row(private(), params=lambda r, w: {"path": f"del/{r}.txt"},
                                         body=_of_alice),
    # personal API tokens (never visible to anyone but their owner and admins)
    ("POST", "/api/tokens"): Row(signed_in(201), body=lambda r, w: {
        "json": {"name": f"by {r}", "scopes": ["read"]}}),
    ("GET", "/api/tokens"): Row(signed_in(200)),
    ("DELETE", "/api/tokens/{token_id}"): Row(
        private(), params=lambda r, w: {"token_id": w.token_ids[r]}),
    # jobs (alice's, group-visible)
    ("POST", "/api/jobs"): Row(signed_in(201), body=_dead_job_spec, after=_cancel_own),
    ("GET", "/api/jobs"): Row(signed_in(200)),
    ("GET", "/api/jobs/{job_id}"): Row(group_read(), params=_job),
    ("GET", "/api/jobs/{job_id}/logs"): Row(group_read(), params=_job),
    ("GET", "/api/jobs/{job_id}/metrics"): Row(group_read(), params=_job),
    ("POST", "/api/jobs/{job_id}/cancel"): Row(group_write(409), params=_job),  # finished
    ("GET", "/api/jobs/{job_id}/artifacts"): Row(group_read(), params=_job),
    ("GET", "/api/jobs/{job_id}/artifacts/{path}"): Row(
        group_read(), params=lambda r, w: {"job_id": w.job_id, "path": "metrics.json"}),
    # accounting: everyone signed in reads their own usage
    ("GET", "/api/usage"): Row(signed_in(200)),
    # models (alice's, group-visible)
    ("GET", "/api/queues"): Row(signed_in(200)),
    ("PUT", "/api/queues"): Row(  # admins only; [] is the default queue, as configured
        {"anonymous": 401, "expired": 401, "other": 403, "member": 403, "owner": 403,
         "admin": 200}, body=lambda r, w: {"json": {"queues": []}}),
    ("GET", "/api/nodes"): Row(signed_in(200)),
    ("GET", "/api/scaling"): Row(signed_in(200)),
    ("GET", "/api/models"): Row(signed_in(200)),
    ("POST", "/api/models/{name}"): Row(group_write(201), params=_model,
                                        body=lambda r, w: {"content": w.bundle}),
    ("GET", "/api/models/{name}"): Row(group_read(), params=_model),
    ("GET", "/api/models/{name}/versions/{version}"): Row(
        group_read(), params=lambda r, w: {"name": MODEL, "version": 1}),
    ("DELETE", "/api/models/{name}/versions/{version}"): Row(
        group_write(), params=lambda r, w: {"name": f"delver-{r}", "version": 1}),
    ("PUT", "/api/models/{name}/aliases/{alias}"): Row(
        group_write(), params=lambda r, w: {"name": MODEL, "alias": f"p-{r}"},
        body=lambda r, w: {"json": {"version": 1}}),
    ("DELETE", "/api/models/{name}/aliases/{alias}"): Row(
        group_write(), params=lambda r, w: {"name": MODEL, "alias": f"a-{r}"}),
    ("GET", "/api/models/{name}/serving"): Row(group_read(), params=_model),
    ("PUT", "/api/models/{name}/serving"): Row(  # {}: the defaults, as it is
        group_write(), params=_model, body=lambda r, w: {"json": {}}),
    ("POST", "/api/models/{name}/predict"): Row(group_read(), params=_model, body=_predict_body),
    ("GET", "/api/models/{name}/visibility"): Row(group_read(), params=_model),
    ("PUT", "/api/models/{name}/visibility"): Row(  # re-set to what it is: state unchanged
        group_write(), params=_model, body=lambda r, w: {"json": {"visibility": "group:/cms"}}),
    # TFaaS compatibility routes
    ("POST", "/json"): Row(group_read(), body=_tfaas_body),
    ("GET", "/models"): Row(signed_in(200)),
    ("DELETE", "/delete/{model}"): Row(group_write(), params=lambda r, w: {"model": f"delall-{r}"}),
    ("POST", "/upload"): Row(group_write(201), body=lambda r, w: {
        "files": {"model": ("bundle.tar.gz", w.bundle)}, "data": {"name": MODEL}}),
    # KServe v2
    ("GET", "/v2/models/{name}"): Row(group_read(), params=_model),
    ("GET", "/v2/models/{name}/versions/{v}"): Row(
        group_read(), params=lambda r, w: {"name": MODEL, "v": "1"}),
    ("GET", "/v2/models/{name}/ready"): Row(group_read(), params=_model),
    ("GET", "/v2/models/{name}/versions/{v}/ready"): Row(
        group_read(), params=lambda r, w: {"name": MODEL, "v": "1"}),
    ("POST", "/v2/models/{name}/infer"): Row(group_read(), params=_model,
                                             body=lambda r, w: {"json": w.v2_body}),
    ("POST", "/v2/models/{name}/versions/{v}/infer"): Row(
        group_read(), params=lambda r, w: {"name": MODEL, "v": "1"},
        body=lambda r, w: {"json": w.v2_body}),
}


def _openapi_endpoints(client: TestClient) -> set[tuple[str, str]]:
    schema = client.get("/openapi.json").json()
    return {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops
            if method.lower() in {"get", "put", "post", "delete", "patch", "head", "options"}}


def test_every_endpoint_is_in_the_matrix(world: World) -> None:
    endpoints = _openapi_endpoints(world.client)
    missing = sorted(endpoints - set(MATRIX))
    stale = sorted(set(MATRIX) - endpoints)
    assert not missing, f"endpoints without a row in MATRIX (add their expectations): {missing}"
    assert not stale, f"MATRIX rows for endpoints that no longer exist: {stale}"


def test_every_endpoint_has_a_scope_rule(world: World) -> None:
    """Scopes and rate limits are one table (mlaas.platform.auth.policy): no endpoint that
    takes a caller may be missing from it, and the table has no rule for a route that is gone."""
    endpoints = _openapi_endpoints(world.client)
    missing = sorted(endpoints - set(ROUTE_RULES) - PUBLIC_ROUTES)
    stale = sorted(set(ROUTE_RULES) - endpoints)
    assert not missing, f"endpoints without a rule in ROUTE_RULES: {missing}"
    assert not stale, f"ROUTE_RULES for endpoints that no longer exist: {stale}"


CASES = [pytest.param(method, path, role, id=f"{method} {path} as {role}")
         for (method, path) in MATRIX for role in ROLES]


@pytest.mark.parametrize("method, path, role", CASES)
def test_matrix(world: World, method: str, path: str, role: str) -> None:
    row = MATRIX[(method, path)]
    url = path.format(**row.params(role, world))
    response = world.client.request(method, url, headers=world.headers[role],
                                    **row.body(role, world))
    try:
        want = row.expect[role]
        assert response.status_code == want, (
            f"{method} {url} as {role}: want {want}, got {response.status_code}: "
            f"{response.text[:300]}")
        # KServe v2 errors are {"error": <message>} by that protocol; ours name the class
        error = response.json().get("error") if want >= 400 else None
        v2 = path.startswith("/v2/")
        if want == 401:
            challenge = response.headers.get("www-authenticate", "")
            assert challenge.startswith("Bearer"), "a 401 must carry a Bearer challenge"
            if not v2:  # the v2 routes answer errors themselves, with a bare "Bearer"
                assert error == "Unauthorized"
                assert challenge == www_authenticate(
                    "invalid_token" if role == "expired" else None)
        if want == 404:  # hidden looks exactly like missing: no owner, no hint
            assert v2 or error in ("NotFound", "ModelNotFound")
            assert "alice" not in response.text
    finally:
        if row.after is not None:
            row.after(role, world, response)


# -- personal tokens: scopes ---------------------------------------------------------------

def _scoped(method: str, path: str, scope: str, want: int) -> Any:
    return pytest.param(method, path, scope, want, id=f"{method} {path} with a {scope!r} token")


@pytest.mark.parametrize("method, path, scope, want", [
    _scoped("GET", "/api/files/{path}", "read", 200),
    _scoped("GET", "/api/files/{path}", "predict", 403),
    _scoped("PUT", "/api/files/{path}", "read", 403),
    _scoped("GET", "/api/jobs/{job_id}", "read", 200),
    _scoped("GET", "/api/jobs/{job_id}", "predict", 403),
    _scoped("GET", "/api/jobs/{job_id}/artifacts/{path}", "submit", 403),
    _scoped("POST", "/api/jobs", "read", 403),
    _scoped("POST", "/api/jobs", "submit", 201),
    _scoped("POST", "/api/jobs/{job_id}/cancel", "read", 403),
    _scoped("POST", "/api/jobs/{job_id}/cancel", "submit", 409),  # allowed; the job is final
    _scoped("GET", "/api/models/{name}", "predict", 403),
    _scoped("GET", "/api/models/{name}", "read", 200),
    _scoped("POST", "/api/models/{name}/predict", "predict", 200),
    _scoped("POST", "/api/models/{name}/predict", "read", 403),
    _scoped("POST", "/api/models/{name}/predict", "submit", 403),
    _scoped("POST", "/v2/models/{name}/infer", "read", 403),
    _scoped("POST", "/v2/models/{name}/infer", "predict", 200),
    _scoped("GET", "/v2/models/{name}", "predict", 403),
    _scoped("POST", "/json", "read", 403),
    _scoped("POST", "/json", "predict", 200),
    _scoped("GET", "/models", "submit", 403),
    _scoped("POST", "/api/models/{name}", "read", 403),
    _scoped("POST", "/api/models/{name}", "submit", 201),
    _scoped("POST", "/upload", "predict", 403),
    _scoped("PUT", "/api/models/{name}/aliases/{alias}", "predict", 403),
    _scoped("PUT", "/api/models/{name}/aliases/{alias}", "submit", 200),
    _scoped("PUT", "/api/models/{name}/serving", "read", 403),
    _scoped("PUT", "/api/models/{name}/serving", "submit", 200),
    _scoped("GET", "/api/models/{name}/serving", "read", 200),
    _scoped("PUT", "/api/models/{name}/visibility", "read", 403),
    _scoped("PUT", "/api/models/{name}/visibility", "submit", 200),
    _scoped("GET", "/api/models/{name}/visibility", "read", 200),
    _scoped("DELETE", "/delete/{model}", "read", 403),
    _scoped("GET", "/api/usage", "read", 200),
    _scoped("GET", "/api/usage", "predict", 403),
    _scoped("GET", "/api/tokens", "read", 200),
    _scoped("GET", "/api/tokens", "predict", 403),
    _scoped("POST", "/api/tokens", "submit", 403),  # only a login mints tokens
])
def test_personal_token_scopes(world: World, method: str, path: str, scope: str,
                               want: int) -> None:
    """A personal token of the owner may do only what its scopes say."""
    alice = Principal(user="sub-alice", groups=("/cms",))
    new = world.tokens.create(alice, name=f"scoped {scope}", scopes=[scope])
    secret = new.secret
    row = MATRIX[(method, path)]
    params = row.params("owner", world)
    if "alias" in params:
        params["alias"] = f"scoped-{scope}"
    response = world.client.request(method, path.format(**params),
                                    headers={"Authorization": f"Bearer {secret}"},
                                    **row.body("owner", world))
    try:
        assert response.status_code == want, response.text[:300]
    finally:
        if row.after is not None:
            row.after("owner", world, response)
        world.tokens.revoke(alice, new.info.id)


# -- public objects -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def public(world: World) -> dict[str, str]:
    """A ``public`` model (uploaded, then shared) and a ``public`` job of alice's."""
    alice = world.headers["owner"]
    _ok(world.client.post("/api/models/public-model", content=world.bundle, headers=alice), 201)
    _ok(world.client.put("/api/models/public-model/visibility", json={"visibility": "public"},
                         headers=alice))
    spec = _dead_job_spec("owner", world)["json"]
    job = _ok(world.client.post("/api/jobs", json={**spec, "visibility": "public"},
                                headers=alice), 201).json()
    return {"model": "public-model", "job": job["id"]}


PUBLIC_READ = {"anonymous": 401, "expired": 401, "other": 200, "member": 200, "owner": 200,
               "admin": 200}


@pytest.mark.parametrize("role", ROLES)
def test_public_objects(world: World, public: dict[str, str], role: str) -> None:
    """Public: readable (and usable for inference) by every signed-in caller; changing it
    stays with the owner and admins (403 for everyone else, who can see it)."""
    model, job = public["model"], public["job"]
    write = {**PUBLIC_READ, "other": 403, "member": 403}
    headers = world.headers[role]
    calls = [
        ("GET", f"/api/models/{model}", {}, PUBLIC_READ),
        ("GET", f"/api/models/{model}/visibility", {}, PUBLIC_READ),
        ("POST", f"/api/models/{model}/predict", _predict_body(role, world), PUBLIC_READ),
        ("GET", f"/api/jobs/{job}", {}, PUBLIC_READ),
        ("GET", f"/api/jobs/{job}/logs", {}, PUBLIC_READ),
        ("PUT", f"/api/models/{model}/visibility", {"json": {"visibility": "public"}}, write),
        ("PUT", f"/api/models/{model}/aliases/pub-{role}", {"json": {"version": 1}}, write),
        ("POST", f"/api/jobs/{job}/cancel", {}, {**write, "owner": None, "admin": None}),
    ]
    for method, url, kw, expect in calls:
        want = expect[role]
        if want is None:
            continue  # cancelling for real would change the job for the next caller
        response = world.client.request(method, url, headers=headers, **kw)
        assert response.status_code == want, (
            f"{method} {url} as {role}: want {want}, got {response.status_code}: "
            f"{response.text[:300]}")
