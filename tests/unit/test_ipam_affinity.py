"""The affinity index and the allocation hot path: cost flat in the number of blocks,
an index that is never missing for a block, stale entries dropped."""

from __future__ import annotations

import threading
import time

import pytest

from datastore.base import Datastore, Entry, Guard, dumps
from datastore.errors import Exhausted
from datastore.sqlite import SqliteDatastore
from ipam_driver import block_store
from ipam_driver.block_store import AFFINITY_PREFIX, BLOCKS_PREFIX, affinity_key
from ipam_driver.service import IpamService

GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


class CountingStore(Datastore):
    """A real SQLite store that counts the reads and writes made through it."""

    def __init__(self, inner: SqliteDatastore) -> None:
        self.inner = inner
        self.ops = 0
        self.listed = 0
        self.prefixes: list[str] = []
        self.changed_reads = 0  # list_changed calls
        self.watches = 0

    def get(self, key: str) -> Entry | None:
        self.ops += 1
        return self.inner.get(key)

    def list(self, prefix: str) -> list[Entry]:
        self.ops += 1
        self.prefixes.append(prefix)
        entries = self.inner.list(prefix)
        self.listed += len(entries)
        return entries

    def list_changed(self, prefix: str, after_revision: int) -> tuple[list[Entry], int]:
        self.ops += 1
        self.changed_reads += 1
        return self.inner.list_changed(prefix, after_revision)

    def create(self, key: str, value: str, guard: Guard | None = None) -> Entry:
        self.ops += 1
        return self.inner.create(key, value, guard)

    def update(self, key: str, value: str, revision: int, guard: Guard | None = None
               ) -> Entry:
        self.ops += 1
        return self.inner.update(key, value, revision, guard)

    def delete(self, key: str, revision: int | None = None) -> bool:
        self.ops += 1
        return self.inner.delete(key, revision)

    def current_revision(self) -> int:
        return self.inner.current_revision()

    def watch(self, prefix: str, after_revision: int, timeout: float) -> list:
        self.watches += 1
        return self.inner.watch(prefix, after_revision, timeout)


def _host_index(store: Datastore, host: str) -> set[str]:
    return {e.data["block"] for e in store.list(AFFINITY_PREFIX + host + "/")}


def _host_blocks(store: Datastore, host: str) -> set[str]:
    return {e.data["cidr"] for e in store.list(BLOCKS_PREFIX) if e.data.get("host") == host}


def _network(store: Datastore, subnet: str) -> IpamService:
    """Host h1 with a pool, a network on subnet and its gateway, as Docker leaves it."""
    ipam = IpamService(store, "h1")
    ipam.add_pool("10.100.0.0/16")
    ipam.request_pool(subnet, None, {}, False)
    ipam.request_address(subnet, None, GATEWAY)
    return ipam


def test_allocation_cost_does_not_grow_with_the_blocks_of_the_subnet(tmp_path):
    store = CountingStore(SqliteDatastore(str(tmp_path / "s.db")))
    ipam = _network(store, "10.100.0.0/16")
    ipam.request_address("10.100.0.0/16", None, {})  # loads the view: one index listing

    def cost(count: int) -> tuple[float, int]:
        store.ops = store.listed = 0
        for _ in range(count):
            ipam.request_address("10.100.0.0/16", None, {})
        return store.ops / count, store.listed

    early, early_listed = cost(640)   # blocks 1 to 10
    for _ in range(64 * 100):          # 100 more blocks
        ipam.request_address("10.100.0.0/16", None, {})
    late, late_listed = cost(640)      # blocks 111 to 120
    assert early_listed == late_listed == 0  # nothing listed on the hot path
    assert late <= early * 1.05 and late < 3.5, (early, late)


