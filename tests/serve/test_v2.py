"""The KServe v2 routes end to end: real uvicorn servers on 127.0.0.1, a real tritonclient.

Against a bare app of the v2 router (one model, a stand-in registry) and
against ``mlaas serve`` itself (create_server, a real registry holding two
versions).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from mlaas.bundle import Bundle
from mlaas.data import synth
from mlaas.serve.metrics import Metrics
from mlaas.serve.routes_v2 import v2_router
from mlaas.serve.runtime import Runtime
from mlaas.serve.server import create_server
from mlaas.train.run import run
from serve_support import running

import tritonclient.http as triton

pytestmark = pytest.mark.network


class OneBundleRegistry:
    """A stand-in registry: one model ``m``, version 1, over a real bundle."""

    def __init__(self, bundle: Bundle) -> None:
        self._bundle = bundle

    def resolve(self, name: str, version: int | None = None, alias: str | None = None
                ) -> tuple[int, Path]:
        if name != "m" or version not in (None, 1):
            raise KeyError(f"no model {name!r} version {version!r}")
        return 1, self._bundle.path

    def bundle(self, name: str, version: int | None = None) -> tuple[int, Bundle]:
        v, _ = self.resolve(name, version)
        return v, self._bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    d = tmp_path_factory.mktemp("v2")
    files = synth.generate(d / "data", 2000, seed=1)["files"]
    spec = {
        "data": {"sources": [{"name": "signal", "files": [str(files["signal"])], "label": 1},
                             {"name": "background", "files": [str(files["background"])],
                              "label": 0}],
                 "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 4}]},
        "model": {"builtin": "deepsets", "phi": [8], "rho": [8]},
        "train": {"epochs": 1},
    }
    run(spec, d / "out", progress=False)
    return Bundle.load(d / "out" / "bundle")


@pytest.fixture(scope="module")
def server(bundle: Bundle) -> Iterator[tuple[str, Metrics]]:
    registry = OneBundleRegistry(bundle)
    metrics = Metrics()
    runtime = Runtime(registry, max_delay_ms=1.0, metrics=metrics)
    app = FastAPI()
    app.include_router(v2_router(runtime, registry, metrics))
    try:
        with running(app) as address:
            yield address, metrics
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def mlaas_serve(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlaas serve`` (create_server) under uvicorn, model ``m`` at versions 1 and 2."""
    app = create_server(tmp_path_factory.mktemp("served") / "models", freeze_gc=False)
    archive = (Path(bundle.path).parent / "bundle.tar.gz").read_bytes()
    with running(app) as address:
        for v in (1, 2):
            r = httpx.post(f"http://{address}/api/models/m", content=archive)
            assert r.status_code == 201 and r.json()["version"] == v, r.text
        yield address


def _inputs(n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 100, size=(n, 5)).astype(np.float32)
    mask = (rng.uniform(size=(n, 4)) > 0.4).astype(np.float32)
    return x, mask


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_tritonclient_infer(server: tuple[str, Metrics], bundle: Bundle, binary_in: bool,
                            binary_out: bool) -> None:
    url, _ = server
    x, mask = _inputs()
    client = triton.InferenceServerClient(url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("m") and client.is_model_ready("m", "1")
        assert not client.is_model_ready("nope")
        meta = client.get_model_metadata("m")
        assert meta["name"] == "m" and meta["versions"] == ["1"]
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 5]},
                                  {"name": "mask", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}]
        ins = [triton.InferInput("x", list(x.shape), "FP32"),
               triton.InferInput("mask", list(mask.shape), "FP32")]
        ins[0].set_data_from_numpy(x, binary_data=binary_in)
        ins[1].set_data_from_numpy(mask, binary_data=binary_in)
        outs = [triton.InferRequestedOutput("score", binary_data=binary_out)]
        result = client.infer("m", ins, outputs=outs, request_id="abc")
        got = result.as_numpy("score")
        np.testing.assert_allclose(got, bundle.run(x, mask), rtol=0, atol=1e-6)
        response = result.get_response()
        assert response["model_version"] == "1" and response["id"] == "abc"
        result = client.infer("m", ins, model_version="1")  # no outputs named: binary by default
        np.testing.assert_allclose(result.as_numpy("score"), bundle.run(x, mask), atol=1e-6)
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_issue4_tritonclient_against_mlaas_serve(mlaas_serve: str, bundle: Bundle,
                                                 binary: bool) -> None:
    x, mask = _inputs()
    want = bundle.run(x, mask)
    client = triton.InferenceServerClient(mlaas_serve)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("m")
        assert client.is_model_ready("m", "1") and client.is_model_ready("m", "2")
        assert not client.is_model_ready("m", "3") and not client.is_model_ready("nope")
        meta = client.get_model_metadata("m", "2")
        assert meta["name"] == "m" and meta["versions"] == ["2"]
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 5]},
                                  {"name": "mask", "datatype": "FP32", "shape": [-1, 4]}]
        assert client.get_model_metadata("m")["versions"] == ["1", "2"]
        ins = [triton.InferInput("x", list(x.shape), "FP32"),
               triton.InferInput("mask", list(mask.shape), "FP32")]
        ins[0].set_data_from_numpy(x, binary_data=binary)
        ins[1].set_data_from_numpy(mask, binary_data=binary)
        outs = [triton.InferRequestedOutput("score", binary_data=binary)]
        for version, served in (("1", "1"), ("2", "2"), ("", "2")):  # "": the default
            result = client.infer("m", ins, model_version=version, outputs=outs,
                                  request_id=f"r{version}")
            np.testing.assert_allclose(result.as_numpy("score"), want, rtol=0, atol=1e-6)
            response = result.get_response()
            assert response["model_version"] == served and response["id"] == f"r{version}"
        with pytest.raises(triton.InferenceServerException) as info:
            client.infer("m", ins, model_version="one", outputs=outs)
        assert info.value.status() == "400" and "'one'" in info.value.message()
    finally:
        client.close()


