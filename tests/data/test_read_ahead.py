"""``chunks.read_ahead``: pass 1 reads the next chunks in threads, but hands them over in order.

Pass 1's statistics merge chunk by chunk, so their bits depend on the order:
the chunks must come in plan order whatever thread read them first, and a
failed read must surface at its own chunk, after the ones before it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mlaas.data import chunks as chunking
from mlaas.data import sources, synth
from mlaas.data.loader import prepare
from mlaas.errors import SourceError
from mlaas.spec import load


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("read-ahead")
    synth.generate(d, 2000, seed=9)
    pipeline = load({"data": {
        "sources": [{"files": [str(d / "signal.root")], "label": 1},
                    {"files": [str(d / "background.root")], "label": 0}],
        "features": ["MET_pt", {"branch": "Jet_pt", "max_len": 3}],
        "step_size": 300}})
    layout, _, plan = prepare(pipeline)
    assert len(plan) >= 10
    return pipeline, layout, plan


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_chunks_come_in_plan_order_with_their_own_arrays(planned, depth: int) -> None:
    pipeline, layout, plan = planned
    with sources.OpenTrees() as trees:
        got = list(chunking.read_ahead(pipeline, layout, plan, trees, depth))
    assert [c for c, _ in got] == plan
    with sources.OpenTrees() as trees:
        for c, chunk in got:
            want = chunking.read(pipeline, layout, c, trees)
            assert chunk.entry_start == c.start and chunk.url == c.url
            np.testing.assert_array_equal(np.asarray(chunk.arrays["MET_pt"]),
                                          np.asarray(want.arrays["MET_pt"]))


def test_a_failed_read_surfaces_at_its_chunk_after_the_ones_before(planned, monkeypatch) -> None:
    pipeline, layout, plan = planned
    real = chunking.read

    def read(pipeline, layout, chunk, trees=None):  # type: ignore[no-untyped-def]
        if chunk == plan[4]:
            raise SourceError("cannot read: disk gone", file_path=chunk.url)
        return real(pipeline, layout, chunk, trees)

    monkeypatch.setattr(chunking, "read", read)
    seen = []
    with sources.OpenTrees() as trees, pytest.raises(SourceError, match="disk gone"):
        for c, _ in chunking.read_ahead(pipeline, layout, plan, trees):
            seen.append(c)
    assert seen == plan[:4]


def test_a_failed_read_does_not_wait_for_the_reads_after_it(planned, monkeypatch) -> None:
    # as when an XRootD server stalls: chunk 0 fails after its retries while the
    # other reader is still inside its own read of chunk 1; the error must not wait
    # for that read (it once held an epoch's error back by a whole retry chain)
    pipeline, layout, plan = planned
    release, finished = threading.Event(), threading.Event()

    def read(pipeline, layout, chunk, trees=None):  # type: ignore[no-untyped-def]
        if chunk == plan[0]:
            time.sleep(0.2)  # the other reader is inside chunk 1 by then
            raise SourceError("cannot read: server stalled", file_path=chunk.url)
        release.wait(60)
        finished.set()
        raise SourceError("cannot read: server stalled", file_path=chunk.url)

    monkeypatch.setattr(chunking, "read", read)
    with sources.OpenTrees() as trees, pytest.raises(SourceError, match="stalled"):
        for _ in chunking.read_ahead(pipeline, layout, plan, trees):
            pass
    try:
        assert not finished.is_set()  # the error came while chunk 1 was still being read
        assert trees.closed  # so that read makes no further attempt
    finally:
        release.set()
