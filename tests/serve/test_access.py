"""The access hook: every model route of the full server asks the ModelAccess policy.

The policy below is a real (small) policy, not a stand-in for a missing
system: the caller is the ``X-User`` header, models have owners, some are
public; ``throttled`` is always rate limited. It records every hook call so
the tests can assert which route calls which hook with which action.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.requests import Request

from mlaas.errors import Forbidden, NotFound, RateLimited, Unauthorized
from mlaas.serve.access import AllowAll, ModelAccess
from mlaas.serve.http_errors import headers_of, status_of
from mlaas.serve.registry import Registry
from mlaas.serve.server import create_server

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


class OwnersPolicy:
    """Owners by model name; ``public`` models are readable by everyone."""

    def __init__(self) -> None:
        self.owners: dict[str, str] = {}
        self.public: set[str] = set()
        self.calls: list[tuple[str, Any, Any]] = []
        self.jobs = 0
        self.versions: dict[str, int] = {}

    def _user(self, request: Request) -> str:
        user = request.headers.get("x-user")
        if not user:
            raise Unauthorized("no X-User header")
        if user == "throttled":
            raise RateLimited("too many requests from 'throttled'", retry_after=2.5)
        return user

    def check(self, request: Request, action: str, name: str) -> None:
        self.calls.append(("check", action, name))
        user = self._user(request)
        owner = self.owners.get(name)
        if owner is None or (owner != user and name not in self.public):
            raise NotFound(f"no model named {name!r}")
        if action == "write" and owner != user:
            raise Forbidden(f"model {name!r} belongs to {owner!r}")

    def on_upload(self, request: Request, name: str) -> dict[str, Any]:
        self.calls.append(("on_upload", None, name))
        user = self._user(request)
        owner = self.owners.setdefault(name, user)
        if owner != user:
            raise Forbidden(f"model {name!r} belongs to {owner!r}")
        self.jobs += 1
        return {"owner": user, "job_id": f"job-{self.jobs}"}

    def after_upload(self, request: Request, name: str, version: int | None) -> None:
        self.calls.append(("after_upload", version, name))
        if version is None and not self.versions.get(name):
            self.owners.pop(name, None)  # a failed first upload claims nothing
        elif version is not None:
            self.versions[name] = version

    def visible(self, request: Request, names: list[str]) -> list[str]:
        self.calls.append(("visible", None, tuple(names)))
        user = self._user(request)
        return [n for n in names if self.owners.get(n) == user or n in self.public]


ALICE = {"X-User": "alice"}
BOB = {"X-User": "bob"}


@pytest.fixture()
def served(tmp_path: Path, trained: dict[str, Any]) -> Any:
    """A full server with the owners policy; alice owns ``priv`` and the public ``pub``."""
    policy = OwnersPolicy()
    registry = Registry(tmp_path / "models")
    app = create_server(None, access=policy, registry=registry)
    with TestClient(app) as client:
        for name in ("priv", "pub"):
            r = client.post(f"/api/models/{name}", content=trained["bytes"], headers=ALICE)
            assert r.status_code == 201, r.text
        policy.public.add("pub")
        policy.calls.clear()
        yield client, policy, registry


def _v2_body(n_features: int) -> dict[str, Any]:
    x = np.zeros((2, n_features), dtype=np.float32)
    return {"inputs": [{"name": "x", "shape": [2, n_features], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}


def test_upload_metadata_is_stored_and_shown(served: Any, trained: dict[str, Any]) -> None:
    client, policy, registry = served
    r = client.post("/api/models/priv", content=trained["bytes"], headers=ALICE)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2
    assert r.json()["metadata"] == {"owner": "alice", "job_id": "job-3"}
    assert policy.calls == [("on_upload", None, "priv"), ("after_upload", 2, "priv")]
    described = client.get("/api/models/priv/versions/1", headers=ALICE).json()
    assert described["metadata"] == {"owner": "alice", "job_id": "job-1"}
    assert registry.version("priv", 2)["metadata"]["job_id"] == "job-3"
    r = client.post("/upload", files={"model": ("b.tar.gz", trained["bytes"])},
                    data={"name": "tfaas"}, headers=BOB)
    assert r.status_code == 201, r.text
    assert r.json()["metadata"] == {"owner": "bob", "job_id": "job-4"}


def test_upload_refused_leaves_registry_unchanged(served: Any, trained: dict[str, Any]) -> None:
    client, _, registry = served
    r = client.post("/api/models/priv", content=trained["bytes"], headers=BOB)
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"
    r = client.post("/upload", files={"model": ("b.tar.gz", trained["bytes"])},
                    data={"name": "priv"}, headers=BOB)
    assert r.status_code == 403
    assert registry.get("priv")["latest"] == 1


def test_after_upload_hears_how_each_upload_ended(served: Any,
                                                 trained: dict[str, Any]) -> None:
    """A failed upload (corrupt, over the limit) is reported with version None, so the
    policy can undo what on_upload recorded: here, bob's claim on a new name."""
    client, policy, registry = served
    r = client.post("/api/models/fresh", content=b"corrupt", headers=BOB)
    assert r.status_code == 400
    r = client.post("/upload", files={"model": ("b.tar.gz", b"corrupt")},
                    data={"name": "fresh"}, headers=BOB)
    assert r.status_code == 400
    assert policy.calls == [("on_upload", None, "fresh"), ("after_upload", None, "fresh")] * 2
    assert "fresh" not in policy.owners
    r = client.post("/api/models/fresh", content=trained["bytes"], headers=ALICE)
    assert r.status_code == 201 and policy.calls[-1] == ("after_upload", 1, "fresh")
    assert registry.get("fresh")["latest"] == 1


