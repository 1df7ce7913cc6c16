"""Group commit: concurrent requests queued behind a leader are served together, each
gets its own outcome, and a batch failing half way tells each request the truth."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from datastore.base import Entry, Guard
from datastore.errors import Exhausted
from datastore.sqlite import SqliteDatastore
from ipam_driver.batching import Batcher
from ipam_driver.block_store import BLOCKS_PREFIX
from ipam_driver.service import IpamService

TIMEOUT = 30  # a bound against hanging, never a timing assertion


def _queued(batcher: Batcher, key: object) -> int:
    lane = batcher._lanes.get(key)
    return len(lane.queue) if lane is not None else 0


def _wait_until(condition: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(TIMEOUT * 100):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition never held")


class GatedServe:
    """serve() that records each batch and holds the first one until released."""

    def __init__(self, fail_after: int | None = None, short: bool = False) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_after = fail_after
        self.short = short

    def __call__(self, key: str, requests: list[int]) -> Iterator[int]:
        self.batches.append((key, list(requests)))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(TIMEOUT)
        for index, request in enumerate(requests):
            if self.fail_after is not None and index == self.fail_after:
                raise ValueError(f"failed at {request}")
            if self.short and index == len(requests) - 1:
                return
            yield request * 10


def _submit_all(batcher: Batcher, key: str, requests: list[int]
                ) -> tuple[list[threading.Thread], dict[int, object]]:
    outcomes: dict[int, object] = {}

    def one(request: int) -> None:
        try:
            outcomes[request] = batcher.submit(key, request)
        except Exception as error:  # noqa: BLE001 - the outcome under test
            outcomes[request] = error

    threads = [threading.Thread(target=one, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    return threads, outcomes


def _leader_then(batcher: Batcher, serve: GatedServe, key: str, followers: list[int]
                 ) -> dict[int, object]:
    """Request 0 leads and is held; followers queue behind it; then all finish."""
    leader, outcomes = _submit_all(batcher, key, [0])
    assert serve.entered.wait(TIMEOUT)
    threads, more = _submit_all(batcher, key, followers)
    _wait_until(lambda: _queued(batcher, key) == len(followers))
    serve.release.set()
    for thread in leader + threads:
        thread.join(TIMEOUT)
    return {**outcomes, **more}


def test_an_idle_batcher_serves_each_request_alone():
    serve = GatedServe()
    serve.release.set()
    batcher = Batcher(serve)
    assert [batcher.submit("a", n) for n in (1, 2, 3)] == [10, 20, 30]
    assert serve.batches == [("a", [1]), ("a", [2]), ("a", [3])]


def test_requests_queued_behind_a_leader_go_together_in_one_batch():
    serve = GatedServe()
    batcher = Batcher(serve)
    outcomes = _leader_then(batcher, serve, "a", [1, 2, 3, 4, 5])
    assert outcomes == {n: n * 10 for n in range(6)}
    assert serve.batches[0] == ("a", [0])
    assert len(serve.batches) == 2 and sorted(serve.batches[1][1]) == [1, 2, 3, 4, 5]


def test_a_batch_failing_half_way_answers_the_served_and_fails_the_rest():
    serve = GatedServe(fail_after=2)
    batcher = Batcher(serve)
    outcomes = _leader_then(batcher, serve, "a", [1, 2, 3, 4])
    order = serve.batches[1][1]
    assert [outcomes[n] for n in order[:2]] == [order[0] * 10, order[1] * 10]
    for n in order[2:]:
        assert isinstance(outcomes[n], ValueError)
        assert str(outcomes[n]) == f"failed at {order[2]}"


def test_a_serve_that_answers_too_few_fails_the_unanswered_clearly():
    serve = GatedServe(short=True)
    serve.release.set()
    batcher = Batcher(serve)
    with pytest.raises(RuntimeError, match="served only 0"):
        batcher.submit("a", 7)


def test_keys_do_not_wait_for_each_other():
    serve = GatedServe()
    batcher = Batcher(serve)
    held, outcomes = _submit_all(batcher, "a", [0])
    assert serve.entered.wait(TIMEOUT)
    assert batcher.submit("b", 4) == 40  # while "a" is still held
    serve.release.set()
    held[0].join(TIMEOUT)
    assert outcomes == {0: 0}


# ------------------------------------------------------- the IPAM service's use


class GatedStore(SqliteDatastore):
    """A real SQLite store whose first block update waits until released."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.block_writes = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def update(self, key: str, value: str, revision: int, guard: Guard | None = None
               ) -> Entry:
        if key.startswith(BLOCKS_PREFIX):
            self.block_writes += 1
            gate, self.gate = self.gate, None
            if gate is not None:
                self.entered.set()
                assert gate.wait(TIMEOUT)
        return super().update(key, value, revision, guard)


def _network(store: SqliteDatastore, subnet: str) -> IpamService:
    ipam = IpamService(store, "h1")
    ipam.add_pool("10.100.0.0/16")
    ipam.request_pool(subnet, None, {}, False)
    ipam.request_address(subnet, None, {"RequestAddressType": "com.docker.network.gateway"})
    return ipam


def _concurrent_requests(ipam: IpamService, store: GatedStore, subnet: str, followers: int
                         ) -> list[object]:
    """One request held in its block write while `followers` more queue behind it."""
    store.gate = threading.Event()
    gate = store.gate
    outcomes: list[object] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            result: object = ipam.request_address(subnet, None, {})
        except Exception as error:  # noqa: BLE001 - the outcome under test
            result = error
        with lock:
            outcomes.append(result)

    first = threading.Thread(target=one)
    first.start()
    assert store.entered.wait(TIMEOUT)
    threads = [threading.Thread(target=one) for _ in range(followers)]
    for thread in threads:
        thread.start()
    _wait_until(lambda: _queued(ipam._auto_batches, subnet) == followers)
    store.block_writes = 0
    gate.set()
    for thread in [first, *threads]:
        thread.join(TIMEOUT)
    return outcomes


def test_concurrent_allocations_share_one_block_write(tmp_path):
    store = GatedStore(str(tmp_path / "s.db"))
    ipam = _network(store, "10.100.0.0/24")
    outcomes = _concurrent_requests(ipam, store, "10.100.0.0/24", followers=7)
    assert all(isinstance(o, str) for o in outcomes), outcomes
    assert len(set(outcomes)) == 8
    # The seven that queued went in one write (the held one had already counted).
    assert store.block_writes == 1
    stored = {a.address for a in ipam.list_allocations() if a.kind == "container"}
    assert stored == {o.split("/")[0] for o in outcomes}


def test_a_batch_larger_than_the_room_left_serves_what_fits_and_refuses_the_rest(tmp_path):
    store = GatedStore(str(tmp_path / "s.db"))
    ipam = _network(store, "10.100.0.0/29")  # 6 usable: the gateway and five more
    ipam.request_address("10.100.0.0/29", None, {})
    outcomes = _concurrent_requests(ipam, store, "10.100.0.0/29", followers=6)
    served = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if not isinstance(o, str)]
    assert len(served) == 4 and len(set(served)) == 4
    assert len(refused) == 3 and all(isinstance(o, Exhausted) for o in refused)
    stored = {a.address for a in ipam.list_allocations() if a.kind == "container"}
    assert {o.split("/")[0] for o in served} <= stored and len(stored) == 5