def test_every_block_of_a_host_is_in_its_index_and_emptied_blocks_leave_it(tmp_path):
    store = SqliteDatastore(str(tmp_path / "s.db"))
    ipam = _network(store, "10.100.0.0/22")
    addresses = [ipam.request_address("10.100.0.0/22", None, {}).split("/")[0]
                 for _ in range(200)]
    assert _host_index(store, "h1") == _host_blocks(store, "h1")
    assert len(_host_blocks(store, "h1")) == 4
    for address in addresses:
        ipam.release_address("10.100.0.0/22", address)
    # Only the gateway's block is left, and the index says exactly that.
    assert _host_blocks(store, "h1") == {"10.100.0.0/26"}
    assert _host_index(store, "h1") == {"10.100.0.0/26"}


def test_a_second_process_finds_the_blocks_through_the_index(tmp_path):
    path = str(tmp_path / "s.db")
    first = _network(SqliteDatastore(path), "10.100.0.0/16")
    for _ in range(200):  # gateway .1, then .2 to .201: four blocks
        first.request_address("10.100.0.0/16", None, {})
    store = CountingStore(SqliteDatastore(path))
    second = IpamService(store, "h1")
    got = second.request_address("10.100.0.0/16", None, {})
    assert got == "10.100.0.202/16"  # the fourth block of the first process, next address
    # The host's 4 index entries were listed, never the blocks.
    assert store.prefixes == [AFFINITY_PREFIX + "h1/"] and store.listed == 4


def test_stale_index_entries_are_dropped_and_upgraded_blocks_are_found(tmp_path):
    store = SqliteDatastore(str(tmp_path / "s.db"))
    _network(store, "10.100.0.0/16")
    # A claimer that died between its index entry and its block; and a block an older
    # version wrote with no index entry at all.
    store.create(affinity_key("h1", "10.100.9.0/26"), dumps({"block": "10.100.9.0/26"}))
    store.delete(affinity_key("h1", "10.100.0.0/26"))
    fresh = IpamService(store, "h1")
    assert fresh.request_address("10.100.0.0/16", None, {}) == "10.100.0.2/16"
    assert _host_index(store, "h1") == {"10.100.0.0/26"}


def test_two_hosts_share_a_subnet_without_duplicates_and_each_indexes_its_own(tmp_path):
    store = SqliteDatastore(str(tmp_path / "s.db"))
    a, b = IpamService(store, "a"), IpamService(store, "b")
    a.add_pool("10.100.0.0/16")
    a.request_pool("10.100.0.0/24", None, {}, False)
    b.request_pool("10.100.0.0/24", None, {}, False)
    a.request_address("10.100.0.0/24", None, GATEWAY)
    got = []
    for _ in range(126):
        got.append(a.request_address("10.100.0.0/24", None, {}))
        got.append(b.request_address("10.100.0.0/24", None, {}))
    assert len(set(got)) == len(got) == 252  # the whole /24 but network, broadcast, gateway
    for host in ("a", "b"):
        assert _host_index(store, host) == _host_blocks(store, host)


def test_borrowing_lists_the_subnet_once_for_many_addresses(tmp_path):
    """Every cell of the subnet (32 blocks: listed, not read one by one) is another
    host's: the first borrow lists the blocks, the next ones use what that listing
    found with room."""
    path = str(tmp_path / "s.db")
    owner = _network(SqliteDatastore(path), "10.100.0.0/21")
    taken = [owner.request_address("10.100.0.0/21", None, {}).split("/")[0]
             for _ in range(2030)]  # all 32 blocks
    for address in taken[:1500:50]:  # room in the others too
        owner.release_address("10.100.0.0/21", address)
    store = CountingStore(SqliteDatastore(path))
    borrower = IpamService(store, "h2")
    borrower.request_pool("10.100.0.0/21", None, {}, False)
    got = [borrower.request_address("10.100.0.0/21", None, {}).split("/")[0]
           for _ in range(40)]
    assert len(set(got)) == 40 and not set(got) & set(taken[1500:])
    assert store.prefixes.count(BLOCKS_PREFIX) == 1, store.prefixes
    assert {e.data["host"] for e in store.list(BLOCKS_PREFIX)} == {"h1"}