def test_concurrent_requests_are_batched(server: tuple[str, Metrics], bundle: Bundle) -> None:
    url, metrics = server
    x, mask = _inputs(40)
    body = lambda i: {"inputs": [  # noqa: E731
        {"name": "x", "shape": [1, 5], "datatype": "FP32", "data": x[i].tolist()},
        {"name": "mask", "shape": [1, 4], "datatype": "FP32", "data": mask[i].tolist()}]}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=f"http://{url}") as c:
            return await asyncio.gather(*(c.post("/v2/models/m/infer", json=body(i))
                                          for i in range(40)))

    responses = asyncio.run(main())
    got = np.array([r.json()["outputs"][0]["data"] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, bundle.run(x, mask), atol=1e-6)
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    assert b'mlaas_requests_total{model="m",route="/v2/models/{name}/infer",status="200"' in text
    assert b"mlaas_batch_size_count" in text


def _post(url: str, path: str, doc: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"http://{url}{path}", json=doc)


def _good() -> dict[str, Any]:
    x, mask = _inputs(2)
    return {"inputs": [{"name": "x", "shape": [2, 5], "datatype": "FP32",
                        "data": x.ravel().tolist()},
                       {"name": "mask", "shape": [2, 4], "datatype": "FP32",
                        "data": mask.ravel().tolist()}]}


def test_bad_requests(server: tuple[str, Metrics]) -> None:
    url, metrics = server
    assert _post(url, "/v2/models/m/infer", _good()).status_code == 200
    wrong_shape = _good()
    wrong_shape["inputs"][0]["shape"] = [2, 4]
    wrong_type = _good()
    wrong_type["inputs"][1]["datatype"] = "BYTES"
    missing = _good()
    del missing["inputs"][1]
    for doc, tensor in ((wrong_shape, "x"), (wrong_type, "mask"), (missing, "mask")):
        r = _post(url, "/v2/models/m/infer", doc)
        assert r.status_code == 400, r.text
        assert f"'{tensor}'" in r.json()["error"]
    r = httpx.post(f"http://{url}/v2/models/m/infer", content=b"{oops")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    for path in ("/v2/models/nope/infer", "/v2/models/m/versions/9/infer",
                 "/v2/models/m/versions/0/infer"):
        r = _post(url, path, _good())
        assert r.status_code == 404 and "error" in r.json()
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/m/versions/2/ready"):
        assert httpx.get(f"http://{url}{path}").status_code == 404
    assert httpx.get(f"http://{url}/v2/models/m/versions/1").json()["versions"] == ["1"]
    text, _ = metrics.render()
    assert b'mlaas_errors_total{model="",route="/v2/models/{name}/infer",status="404"' in text


def test_issue4_non_integer_version_is_400_naming_it(server: tuple[str, Metrics]) -> None:
    """As ``/api/models/{name}/versions/abc`` answers: the path is malformed, not unknown."""
    url, metrics = server
    for method, path in (("POST", "/v2/models/m/versions/x/infer"),
                         ("POST", "/v2/models/m/versions/1.5/infer"),
                         ("GET", "/v2/models/m/versions/abc"),
                         ("GET", "/v2/models/m/versions/abc/ready")):
        r = httpx.request(method, f"http://{url}{path}", json=_good())
        assert r.status_code == 400, (path, r.text)
        bad = path.split("/versions/")[1].split("/")[0]
        assert f"version {bad!r}" in r.json()["error"]
    text, _ = metrics.render()
    assert (b'mlaas_errors_total{model="",route="/v2/models/{name}/versions/{v}/infer",'
            b'status="400",version=""}') in text
