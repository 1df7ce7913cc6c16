"""The block record format setting: format 2 on a new datastore, format 1 kept on one
that has blocks until it is set, and format 1 restored (every block rewritten) before a
downgrade."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from datastore.base import dumps
from datastore.errors import InvalidRequest
from datastore.sqlite import SqliteDatastore
from ipam_driver.block_format import (
    REFRESH_SECONDS,
    BlockFormat,
    read_block_format,
    set_block_format,
)
from ipam_driver.block_store import BLOCKS_PREFIX, block_key
from ipam_driver.blocks import AddressAllocation, AllocationBlock
from ipam_driver.service import IpamService


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteDatastore]:
    db = SqliteDatastore(str(tmp_path / "ipam.db"))
    yield db
    db.close()


def _service(store: SqliteDatastore) -> IpamService:
    """A new process's service: it reads the setting afresh."""
    service = IpamService(store, "host-a")
    if not service.get_pools():
        service.add_pool("10.201.0.0/16")
    return service


def _allocate(service: IpamService, count: int) -> list[str]:
    pool_id = "10.201.0.0/24"
    if pool_id not in {s.pool_id for s in service.list_subnets()}:
        service.request_pool(pool_id, None, {}, False)
    return [service.request_address(pool_id, None, {}).split("/")[0] for _ in range(count)]


def _formats(store: SqliteDatastore) -> set[int]:
    return {e.data.get("format", 1) for e in store.list(BLOCKS_PREFIX)}


def _readable_by_format_1(store: SqliteDatastore) -> bool:
    """What a version before format 2 does with each block record."""
    try:
        for entry in store.list(BLOCKS_PREFIX):
            for record in entry.data["allocations"].values():
                AddressAllocation.from_dict(record)
    except AttributeError:
        return False
    return True


def _held(service: IpamService) -> list[tuple[str, str | None, str]]:
    return [(a.address, a.handle, a.kind) for a in service.list_allocations()]


def test_a_new_datastore_writes_compact_blocks(store: SqliteDatastore) -> None:
    assert read_block_format(store) is None
    _allocate(_service(store), 3)
    assert read_block_format(store) == 2
    assert _formats(store) == {2}


def test_a_datastore_with_blocks_keeps_format_1_until_it_is_set(
        store: SqliteDatastore) -> None:
    older = AllocationBlock("10.201.0.0/26", "host-a")
    older.allocate("10.201.0.7", "ep7", {"kind": "container"})
    store.create(block_key(older.cidr), dumps(older.to_dict()))  # as an older version
    _allocate(_service(store), 3)
    assert read_block_format(store) == 1
    assert _formats(store) == {1} and _readable_by_format_1(store)

    assert set_block_format(store, 2, _attempts) == 0
    _allocate(_service(store), 1)
    assert _formats(store) == {2}


def test_format_1_rewrites_every_block_and_keeps_every_allocation(
        store: SqliteDatastore) -> None:
    service = _service(store)
    _allocate(service, 70)  # two blocks
    service.request_address("10.201.0.0/24", "10.201.0.200", {})
    service.assign_handle("10.201.0.200", "ep200")
    held = _held(service)
    assert _formats(store) == {2} and not _readable_by_format_1(store)
    waited: list[float] = []

    assert set_block_format(store, 1, _attempts, wait=waited.append) == 3
    assert waited == [REFRESH_SECONDS + 1]  # every process has seen it by then
    assert _formats(store) == {1} and _readable_by_format_1(store)
    assert _held(_service(store)) == held
    assert read_block_format(store) == 1


def test_a_process_writes_by_the_setting_it_read_until_it_reads_it_again(
        store: SqliteDatastore) -> None:
    now = [0.0]
    seen = BlockFormat(store, clock=lambda: now[0])
    assert seen.compact()  # decided on the empty datastore
    set_block_format(store, 1, _attempts, wait=lambda _seconds: None)
    now[0] = REFRESH_SECONDS - 0.1
    assert seen.compact()
    now[0] = REFRESH_SECONDS
    assert not seen.compact()


@pytest.mark.parametrize("block_format", [0, 3])
def test_an_unknown_format_is_refused_and_changes_nothing(
        store: SqliteDatastore, block_format: int) -> None:
    with pytest.raises(InvalidRequest, match=f"unknown block format {block_format}"):
        set_block_format(store, block_format, _attempts)
    assert read_block_format(store) is None


def _attempts(what: str) -> Iterator[int]:
    yield from range(5)
    raise AssertionError(f"gave up {what}")