def _filled_by_two_processes(tmp_path, subnet: str = "10.100.0.0/21"
                             ) -> tuple[IpamService, CountingStore, list[str]]:
    """Two processes of host h1 on one file: the first fills the subnet (its view has
    read every block, full); the second frees 30 addresses spread over the blocks."""
    path = str(tmp_path / "s.db")
    store = CountingStore(SqliteDatastore(path))
    first = _network(store, subnet)
    taken = []
    with pytest.raises(Exhausted):
        while True:
            taken.append(first.request_address(subnet, None, {}).split("/")[0])
    second = IpamService(SqliteDatastore(path), "h1")
    freed = taken[::67][:30]
    for address in freed:
        second.release_address(subnet, address)
    store.prefixes.clear()
    store.changed_reads = store.watches = 0
    return first, store, freed


def test_addresses_freed_by_another_process_are_found_by_reading_the_changed_blocks(
        tmp_path):
    """One read of the blocks written since (no history, no listing) finds them."""
    first, store, freed = _filled_by_two_processes(tmp_path)
    got = [first.request_address("10.100.0.0/21", None, {}).split("/")[0]
           for _ in range(len(freed))]
    assert sorted(got) == sorted(freed)
    assert BLOCKS_PREFIX not in store.prefixes, "the subnet's blocks were listed"
    assert (store.changed_reads, store.watches) == (1, 0)
    with pytest.raises(Exhausted):
        first.request_address("10.100.0.0/21", None, {})


def _requested_in(ipam: IpamService, subnet: str, count: int) -> list[str]:
    return [ipam.request_address(subnet, None, {}).split("/")[0] for _ in range(count)]


def _requested(ipam: IpamService, count: int) -> list[str]:
    return _requested_in(ipam, "10.100.0.0/21", count)


def _history_read_up_to_10_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_store, "CATCH_UP_MIN_CHANGES", 10)
    monkeypatch.setattr(block_store, "CATCH_UP_PER_BLOCK", 0)


def test_a_view_too_far_behind_for_the_history_still_finds_freed_addresses_unlisted(
        tmp_path, monkeypatch):
    first, store, freed = _filled_by_two_processes(tmp_path)
    _history_read_up_to_10_changes(monkeypatch)  # 30 changes behind
    assert sorted(_requested(first, len(freed))) == sorted(freed)
    assert BLOCKS_PREFIX not in store.prefixes, "the subnet's blocks were listed"


def _block_emptied_by_another_process(tmp_path) -> tuple[IpamService, CountingStore,
                                                          list[str]]:
    """The second process empties a whole block (deleted, its cell free) of a subnet
    that the first filled (its cursor passed every cell)."""
    path = str(tmp_path / "s.db")
    store = CountingStore(SqliteDatastore(path))
    first = _network(store, "10.100.0.0/21")
    taken = []
    with pytest.raises(Exhausted):
        while True:
            taken.append(first.request_address("10.100.0.0/21", None, {}).split("/")[0])
    emptied = [a for a in taken if a.startswith("10.100.3.") and int(a.split(".")[3]) < 64]
    second = IpamService(SqliteDatastore(path), "h1")
    for address in emptied:
        second.release_address("10.100.0.0/21", address)
    assert store.inner.get(BLOCKS_PREFIX + "10.100.3.0-26") is None
    store.prefixes.clear()
    return first, store, emptied


def test_a_cell_another_process_freed_is_claimed_from_the_history(tmp_path):
    """The read of the changed blocks cannot show a deleted one: the history does,
    and the cell is claimed again without a listing."""
    first, store, emptied = _block_emptied_by_another_process(tmp_path)
    assert sorted(_requested(first, len(emptied))) == sorted(emptied)
    assert BLOCKS_PREFIX not in store.prefixes, "the subnet's blocks were listed"


