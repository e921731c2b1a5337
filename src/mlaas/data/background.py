"""Run an iterator in a thread and hand its items over through a bounded queue.

Layer: data, plumbing. ``RootDataset`` uses it so that preprocessing and
batch building run beside the consumer (a training step, or a DataLoader
worker's pickling) instead of between its steps: numpy and torch both
release the GIL for their heavy work, so on two cores the two overlap.

Order is kept (one producer, one FIFO queue), so an epoch's batches are the
same with or without the thread. An exception raised by the producer is
raised again in the consumer. Closing the consumer's generator (or dropping
it) stops the producer at its next item and closes the source iterator in
the producer's thread, so its own clean-up (a prefetch pool) runs there.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

__all__ = ["in_background", "Backlog"]

T = TypeVar("T")
_POLL_S = 0.1  # how often a blocked producer checks whether the consumer left


class Backlog:
    """What the consumer has in reserve: lets the producer see whether it is waited for.

    A producer that can work faster by taking a second core (the loader's
    padding thread) should do so only while the consumer waits: a training
    step that is slower than the loader needs the cores for itself, and the
    queue is full then.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[bool, object]] | None = None

    def low(self) -> bool:
        """Whether less than a quarter of the queue is filled (or there is no queue)."""
        q = self._queue
        return q is None or q.qsize() * 4 < q.maxsize


def in_background(items: Iterator[T], depth: int, name: str = "mlaas-batches",
                  backlog: Backlog | None = None) -> Iterator[T]:
    """Yield ``items`` in order, produced by a thread that runs at most ``depth`` items ahead.

    Args:
        items (iterator): the work; it is advanced only in the thread.
        depth (int): items held in the queue at most (memory bound).
        name (str): the thread's name, for profilers and ``py-spy dump``.
        backlog (Backlog): when given, reports this queue's level to the producer.
    """
    handoff: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=max(1, depth))
    if backlog is not None:
        backlog._queue = handoff
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            is_item, value = handoff.get()
            if is_item:
                yield value  # type: ignore[misc]
            elif value is None:
                return
            else:
                assert isinstance(value, BaseException)
                raise value
    finally:
        stop.set()
        thread.join()
