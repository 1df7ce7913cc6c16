"""The datastore contract (datastore/base.py), run against every backend.

Each test gets `store` (a fresh SQLite file, or the session's etcd) and
`prefix` (a key prefix of its own); every key a test writes lives under it.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from datastore.base import (
    AlreadyExists,
    Datastore,
    DatastoreUnavailable,
    Entry,
    Event,
    Guard,
    GuardChanged,
    RevisionConflict,
    dumps,
)
from datastore.etcd import EtcdDatastore
from datastore.sqlite import SqliteDatastore
from tests.conftest import EtcdServer
from tests.contract._workers import increment, increment_sqlite
from tests.contract.conftest import Backend


def collect(
    store: Datastore, prefix: str, after: int, count: int, timeout: float = 5.0
) -> list[Event]:
    """Watch until `count` events arrived (or timeout), as a watcher loop does."""
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    revision = after
    while len(events) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        batch = store.watch(prefix, revision, remaining)
        events.extend(batch)
        if batch:
            revision = batch[-1].revision
    return events


# get / create


def test_get_missing_key_is_none(store: Datastore, prefix: str) -> None:
    assert store.get(prefix + "missing") is None


def test_create_then_get(store: Datastore, prefix: str) -> None:
    key = prefix + "pool"
    entry = store.create(key, '{"cidr":"10.0.0.0/16"}')
    assert entry.key == key
    assert entry.value == '{"cidr":"10.0.0.0/16"}'
    assert entry.revision > 0
    assert entry.data == {"cidr": "10.0.0.0/16"}
    assert store.get(key) == entry


def test_create_existing_raises_and_keeps_value(store: Datastore, prefix: str) -> None:
    key = prefix + "block"
    first = store.create(key, '"first"')
    with pytest.raises(AlreadyExists):
        store.create(key, '"second"')
    assert store.get(key) == first


def test_non_ascii_keys_and_values_round_trip(store: Datastore, prefix: str) -> None:
    key = prefix + "profile/café"
    entry = store.create(key, dumps({"name": "réseau ✓"}))
    assert store.get(key) == entry
    assert store.get(key).data == {"name": "réseau ✓"}  # type: ignore[union-attr]
    assert store.list(prefix + "profile/") == [entry]


# update


def test_update_with_current_revision(store: Datastore, prefix: str) -> None:
    key = prefix + "net"
    created = store.create(key, '"v1"')
    updated = store.update(key, '"v2"', created.revision)
    assert updated.value == '"v2"'
    assert updated.revision > created.revision
    assert store.get(key) == updated
    # The new revision is the one to compare against next.
    again = store.update(key, '"v3"', updated.revision)
    assert store.get(key) == again


def test_update_with_stale_revision_conflicts_and_keeps_value(
    store: Datastore, prefix: str
) -> None:
    key = prefix + "net"
    created = store.create(key, '"v1"')
    current = store.update(key, '"v2"', created.revision)
    with pytest.raises(RevisionConflict):
        store.update(key, '"lost"', created.revision)
    assert store.get(key) == current


@pytest.mark.parametrize("revision", [1, 0, -1])
def test_update_of_absent_key_conflicts(store: Datastore, prefix: str, revision: int) -> None:
    key = prefix + "absent"
    with pytest.raises(RevisionConflict):
        store.update(key, '"x"', revision)
    assert store.get(key) is None


def test_update_of_deleted_key_conflicts(store: Datastore, prefix: str) -> None:
    key = prefix + "gone"
    created = store.create(key, '"x"')
    assert store.delete(key)
    with pytest.raises(RevisionConflict):
        store.update(key, '"y"', created.revision)
    assert store.get(key) is None


# guarded writes


def test_guarded_writes_happen_while_the_guard_holds(store: Datastore, prefix: str) -> None:
    reservation = store.create(prefix + "subnet", '"r1"')
    guard = Guard(reservation.key, reservation.revision)
    created = store.create(prefix + "block", '"one"', guard)
    updated = store.update(prefix + "block", '"two"', created.revision, guard)
    assert store.get(prefix + "block") == updated
    assert store.get(reservation.key) == reservation  # the guard key is only compared


@pytest.mark.parametrize("change", ["updated", "deleted", "recreated"])
def test_guarded_writes_change_nothing_once_the_guard_moved(
        store: Datastore, prefix: str, change: str) -> None:
    reservation = store.create(prefix + "subnet", '"r1"')
    block = store.create(prefix + "block", '"one"')
    if change == "updated":
        store.update(reservation.key, '"r1 with another host"', reservation.revision)
    else:
        store.delete(reservation.key)
        if change == "recreated":
            store.create(reservation.key, '"r2"')
    stale = Guard(reservation.key, reservation.revision)
    before = store.current_revision()
    with pytest.raises(GuardChanged, match="subnet"):
        store.update(block.key, '"lost"', block.revision, stale)
    with pytest.raises(GuardChanged, match="subnet"):
        store.create(prefix + "other", '"lost"', stale)
    assert store.get(block.key) == block
    assert store.get(prefix + "other") is None
    assert store.current_revision() == before


def test_a_guarded_write_that_holds_still_checks_its_own_key(
        store: Datastore, prefix: str) -> None:
    reservation = store.create(prefix + "subnet", '"r1"')
    guard = Guard(reservation.key, reservation.revision)
    block = store.create(prefix + "block", '"one"')
    current = store.update(block.key, '"two"', block.revision)
    with pytest.raises(RevisionConflict):
        store.update(block.key, '"lost"', block.revision, guard)
    with pytest.raises(AlreadyExists):
        store.create(block.key, '"lost"', guard)
    assert store.get(block.key) == current


# delete


def test_delete_without_revision(store: Datastore, prefix: str) -> None:
    key = prefix + "endpoint"
    store.create(key, '"x"')
    assert store.delete(key) is True
    assert store.get(key) is None
    assert store.delete(key) is False
    assert store.delete(prefix + "never-there") is False


def test_delete_with_current_revision(store: Datastore, prefix: str) -> None:
    key = prefix + "endpoint"
    entry = store.create(key, '"x"')
    assert store.delete(key, entry.revision) is True
    assert store.get(key) is None


def test_delete_with_stale_revision_is_refused(store: Datastore, prefix: str) -> None:
    key = prefix + "endpoint"
    created = store.create(key, '"x"')
    current = store.update(key, '"y"', created.revision)
    with pytest.raises(RevisionConflict):
        store.delete(key, created.revision)
    assert store.get(key) == current


def test_delete_of_absent_key_with_revision_conflicts(store: Datastore, prefix: str) -> None:
    with pytest.raises(RevisionConflict):
        store.delete(prefix + "absent", 1)


def test_key_can_be_created_again_after_delete(store: Datastore, prefix: str) -> None:
    key = prefix + "handle"
    first = store.create(key, '"one"')
    store.delete(key, first.revision)
    second = store.create(key, '"two"')
    assert second.revision > first.revision
    assert store.get(key) == second


# list


def test_list_is_sorted_and_stays_inside_the_prefix(store: Datastore, prefix: str) -> None:
    inside = [prefix + "a/" + name for name in ("m", "b", "z/1", "b/c", "a")]
    outside = [prefix + "ab", prefix + "a", prefix + "b/x", prefix + "a-"]
    for key in inside + outside:
        store.create(key, dumps(key))
    listed = store.list(prefix + "a/")
    assert [entry.key for entry in listed] == sorted(inside)
    assert all(entry == store.get(entry.key) for entry in listed)
    assert store.list(prefix + "nothing/") == []
    assert [entry.key for entry in store.list(prefix)] == sorted(inside + outside)


def test_list_does_not_return_deleted_keys(store: Datastore, prefix: str) -> None:
    keep = store.create(prefix + "k/1", '"x"')
    store.create(prefix + "k/2", '"y"')
    store.delete(prefix + "k/2")
    assert store.list(prefix + "k/") == [keep]


# revisions


def test_revisions_strictly_increase_across_keys(store: Datastore, prefix: str) -> None:
    start = store.current_revision()
    revisions = [start]
    a = store.create(prefix + "a", '"1"')
    revisions.append(a.revision)
    b = store.create(prefix + "b", '"1"')
    revisions.append(b.revision)
    a = store.update(prefix + "a", '"2"', a.revision)
    revisions.append(a.revision)
    store.delete(prefix + "b", b.revision)
    revisions.append(store.current_revision())
    c = store.create(prefix + "c", '"1"')
    revisions.append(c.revision)
    assert revisions == sorted(set(revisions)), revisions
    assert store.current_revision() == c.revision
    # An entry keeps the revision of its own last write.
    assert store.get(prefix + "a").revision == a.revision  # type: ignore[union-attr]


def test_failed_writes_and_reads_do_not_move_the_revision(
    store: Datastore, prefix: str
) -> None:
    entry = store.create(prefix + "a", '"1"')
    before = store.current_revision()
    with pytest.raises(AlreadyExists):
        store.create(prefix + "a", '"2"')
    with pytest.raises(RevisionConflict):
        store.update(prefix + "a", '"2"', entry.revision + 1000)
    store.get(prefix + "a")
    store.list(prefix)
    assert store.delete(prefix + "absent") is False
    assert store.current_revision() == before


# list_changed


def test_list_changed_gives_the_current_value_of_each_key_written_since(
    store: Datastore, prefix: str
) -> None:
    before = store.create(prefix + "old", '"kept"')
    a1 = store.create(prefix + "a", '"1"')
    store.create(prefix + "c", '"1"')
    a2 = store.update(prefix + "a", '"2"', a1.revision)
    b = store.create(prefix + "b", '"1"')
    store.delete(prefix + "c")
    store.create(prefix + "outside", '"x"')
    entries, revision = store.list_changed(prefix + "a", before.revision)
    assert entries == [Entry(prefix + "a", '"2"', a2.revision)]
    entries, revision = store.list_changed(prefix, before.revision)
    # Sorted by key, the last write of each, no deleted key, nothing older.
    assert entries == [Entry(prefix + "a", '"2"', a2.revision),
                       Entry(prefix + "b", '"1"', b.revision),
                       Entry(prefix + "outside", '"x"', revision)]
    assert revision == store.current_revision()
    assert store.list_changed(prefix, revision) == ([], revision)
    assert store.list_changed(prefix, 0)[0] == store.list(prefix)


def test_list_changed_does_not_need_compacted_history(
    backend: Backend, store: Datastore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = store.current_revision()
    first = store.create(prefix + "a", '"1"')
    entry = store.update(prefix + "a", '"2"', first.revision)
    backend.compact(store, monkeypatch)
    with pytest.raises(RevisionConflict):
        store.watch(prefix, old, 0.5)
    entries, _revision = store.list_changed(prefix, old)
    assert entries == [entry]


def test_sqlite_list_changed_from_the_log_and_from_a_scan_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteDatastore(str(tmp_path / "s.db"))
    start = store.create("/p/old", '"0"').revision
    for index in range(20):
        store.create(f"/p/{index:02}", '"1"')
    for index in range(0, 20, 3):
        entry = store.get(f"/p/{index:02}")
        assert entry is not None
        store.update(entry.key, '"2"', entry.revision)
    store.delete("/p/05")
    since = start + 10
    from_log = store.list_changed("/p/", since)
    monkeypatch.setattr("datastore.sqlite.CHANGED_FROM_LOG_MAX", 0)
    assert store.list_changed("/p/", since) == from_log
    assert [entry.key for entry in from_log[0]] == [
        f"/p/{index:02}" for index in (0, 3, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19)]


# watch


def test_watch_returns_puts_and_deletes_in_order(store: Datastore, prefix: str) -> None:
    start = store.current_revision()
    a1 = store.create(prefix + "a", '"1"')
    b1 = store.create(prefix + "b", '"1"')
    a2 = store.update(prefix + "a", '"2"', a1.revision)
    store.delete(prefix + "b", b1.revision)
    deleted_at = store.current_revision()
    events = collect(store, prefix, start, 4)
    assert events == [
        Event("put", prefix + "a", '"1"', a1.revision),
        Event("put", prefix + "b", '"1"', b1.revision),
        Event("put", prefix + "a", '"2"', a2.revision),
        Event("delete", prefix + "b", None, deleted_at),
    ]
    # Only changes after the given revision.
    assert collect(store, prefix, a2.revision, 1) == [events[3]]
    assert store.watch(prefix, deleted_at, 0.2) == []


def test_watch_respects_the_prefix(store: Datastore, prefix: str) -> None:
    start = store.current_revision()
    store.create(prefix + "ab", '"sibling"')
    store.create(prefix + "b/1", '"other"')
    inside = store.create(prefix + "a/1", '"mine"')
    store.create(prefix + "a", '"parent"')
    assert collect(store, prefix + "a/", start, 1) == [
        Event("put", prefix + "a/1", '"mine"', inside.revision)
    ]
    assert store.watch(prefix + "a/", inside.revision, 0.3) == []


def test_watch_times_out_with_no_events(store: Datastore, prefix: str) -> None:
    store.create(prefix + "elsewhere/1", '"x"')
    revision = store.current_revision()
    store.create(prefix + "elsewhere/2", '"x"')
    started = time.monotonic()
    assert store.watch(prefix + "quiet/", revision, 0.5) == []
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5, elapsed


def test_watch_in_a_thread_wakes_up_on_a_write(store: Datastore, prefix: str) -> None:
    revision = store.current_revision()
    result: list[list[Event]] = []
    woke_at: list[float] = []

    def watcher() -> None:
        result.append(store.watch(prefix, revision, 10.0))
        woke_at.append(time.monotonic())

    thread = threading.Thread(target=watcher)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive(), "watch returned before anything was written"
    written_at = time.monotonic()
    entry = store.create(prefix + "new", '"hello"')
    thread.join(timeout=5.0)
    assert not thread.is_alive(), "watch did not wake up on a write"
    assert result == [[Event("put", prefix + "new", '"hello"', entry.revision)]]
    assert woke_at[0] - written_at < 2.0


def test_watch_of_compacted_history_raises_revision_conflict(
    backend: Backend, store: Datastore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = store.current_revision()
    entry = store.create(prefix + "a", '"1"')
    store.update(prefix + "a", '"2"', entry.revision)
    backend.compact(store, monkeypatch)
    with pytest.raises(RevisionConflict):
        store.watch(prefix, old, 2.0)
    # A watch from the current revision still works after a resync.
    now = store.current_revision()
    later = store.create(prefix + "b", '"1"')
    assert collect(store, prefix, now, 1) == [Event("put", prefix + "b", '"1"', later.revision)]


# concurrency


def test_concurrent_compare_and_swap_from_threads_loses_no_update(
    store: Datastore, prefix: str
) -> None:
    key = prefix + "counter"
    store.create(key, "0")
    threads, times = 8, 25
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda _: increment(store, key, times), range(threads)))
    assert store.get(key).data == threads * times  # type: ignore[union-attr]


def test_concurrent_creates_have_one_winner(store: Datastore, prefix: str) -> None:
    key = prefix + "ipam/blocks/10.0.0.0-26"
    barrier = threading.Barrier(8)

    def claim(host: int) -> bool:
        barrier.wait()
        try:
            store.create(key, dumps({"affinity": f"host{host}"}))
        except AlreadyExists:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        won = list(pool.map(claim, range(8)))
    assert won.count(True) == 1
    assert store.get(key).data == {"affinity": f"host{won.index(True)}"}  # type: ignore[union-attr]


def test_concurrent_compare_and_swap_from_processes_loses_no_update(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    store = SqliteDatastore(path)
    key = "/contract/counter"
    store.create(key, "0")
    processes, times = 4, 50
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    children = [
        context.Process(target=increment_sqlite, args=(path, key, times, barrier, results))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    try:
        conflicts = [results.get(timeout=60) for _ in children]
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    assert all(isinstance(count, int) for count in conflicts), conflicts
    assert [child.exitcode for child in children] == [0] * processes
    assert store.get(key).data == processes * times  # type: ignore[union-attr]
    store.close()


# put_json


def test_put_json_creates_and_overwrites(store: Datastore, prefix: str) -> None:
    key = prefix + "nodes/host1"
    first = store.put_json(key, {"b": 2, "a": [1, "x"]})
    assert first.value == '{"a":[1,"x"],"b":2}'
    assert store.get(key) == first
    second = store.put_json(key, {"a": None})
    assert second.revision > first.revision
    assert store.get(key) == second
    assert second.data == {"a": None}


# etcd only: connection failures


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("operation", ["get", "list", "create", "update", "delete", "watch"])
def test_etcd_on_a_closed_port_is_unavailable(operation: str) -> None:
    port = _closed_port()
    store = EtcdDatastore([f"http://127.0.0.1:{port}"], timeout=2.0)
    calls = {
        "get": lambda: store.get("/k"),
        "list": lambda: store.list("/k/"),
        "create": lambda: store.create("/k", '"v"'),
        "update": lambda: store.update("/k", '"v"', 3),
        "delete": lambda: store.delete("/k"),
        "watch": lambda: store.watch("/k/", 0, 1.0),
    }
    started = time.monotonic()
    try:
        with pytest.raises(DatastoreUnavailable) as raised:
            calls[operation]()
    finally:
        store.close()
    assert time.monotonic() - started < 4.0
    assert f"127.0.0.1:{port}" in str(raised.value)


@pytest.mark.etcd
def test_etcd_fails_over_to_a_working_endpoint(etcd_endpoints: list[str], prefix: str) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    store = EtcdDatastore([dead, *etcd_endpoints], timeout=2.0)
    try:
        key = prefix + "failover"
        assert store.delete(key) is False
        entry = store.create(key, '"x"')
        assert store.get(key) == entry
        assert store.delete(key, entry.revision)
    finally:
        store.close()


def test_etcd_rejects_malformed_endpoints() -> None:
    with pytest.raises(ValueError):
        EtcdDatastore([])
    with pytest.raises(ValueError):
        EtcdDatastore(["ftp://127.0.0.1:2379"])


@pytest.mark.etcd
def test_etcd_outage_is_unavailable_and_the_same_store_recovers(own_etcd: EtcdServer) -> None:
    store = EtcdDatastore([own_etcd.client_url], timeout=2.0)
    try:
        entry = store.create("/outage/key", '"before"')
        revision = store.current_revision()
        watched: list[object] = []

        def watcher() -> None:
            try:
                watched.append(store.watch("/outage/", revision, 30.0))
            except DatastoreUnavailable as exc:
                watched.append(exc)

        thread = threading.Thread(target=watcher)
        thread.start()
        time.sleep(0.3)
        own_etcd.stop()
        thread.join(timeout=10.0)
        assert not thread.is_alive(), "a watch did not notice that etcd went away"
        assert isinstance(watched[0], DatastoreUnavailable)
        assert own_etcd.client_url.removeprefix("http://") in str(watched[0])

        started = time.monotonic()
        with pytest.raises(DatastoreUnavailable):
            store.get("/outage/key")
        with pytest.raises(DatastoreUnavailable):
            store.create("/outage/other", '"x"')
        assert time.monotonic() - started < 5.0

        own_etcd.start()
        started = time.monotonic()
        while True:
            try:
                current = store.get("/outage/key")
                break
            except DatastoreUnavailable:
                assert time.monotonic() - started < 15.0, "no recovery after etcd came back"
                time.sleep(0.2)
        assert current == entry
        assert store.update("/outage/key", '"after"', entry.revision).value == '"after"'
    finally:
        store.close()


@pytest.mark.etcd
def test_etcd_over_tls_with_client_certificates(
    tls_etcd: EtcdServer, tls_files: tuple[str, str, str], prefix: str
) -> None:
    ca_cert, cert_file, key_file = tls_files
    store = EtcdDatastore(
        [tls_etcd.client_url], ca_cert=ca_cert, cert_file=cert_file, key_file=key_file
    )
    try:
        revision = store.current_revision()
        entry = store.create(prefix + "k", '"secret"')
        assert store.get(prefix + "k") == entry
        assert collect(store, prefix, revision, 1) == [
            Event("put", prefix + "k", '"secret"', entry.revision)
        ]
    finally:
        store.close()
    # Without a client certificate etcd refuses the connection.
    anonymous = EtcdDatastore([tls_etcd.client_url], ca_cert=ca_cert, timeout=2.0)
    try:
        started = time.monotonic()
        with pytest.raises(DatastoreUnavailable, match="127.0.0.1"):
            anonymous.get(prefix + "k")
        assert time.monotonic() - started < 5.0
    finally:
        anonymous.close()
