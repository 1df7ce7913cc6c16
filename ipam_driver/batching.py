"""Group commit: concurrent requests of one process that can share one datastore write
are served together (flat combining; no I/O here).

Requests are grouped by a key (for addresses: the pool id). A thread that submits a
request queues it, then takes the key's leader lock. If the previous leader served
its request meanwhile, it returns that outcome; otherwise it becomes the leader and
serves every request queued so far in one call. So while one batch is being written
the requests that arrive queue up and go together in the next write: the busier the
process, the larger the batches, with no timer and no added wait when it is idle.

``serve(key, requests)`` yields one result per request, in order, as each becomes
final. When it raises, every request it has not yet answered gets that exception, so
a batch that fails half way never reports an address written as failed or the
other way round.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
T = TypeVar("T")


class _Slot(Generic[R, T]):
    __slots__ = ("request", "done", "result", "error")

    def __init__(self, request: R) -> None:
        self.request = request
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class _Lane(Generic[R, T]):
    """The queue and the leader lock of one key."""

    __slots__ = ("queue", "leader", "__weakref__")

    def __init__(self) -> None:
        self.queue: list[_Slot[R, T]] = []
        self.leader = threading.Lock()


class Batcher(Generic[K, R, T]):
    """Serves concurrent submit()s of one key in batches (see the module docstring)."""

    def __init__(self, serve: Callable[[K, list[R]], Iterator[T]]) -> None:
        self._serve = serve
        self._lock = threading.Lock()
        # A lane lives while some thread holds it: idle keys cost nothing.
        self._lanes: weakref.WeakValueDictionary[K, _Lane[R, T]] = (
            weakref.WeakValueDictionary())

    def submit(self, key: K, request: R) -> T:
        slot: _Slot[R, T] = _Slot(request)
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane()
            lane.queue.append(slot)
        with lane.leader:
            if not slot.done:
                with self._lock:
                    batch, lane.queue = lane.queue, []
                self._run(key, batch)
        return slot.outcome()

    def _run(self, key: K, batch: list[_Slot[R, T]]) -> None:
        answered = 0
        try:
            for result in self._serve(key, [slot.request for slot in batch]):
                if answered == len(batch):
                    raise RuntimeError(f"batch of {len(batch)} got more results")
                batch[answered].result = result
                batch[answered].done = True
                answered += 1
            if answered < len(batch):
                raise RuntimeError(f"batch of {len(batch)} served only {answered}")
        except BaseException as error:  # handed to every request not answered
            for slot in batch[answered:]:
                slot.error, slot.done = error, True
            if not isinstance(error, Exception):
                raise  # the leader's own thread is being stopped
