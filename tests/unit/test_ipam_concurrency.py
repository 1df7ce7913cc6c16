"""IPAM under concurrency: threads and processes on one SQLite file never collide."""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections import Counter

import pytest

from datastore.errors import CalicoCnmError, Conflict
from datastore.sqlite import SqliteDatastore
from ipam_driver.service import IpamService

PER_WORKER = 30


@pytest.fixture
def db_path(tmp_path):
    path = str(tmp_path / "ipam.db")
    store = SqliteDatastore(path)
    ipam = IpamService(store, "setup")
    ipam.add_pool("10.201.0.0/16")
    ipam.request_pool("10.201.0.0/24", None, {}, False)
    store.close()
    return path


def _allocate(path: str, host: str, count: int, barrier, results) -> None:
    store = SqliteDatastore(path)
    ipam = IpamService(store, host)
    barrier.wait(timeout=30)
    got = []
    try:
        for _ in range(count):
            got.append(ipam.request_address("10.201.0.0/24", None, {}).split("/")[0])
        try:
            ipam.request_address("10.201.0.0/24", "10.201.0.255", {})
        except CalicoCnmError:
            pass
        try:
            got.append(ipam.request_address("10.201.0.0/24", "10.201.0.254", {}).split("/")[0])
        except Conflict:
            pass
    finally:
        results.put((host, got))
        store.close()


def _check(path: str, results: list[tuple[str, list[str]]], expected: int) -> None:
    addresses = [address for _host, got in results for address in got]
    duplicates = [a for a, n in Counter(addresses).items() if n > 1]
    assert duplicates == []
    assert len(addresses) == expected
    store = SqliteDatastore(path)
    stored = [a.address for a in IpamService(store, "check").list_allocations()]
    store.close()
    assert sorted(stored) == sorted(addresses)
    assert "10.201.0.254" in stored  # exactly one worker won the explicit address


def test_threads_never_get_a_duplicate(db_path):
    workers = 8
    barrier = threading.Barrier(workers)
    results: queue.Queue = queue.Queue()
    threads = [
        threading.Thread(
            target=_allocate, args=(db_path, f"host-{n % 3}", PER_WORKER, barrier, results)
        )
        for n in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    collected = [results.get_nowait() for _ in range(workers)]
    # 8 x 30 = 240 of the 254 usable addresses, plus the one explicit winner.
    _check(db_path, collected, workers * PER_WORKER + 1)


def test_processes_never_get_a_duplicate(db_path):
    ctx = multiprocessing.get_context("fork")
    workers = 4
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_allocate, args=(db_path, f"host-{n}", 50, barrier, results))
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    collected = [results.get(timeout=60) for _ in range(workers)]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    # 4 hosts x 50 addresses in a /24 with four /26 blocks: claims and borrowing.
    _check(db_path, collected, workers * 50 + 1)


def test_concurrent_carving_gives_distinct_subnets(tmp_path):
    path = str(tmp_path / "ipam.db")
    SqliteDatastore(path).close()
    setup = IpamService(SqliteDatastore(path), "setup")
    setup.add_pool("10.50.0.0/20")
    got: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def carve(host: str) -> None:
        ipam = IpamService(SqliteDatastore(path), host)
        barrier.wait(timeout=30)
        for _ in range(2):
            cidr = ipam.request_pool(None, None, {}, False)[1]
            with lock:
                got.append(cidr)

    threads = [threading.Thread(target=carve, args=(f"h{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(got) == sorted(f"10.50.{n}.0/24" for n in range(12))


def _remove(ipam: IpamService, barrier: threading.Barrier, result: dict[str, str]) -> None:
    barrier.wait(timeout=10)
    try:
        ipam.remove_pool("10.60.0.0/16")
        result["remove"] = "ok"
    except Conflict:
        result["remove"] = "refused"


def _request(ipam: IpamService, barrier: threading.Barrier, result: dict[str, str]) -> None:
    barrier.wait(timeout=10)
    try:
        ipam.request_pool("10.60.1.0/24", None, {}, False)
        result["request"] = "ok"
    except CalicoCnmError:
        result["request"] = "refused"


def test_remove_pool_never_orphans_a_subnet(tmp_path):
    """remove_pool racing request_pool: never a subnet left in a removed pool."""
    path = str(tmp_path / "ipam.db")
    remover = IpamService(SqliteDatastore(path), "a")
    requester = IpamService(SqliteDatastore(path), "b")
    outcomes: Counter = Counter()
    for _ in range(60):
        remover.add_pool("10.60.0.0/16")
        barrier = threading.Barrier(2)
        result: dict[str, str] = {}
        threads = [
            threading.Thread(target=_remove, args=(remover, barrier, result)),
            threading.Thread(target=_request, args=(requester, barrier, result)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        pools = [p.cidr for p in remover.get_pools()]
        subnets = [s.cidr for s in remover.list_subnets()]
        outcomes[(result["remove"], result["request"])] += 1
        if subnets:
            assert pools == ["10.60.0.0/16"]
            assert not remover.get_pool("10.60.0.0/16").deleting
            requester.release_pool("10.60.1.0/24")
            remover.remove_pool("10.60.0.0/16")
        else:
            assert pools == []
    assert set(outcomes) <= {("ok", "refused"), ("refused", "ok")}
