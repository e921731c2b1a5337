"""Raw-event requests batched with their preprocessing, and the registry's state token.

Uses the real bundle of ``conftest.trained`` and a real :class:`Registry`.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlaas.bundle import Bundle, InvalidEvent
from mlaas.serve import registry as registry_module
from mlaas.serve import runtime
from mlaas.serve.registry import Registry
from mlaas.serve.runtime import Runtime, _as_rows


@pytest.fixture
def served(tmp_path: Path, trained: dict[str, Any], request: pytest.FixtureRequest) -> Any:
    """A registry with model ``m`` and a Runtime whose batches fire only when full
    (``max_batch_size`` is the indirect parameter, the delay is 5 s)."""
    reg = Registry(tmp_path / "models")
    reg.upload("m", trained["bytes"])
    size = getattr(request, "param", 64)
    rt = Runtime(reg, max_batch_size=size, max_delay_ms=5_000.0, threads=1)
    yield reg, rt
    rt.close()


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=1e-6)


@pytest.mark.parametrize("served", [12], indirect=True)  # 5 + 5 + 2 events: full at once
def test_concurrent_event_requests_share_one_preprocessing(
        served: Any, trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    reg, rt = served
    bundle = Bundle.load(trained["dir"])
    rows = trained["rows"]
    requests: list[Any] = [[r] for r in rows] + [trained["columns"], {"events": rows[:2]}]
    calls: list[int] = []
    score = runtime.score_events

    def counting(b: Any, run: Any, ev: Any) -> np.ndarray:
        calls.append(len(ev))
        return score(b, run, ev)

    monkeypatch.setattr(runtime, "score_events", counting)

    async def main() -> list[tuple[int, np.ndarray]]:
        return await asyncio.gather(*(rt.predict_events("m", None, None, r) for r in requests))

    results = asyncio.run(main())
    assert calls == [len(rows) * 2 + 2]  # one preprocessing + ONNX call for all requests
    for req, (v, got) in zip(requests, results):
        assert v == 1
        _same(got, bundle.predict_events(req))


@pytest.mark.parametrize("served", [7], indirect=True)  # 2 + 3 + 2 events
def test_a_bad_request_fails_alone_naming_its_own_event(served: Any,
                                                        trained: dict[str, Any]) -> None:
    reg, rt = served
    rows = trained["rows"]
    bad = copy.deepcopy(rows[:3])
    bad[2]["MET_pt"] = "high"

    async def main() -> list[Any]:
        return await asyncio.gather(rt.predict_events("m", None, None, rows[:2]),
                                    rt.predict_events("m", None, None, bad),
                                    rt.predict_events("m", None, None, rows[3:]),
                                    return_exceptions=True)

    good1, err, good2 = asyncio.run(main())
    assert isinstance(err, InvalidEvent)
    assert "event 2" in str(err) and err.field == "MET_pt"  # type: ignore[attr-defined]
    bundle = Bundle.load(trained["dir"])
    _same(good1[1], bundle.predict_events(rows[:2]))
    _same(good2[1], bundle.predict_events(rows[3:]))


def test_unusual_shapes_run_alone_with_their_own_errors(served: Any) -> None:
    _, rt = served
    assert _as_rows([1, 2], {"MET_pt": {}}) is None
    assert _as_rows({"MET_pt": [1.0], "Jet_pt": [[1.0], [2.0]]}, {"MET_pt": {}, "Jet_pt": {}}) \
        is None
    assert _as_rows({"MET_pt": [1.0], "Jet_pt": [[2.0]]}, {"MET_pt": {}, "Jet_pt": {}}) == [
        {"MET_pt": 1.0, "Jet_pt": [2.0]}]
    with pytest.raises(InvalidEvent,
                       match="column 'MET_pt' has 2 values but column 'Jet_pt' has 1"):
        asyncio.run(rt.predict_events("m", None, None,
                                      {"MET_pt": [1.0, 2.0], "Jet_pt": [[3.0]]}))
    with pytest.raises(InvalidEvent, match="event 1 is a int"):
        asyncio.run(rt.predict_events("m", None, None, [{"MET_pt": 1.0, "Jet_pt": []}, 3]))
    v, empty = asyncio.run(rt.predict_events("m", None, None, []))
    assert v == 1 and empty.shape[0] == 0


def test_state_token_follows_every_change(tmp_path: Path, trained: dict[str, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_SETTLE_NS", 0)
    reg = Registry(tmp_path / "r")
    other = Registry(tmp_path / "r")  # another process's view of the same root
    assert reg.state_token("m") is None and reg.state_token("../x") is None
    other.upload("m", trained["bytes"])
    tokens = [reg.state_token("m")]
    other.upload("m", trained["bytes"])
    tokens.append(reg.state_token("m"))
    other.set_alias("m", "production", 1)
    tokens.append(reg.state_token("m"))
    other.set_alias("m", "production", 2)
    tokens.append(reg.state_token("m"))
    reg.delete_alias("m", "production")  # through this object: the counter moves too
    tokens.append(reg.state_token("m"))
    assert None not in tokens
    assert len(set(tokens)) == len(tokens), tokens


def test_state_token_distrusts_fresh_changes(tmp_path: Path, trained: dict[str, Any]) -> None:
    reg = Registry(tmp_path / "r")
    reg.upload("m", trained["bytes"])
    model_dir = tmp_path / "r" / "m"
    old = time.time_ns() - 10 * registry_module._SETTLE_NS
    os.utime(model_dir, ns=(old, old))
    assert reg.state_token("m") is not None
    now = time.time_ns()
    os.utime(model_dir, ns=(now, now))
    assert reg.state_token("m") is None


def test_runtime_sees_alias_changes_by_another_registry(tmp_path: Path, trained: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_SETTLE_NS", 0)
    reg = Registry(tmp_path / "r")
    other = Registry(tmp_path / "r")
    reg.upload("m", trained["bytes"])
    reg.upload("m", trained["bytes"])
    rt = Runtime(reg, max_delay_ms=0.0, threads=1)
    rows = trained["rows"][:1]
    try:
        assert asyncio.run(rt.predict_events("m", None, None, rows))[0] == 2
        other.set_alias("m", "production", 1)
        assert asyncio.run(rt.predict_events("m", None, None, rows))[0] == 1
        other.delete_version("m", 1)
        assert asyncio.run(rt.predict_events("m", None, None, rows))[0] == 2
    finally:
        rt.close()


def test_event_worker_process_scores_and_reports_errors(tmp_path: Path,
                                                       trained: dict[str, Any]) -> None:
    """A real spawned worker process: same scores, same error classes and context."""
    reg = Registry(tmp_path / "r")
    reg.upload("m", trained["bytes"])
    rt = Runtime(reg, max_batch_size=7, max_delay_ms=5_000.0, threads=1, event_workers=1)
    rows = trained["rows"]
    bad = copy.deepcopy(rows[:3])
    bad[1]["Jet_pt"] = 4.0
    try:
        async def main() -> list[Any]:
            return await asyncio.gather(rt.predict_events("m", None, None, rows[:2]),
                                        rt.predict_events("m", None, None, bad),
                                        rt.predict_events("m", None, None, rows[3:]),
                                        return_exceptions=True)

        good1, err, good2 = asyncio.run(main())
        bundle = Bundle.load(trained["dir"])
        _same(good1[1], bundle.predict_events(rows[:2]))
        _same(good2[1], bundle.predict_events(rows[3:]))
        assert isinstance(err, InvalidEvent), err
        assert err.event == 1 and err.field == "Jet_pt"  # type: ignore[attr-defined]
        with pytest.raises(InvalidEvent, match="event 0 is a int"):  # alone, in the worker
            asyncio.run(rt.predict_events("m", None, None, [3]))
    finally:
        rt.close()


def test_server_with_an_event_worker(tmp_path: Path, trained: dict[str, Any]) -> None:
    import warnings

    from mlaas.serve.server import create_server

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

    app = create_server(tmp_path / "models", event_workers=1)
    with TestClient(app) as client:
        assert client.post("/api/models/m", content=trained["bytes"]).status_code == 201
        r = client.post("/api/models/m/predict", json=trained["rows"])
        assert r.status_code == 200, r.text
        got = np.array([np.nan if v is None else v for v in r.json()["outputs"]])
        _same(got.astype(np.float32), Bundle.load(trained["dir"]).predict_events(
            trained["rows"])[:, 0])
        r = client.post("/api/models/m/predict", json=[{"MET_pt": "x", "Jet_pt": []}])
        assert r.status_code == 400 and r.json()["event"] == 0 and r.json()["field"] == "MET_pt"
    assert app.state.runtime.workers._pool is None  # the lifespan stopped the worker


def test_server_bundles_use_one_ort_thread(tmp_path: Path, trained: dict[str, Any]) -> None:
    from mlaas.serve.server import create_server

    app = create_server(tmp_path / "a")
    app.state.registry.upload("m", trained["bytes"])
    _, bundle = app.state.registry.bundle("m")
    assert bundle.session.get_session_options().intra_op_num_threads == 1
    other = create_server(tmp_path / "b", ort_threads=None)
    other.state.registry.upload("m", trained["bytes"])
    _, bundle = other.state.registry.bundle("m")
    assert bundle.session.get_session_options().intra_op_num_threads == min(2, os.cpu_count() or 1)


def test_server_freezes_the_gc_for_its_lifespan(tmp_path: Path) -> None:
    import gc
    import warnings

    from mlaas.serve.server import create_server

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

    assert gc.get_freeze_count() == 0
    with TestClient(create_server(tmp_path / "a")):
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    with TestClient(create_server(tmp_path / "b", freeze_gc=False)):
        assert gc.get_freeze_count() == 0


def test_the_wait_counts_from_the_end_of_the_previous_batch() -> None:
    """A request that queued during a long batch waits (up to max_delay) after that batch
    for the callers just answered, instead of running alone at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from mlaas.serve.runtime import Batcher

    sizes: list[int] = []
    gate = threading.Event()

    def run(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        sizes.append(len(x))
        if len(sizes) == 1:
            gate.wait(30)
        return x.sum(axis=1, keepdims=True)

    async def main() -> None:
        with ThreadPoolExecutor(1) as ex:
            batcher = Batcher(run, max_batch_size=8, max_delay_ms=500.0, executor=ex)
            first = asyncio.ensure_future(batcher.submit(np.ones((8, 2), np.float32), None))
            await asyncio.sleep(0.05)  # the full first batch is running
            a = asyncio.ensure_future(batcher.submit(np.ones((1, 2), np.float32), None))
            await asyncio.sleep(0.6)  # A has now waited longer than max_delay
            gate.set()
            await first
            b = await batcher.submit(np.ones((7, 2), np.float32), None)  # fills A's batch
            assert len(await a) == 1 and len(b) == 7

    asyncio.run(main())
    assert sizes == [8, 8]
