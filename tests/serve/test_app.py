"""The HTTP app, in-process through TestClient: registry API, predictions, TFaaS, errors."""

from __future__ import annotations

import io
import json
import math
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import APIRouter

from mlaas.bundle import Bundle
from mlaas.serve.app import create_app
from mlaas.serve import registry as registry_module
from mlaas.serve.registry import Registry
from serve_support import with_spec

with warnings.catch_warnings():
    # starlette >= 1.x asks for its httpx fork ("httpx2"); httpx works the same for these tests
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(tmp_path / "models")) as c:
        yield c


@pytest.fixture
def loaded(client: TestClient, trained: dict[str, Any]) -> TestClient:
    """A client whose registry holds model ``higgs`` versions 1 and 2."""
    for v in (1, 2):
        r = client.post("/api/models/higgs", content=trained["bytes"],
                        headers={"content-type": "application/gzip"})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == v
    return client


def _expected(trained: dict[str, Any], events: Any) -> list[Any]:
    scores = Bundle.load(trained["dir"]).predict_events(events)[:, 0].tolist()
    return [None if math.isnan(s) else s for s in scores]


def _tar(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def test_health(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_registry_routes(loaded: TestClient) -> None:
    c = loaded
    assert c.get("/api/models").json()["models"] == [
        {"name": "higgs", "versions": [1, 2], "latest": 2, "aliases": {}}]
    info = c.get("/api/models/higgs").json()
    assert [v["version"] for v in info["versions"]] == [1, 2]
    v1 = c.get("/api/models/higgs/versions/1").json()
    assert v1["model"] == "higgs" and v1["version"] == 1
    assert v1["metrics"]["test"] and v1["spec"]["task"] == "binary" and v1["created"]
    r = c.put("/api/models/higgs/aliases/production", json={"version": 1})
    assert r.status_code == 200 and r.json()["aliases"] == {"production": 1}
    assert c.put("/api/models/higgs/aliases/staging", json=2).json()["aliases"] == {
        "production": 1, "staging": 2}
    assert c.get("/api/models/higgs").json()["aliases"] == {"production": 1, "staging": 2}
    r = c.delete("/api/models/higgs/versions/1")
    assert r.status_code == 200 and r.json() == {"model": "higgs", "deleted": 1}
    assert c.get("/api/models/higgs").json()["aliases"] == {"staging": 2}
    assert c.delete("/api/models/higgs/aliases/staging").json()["aliases"] == {}
    c.delete("/api/models/higgs/versions/2")
    assert c.get("/api/models").json() == {"models": []}
    app = c.app
    assert isinstance(app.state.registry, Registry)  # type: ignore[attr-defined]


def test_predict_rows_and_columns(loaded: TestClient, trained: dict[str, Any]) -> None:
    expected = _expected(trained, trained["rows"])
    assert expected[1] is None and all(isinstance(s, float) for i, s in enumerate(expected)
                                       if i != 1)
    for events in (trained["rows"], trained["columns"], {"events": trained["rows"]}):
        r = loaded.post("/api/models/higgs/predict", json=events)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "higgs" and body["version"] == 2
        assert body["outputs"][1] is None
        np.testing.assert_allclose([np.nan if s is None else s for s in body["outputs"]],
                                   [np.nan if s is None else s for s in expected], rtol=1e-6)


def test_predict_version_and_alias(loaded: TestClient, trained: dict[str, Any]) -> None:
    url = "/api/models/higgs/predict"
    rows = trained["rows"]
    assert loaded.post(url, json=rows, params={"version": 1}).json()["version"] == 1
    loaded.put("/api/models/higgs/aliases/staging", json={"version": 1})
    assert loaded.post(url, json=rows, params={"alias": "staging"}).json()["version"] == 1
    loaded.put("/api/models/higgs/aliases/production", json={"version": 1})
    assert loaded.post(url, json=rows).json()["version"] == 1  # production is the default


def test_not_found(loaded: TestClient) -> None:
    rows = [{"MET_pt": 10, "Jet_pt": []}]
    cases = [
        ("POST", "/api/models/nope/predict", rows),
        ("POST", "/api/models/higgs/predict?version=7", rows),
        ("POST", "/api/models/higgs/predict?alias=canary", rows),
        ("GET", "/api/models/nope", None),
        ("GET", "/api/models/higgs/versions/9", None),
        ("DELETE", "/api/models/higgs/versions/9", None),
        ("PUT", "/api/models/higgs/aliases/production", {"version": 9}),
        ("DELETE", "/delete/nope", None),
        ("POST", "/json", {"keys": ["MET_pt", "Jet_pt"], "values": [1, []], "model": "nope"}),
    ]
    for method, url, body in cases:
        r = loaded.request(method, url, json=body)
        assert r.status_code == 404, (url, r.text)
        assert r.json()["error"] == "ModelNotFound" and r.json()["message"], url
    assert loaded.get("/no/such/route").status_code == 404


def test_bad_events_and_requests(loaded: TestClient) -> None:
    url = "/api/models/higgs/predict"
    r = loaded.post(url, json=[{"MET_pt": 10, "Jet_pt": [1.0]},
                               {"MET_pt": "high", "Jet_pt": [1.0]}])
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "InvalidEvent" and body["event"] == 1 and body["field"] == "MET_pt"
    assert "'high'" in body["message"]
    r = loaded.post(url, json=[{"MET_pt": 10, "Jet_pt": [1.0, "x"]}])
    assert r.status_code == 400 and (r.json()["event"], r.json()["field"]) == (0, "Jet_pt")
    r = loaded.post(url, json=[{"MET_pt": 10}])
    assert r.status_code == 400 and r.json()["field"] == "Jet_pt"
    r = loaded.post(url, content=b'[{"MET_pt": 10,', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "BadRequest"
    assert "not valid JSON" in r.json()["message"]
    r = loaded.post(url, json=[], params={"version": "one"})
    assert r.status_code == 400 and r.json()["error"] == "BadRequest"
    r = loaded.put("/api/models/higgs/aliases/production", json={"v": 1})
    assert r.status_code == 400 and r.json()["field"] == "version"
    r = loaded.put("/api/models/higgs/aliases/bad%20alias", json=1)
    assert r.status_code == 400 and r.json()["error"] == "InvalidName"


def test_bad_uploads_are_400_and_change_nothing(loaded: TestClient,
                                                trained: dict[str, Any]) -> None:
    before = loaded.get("/api/models").json()
    bad = [
        np.random.default_rng(1).bytes(3000),
        trained["bytes"][:-200],
        _tar("../evil"),
        _tar("/tmp/evil-abs"),
        _tar("bundle/spec.json", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        _tar("bundle/spec.json", json.dumps({"format_version": 1}).encode()),
    ]
    for data in bad:
        for name in ("higgs", "other"):
            r = loaded.post(f"/api/models/{name}", content=data)
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "BundleError"
    assert loaded.post("/api/models/..bad", content=trained["bytes"]).status_code == 400
    assert loaded.get("/api/models").json() == before
    assert not Path("/tmp/evil-abs").exists()


def test_body_limit(tmp_path: Path, trained: dict[str, Any]) -> None:
    app = create_app(tmp_path / "models", max_body_bytes=1000)
    with TestClient(app) as c:
        r = c.post("/api/models/higgs", content=trained["bytes"])
        assert r.status_code == 413 and r.json()["error"] == "RequestTooLarge"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b"x" * 500

        r = c.post("/api/models/higgs", content=chunks())
        assert r.status_code == 413 and r.json()["error"] == "RequestTooLarge"
        r = c.post("/upload", data={"name": "higgs"}, files={"model": ("b", trained["bytes"])})
        assert r.status_code == 413
        r = c.post("/api/models/higgs/predict", json=[{"MET_pt": 1.0}] * 200)
        assert r.status_code == 413
        assert c.get("/api/models").json() == {"models": []}
        assert c.post("/api/models/higgs/predict", json=[]).status_code == 404


def test_internal_errors_hide_tracebacks(tmp_path: Path) -> None:
    router = APIRouter()

    async def boom() -> None:
        raise RuntimeError("secret detail")

    router.add_api_route("/boom", boom, methods=["GET"])
    app = create_app(tmp_path / "models", extra_routers=[router])
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500
    assert r.json()["error"] == "InternalServerError"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_tfaas_routes(client: TestClient, trained: dict[str, Any]) -> None:
    r = client.post("/upload", data={"name": "tf"},
                    files={"model": ("bundle.tar.gz", trained["bytes"], "application/gzip")})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1
    r = client.post("/upload", data={"name": "tf"},
                    files={"file": ("b.tar.gz", trained["bytes"], "application/octet-stream")})
    assert r.json()["version"] == 2
    r = client.post("/upload", params={"name": "raw"}, content=trained["bytes"])
    assert r.status_code == 201 and r.json()["version"] == 1
    r = client.post("/upload", data={"name": "tf"},
                    files={"model": ("b.tar.gz", b"garbage")})
    assert r.status_code == 400 and r.json()["error"] == "BundleError"
    models = client.get("/models").json()
    assert [m["name"] for m in models] == ["raw", "tf"]
    assert models[1]["versions"] == [1, 2] and models[1]["latest"] == 2
    assert models[1]["aliases"] == {} and models[1]["model"] == "model.onnx"
    assert models[1]["inputNode"] == "x" and models[1]["outputNode"] == "score"
    assert models[1]["timestamp"] and "version 2" in models[1]["description"]

    rows = trained["rows"]
    expected = _expected(trained, rows)
    keys = ["MET_pt", "Jet_pt"]
    one = client.post("/json", json={"keys": keys, "values": [rows[0]["MET_pt"],
                                                              rows[0]["Jet_pt"]],
                                     "model": "tf"})
    assert one.status_code == 200, one.text
    np.testing.assert_allclose(one.json(), expected[:1], rtol=1e-6)
    many = client.post("/json", json={"keys": keys, "model": "tf",
                                      "values": [[r["MET_pt"], r["Jet_pt"]] for r in rows]})
    got = many.json()
    assert got[1] is None and len(got) == len(rows)
    np.testing.assert_allclose([g for g in got if g is not None],
                               [e for e in expected if e is not None], rtol=1e-6)
    r = client.post("/json", json={"keys": keys, "values": ["x", [1.0]], "model": "tf"})
    assert r.status_code == 400 and r.json()["field"] == "MET_pt"
    r = client.post("/json", json={"keys": keys, "values": [1.0, [1.0]]})  # two models
    assert r.status_code == 400 and r.json()["field"] == "model"

    r = client.delete("/delete/tf")
    assert r.status_code == 200 and r.json() == {"model": "tf", "deleted": [1, 2]}
    assert [m["name"] for m in client.get("/models").json()] == ["raw"]
    # with one model left, "model" may be omitted
    assert client.post("/json", json={"keys": keys, "values": [1.0, [1.0]]}).status_code == 200


def test_tfaas_models_reads_two_files_per_model(client: TestClient, trained: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``GET /models`` reads each model's aliases (the listing) and, of the version served
    by default, only its .registry.json and spec.json, once; the answer is what
    :meth:`Registry.version` describes."""
    for name in ("tf", "tf", "raw"):
        assert client.post(f"/api/models/{name}", content=trained["bytes"]).status_code == 201
    assert client.put("/api/models/tf/aliases/production", json=1).status_code == 200
    registry: Registry = client.app.state.registry  # type: ignore[attr-defined]

    def params(name: str, version: int) -> dict[str, Any]:
        info = registry.version(name, version)
        spec = info["spec"]
        return {"name": name, "model": "model.onnx",
                "inputNode": ",".join(t["name"] for t in spec["inputs"]),
                "outputNode": ",".join(t["name"] for t in spec["outputs"]),
                "description": f"mlaas bundle {spec['name'] or name}, task {spec['task']}, "
                               f"version {version}",
                "timestamp": info["created"]}

    want = [{**params("raw", 1), "versions": [1], "latest": 1, "aliases": {}},
            {**params("tf", 1), "versions": [1, 2], "latest": 2,
             "aliases": {"production": 1}}]
    reads: list[str] = []
    real = registry_module._read_json

    def read_json(path: Path) -> dict[str, Any]:
        reads.append(path.relative_to(registry.root).as_posix())
        return real(path)

    monkeypatch.setattr(registry_module, "_read_json", read_json)
    assert client.get("/models").json() == want
    assert sorted(reads) == ["raw/1/.registry.json", "raw/1/spec.json", "raw/aliases.json",
                             "tf/1/.registry.json", "tf/1/spec.json", "tf/aliases.json"]


def test_issue4_tfaas_upload_without_a_name(client: TestClient,
                                            trained: dict[str, Any]) -> None:
    """TFaaS clients send a bare tarball (``curl --data-binary @x.tar.gz``): the name is the
    bundle's own (spec.json), else the file's; the multipart form keeps working."""
    named = with_spec(trained["bytes"], name="from-spec")
    unnamed = with_spec(trained["bytes"], name=None)
    r = client.post("/upload", content=named,
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert r.json()["model"] == "from-spec" and r.json()["version"] == 1
    r = client.post("/upload", content=unnamed,
                    headers={"content-disposition": 'attachment; filename="from-file.tar.gz"'})
    assert r.status_code == 201 and r.json()["model"] == "from-file"
    r = client.post("/upload", files={"model": ("form-file.tgz", unnamed)})
    assert r.status_code == 201 and r.json()["model"] == "form-file"
    r = client.post("/upload", files={"model": ("form-file.tgz", named)})  # the spec wins
    assert r.status_code == 201 and r.json()["model"] == "from-spec" and r.json()["version"] == 2
    r = client.post("/upload", params={"name": "given"}, content=named)  # a given name wins
    assert r.status_code == 201 and r.json()["model"] == "given"
    for body in (unnamed, b"garbage"):  # nothing to take a name from
        r = client.post("/upload", content=body)
        assert r.status_code == 400 and r.json()["field"] == "name", r.text
    assert [m["name"] for m in client.get("/models").json()] == [
        "form-file", "from-file", "from-spec", "given"]


def test_hot_loading_between_apps(tmp_path: Path, trained: dict[str, Any]) -> None:
    """Two servers on one registry directory: an upload through one is served by the other."""
    with TestClient(create_app(tmp_path)) as a, TestClient(create_app(tmp_path)) as b:
        a.post("/api/models/m", content=trained["bytes"])
        assert b.post("/api/models/m/predict", json=trained["rows"]).json()["version"] == 1
        a.post("/api/models/m", content=trained["bytes"])
        assert b.post("/api/models/m/predict", json=trained["rows"]).json()["version"] == 2
        a.delete("/delete/m")
        assert b.post("/api/models/m/predict", json=trained["rows"]).status_code == 404