def test_a_cell_freed_while_the_view_was_too_far_behind_is_found_by_a_listing(
        tmp_path, monkeypatch):
    first, store, emptied = _block_emptied_by_another_process(tmp_path)
    _history_read_up_to_10_changes(monkeypatch)  # 64 changes behind
    assert sorted(_requested(first, len(emptied))) == sorted(emptied)
    assert store.prefixes.count(BLOCKS_PREFIX) == 1, store.prefixes


def test_a_busy_or_avoided_block_is_waited_for_rather_than_the_subnet_listed(tmp_path):
    """A candidate this process avoids (it lost a write on it twice) while its cursor
    walks the grid again: once the cursor is through, the candidate is taken, with no
    listing of the subnet."""
    path = str(tmp_path / "s.db")
    store = CountingStore(SqliteDatastore(path))
    ipam = _network(store, "10.100.0.0/21")
    with pytest.raises(Exhausted):
        while True:
            last = ipam.request_address("10.100.0.0/21", None, {}).split("/")[0]
    ipam.release_address("10.100.0.0/21", last)
    view = ipam.blocks.view
    (scope,) = view.scopes()
    (candidate,) = scope.candidates
    view.avoid(candidate)
    # As a refresher's relist leaves it: the cursor starts again, nothing new to read.
    view.restart_cells(scope, block_store.grid_cells(scope.allowed, 4, 26), foreign=set())
    scope.caught_up = store.current_revision()
    store.prefixes.clear()
    assert ipam.request_address("10.100.0.0/21", None, {}).split("/")[0] == last
    assert BLOCKS_PREFIX not in store.prefixes, "the subnet's blocks were listed"


def _idle_while_another_fills(tmp_path) -> tuple[IpamService, CountingStore, list[str]]:
    """The first process fills the subnet (its cursor has passed every cell) and goes
    idle; the second frees 30 addresses after more changes than a slow-path catch-up
    reads (300 allocations and releases)."""
    first, store, freed = _filled_by_two_processes(tmp_path)
    second = IpamService(SqliteDatastore(store.inner.path), "h1")
    for _ in range(150):
        address = second.request_address("10.100.0.0/21", None, {}).split("/")[0]
        second.release_address("10.100.0.0/21", address)
    assert store.inner.current_revision() - first.blocks.view.scopes()[0].caught_up > max(
        block_store.CATCH_UP_MIN_CHANGES, block_store.CATCH_UP_PER_BLOCK * 32)
    store.prefixes.clear()
    store.changed_reads = store.watches = 0
    return first, store, freed


def test_the_refresher_brings_an_idle_view_up_to_date_off_the_request_path(tmp_path):
    """Too far behind for the history: the refresher lists the blocks once (rather
    than page through every change), and the requests then read nothing."""
    idle, store, freed = _idle_while_another_fills(tmp_path)
    assert idle.blocks.refresh() == 1
    assert store.prefixes.count(BLOCKS_PREFIX) == 1 and store.watches == 0
    store.prefixes.clear()
    store.changed_reads = 0
    got = [idle.request_address("10.100.0.0/21", None, {}).split("/")[0]
           for _ in range(len(freed))]
    assert sorted(got) == sorted(freed)
    assert BLOCKS_PREFIX not in store.prefixes, "the subnet's blocks were listed"
    assert (store.changed_reads, store.watches) == (0, 0), "the requests read changes"


def test_a_refresher_close_behind_reads_the_history_not_every_block(tmp_path):
    first, store, freed = _filled_by_two_processes(tmp_path)  # 30 changes behind
    assert first.blocks.refresh() == 1
    assert BLOCKS_PREFIX not in store.prefixes and store.watches == 1
    store.changed_reads = store.watches = 0
    assert sorted(_requested(first, len(freed))) == sorted(freed)
    assert (store.changed_reads, store.watches) == (0, 0), "the requests read changes"


