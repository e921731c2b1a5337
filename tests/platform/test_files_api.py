"""The workspace files API through a real FastAPI app, store and storage (SQLite).

The app is built here from the router alone, with the real
``PlatformContext``; an authenticator that picks a Principal from the
``X-User`` header (a small fixed policy, not a mock) lets us act as
different users, and :class:`SingleUser` is checked as the default.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlaas.errors import MlaasError, Unauthorized
from mlaas.platform.deps import PlatformContext, SingleUser
from mlaas.platform.principal import ADMIN_ROLE, Principal
from mlaas.platform.routes.files import files_router
from mlaas.platform.storage import Storage
from mlaas.platform.store import SqlStore
from mlaas.serve.http_errors import headers_of, status_of

with warnings.catch_warnings():  # starlette's notice about its own test client dependency
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

USERS = {
    "alice": Principal(user="alice", groups=("/cms",)),
    "bob": Principal(user="bob", groups=("/cms",)),
    "root": Principal(user="root", groups=("/ops",), roles=frozenset({ADMIN_ROLE})),
    "reader": Principal(user="reader", scopes=frozenset({"read"})),
}


class HeaderUsers:
    """Test authenticator: the Principal named by ``X-User`` (unknown names are 401)."""

    def authenticate(self, request: Request) -> Principal:
        name = request.headers.get("x-user", "")
        if name not in USERS:
            raise Unauthorized(f"unknown test user {name!r}")
        return USERS[name]


@dataclass
class Config:
    workspace_quota_bytes: int = 1000


async def _mlaas_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MlaasError)
    return JSONResponse(exc.to_dict(), status_code=status_of(exc), headers=headers_of(exc))


def _app(store: SqlStore, storage: Storage, authenticator: Any, config: Any) -> FastAPI:
    app = FastAPI(exception_handlers={MlaasError: _mlaas_error})
    app.state.platform = PlatformContext(store=store, storage=storage, manager=None,
                                         registry=None, config=config)
    app.state.authenticator = authenticator
    app.include_router(files_router())
    return app


@pytest.fixture
def client(sqlite_store: SqlStore, storage: Storage) -> Iterator[TestClient]:
    with TestClient(_app(sqlite_store, storage, HeaderUsers(), Config())) as c:
        yield c


def _as(user: str) -> dict[str, str]:
    return {"X-User": user}


def test_upload_list_download_delete(client: TestClient, sqlite_store: SqlStore,
                                     storage: Storage) -> None:
    body = b"def build(n, spec):\n    ...\n"
    r = client.put("/api/files/models/net.py", content=body, headers=_as("alice"))
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["path"] == "models/net.py" and out["size"] == len(body)
    assert out["sha256"] == hashlib.sha256(body).hexdigest() and "updated_at" in out
    assert set(out) == {"path", "size", "sha256", "updated_at"}
    record = sqlite_store.get_file("alice", "models/net.py")
    assert (record.owner, record.group, record.visibility) == ("alice", "/cms", "private")

    r = client.get("/api/files/models/net.py", headers=_as("alice"))
    assert r.status_code == 200 and r.content == body
    assert r.headers["content-type"] == "application/octet-stream"

    client.put("/api/files/a.root", content=b"xyz", headers=_as("alice"))
    listing = client.get("/api/files", headers=_as("alice")).json()
    assert [f["path"] for f in listing["files"]] == ["a.root", "models/net.py"]

    r = client.delete("/api/files/models/net.py", headers=_as("alice"))
    assert r.status_code == 200 and r.json() == {"deleted": "models/net.py"}
    assert client.get("/api/files/models/net.py", headers=_as("alice")).status_code == 404
    assert not storage.resolve("alice", "models/net.py").exists()
    assert sqlite_store.used_bytes("alice") == 3


def test_replace_counts_only_the_new_size(client: TestClient, sqlite_store: SqlStore) -> None:
    assert client.put("/api/files/f", content=b"x" * 600, headers=_as("alice")).status_code == 201
    r = client.put("/api/files/f", content=b"y" * 900, headers=_as("alice"))  # 900 <= 1000
    assert r.status_code == 201 and r.json()["size"] == 900
    assert sqlite_store.used_bytes("alice") == 900


def test_streamed_upload_without_length(client: TestClient) -> None:
    chunks = [b"a" * 100, b"b" * 200, b"c" * 300]
    r = client.put("/api/files/stream.bin", content=iter(chunks), headers=_as("alice"))
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_quota(client: TestClient, storage: Storage, sqlite_store: SqlStore) -> None:
    assert client.put("/api/files/a", content=b"x" * 700, headers=_as("alice")).status_code == 201
    r = client.put("/api/files/b", content=b"x" * 301, headers=_as("alice"))  # declared length
    assert r.status_code == 413
    assert r.json()["error"] == "QuotaExceeded" and "'b'" in r.json()["message"]
    r = client.put("/api/files/c", content=iter([b"x" * 200, b"x" * 200]), headers=_as("alice"))
    assert r.status_code == 413 and r.json()["error"] == "QuotaExceeded"  # counted while streaming
    assert [f.path for f in sqlite_store.list_files("alice")] == ["a"]
    assert sorted(p.name for p in storage.workspace("alice").iterdir()) == ["a"]
    assert client.put("/api/files/d", content=b"x" * 300, headers=_as("alice")).status_code == 201
    # quotas are per user
    assert client.put("/api/files/a", content=b"x" * 1000, headers=_as("bob")).status_code == 201


def test_quota_comes_from_the_config(sqlite_store: SqlStore, storage: Storage) -> None:
    with TestClient(_app(sqlite_store, storage, HeaderUsers(), Config(10))) as c:
        assert c.put("/api/files/f", content=b"x" * 11, headers=_as("alice")).status_code == 413
    with TestClient(_app(sqlite_store, storage, HeaderUsers(), object())) as c:  # 1 GiB default
        assert c.put("/api/files/f", content=b"x" * 5000, headers=_as("alice")).status_code == 201


@pytest.mark.parametrize("path, why", [
    ("..%2Fx", r"contains '\.\.'"),
    ("a/..%2F..%2Fx", r"contains '\.\.'"),
    ("a%5Cb", "backslash"),
    ("a%00b", "NUL"),
    ("a//b", "empty part"),
    ("%2Fetc%2Fpasswd", "absolute"),
    ("x" * 256, "longer than 255 bytes"),
    ("~%2Fx", "starts with '~'"),
])
def test_path_tricks_are_400(client: TestClient, path: str, why: str, storage: Storage) -> None:
    for method in ("PUT", "GET", "DELETE"):
        r = client.request(method, f"/api/files/{path}", content=b"x", headers=_as("alice"))
        assert r.status_code == 400, (method, r.text)
        assert r.json()["error"] == "PathError"
        assert r.json()["message"].startswith("path ")
        assert re.search(why, r.json()["message"]), r.json()["message"]
    assert sorted(storage.root.rglob("*x")) == []


def test_another_users_files_are_404(client: TestClient) -> None:
    client.put("/api/files/secret.txt", content=b"mine", headers=_as("alice"))
    # bob's own workspace has no such file; asking for alice's is the same 404
    for url in ("/api/files/secret.txt", "/api/files/secret.txt?owner=alice"):
        for method in ("GET", "DELETE"):
            r = client.request(method, url, headers=_as("bob"))
            assert r.status_code == 404, (method, url)
            assert r.json() == {"error": "NotFound", "message": "no file named 'secret.txt'"}
    assert client.get("/api/files/nothing?owner=alice", headers=_as("bob")).json()["message"] \
        == "no file named 'nothing'"
    assert client.get("/api/files?owner=alice", headers=_as("bob")).json() == {"files": []}
    # bob writing the same path makes his own file; alice's is unchanged
    assert client.put("/api/files/secret.txt", content=b"bob's", headers=_as("bob")).status_code \
        == 201
    assert client.get("/api/files/secret.txt", headers=_as("alice")).content == b"mine"
    assert client.get("/api/files/secret.txt", headers=_as("bob")).content == b"bob's"


def test_admin_may_read_and_delete_others_files(client: TestClient) -> None:
    client.put("/api/files/x.txt", content=b"alice", headers=_as("alice"))
    assert client.get("/api/files/x.txt?owner=alice", headers=_as("root")).content == b"alice"
    listing = client.get("/api/files?owner=alice", headers=_as("root")).json()["files"]
    assert [f["path"] for f in listing] == ["x.txt"]
    assert client.get("/api/files/x.txt", headers=_as("root")).status_code == 404  # own workspace
    assert client.delete("/api/files/x.txt?owner=alice", headers=_as("root")).status_code == 200
    assert client.get("/api/files/x.txt", headers=_as("alice")).status_code == 404


def test_scopes_of_personal_tokens(client: TestClient) -> None:
    r = client.put("/api/files/f", content=b"x", headers=_as("reader"))
    assert r.status_code == 403 and "'submit' scope" in r.json()["message"]
    assert client.get("/api/files", headers=_as("reader")).status_code == 200


def test_unauthenticated_is_401(client: TestClient) -> None:
    r = client.get("/api/files", headers=_as("mallory"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_single_user_mode(sqlite_store: SqlStore, storage: Storage) -> None:
    with TestClient(_app(sqlite_store, storage, SingleUser(), Config())) as c:
        assert c.put("/api/files/spec.yaml", content=b"a: 1").status_code == 201
        assert c.get("/api/files/spec.yaml").content == b"a: 1"
    assert sqlite_store.get_file("local", "spec.yaml").group == "local"


def test_missing_bytes_are_404_and_delete_still_cleans_up(client: TestClient,
                                                          storage: Storage,
                                                          sqlite_store: SqlStore) -> None:
    client.put("/api/files/gone.txt", content=b"x", headers=_as("alice"))
    storage.resolve("alice", "gone.txt").unlink()  # bytes lost behind the server's back
    assert client.get("/api/files/gone.txt", headers=_as("alice")).status_code == 404
    assert client.delete("/api/files/gone.txt", headers=_as("alice")).status_code == 200
    assert sqlite_store.list_files("alice") == []


def test_upload_onto_a_directory_is_400(client: TestClient) -> None:
    client.put("/api/files/d/f", content=b"x", headers=_as("alice"))
    r = client.put("/api/files/d", content=b"x", headers=_as("alice"))
    assert r.status_code == 400 and "is a directory" in r.json()["message"]
    r = client.put("/api/files/d/f/g", content=b"x", headers=_as("alice"))
    assert r.status_code == 400 and "goes through a file" in r.json()["message"]
