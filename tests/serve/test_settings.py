"""Per-model batching settings: the validator, the registry's store, the HTTP routes, and
that the runtime batches by them (with a real bundle, judged by the batch-size metric)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlaas.errors import BadRequest, BundleError
from mlaas.serve.registry import Registry
from mlaas.serve.server import create_server
from mlaas.serve.settings import Batching, effective, parse_settings
from serve_support import samples, with_spec

BAD = [  # (body, the field the 400 names)
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_size": -3}, "max_batch_size"),
    ({"max_batch_size": 1.5}, "max_batch_size"),
    ({"max_batch_size": "8"}, "max_batch_size"),
    ({"max_batch_size": True}, "max_batch_size"),
    ({"max_batch_size": None, "max_delay_ms": -0.5}, "max_delay_ms"),
    ({"max_delay_ms": "2"}, "max_delay_ms"),
    ({"max_delay_ms": 1e400}, "max_delay_ms"),
    ({"max_batch_size": 4, "max_delay": 2}, "max_delay"),
]


@pytest.mark.parametrize("body, field", BAD)
def test_parse_settings_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_settings(body)
    assert info.value.context["field"] == field and field in info.value.message
    with pytest.raises(BundleError) as bundle_info:
        parse_settings(body, error=BundleError, prefix="serving.")
    assert bundle_info.value.context["field"] == f"serving.{field}"


def test_parse_settings_keeps_only_what_is_set() -> None:
    assert parse_settings({}) == {}
    assert parse_settings({"max_delay_ms": 0}) == {"max_delay_ms": 0.0}
    assert parse_settings({"max_batch_size": 1, "max_delay_ms": 2.5}) == {
        "max_batch_size": 1, "max_delay_ms": 2.5}
    with pytest.raises(BadRequest):
        parse_settings([1, 2])


def test_the_operator_wins_then_the_bundle_then_the_server() -> None:
    server = Batching(256, 2.0)
    assert effective({}, None, server) == server
    bundle = {"serving": {"max_batch_size": 8, "max_delay_ms": 5}}
    assert effective({}, bundle, server) == Batching(8, 5.0)
    assert effective({"max_delay_ms": 0.0}, bundle, server) == Batching(8, 0.0)
    with pytest.raises(BundleError, match="serving.max_batch_size"):
        effective({}, {"serving": {"max_batch_size": 0}}, server)


def test_registry_stores_settings_per_model(tmp_path: Path, trained: dict[str, Any]) -> None:
    reg = Registry(tmp_path)
    reg.upload("m", trained["bytes"])
    assert reg.serving("m") == {}
    assert reg.set_serving("m", {"max_batch_size": 4}) == {"max_batch_size": 4}
    assert Registry(tmp_path).serving("m") == {"max_batch_size": 4}  # on disk
    with pytest.raises(BadRequest):
        reg.set_serving("m", {"max_batch_size": 0})
    assert reg.serving("m") == {"max_batch_size": 4}
    reg.set_serving("m", {})
    assert reg.serving("m") == {}
    with pytest.raises(KeyError):
        reg.set_serving("nope", {"max_batch_size": 4})
    reg.set_serving("m", {"max_delay_ms": 1})
    reg.delete_version("m", 1)  # the last version: the settings go with the model
    reg.upload("m", trained["bytes"])
    assert reg.serving("m") == {}


def _batches(text: str, model: str = "higgs", version: str = "1") -> tuple[float, float]:
    """(count, sum) of the batch-size histogram of one model version."""
    labels = (("model", model), ("version", version))
    return (samples(text, "mlaas_batch_size_count").get(labels, 0.0),
            samples(text, "mlaas_batch_size_sum").get(labels, 0.0))


def test_issue4_settings_route_takes_effect_on_the_next_batches(
        tmp_path: Path, trained: dict[str, Any]) -> None:
    """max_batch_size 1 merges nothing; a long max_delay_ms holds concurrent requests until
    a batch is full; both applied to a running server by PUT, without a restart."""
    app = create_server(tmp_path / "models", max_batch_size=256, max_delay_ms=2.0,
                        freeze_gc=False)
    event = [trained["rows"][0]]  # one event, passing the cut
    n = 6

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            assert (await c.post("/api/models/higgs", content=trained["bytes"])).status_code \
                == 201
            r = await c.get("/api/models/higgs/serving")
            assert r.json() == {"model": "higgs", "max_batch_size": 256, "max_delay_ms": 2.0,
                                "set": [], "versions": {"1": {"max_batch_size": 256,
                                                              "max_delay_ms": 2.0}}}

            async def predict() -> None:
                r = await c.post("/api/models/higgs/predict", json=event)
                assert r.status_code == 200, r.text

            async def batches() -> tuple[float, float]:
                return _batches((await c.get("/metrics")).text)

            # 1. one event per batch: n concurrent requests are n batches
            r = await c.put("/api/models/higgs/serving", json={"max_batch_size": 1})
            assert r.status_code == 200, r.text
            assert r.json()["max_batch_size"] == 1 and r.json()["set"] == ["max_batch_size"]
            before = await batches()
            await asyncio.gather(*(predict() for _ in range(n)))
            count, total = await batches()
            assert (count - before[0], total - before[1]) == (n, n)

            # 2. a long wait: requests are held for others to join, then merged into one
            # batch when it fills (the size is raised to n while they wait)
            r = await c.put("/api/models/higgs/serving",
                            json={"max_batch_size": 64, "max_delay_ms": 600_000})
            assert r.status_code == 200, r.text
            before = await batches()
            tasks = [asyncio.ensure_future(predict()) for _ in range(n)]
            _, batcher = await app.state.runtime.event_batcher("higgs")
            for _ in range(10_000):  # until all n wait; bounded, no clock involved
                if batcher.waiting == n:
                    break
                await asyncio.sleep(0.005)
            assert batcher.waiting == n and not any(t.done() for t in tasks)
            r = await c.put("/api/models/higgs/serving",
                            json={"max_batch_size": n, "max_delay_ms": 600_000})
            assert r.status_code == 200, r.text
            await asyncio.gather(*tasks)
            count, total = await batches()
            assert (count - before[0], total - before[1]) == (1, n)

    asyncio.run(main())


def test_issue4_bad_settings_are_400_naming_the_field(tmp_path: Path,
                                                      trained: dict[str, Any]) -> None:
    app = create_server(tmp_path / "models", freeze_gc=False)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            assert (await c.post("/api/models/m", content=trained["bytes"])).status_code == 201
            good = {"max_batch_size": 8, "max_delay_ms": 1.5}
            assert (await c.put("/api/models/m/serving", json=good)).status_code == 200
            for body, field in BAD:  # as text: httpx's encoder refuses 1e400
                r = await c.put("/api/models/m/serving", content=json.dumps(body))
                assert r.status_code == 400, (body, r.text)
                assert r.json()["field"] == field and field in r.json()["message"]
            for raw in (b"[1]", b"{oops"):
                assert (await c.put("/api/models/m/serving", content=raw)).status_code == 400
            r = await c.get("/api/models/m/serving")
            assert {k: r.json()[k] for k in good} == good  # unchanged by the refusals
            assert (await c.put("/api/models/nope/serving", json=good)).status_code == 404
            assert (await c.get("/api/models/nope/serving")).status_code == 404

    asyncio.run(main())


def test_issue4_bundle_serving_is_checked_at_upload(tmp_path: Path,
                                                    trained: dict[str, Any]) -> None:
    """A bundle's own ``serving`` is validated like the route's body; a valid one applies to
    its version unless the operator set the field."""
    app = create_server(tmp_path / "models", freeze_gc=False)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            for serving, field in (({"max_batch_size": 0}, "serving.max_batch_size"),
                                   ({"max_delay_ms": "soon"}, "serving.max_delay_ms"),
                                   ({"batch": 3}, "serving.batch"),
                                   ([3], "serving")):
                r = await c.post("/api/models/m", content=with_spec(trained["bytes"],
                                                                    serving=serving))
                assert r.status_code == 400 and r.json()["error"] == "BundleError", r.text
                assert r.json()["field"] == field
            assert (await c.get("/api/models")).json() == {"models": []}
            own = with_spec(trained["bytes"], serving={"max_delay_ms": 7})
            assert (await c.post("/api/models/m", content=own)).status_code == 201
            assert (await c.post("/api/models/m", content=trained["bytes"])).status_code == 201
            got = (await c.get("/api/models/m/serving")).json()
            assert got["versions"] == {"1": {"max_batch_size": 256, "max_delay_ms": 7.0},
                                       "2": {"max_batch_size": 256, "max_delay_ms": 2.0}}
            await c.put("/api/models/m/serving", json={"max_delay_ms": 3})
            got = (await c.get("/api/models/m/serving")).json()
            assert got["versions"]["1"] == got["versions"]["2"] == {"max_batch_size": 256,
                                                                    "max_delay_ms": 3.0}
            _, batcher = await app.state.runtime.event_batcher("m", 1)
            assert (batcher.max_batch_size, batcher.max_delay) == (256, 0.003)

    asyncio.run(main())


def _plant(path: Path, text: str) -> None:
    """Write ``path`` as an editor saving it would: a new file renamed over the old."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.replace(tmp, path)


