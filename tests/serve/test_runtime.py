"""mlaas.serve.runtime: dynamic batching (merging, splitting, errors, limits) and Runtime."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlaas.bundle import Bundle
from mlaas.errors import BadRequest
from mlaas.serve.registry import Registry
from mlaas.serve.runtime import (Batcher, InferenceError, Overloaded, Runtime, _BatchQueue,
                                 _ModelState, _runner)
from mlaas.serve.settings import Batching, ServingSettings
from serve_support import with_spec


class Recorder:
    """A run function: score = row sum + mask sum, recording each call's batch size."""

    def __init__(self, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        with self.lock:
            self.sizes.append(len(x))
        if self.fail:
            raise RuntimeError("boom")
        extra = mask.sum(axis=1) if mask is not None else 0.0
        return (x.sum(axis=1) + extra)[:, None].astype(np.float32)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as ex:
        yield ex


def _requests(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [(rng.normal(size=(1 + i % 4, 3)).astype(np.float32),
             rng.integers(0, 2, size=(1 + i % 4, 2)).astype(np.float32)) for i in range(n)]


def test_concurrent_submits_are_merged(executor: ThreadPoolExecutor) -> None:
    reqs = _requests(50)
    rec = Recorder()
    seen: list[int] = []
    batcher = Batcher(rec, max_batch_size=16, max_delay_ms=5.0, executor=executor,
                      on_batch=seen.append)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(x, m) for x, m in reqs))

    results = asyncio.run(main())
    for (x, m), got in zip(reqs, results):
        np.testing.assert_array_equal(got, rec(x, m))
    calls = rec.sizes[:-50]  # the rest are the one-by-one references above
    assert len(calls) < 50
    assert max(calls) <= 16
    assert sum(calls) == sum(len(x) for x, _ in reqs)
    assert seen == calls
    assert batcher.waiting == 0


def test_one_by_one_equals_batched(executor: ThreadPoolExecutor) -> None:
    reqs = _requests(20)
    batcher = Batcher(Recorder(), max_batch_size=32, max_delay_ms=1.0, executor=executor)

    async def one_by_one() -> list[np.ndarray]:
        return [await batcher.submit(x, m) for x, m in reqs]

    async def together() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(x, m) for x, m in reqs))

    for a, b in zip(asyncio.run(one_by_one()), asyncio.run(together())):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_no_mask(executor: ThreadPoolExecutor) -> None:
    rec = Recorder()
    batcher = Batcher(rec, max_batch_size=8, executor=executor)
    xs = [np.ones((2, 3), np.float32) * i for i in range(5)]

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(x, None) for x in xs))

    for i, got in enumerate(asyncio.run(main())):
        np.testing.assert_array_equal(got, np.full((2, 1), 3.0 * i, np.float32))


