"""IPAM under concurrency: threads and processes on one SQLite file never collide."""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections import Counter
from collections.abc import Callable

import pytest
from netaddr import IPNetwork

from datastore.errors import CalicoCnmError, Conflict
from datastore.sqlite import SqliteDatastore
from ipam_driver.service import SUBNETS_PREFIX, IpamService

PER_WORKER = 30
GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


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


# ------------------------------------------------ subnets: one record each, many hosts


def _race(path: str, jobs: list[tuple[str, Callable[[IpamService], object]]]) -> list[object]:
    """Run each (hostname, job) in its own thread with its own store handle, all
    released at once; the results (or the CalicoCnmError raised), in job order."""
    barrier = threading.Barrier(len(jobs))
    results: list[object] = [None] * len(jobs)

    def run(index: int, host: str, job: Callable[[IpamService], object]) -> None:
        store = SqliteDatastore(path)
        ipam = IpamService(store, host)
        barrier.wait(timeout=30)
        try:
            results[index] = job(ipam)
        except CalicoCnmError as exc:
            results[index] = exc
        finally:
            store.close()

    threads = [threading.Thread(target=run, args=(n, host, job))
               for n, (host, job) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def _requester(cidr: str, ip_range: str | None = None) -> Callable[[IpamService], object]:
    return lambda ipam: ipam.request_pool(cidr, ip_range, {}, False)[0]


def test_nested_subnets_requested_at_once_leave_exactly_one(tmp_path):
    path = str(tmp_path / "ipam.db")
    setup = IpamService(SqliteDatastore(path), "setup")
    setup.add_pool("10.70.0.0/16")
    nested = [f"10.70.0.0/{prefix}" for prefix in range(17, 27)]  # every pair overlaps
    winners = Counter()
    for _round in range(12):
        results = _race(path, [(f"host-{n}", _requester(c)) for n, c in enumerate(nested)])
        won = [r for r in results if isinstance(r, str)]
        assert len(won) == 1, results
        assert all(isinstance(r, Conflict) for r in results if not isinstance(r, str))
        # Exactly the winner is stored: no loser's record survives, pending or not.
        assert [e.data["cidr"] for e in setup.store.list(SUBNETS_PREFIX)] == won
        assert [s.cidr for s in setup.list_subnets()] == won
        winners[won[0]] += 1
        IpamService(setup.store, f"host-{nested.index(won[0])}").release_pool(won[0])
    assert sum(winners.values()) == 12


def test_overlapping_subnets_requested_at_once_never_both_survive(tmp_path):
    path = str(tmp_path / "ipam.db")
    setup = IpamService(SqliteDatastore(path), "setup")
    setup.add_pool("10.71.0.0/16")
    cidrs = ["10.71.0.0/24", "10.71.0.0/25", "10.71.0.128/25", "10.71.1.0/24",
             "10.71.0.0/23", "10.71.0.64/26", "10.71.1.128/25", "10.71.2.0/24"]
    for _round in range(10):
        results = _race(path, [(f"h{n}", _requester(c)) for n, c in enumerate(cidrs)])
        won = sorted(r for r in results if isinstance(r, str))
        stored = sorted(e.data["cidr"] for e in setup.store.list(SUBNETS_PREFIX))
        assert stored == won
        nets = [IPNetwork(c) for c in won]
        for i, first in enumerate(nets):
            for second in nets[i + 1:]:
                assert first.last < second.first or second.last < first.first, (first, second)
        assert "10.71.2.0/24" in won  # overlaps nothing: never refused
        for index, cidr in enumerate(cidrs):
            if cidr in won:
                IpamService(setup.store, f"h{index}").release_pool(cidr)


def test_hosts_creating_one_network_at_once_share_it(tmp_path):
    path = str(tmp_path / "ipam.db")
    setup = IpamService(SqliteDatastore(path), "setup")
    setup.add_pool("10.72.0.0/16")
    hosts = [f"node-{n}" for n in range(6)]
    subnet = "10.72.5.0/24"

    def create_network(ipam: IpamService) -> tuple[str, str]:
        pool_id = ipam.request_pool(subnet, "10.72.5.128/25", {}, False)[0]
        return pool_id, ipam.request_address(pool_id, None, GATEWAY)

    results = _race(path, [(host, create_network) for host in hosts])
    assert results == [(subnet, "10.72.5.1/24")] * len(hosts)
    assert setup.claimed_hosts(subnet) == sorted(hosts)
    assert len(setup.store.list(SUBNETS_PREFIX)) == 1
    gateways = [a for a in setup.list_allocations() if a.kind == "gateway"]
    assert [g.address for g in gateways] == ["10.72.5.1"]

    def remove_network(ipam: IpamService) -> list[str]:
        ipam.release_address(subnet, "10.72.5.1")
        return ipam.release_pool(subnet)

    freed = _race(path, [(host, remove_network) for host in hosts])
    assert all(isinstance(f, list) for f in freed), freed
    assert setup.store.list(SUBNETS_PREFIX) == []
    assert setup.list_allocations() == []
    # Whatever the interleaving, the gateway was freed exactly once: by the last
    # gateway release (then no sweep frees anything) or by the one sweep.
    assert [address for f in freed for address in f] in ([], ["10.72.5.1"])


def test_the_last_of_many_releases_sweeps_exactly_once(tmp_path):
    path = str(tmp_path / "ipam.db")
    setup = IpamService(SqliteDatastore(path), "setup")
    setup.add_pool("10.73.0.0/16")
    hosts = [f"node-{n}" for n in range(6)]
    subnet = "10.73.1.0/24"
    leaked = []
    for host in hosts:
        ipam = IpamService(setup.store, host)
        ipam.request_pool(subnet, None, {}, False)
        ipam.request_address(subnet, None, GATEWAY)
        leaked.append(ipam.request_address(subnet, None, {}).split("/")[0])
    freed = _race(path, [(host, lambda ipam: ipam.release_pool(subnet)) for host in hosts])
    sweeps = [f for f in freed if f]
    assert len(sweeps) == 1
    assert sorted(sweeps[0]) == sorted(["10.73.1.1", *leaked])
    assert setup.store.list(SUBNETS_PREFIX) == [] and setup.list_allocations() == []