HAND_EDITED = [  # (serving.json as edited by hand, the field the error names or None)
    ('{"max_batch_size": 0}', "max_batch_size"),
    ('{"max_batch_size": 8, "max_delay": 2}', "max_delay"),
    ('{"max_batch_size": 8,}', None),  # not JSON
    ("[8]", None),
]


def test_a_hand_edited_invalid_serving_json_is_reported_and_not_applied(
        tmp_path: Path, trained: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """GET .../serving answers 500 ServeError naming the file and the field; predictions
    go on with the bundle's or the server's settings, with one warning per problem in
    the log; PUT replaces the file."""
    app = create_server(tmp_path / "models", max_batch_size=256, freeze_gc=False)
    path = tmp_path / "models" / "m" / "serving.json"
    rows = trained["rows"]

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            assert (await c.post("/api/models/m", content=trained["bytes"])).status_code == 201
            assert (await c.put("/api/models/m/serving",
                                json={"max_batch_size": 4})).status_code == 200
            want = (await c.post("/api/models/m/predict", json=rows)).json()
            _, batcher = await app.state.runtime.event_batcher("m")
            assert batcher.max_batch_size == 4
            for text, field in HAND_EDITED:
                caplog.clear()
                _plant(path, text)
                await app.state.runtime.refresh("m")  # as a request does once it sees it
                r = await c.get("/api/models/m/serving")
                assert r.status_code == 500, r.text
                body = r.json()
                assert body["error"] == "ServeError" and body["file_path"] == "m/serving.json"
                assert body.get("field") == field
                assert "PUT /api/models/m/serving" in body["message"]
                if field is not None:
                    assert field in body["message"]
                for _ in range(2):
                    r = await c.post("/api/models/m/predict", json=rows)
                    assert r.status_code == 200 and r.json() == want, r.text
                    await app.state.runtime.refresh("m")
                assert batcher.max_batch_size == 256  # the server's default again
                warnings = [rec.getMessage() for rec in caplog.records
                            if rec.name == "mlaas.serve" and rec.levelname == "WARNING"]
                assert len(warnings) == 1, caplog.text  # once per problem
                assert "m/serving.json" in warnings[0]
                assert field is None or field in warnings[0]
            r = await c.put("/api/models/m/serving", json={"max_batch_size": 8})
            assert r.status_code == 200 and r.json()["max_batch_size"] == 8
            assert json.loads(path.read_text()) == {"max_batch_size": 8}
            assert (await c.post("/api/models/m/predict", json=rows)).json() == want
            assert batcher.max_batch_size == 8

    with caplog.at_level(logging.WARNING, logger="mlaas.serve"):
        asyncio.run(main())


def test_a_planted_bundle_with_invalid_serving_is_shown_not_served(
        tmp_path: Path, trained: dict[str, Any]) -> None:
    """A version put in the registry directory by hand whose spec.json carries an invalid
    ``serving`` (upload refuses such bundles): GET .../serving shows the other versions'
    settings and, for it, the error naming the file and the field; it is not served."""
    app = create_server(tmp_path / "models", freeze_gc=False)
    model = tmp_path / "models" / "m"

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            assert (await c.post("/api/models/m", content=trained["bytes"])).status_code == 201
            shutil.copytree(model / "1", model / ".2")
            spec = json.loads((model / ".2" / "spec.json").read_text())
            (model / ".2" / "spec.json").write_text(
                json.dumps({**spec, "serving": {"max_batch_size": 0}}))
            os.rename(model / ".2", model / "2")
            r = await c.get("/api/models/m/serving")
            assert r.status_code == 200, r.text
            assert r.json() == {
                "model": "m", "max_batch_size": 256, "max_delay_ms": 2.0, "set": [],
                "versions": {
                    "1": {"max_batch_size": 256, "max_delay_ms": 2.0},
                    "2": {"error": "BundleError",
                          "message": "invalid serving settings: serving.max_batch_size: "
                                     "Input should be greater than or equal to 1",
                          "field": "serving.max_batch_size", "file_path": "m/2/spec.json"}}}
            r = await c.post("/api/models/m/predict", json=trained["rows"])  # the latest: 2
            assert r.status_code == 400 and r.json()["error"] == "BundleError", r.text
            assert r.json()["field"] == "serving.max_batch_size"
            r = await c.post("/api/models/m/predict?version=1", json=trained["rows"])
            assert r.status_code == 200 and r.json()["version"] == 1, r.text

    asyncio.run(main())
