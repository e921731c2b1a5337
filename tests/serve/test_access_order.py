"""Routes whose model name is in the body authenticate the caller before reading it.

``POST /json`` (the name is a JSON field) and ``POST /upload`` (a form field)
call the policy's ``authenticate`` hook first: an anonymous caller gets 401
whatever body it sends, and its body is never parsed. The policy below is a
real (small) one: the caller is a bearer token naming the user; anonymous
callers are refused everywhere.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from mlaas.errors import Unauthorized
from mlaas.serve.registry import Registry
from mlaas.serve.server import create_server

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


class DenyAnonymous:
    """Every hook needs ``Authorization: Bearer <user>``; authenticated users may do all."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _user(self, request: Request) -> str:
        scheme, _, user = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not user:
            raise Unauthorized("no bearer token")
        return user

    def authenticate(self, request: Request) -> None:
        self.calls.append("authenticate")
        self._user(request)

    def check(self, request: Request, action: str, name: str) -> None:
        self.calls.append(f"check {action} {name}")
        self._user(request)

    def on_upload(self, request: Request, name: str) -> dict[str, Any]:
        self.calls.append(f"on_upload {name}")
        return {"owner": self._user(request)}

    def visible(self, request: Request, names: list[str]) -> list[str]:
        self.calls.append("visible")
        self._user(request)
        return list(names)


ALICE = {"Authorization": "Bearer alice"}
BAD_FORM = {"content-type": "multipart/form-data; boundary=xyz"}


@pytest.fixture()
def served(tmp_path: Path, trained: dict[str, Any]) -> Any:
    policy = DenyAnonymous()
    app = create_server(None, access=policy, registry=Registry(tmp_path / "models"),
                        freeze_gc=False)
    with TestClient(app) as client:
        r = client.post("/api/models/m", content=trained["bytes"], headers=ALICE)
        assert r.status_code == 201, r.text
        policy.calls.clear()
        yield client, policy


@pytest.mark.parametrize("body", [b"{not json", b'{"keys": 3}',
                                  b'{"model": "m", "keys": ["MET_pt"], "values": [1.0]}'])
def test_anonymous_json_is_401_before_the_body_is_read(served: Any, body: bytes) -> None:
    client, policy = served
    r = client.post("/json", content=body)
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "Unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert policy.calls == ["authenticate"]


def test_authenticated_json_still_checks_the_model_after_parsing(served: Any,
                                                                  trained: dict[str, Any]
                                                                  ) -> None:
    client, policy = served
    r = client.post("/json", content=b"{not json", headers=ALICE)
    assert r.status_code == 400 and r.json()["error"] == "BadRequest"
    assert policy.calls == ["authenticate"]
    policy.calls.clear()
    row = trained["rows"][0]
    r = client.post("/json", json={"model": "m", "keys": ["MET_pt", "Jet_pt"],
                                   "values": [row["MET_pt"], row["Jet_pt"]]}, headers=ALICE)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()[0], float)
    assert policy.calls == ["authenticate", "check read m"]


def test_anonymous_upload_is_401_before_the_form_is_parsed(served: Any,
                                                           trained: dict[str, Any]) -> None:
    client, policy = served
    r = client.post("/upload", content=b"--xyz\r\ngarbage", headers=BAD_FORM)
    assert r.status_code == 401, r.text
    r = client.post("/upload", files={"model": ("b.tar.gz", trained["bytes"])},
                    data={"name": "anon"})
    assert r.status_code == 401, r.text
    assert policy.calls == ["authenticate", "authenticate"]
    # the same malformed form from a known caller is parsed, and refused as such
    r = client.post("/upload", content=b"--xyz\r\ngarbage", headers={**BAD_FORM, **ALICE})
    assert r.status_code == 400, r.text
    r = client.post("/upload", files={"model": ("b.tar.gz", trained["bytes"])},
                    data={"name": "tfaas"}, headers=ALICE)
    assert r.status_code == 201, r.text
    assert r.json()["metadata"] == {"owner": "alice"}
    assert policy.calls[-2:] == ["authenticate", "on_upload tfaas"]