def test_exceptions_reach_every_caller(executor: ThreadPoolExecutor) -> None:
    rec = Recorder(fail=True)
    batcher = Batcher(rec, max_batch_size=64, max_delay_ms=5.0, executor=executor)

    async def main() -> list[object]:
        return await asyncio.gather(*(batcher.submit(x, m) for x, m in _requests(10)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)
    assert len(rec.sizes) < 10


def test_oversized_request_runs_alone(executor: ThreadPoolExecutor) -> None:
    rec = Recorder()
    batcher = Batcher(rec, max_batch_size=4, max_delay_ms=5.0, executor=executor)
    big = (np.ones((10, 3), np.float32), np.zeros((10, 2), np.float32))
    small = _requests(3)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(batcher.submit(*big), *(batcher.submit(x, m)
                                                            for x, m in small))

    results = asyncio.run(main())
    np.testing.assert_array_equal(results[0], np.full((10, 1), 3.0, np.float32))
    assert 10 in rec.sizes
    assert all(s <= 4 for s in rec.sizes if s != 10)
    assert sum(rec.sizes) == 10 + sum(len(x) for x, _ in small)


def test_full_queue_is_overloaded(executor: ThreadPoolExecutor) -> None:
    batcher = Batcher(Recorder(), max_batch_size=64, max_delay_ms=50.0, executor=executor,
                      max_queue=3)

    async def main() -> list[object]:
        return await asyncio.gather(*(batcher.submit(x, m) for x, m in _requests(5)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert [isinstance(r, Overloaded) for r in results] == [False, False, False, True, True]
    assert "limit 3" in str(results[3])


def test_onnx_runtime_errors_are_mapped() -> None:
    class Broken:
        path = "/b"

        def run(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT")

    with pytest.raises(InferenceError, match="INVALID_ARGUMENT") as info:
        _runner(Broken())(np.zeros((1, 3), np.float32), None)
    assert isinstance(info.value.__cause__, RuntimeError)


# -- Runtime over a registry, with a fake bundle ---------------------------------------------


class FakeBundle:
    input_names = ["x", "mask"]
    n_outputs = 1

    def __init__(self, serving: dict | None = None) -> None:
        self.spec = {"feature_names": ["a", "b", "c"], "mask_names": ["m0", "m1"]}
        if serving:
            self.spec["serving"] = serving
        self.rec = Recorder()

    def run(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.rec(x, mask)


class FakeRegistry:
    def __init__(self) -> None:
        self.bundles = {("m", 1): FakeBundle(), ("m", 2): FakeBundle({"max_batch_size": 3})}

    def resolve(self, name: str, version: int | None = None, alias: str | None = None
                ) -> tuple[int, str]:
        v = 2 if version is None else version
        if (name, v) not in self.bundles:
            raise KeyError(f"no model {name!r} version {v}")
        return v, f"/{name}/{v}"

    def bundle(self, name: str, version: int) -> tuple[int, FakeBundle]:
        return version, self.bundles[(name, version)]


def test_runtime_batches_per_version_and_reloads() -> None:
    reg = FakeRegistry()
    rt = Runtime(reg, max_batch_size=100, max_delay_ms=5.0, threads=1)
    reqs = _requests(12)
    try:
        async def main() -> list[tuple[int, np.ndarray]]:
            return await asyncio.gather(*(rt.infer("m", None, None, {"x": x, "mask": m})
                                          for x, m in reqs))

        results = asyncio.run(main())
        assert {v for v, _ in results} == {2}
        assert max(reg.bundles[("m", 2)].rec.sizes) <= 4  # serving.max_batch_size 3, or alone
        v, got = asyncio.run(rt.infer("m", 1, None, {"x": reqs[0][0], "mask": reqs[0][1]}))
        assert v == 1
        np.testing.assert_array_equal(got, results[0][1])
        first = asyncio.run(rt.batcher("m", 1))[2]
        assert asyncio.run(rt.batcher("m", 1))[2] is first
        reg.bundles[("m", 1)] = FakeBundle()  # a new upload of version 1
        assert asyncio.run(rt.batcher("m", 1))[2] is not first
        with pytest.raises(KeyError):
            asyncio.run(rt.infer("nope", None, None, {"x": reqs[0][0]}))
        with pytest.raises(ValueError, match="input 'x': shape \\[1, 2\\]"):
            asyncio.run(rt.infer("m", 1, None, {"x": np.zeros((1, 2)), "mask": reqs[0][1]}))
        with pytest.raises(ValueError, match="missing input 'mask'"):
            asyncio.run(rt.infer("m", 1, None, {"x": reqs[0][0]}))
    finally:
        rt.close()


# -- scoring on the event loop when alone (Batcher.submit(inline_rows=...), Runtime.score) ---


class ThreadRecorder(Recorder):
    """A Recorder that also notes the thread of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        self.threads.append(threading.get_ident())
        return super().__call__(x, mask)


def test_full_batch_alone_runs_on_the_loop_with_the_same_result(
        executor: ThreadPoolExecutor) -> None:
    rec = ThreadRecorder()
    seen: list[int] = []
    batcher = Batcher(rec, max_batch_size=8, max_delay_ms=1.0, executor=executor,
                      on_batch=seen.append)
    x, m = _requests(1)[0]
    x, m = np.tile(x, (8, 1)), np.tile(m, (8, 1))  # a full batch (8 rows)

    async def main() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        first = await batcher.submit(x, m, inline_rows=16)  # cost unknown: the executor
        inline = await batcher.submit(x, m, inline_rows=16)
        threaded = await batcher.submit(x, m)  # inline_rows 0: the executor, as before
        too_big = await batcher.submit(np.tile(x, (3, 1)), np.tile(m, (3, 1)), inline_rows=16)
        return first, inline, threaded, too_big, threading.get_ident()

    first, inline, threaded, too_big, loop_thread = asyncio.run(main())
    np.testing.assert_array_equal(inline, threaded)
    np.testing.assert_array_equal(first, threaded)
    np.testing.assert_array_equal(too_big, np.tile(threaded, (3, 1)))
    assert rec.threads[0] != loop_thread and rec.threads[1] == loop_thread
    assert rec.threads[2] != loop_thread and rec.threads[3] != loop_thread  # 24 > 16 rows
    assert seen == [8, 8, 8, 24]
    assert batcher.row_seconds is not None


def test_a_model_too_slow_for_the_budget_never_runs_on_the_loop(
        executor: ThreadPoolExecutor) -> None:
    """8 rows at 1 ms each exceed the 3 ms budget: every call goes to the executor."""
    rec = ThreadRecorder()

    def slow(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        time.sleep(0.001 * len(x))
        return rec(x, mask)

    batcher = Batcher(slow, max_batch_size=8, max_delay_ms=1.0, executor=executor)
    x, m = _requests(1)[0]
    x, m = np.tile(x, (8, 1)), np.tile(m, (8, 1))

    async def main() -> int:
        for _ in range(3):
            await batcher.submit(x, m, inline_rows=16)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(rec.threads) == 3 and loop_thread not in rec.threads
    assert batcher.row_seconds is not None and batcher.row_seconds >= 0.001


def test_full_batch_waits_its_turn_while_small_requests_batch(
        executor: ThreadPoolExecutor) -> None:
    rec = ThreadRecorder()
    batcher = Batcher(rec, max_batch_size=4, max_delay_ms=20.0, executor=executor)
    small = _requests(3)  # 1 + 2 + 3 rows: queued, waiting for the deadline
    big = (np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32))

    async def main() -> tuple[list[np.ndarray], int]:
        tasks = [asyncio.ensure_future(batcher.submit(x, m)) for x, m in small]
        await asyncio.sleep(0)  # the small ones are queued now
        assert not batcher.idle
        got = await batcher.submit(*big, inline_rows=64)
        return [got, *await asyncio.gather(*tasks)], threading.get_ident()

    results, loop_thread = asyncio.run(main())
    np.testing.assert_array_equal(results[0], np.full((4, 1), 3.0, np.float32))
    for (x, m), got in zip(small, results[1:]):
        np.testing.assert_array_equal(got, rec(x, m))
    assert loop_thread not in rec.threads[:-len(small)]  # nothing ran on the loop
    assert batcher.idle


def test_runtime_scores_on_the_loop_only_when_alone() -> None:
    reg = FakeRegistry()
    rt = Runtime(reg, max_batch_size=4, max_delay_ms=5.0, threads=1, inline_rows=64)
    rec = ThreadRecorder()
    reg.bundles[("m", 1)].rec = rec
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    mask = np.ones((8, 2), np.float32)
    try:
        async def alone() -> tuple[np.ndarray, int]:
            await rt.infer("m", 1, None, {"x": x, "mask": mask})  # measures the model
            _, got = await rt.infer("m", 1, None, {"x": x, "mask": mask})
            return got, threading.get_ident()

        got, loop_thread = asyncio.run(alone())
        assert rec.threads[0] != loop_thread and rec.threads[1] == loop_thread

        async def together() -> list[tuple[int, np.ndarray]]:
            return await asyncio.gather(rt.infer("m", 1, None, {"x": x, "mask": mask}),
                                        rt.infer("m", 1, None, {"x": x[:1], "mask": mask[:1]}))

        (_, big), (_, small) = asyncio.run(together())
        np.testing.assert_array_equal(big, got)
        np.testing.assert_array_equal(small, got[:1])
        assert loop_thread not in rec.threads[2:]  # two requests active: the executor
        assert rt.active == 0
    finally:
        rt.close()


def test_a_request_over_the_same_connection_as_the_last_skips_the_loop_turns() -> None:
    rt = Runtime(FakeRegistry(), threads=1)
    try:
        with rt.request(("127.0.0.1", 5000)) as again:
            assert again is False  # nothing before it
        with rt.request(("127.0.0.1", 5000)) as again:
            assert again is True
            assert asyncio.run(rt.alone(again)) is True
        with rt.request(("127.0.0.1", 5001)) as again:
            assert again is False  # another connection: the loop turns decide
        with rt.request(None) as again, rt.request(None) as again2:
            assert again is False and again2 is False  # unknown clients are never the same
            assert rt.active == 2
            assert asyncio.run(rt.alone(True)) is False  # two in flight: never alone

        async def turns_see_a_newcomer() -> bool:
            with rt.request(("127.0.0.1", 6000)) as again:
                async def newcomer() -> None:
                    with rt.request(("127.0.0.1", 6001)):
                        await asyncio.sleep(0.01)

                task = asyncio.ensure_future(newcomer())  # started, not yet counted
                alone = await rt.alone(again)
                await task
                return alone

        assert asyncio.run(turns_see_a_newcomer()) is False
        assert rt.active == 0
    finally:
        rt.close()


def test_issue4_runtime_lets_go_of_deleted_versions(tmp_path: Path,
                                                    trained: dict[str, Any]) -> None:
    """Deleted versions' batchers, bundles and ONNX sessions are not kept: deleted here
    (refresh), or by another process (seen by the next request for the model)."""
    registry = Registry(tmp_path)
    for _ in range(3):
        registry.upload("m", trained["bytes"])
    other = Registry(tmp_path)  # another server on the same directory
    rt = Runtime(registry, threads=1)
    rows = trained["rows"]

    async def main() -> None:
        for v in (1, 2, 3):
            assert (await rt.predict_events("m", v, None, rows))[0] == v
        assert rt.held() == [("m", 1), ("m", 2), ("m", 3)]
        gone = weakref.ref((await rt.event_batcher("m", 1))[1].bundle)
        other.delete_version("m", 1)
        assert (await rt.predict_events("m", None, None, rows))[0] == 3
        assert rt.held() == [("m", 2), ("m", 3)]
        gc.collect()
        assert gone() is None  # nothing refers to the deleted version's bundle any more
        registry.delete_version("m", 3)
        await rt.refresh("m")  # what the server's delete routes do
        assert rt.held() == [("m", 2)]
        other.delete_model("m")
        with pytest.raises(KeyError):
            await rt.predict_events("m", None, None, rows)
        assert rt.held() == []

    try:
        asyncio.run(main())
    finally:
        rt.close()


def test_an_older_reading_of_a_model_is_not_applied_over_a_newer_one() -> None:
    """A request's look at the registry can finish after a delete's refresh that started
    later; applying it would bring back what the refresh let go."""
    reg = FakeRegistry()
    rt = Runtime(reg, max_batch_size=100, threads=1)
    try:
        asyncio.run(rt.batcher("m", 1))
        batcher = asyncio.run(rt.batcher("m", 2))[2]
        old = rt._model_state("m")  # read first...
        new = _ModelState(old.read + 1, frozenset({2}), {"max_batch_size": 7})
        assert rt._apply("m", new, None)  # ...but the newer reading is applied first
        assert rt.held() == [("m", 2)] and batcher.max_batch_size == 7
        assert not rt._apply("m", _ModelState(old.read, frozenset({1, 2}), {}), None)
        assert rt.held() == [("m", 2)] and batcher.max_batch_size == 7
    finally:
        rt.close()


class UncachedRegistry(Registry):
    """A real registry whose state token is always None (as for a model changed in the
    last moments), so every request asks it again; counts its directory listings."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listings = 0

    def state_token(self, name: str) -> None:
        return None

    def _versions_of(self, model_dir: Path) -> list[int]:  # type: ignore[override]
        self.listings += 1
        return Registry._versions_of(model_dir)


def test_an_uncached_request_lists_once_and_reconfigures_only_on_change(
        tmp_path: Path, trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a state token every request reads the model's state again: one listing of
    its directory, no validation of the held bundles' own settings (parsed once, when
    held) and no re-configuring of batchers whose settings did not change; a change by
    another process still applies to the next batch, and a deleted version is let go."""
    own = {"max_delay_ms": 7}
    registry = UncachedRegistry(tmp_path)
    registry.upload("m", trained["bytes"])
    registry.upload("m", with_spec(trained["bytes"], serving=own))
    validated: list[Any] = []
    real_validate = ServingSettings.model_validate.__func__  # type: ignore[attr-defined]

    def validate(cls: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        validated.append(data)
        return real_validate(cls, data, *args, **kwargs)

    configured: list[Batching] = []
    real_configure = _BatchQueue.configure

    def configure(self: _BatchQueue, batching: Batching) -> None:
        configured.append(batching)
        real_configure(self, batching)

    monkeypatch.setattr(ServingSettings, "model_validate", classmethod(validate))
    monkeypatch.setattr(_BatchQueue, "configure", configure)
    rt = Runtime(registry, threads=1)
    rows = trained["rows"]

    async def main() -> None:
        assert (await rt.predict_events("m", 1, None, rows))[0] == 1
        assert (await rt.predict_events("m", None, None, rows))[0] == 2
        assert rt.held() == [("m", 1), ("m", 2)]
        assert validated.count(own) == 1  # when version 2 was held
        registry.listings = 0
        configured.clear()
        for _ in range(3):
            for version, want in ((None, 2), (1, 1)):
                assert (await rt.predict_events("m", version, None, rows))[0] == want
        assert registry.listings == 6  # one per request (2 or 3 before)
        assert validated.count(own) == 1 and configured == []

        other = Registry(tmp_path)  # another server on the same directory
        other.set_serving("m", {"max_batch_size": 3})
        assert (await rt.predict_events("m", 1, None, rows))[0] == 1
        batchers = [(await rt.batcher("m", v))[2] for v in (1, 2)]
        events = [(await rt.event_batcher("m", v))[1] for v in (1, 2)]
        assert [b.max_batch_size for b in batchers + events] == [3] * 4
        assert (batchers[1].max_delay, events[1].max_delay) == (0.007, 0.007)
        assert configured == [Batching(3, 2.0)] * 2 + [Batching(3, 7.0)] * 2
        assert validated.count(own) == 1

        other.delete_version("m", 1)
        assert (await rt.predict_events("m", None, None, rows))[0] == 2
        assert rt.held() == [("m", 2)]

    try:
        asyncio.run(main())
    finally:
        rt.close()


def test_predict_events_tells_the_version_before_scoring(tmp_path: Path,
                                                         trained: dict[str, Any]) -> None:
    """``on_resolved`` hears the version once it is known, also when the events then fail
    (the routes label their metrics there); ``prepare`` turns the request into events
    with the model's bundle, after it."""
    registry = Registry(tmp_path)
    for _ in range(2):
        registry.upload("m", trained["bytes"])
    rt = Runtime(registry, threads=1)
    rows = trained["rows"]
    want = Bundle.load(trained["dir"]).predict_events(rows)
    seen: list[Any] = []

    async def main() -> None:
        v, scores = await rt.predict_events("m", 1, None, rows, on_resolved=seen.append)
        assert v == 1 and seen == [1]
        np.testing.assert_array_equal(scores, want)
        with pytest.raises(ValueError, match="MET_pt"):
            await rt.predict_events("m", None, None, [{"MET_pt": "x", "Jet_pt": []}],
                                    on_resolved=seen.append)
        assert seen == [1, 2]
        with pytest.raises(KeyError):  # never resolved: nothing to tell
            await rt.predict_events("nope", None, None, rows, on_resolved=seen.append)
        assert seen == [1, 2]

        bundle = (await rt.event_batcher("m", 2))[1].bundle

        def prepare(got: Any, sent: Any) -> Any:
            seen.append(("prepare", got is bundle, sent["rows"] is rows))
            return sent["rows"]

        v, scores = await rt.predict_events("m", 2, None, {"rows": rows},
                                            on_resolved=seen.append, prepare=prepare)
        assert v == 2 and seen[2:] == [2, ("prepare", True, True)]
        np.testing.assert_array_equal(scores, want)

        def refuse(got: Any, sent: Any) -> Any:
            raise BadRequest("values[0] must be a list")

        with pytest.raises(BadRequest, match="values"):
            await rt.predict_events("m", 2, None, rows, on_resolved=seen.append,
                                    prepare=refuse)
        assert seen[4:] == [2] and rt.active == 0

    try:
        asyncio.run(main())
    finally:
        rt.close()