def test_listings_are_filtered(served: Any) -> None:
    client, policy, _ = served
    assert [m["name"] for m in client.get("/api/models", headers=ALICE).json()["models"]] == [
        "priv", "pub"]
    assert [m["name"] for m in client.get("/api/models", headers=BOB).json()["models"]] == [
        "pub"]
    assert [m["name"] for m in client.get("/models", headers=BOB).json()] == ["pub"]
    assert ("visible", None, ("priv", "pub")) in policy.calls


# (method, path, body kind, action the route must ask for)
ROUTES = [
    ("GET", "/api/models/{m}", None, "read"),
    ("GET", "/api/models/{m}/versions/1", None, "read"),
    ("POST", "/api/models/{m}/predict", "rows", "read"),
    ("POST", "/json", "tfaas", "read"),
    ("GET", "/v2/models/{m}", None, "read"),
    ("GET", "/v2/models/{m}/versions/1", None, "read"),
    ("GET", "/v2/models/{m}/ready", None, "read"),
    ("GET", "/v2/models/{m}/versions/1/ready", None, "read"),
    ("POST", "/v2/models/{m}/infer", "v2", "read"),
    ("POST", "/v2/models/{m}/versions/1/infer", "v2", "read"),
    ("DELETE", "/api/models/{m}/versions/1", None, "write"),
    ("PUT", "/api/models/{m}/aliases/production", "alias", "write"),
    ("DELETE", "/api/models/{m}/aliases/production", None, "write"),
    ("DELETE", "/delete/{m}", None, "write"),
]


def _send(client: TestClient, method: str, path: str, body: str | None, model: str,
          trained: dict[str, Any], n_features: int, headers: dict[str, str]) -> Any:
    kwargs: dict[str, Any] = {"headers": headers}
    if body == "rows":
        kwargs["json"] = trained["rows"]
    elif body == "tfaas":
        kwargs["json"] = {"keys": ["MET_pt", "Jet_pt"], "values": [20.5, [50.0]], "model": model}
    elif body == "v2":
        kwargs["json"] = _v2_body(n_features)
    elif body == "alias":
        kwargs["json"] = {"version": 1}
    return client.request(method, path.format(m=model), **kwargs)


def _n_features(registry: Registry) -> int:
    return len(registry.bundle("pub")[1].spec["feature_names"])


@pytest.mark.parametrize(("method", "path", "body", "action"), ROUTES)
def test_every_model_route_asks_the_policy(served: Any, trained: dict[str, Any], method: str,
                                           path: str, body: str | None, action: str) -> None:
    client, policy, registry = served
    n = _n_features(registry)
    # a hidden model is 404 for reads and writes alike
    r = _send(client, method, path, body, "priv", trained, n, BOB)
    assert r.status_code == 404, r.text
    assert ("check", action, "priv") in policy.calls
    # a public model: bob may read, not write
    policy.calls.clear()
    r = _send(client, method, path, body, "pub", trained, n, BOB)
    assert policy.calls[0] == ("check", action, "pub")
    if action == "write":
        assert r.status_code == 403, r.text
        assert registry.get("pub")["latest"] == 1
    else:
        assert r.status_code == 200, r.text
    # the owner may do both
    if action == "write" and "aliases/production" in path and method == "DELETE":
        client.put("/api/models/pub/aliases/production", json=1, headers=ALICE)
    r = _send(client, method, path, body, "pub", trained, n, ALICE)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("method", "path", "body", "action"), ROUTES)