def test_without_the_refresher_an_idle_view_reads_the_changes_in_a_request(tmp_path):
    """What the refresher saves (the check above is not vacuous)."""
    idle, store, freed = _idle_while_another_fills(tmp_path)
    got = [idle.request_address("10.100.0.0/21", None, {}).split("/")[0]
           for _ in range(len(freed))]
    assert sorted(got) == sorted(freed)
    assert BLOCKS_PREFIX not in store.prefixes, "the subnet's blocks were listed"
    assert store.changed_reads == 1


def _refreshers() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "ipam-view-refresher")


def test_the_refresher_leaves_scopes_unused_for_a_while_and_runs_only_when_serving(
        tmp_path):
    before = _refreshers()
    idle, _store, _freed = _idle_while_another_fills(tmp_path)
    later = time.monotonic() + block_store.REFRESH_IDLE_SECONDS + 1
    assert idle.blocks.refresh(now=later) == 0
    assert _refreshers() == before
    serving = IpamService(SqliteDatastore(str(tmp_path / "s.db")), "h1",
                          refresh_in_background=True)
    serving.request_address("10.100.0.0/21", None, {})
    serving.request_address("10.100.0.0/21", None, {})
    assert _refreshers() == before + 1


def test_room_another_host_freed_is_borrowed_from_the_history_without_a_listing(tmp_path):
    """h2 borrows in a subnet whose every block is h1's: its first borrow lists the
    blocks; the room h1 frees afterwards comes to h2 from the history."""
    path = str(tmp_path / "s.db")
    owner = _network(SqliteDatastore(path), "10.100.0.0/21")
    taken = []
    with pytest.raises(Exhausted):
        while True:
            taken.append(owner.request_address("10.100.0.0/21", None, {}).split("/")[0])
    owner.release_address("10.100.0.0/21", taken[0])
    store = CountingStore(SqliteDatastore(path))
    borrower = IpamService(store, "h2")
    borrower.request_pool("10.100.0.0/21", None, {}, False)
    assert borrower.request_address("10.100.0.0/21", None, {}).split("/")[0] == taken[0]
    freed = taken[5::67][:30]
    for address in freed:
        owner.release_address("10.100.0.0/21", address)
    store.prefixes.clear()
    got = [borrower.request_address("10.100.0.0/21", None, {}).split("/")[0]
           for _ in range(len(freed))]
    assert sorted(got) == sorted(freed)
    assert BLOCKS_PREFIX not in store.prefixes, "the subnet's blocks were listed again"
    assert {e.data["host"] for e in store.list(BLOCKS_PREFIX)} == {"h1"}


def test_the_refresher_skips_a_subnet_with_cells_to_spare(tmp_path):
    """Two blocks of the 32 of a /21 are claimed: a process out of room claims a new
    block, so there is no history to read; past half of the cells there is."""
    ipam = _network(SqliteDatastore(str(tmp_path / "s.db")), "10.100.0.0/21")
    for _ in range(100):
        ipam.request_address("10.100.0.0/21", None, {})
    assert ipam.blocks.refresh() == 0
    for _ in range(16 * 64 - 100):
        ipam.request_address("10.100.0.0/21", None, {})
    assert ipam.blocks.refresh() == 1


def test_a_subnet_created_again_allocates_from_its_gateways_block(tmp_path):
    """The process that served a removed network's subnet still holds the cells it
    freed; when the same subnet comes back, the first container address shares the
    gateway's block instead of claiming another one."""
    ipam = _network(SqliteDatastore(str(tmp_path / "s.db")), "10.100.0.0/24")
    taken = _requested_in(ipam, "10.100.0.0/24", 150)  # three blocks
    for address in taken:
        ipam.release_address("10.100.0.0/24", address)
    ipam.release_address("10.100.0.0/24", "10.100.0.1")
    ipam.release_pool("10.100.0.0/24")
    ipam.request_pool("10.100.0.0/24", None, {}, False)
    ipam.request_address("10.100.0.0/24", None, GATEWAY)
    assert _requested_in(ipam, "10.100.0.0/24", 1) == ["10.100.0.2"]
