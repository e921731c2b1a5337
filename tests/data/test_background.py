"""The background batch thread: order kept, errors raised in the caller, early stop cleans up,
the backlog seen by the producer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from mlaas.data.background import Backlog, in_background
from mlaas.errors import BadValues


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


def test_items_arrive_in_order_from_another_thread() -> None:
    seen: list[str] = []

    def work() -> Iterator[int]:
        for i in range(50):
            seen.append(threading.current_thread().name)
            yield i

    assert list(in_background(work(), depth=3, name="bg-order")) == list(range(50))
    assert set(seen) == {"bg-order"}
    assert "bg-order" not in _threads()


def test_producer_error_is_raised_in_the_caller_after_earlier_items() -> None:
    def work() -> Iterator[int]:
        yield 1
        yield 2
        raise BadValues("feature 'x' has 3 NaN values", file_path="f.root")

    got: list[int] = []
    with pytest.raises(BadValues, match="feature 'x' has 3 NaN") as info:
        for item in in_background(work(), depth=1, name="bg-error"):
            got.append(item)
    assert got == [1, 2]
    assert info.value.context["file_path"] == "f.root"
    assert "bg-error" not in _threads()


def test_leaving_early_stops_the_producer_and_closes_the_source() -> None:
    produced: list[int] = []
    closed = threading.Event()

    def work() -> Iterator[int]:
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = in_background(work(), depth=2, name="bg-early")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # type: ignore[attr-defined]
    assert closed.is_set()
    assert len(produced) <= 3 + 2 + 1  # at most depth items (and one in hand) ahead
    assert "bg-early" not in _threads()


def test_nothing_starts_before_the_first_item_is_asked_for() -> None:
    started = threading.Event()

    def work() -> Iterator[int]:
        started.set()
        yield 1

    it = in_background(work(), depth=1, name="bg-lazy")
    assert not started.is_set() and "bg-lazy" not in _threads()
    assert list(it) == [1]


def test_the_backlog_tells_the_producer_whether_the_consumer_waits() -> None:
    """Low while the queue is under a quarter full (the consumer waits: a producer may
    take a second core), not low while it is fuller (the consumer is the slower one)."""
    backlog = Backlog()
    assert backlog.low()  # no queue yet
    seen: list[bool] = []

    def items() -> Iterator[int]:
        for i in range(12):
            seen.append(backlog.low())
            yield i

    it = in_background(items(), depth=8, backlog=backlog)
    assert next(it) == 0
    for _ in range(2000):  # the producer fills the queue while nobody reads it
        if backlog._queue is not None and backlog._queue.qsize() >= 7:
            break
        time.sleep(0.005)
    assert not backlog.low()
    assert list(it) == list(range(1, 12))
    assert seen[0] is True  # the first item: an empty queue
    assert seen[3:9] == [False] * 6  # items made while 2..7 others waited unread