def test_unauthorized_and_rate_limited(served: Any, trained: dict[str, Any], method: str,
                                       path: str, body: str | None, action: str) -> None:
    client, _, registry = served
    n = _n_features(registry)
    r = _send(client, method, path, body, "pub", trained, n, {})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    r = _send(client, method, path, body, "pub", trained, n, {"X-User": "throttled"})
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "3"


def test_listing_and_upload_errors_carry_headers(served: Any, trained: dict[str, Any]) -> None:
    client, _, _ = served
    for method, path in (("GET", "/api/models"), ("GET", "/models")):
        r = client.request(method, path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/api/models/new", content=trained["bytes"], headers={"X-User": "throttled"})
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"] == "RateLimited"


def test_json_without_model_picks_among_visible(served: Any) -> None:
    client, _, _ = served
    body = {"keys": ["MET_pt", "Jet_pt"], "values": [20.5, [50.0]]}
    r = client.post("/json", json=body, headers=BOB)  # bob sees only "pub"
    assert r.status_code == 200, r.text
    assert len(r.json()) == 1
    r = client.post("/json", json=body, headers=ALICE)  # alice sees two: must name one
    assert r.status_code == 400 and "priv, pub" in r.json()["message"]


def test_allow_all_is_the_default(tmp_path: Path, trained: dict[str, Any]) -> None:
    app = create_server(tmp_path / "m")
    assert isinstance(app.state.access, AllowAll)
    with TestClient(app) as client:
        r = client.post("/api/models/m", content=trained["bytes"])
        assert r.status_code == 201 and r.json()["metadata"] == {}
        assert [m["name"] for m in client.get("/models").json()] == ["m"]


def test_policy_type_checks_as_model_access() -> None:
    policy: ModelAccess = OwnersPolicy()  # mypy checks the structural match
    assert callable(policy.check) and callable(AllowAll().on_upload)


def test_bad_upload_metadata_leaves_registry_unchanged(tmp_path: Path,
                                                      trained: dict[str, Any]) -> None:
    registry = Registry(tmp_path / "r")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        registry.upload("m", trained["bytes"], {"when": object()})
    with pytest.raises(TypeError, match="string keys"):
        registry.upload("m", trained["bytes"], {1: "x"})  # type: ignore[dict-item]
    assert registry.list() == []
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".upload-")]


def test_shared_registry_is_used(tmp_path: Path, trained: dict[str, Any]) -> None:
    registry = Registry(tmp_path / "shared")
    registry.upload("x", trained["bytes"], {"job_id": "j"})
    app = create_server(None, registry=registry)
    assert app.state.registry is registry
    with TestClient(app) as client:
        assert client.get("/api/models/x").json()["versions"][0]["metadata"] == {"job_id": "j"}
    with pytest.raises(TypeError, match="models_dir or registry"):
        create_server(None)


def test_error_statuses_and_headers() -> None:
    assert status_of(NotFound("x")) == 404
    assert status_of(Forbidden("x")) == 403
    assert status_of(Unauthorized("x")) == 401
    assert status_of(RateLimited("x", retry_after=1)) == 429
    assert headers_of(RateLimited("x", retry_after=0.2)) == {"Retry-After": "1"}
    assert headers_of(RateLimited("x")) == {"Retry-After": "1"}
    assert headers_of(Unauthorized("x")) == {"WWW-Authenticate": "Bearer"}
    assert headers_of(Forbidden("x")) == {}
    assert status_of(KeyError("x")) == 404 and status_of(ValueError("x")) == 400
    assert status_of(RuntimeError("x")) == 500


def test_404_does_not_suggest_hidden_model_names(served: Any) -> None:
    client, policy, _ = served
    policy.owners["pri"] = "bob"  # bob's own name, with no version in the registry
    r = client.get("/api/models/pri", headers=BOB)
    assert r.status_code == 404
    assert "priv" not in r.text and "did_you_mean" not in r.json()
    r = client.get("/v2/models/pri", headers=BOB)
    assert r.status_code == 404 and "priv" not in r.text


def test_allow_all_suggests_names(tmp_path: Path, trained: dict[str, Any]) -> None:
    with TestClient(create_server(tmp_path / "m")) as client:
        client.post("/api/models/higgs", content=trained["bytes"])
        r = client.get("/api/models/higs")
        assert r.status_code == 404 and r.json()["did_you_mean"] == ["higgs"]
        assert "did you mean 'higgs'" in client.get("/v2/models/higs").json()["error"]
