"""`mlaas serve` as assembled: registry upload, v2 inference with batching, /metrics, --get."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from typer.testing import CliRunner

from mlaas.bundle import Bundle
from mlaas.cli import app as cli
from mlaas.serve.server import create_server
from serve_support import samples

with warnings.catch_warnings():
    # starlette >= 1.x asks for its httpx fork ("httpx2"); httpx works the same here
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


def test_upload_infer_and_metrics(tmp_path: Path, trained: dict[str, Any]) -> None:
    with TestClient(create_server(tmp_path / "models")) as client:
        r = client.post("/api/models/higgs", content=trained["bytes"])
        assert r.status_code == 201, r.text
        bundle = Bundle.load(trained["dir"])
        x = np.random.default_rng(0).normal(size=(3, len(bundle.spec["feature_names"])))
        body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.astype(np.float32).ravel().tolist()}]}
        assert bundle.input_names == ["x"]
        r = client.post("/v2/models/higgs/infer", json=body)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
        np.testing.assert_allclose(got, bundle.run(x.astype(np.float32), None), atol=1e-6)
        assert client.get("/v2/models/higgs/ready").status_code == 200
        assert client.get("/v2/models/nope/ready").status_code == 404
        r = client.post("/api/models/higgs/predict", json=trained["rows"])
        assert r.status_code == 200, r.text
        want = bundle.predict_events(trained["rows"])[:, 0]
        got = r.json()["outputs"]
        assert [g is None for g in got] == np.isnan(want).tolist()
        np.testing.assert_allclose([g for g in got if g is not None], want[~np.isnan(want)],
                                   atol=1e-6)
        assert client.post("/api/models/nope/predict", json=trained["rows"]).status_code == 404
        metrics = client.get("/metrics").text
        assert "mlaas_requests_total" in metrics and 'model="higgs"' in metrics
        # one v2 call (3 events) and one raw call (its events passing the cut) were batched
        batches = [line for line in metrics.splitlines()
                   if line.startswith('mlaas_batch_size_count{model="higgs"')]
        assert batches and float(batches[0].split()[-1]) == 2.0


def test_serve_get_answers_in_process(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["serve", "--models", str(tmp_path / "m"), "--get", "/v2/health/ready"])
    assert ok.exit_code == 0, ok.output
    missing = runner.invoke(cli, ["serve", "--models", str(tmp_path / "m"), "--get",
                                  "/v2/models/none"])
    assert missing.exit_code == 1
    assert json.loads(runner.invoke(cli, ["serve", "--models", str(tmp_path / "m"), "--get",
                                          "/api/models"]).stdout) is not None


def test_serve_access_log_is_off_unless_asked(tmp_path: Path, monkeypatch: Any) -> None:
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(options))
    runner = CliRunner()
    assert runner.invoke(cli, ["serve", "--models", str(tmp_path / "m")]).exit_code == 0
    assert runner.invoke(cli, ["serve", "--models", str(tmp_path / "m"),
                               "--access-log"]).exit_code == 0
    assert [c["access_log"] for c in calls] == [False, True]
    assert all(c["host"] == "127.0.0.1" and c["log_level"] == "info" for c in calls)


class RecordingAccess:
    """Allows everything, noting the route template and router each check saw."""

    blocking = False

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def check(self, request: Any, action: str, name: str) -> None:
        self.seen.append((request.scope["route"].path, "router" in request.scope))

    def on_upload(self, request: Any, name: str) -> dict[str, Any]:
        return {}

    def visible(self, request: Any, names: list[str]) -> list[str]:
        return names


def test_infer_routes_answered_directly_behave_as_routed(tmp_path: Path,
                                                         trained: dict[str, Any]) -> None:
    """create_server hands v2 infer requests to their route from its innermost middleware
    (DirectRoutes); the answers, limits and errors are those of the routed app."""
    access = RecordingAccess()
    limit = len(trained["bytes"]) + 100_000
    with TestClient(create_server(tmp_path / "models", access=access,
                                  max_body_bytes=limit)) as client:
        assert client.post("/api/models/higgs", content=trained["bytes"]).status_code == 201
        bundle = Bundle.load(trained["dir"])
        x = np.random.default_rng(1).normal(size=(300, len(bundle.spec["feature_names"])))
        x = x.astype(np.float32)
        header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        for path in ("/v2/models/higgs/infer", "/v2/models/higgs/versions/1/infer"):
            r = client.post(path, content=header + x.tobytes(), headers=headers)
            assert r.status_code == 200, r.text
            n = int(r.headers["inference-header-content-length"])
            assert r.headers["content-type"] == "application/octet-stream"
            got = np.frombuffer(r.content[n:], dtype="<f4").reshape(300, -1)
            np.testing.assert_allclose(got, bundle.run(x, None), atol=1e-6)
        assert access.seen[-2:] == [("/v2/models/{name}/infer", True),
                                    ("/v2/models/{name}/versions/{v}/infer", True)]
        # another method: the router's 405; another model: 404; too large a body: 413
        r = client.get("/v2/models/higgs/infer")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        r = client.post("/v2/models/nope/infer", content=header + x.tobytes(), headers=headers)
        assert r.status_code == 404 and "nope" in r.json()["error"]
        big = np.zeros((limit // (4 * x.shape[1]) + 1, x.shape[1]), np.float32)
        r = client.post("/v2/models/higgs/infer", content=header + big.tobytes(),
                        headers=headers)
        assert r.status_code == 413, r.text
        r = client.post("/v2/models/higgs/versions/x/infer", content=b"{}")
        assert r.status_code == 400 and "version 'x'" in r.json()["error"]


def test_issue4_every_model_route_is_in_the_metrics(tmp_path: Path,
                                                    trained: dict[str, Any]) -> None:
    """Raw-event, TFaaS and registry routes count requests, errors and latency by route
    template, model, version and status, as the /v2 routes do."""
    predict, tfaas = "/api/models/{name}/predict", "/json"
    with TestClient(create_server(tmp_path / "models")) as client:
        assert client.post("/api/models/higgs", content=trained["bytes"]).status_code == 201
        assert client.post("/api/models/higgs/predict", json=trained["rows"]).status_code == 200
        r = client.post("/api/models/higgs/predict", json=[{"MET_pt": "x", "Jet_pt": []}])
        assert r.status_code == 400, r.text
        body = {"keys": ["MET_pt", "Jet_pt"], "values": [20.0, [30.0]], "model": "higgs"}
        assert client.post("/json", json=body).status_code == 200
        r = client.post("/json", json={**body, "values": ["x", [1.0]]})
        assert r.status_code == 400, r.text
        assert client.get("/api/models/nope").status_code == 404
        assert client.get("/models").status_code == 200
        text = client.get("/metrics").text

    requests = samples(text, "mlaas_requests_total")
    errors = samples(text, "mlaas_errors_total")
    seconds = samples(text, "mlaas_request_seconds_count")

    def key(route: str, status: int | None = None, model: str = "higgs",
            version: str = "1") -> tuple[tuple[str, str], ...]:
        labels = {"route": route, "model": model, "version": version}
        if status is not None:
            labels["status"] = str(status)
        return tuple(sorted(labels.items()))

    for route in (predict, tfaas):
        assert requests[key(route, 200)] == 1 and requests[key(route, 400)] == 1
        assert errors[key(route, 400)] == 1 and key(route, 200) not in errors
        assert seconds[key(route)] == 2
    assert requests[key("/api/models/{name}", 201)] == 1  # the upload, with its new version
    # an unknown name is not a label value
    assert errors[key("/api/models/{name}", 404, model="", version="")] == 1
    assert requests[key("/models", 200, model="", version="")] == 1
    buckets = samples(text, "mlaas_request_seconds_bucket")
    assert buckets[(("le", "+Inf"), *key(predict))] == 2
    assert 'version="1"' in text


def test_issue4_delete_routes_let_go_of_the_versions(tmp_path: Path,
                                                     trained: dict[str, Any]) -> None:
    """After DELETE, the runtime holds no batcher (and so no ONNX session) for the version."""
    app = create_server(tmp_path / "models", freeze_gc=False)
    with TestClient(app) as client:
        for _ in range(2):
            assert client.post("/api/models/higgs", content=trained["bytes"]).status_code == 201
        for v in (1, 2):
            r = client.post(f"/api/models/higgs/predict?version={v}", json=trained["rows"])
            assert r.status_code == 200
        runtime = app.state.runtime
        assert runtime.held() == [("higgs", 1), ("higgs", 2)]
        assert client.delete("/api/models/higgs/versions/1").status_code == 200
        assert runtime.held() == [("higgs", 2)]
        assert client.delete("/delete/higgs").status_code == 200
        assert runtime.held() == []


def test_predict_answered_directly_keeps_the_routed_answers(tmp_path: Path,
                                                            trained: dict[str, Any]) -> None:
    """create_server hands raw-event predicts to their plain ASGI handler from its innermost
    middleware (mlaas.serve.direct): the access policy still sees the route, and every
    answer, limit and error is the one the FastAPI route gave."""
    access = RecordingAccess()
    limit = len(trained["bytes"]) + 100_000
    with TestClient(create_server(tmp_path / "models", access=access,
                                  max_body_bytes=limit)) as client:
        for _ in range(2):
            assert client.post("/api/models/higgs", content=trained["bytes"]).status_code == 201
        assert client.put("/api/models/higgs/aliases/production", json=1).status_code == 200
        url = "/api/models/higgs/predict"
        want = Bundle.load(trained["dir"]).predict_events(trained["rows"])[:, 0]
        for query, version in (("", 1), ("?version=2", 2), ("?alias=production", 1),
                               ("?version=1&version=2", 2)):
            r = client.post(url + query, json=trained["rows"])
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/json"
            assert r.json()["version"] == version and r.json()["model"] == "higgs"
            got = np.array([np.nan if g is None else g for g in r.json()["outputs"]])
            np.testing.assert_allclose(got, want, atol=1e-6)
        assert access.seen[-1] == ("/api/models/{name}/predict", True)

        r = client.post(url + "?version=abc", json=trained["rows"])
        assert r.status_code == 400
        assert r.json()["problems"] == [["query.version", "Input should be a valid integer, "
                                         "unable to parse string as an integer"]]
        r = client.post(url + "?version=7", json=trained["rows"])
        assert r.status_code == 404 and r.json()["error"] == "ModelNotFound", r.text
        r = client.post(url + "?alias=nope", json=trained["rows"])
        assert r.status_code == 404 and "nope" in r.json()["message"], r.text
        r = client.post("/api/models/nope/predict", json=trained["rows"])
        assert r.status_code == 404 and "nope" in r.json()["message"], r.text
        r = client.post(url, content=b"[{")
        assert r.status_code == 400 and "not valid JSON" in r.json()["message"], r.text
        r = client.post(url, json=[{"MET_pt": "x", "Jet_pt": []}])
        assert r.status_code == 400 and "MET_pt" in r.json()["message"], r.text
        r = client.post(url, content=b"[" + b"1," * limit + b"1]")
        assert r.status_code == 413, r.text
        r = client.get(url)
        assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_predict_query_is_bound_as_fastapi_binds_it() -> None:
    """The direct predict handler parses ?version= and ?alias= itself; for each query it
    must give what FastAPI gives for the documented signature (version: int | None)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    from mlaas.serve.app import _version_and_alias

    reference = FastAPI()

    @reference.get("/q")
    def bound(version: int | None = None, alias: str | None = None) -> dict[str, Any]:
        return {"version": version, "alias": alias}

    queries = ["", "version=3", "version=%2B3", "version=-2", "version=%203%20", "version=1.0",
               "version=1_0", "version=abc", "version=", "alias=prod", "alias=",
               "version=1&version=2", "alias=a&alias=b&version=4", "other=1"]
    with TestClient(reference) as client:
        for query in queries:
            r = client.get("/q?" + query)
            scope = {"query_string": query.encode()}
            if r.status_code == 422:
                try:
                    _version_and_alias(scope)
                except RequestValidationError as exc:
                    assert [e["loc"] for e in exc.errors()] == [("query", "version")], query
                    continue
                raise AssertionError(f"{query!r}: FastAPI refuses it, the handler took it")
            assert r.status_code == 200, query
            assert list(_version_and_alias(scope)) == [r.json()["version"], r.json()["alias"]], query
