"""IpamService: network subnets, addresses, affinity and handles on a real SQLite store."""

from __future__ import annotations

import pytest
from netaddr import IPNetwork

from datastore.base import ROOT, AlreadyExists, DatastoreUnavailable, RevisionConflict, dumps
from datastore.errors import Conflict, Exhausted, InvalidRequest, NotFound, Unavailable
from datastore.sqlite import SqliteDatastore
from ipam_driver.block_store import BLOCKS_PREFIX, block_key
from ipam_driver.blocks import AllocationBlock
from ipam_driver.pools import SubnetReservation
from ipam_driver.service import (
    SUBNETS_PREFIX,
    Allocation,
    IpamService,
    subnet_key,
)

GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


@pytest.fixture
def store(tmp_path):
    db = SqliteDatastore(str(tmp_path / "ipam.db"))
    yield db
    db.close()


@pytest.fixture
def ipam(store):
    service = IpamService(store, "host-a")
    service.add_pool("10.201.0.0/16")
    service.add_pool("fd00:201::/48")
    return service


def snapshot(store):
    return [(e.key, e.value, e.revision) for e in store.list(ROOT)]


def blocks(store):
    return {
        e.data["cidr"]: AllocationBlock.from_dict(e.data) for e in store.list(BLOCKS_PREFIX)
    }


def address_only(reply):
    return reply.split("/")[0]


def reservations(store):
    """The stored reservation records, by CIDR."""
    return {e.data["cidr"]: e.data for e in store.list(SUBNETS_PREFIX)}


# --------------------------------------------------------------------- subnets


def test_carved_subnets_are_distinct_and_do_not_overlap(ipam, store):
    got = [ipam.request_pool(None, None, {}, False) for _ in range(5)]
    for pool_id, cidr, data in got:
        assert pool_id == cidr
        assert data == {}
    cidrs = [cidr for _id, cidr, _ in got]
    assert cidrs == [f"10.201.{n}.0/24" for n in range(5)]
    reserved = reservations(store)
    assert sorted(reserved) == sorted(cidrs)
    assert all(reserved[c]["pool"] == "10.201.0.0/16" for c in cidrs)
    # One key per subnet, each settled, claimed by its creator.
    assert [e.key for e in store.list(SUBNETS_PREFIX)] == sorted(subnet_key(c) for c in cidrs)
    assert all(reserved[c]["hosts"] == ["host-a"] for c in cidrs)
    assert all(isinstance(reserved[c]["created_revision"], int) for c in cidrs)


def test_carving_skips_explicit_subnets_and_reuses_released(ipam):
    ipam.request_pool("10.201.0.128/25", None, {}, False)
    assert ipam.request_pool(None, None, {}, False)[1] == "10.201.1.0/24"
    ipam.release_pool("10.201.0.128/25")
    assert ipam.request_pool(None, None, {}, False)[1] == "10.201.0.0/24"


def test_carving_ipv6_and_size_parameters(store):
    ipam = IpamService(store, "h", network_prefix_v4=26, network_prefix_v6=112)
    ipam.add_pool("10.5.0.0/24")
    ipam.add_pool("fd00:5::/48")
    assert ipam.request_pool(None, None, {}, True)[1] == "fd00:5::/112"
    assert ipam.request_pool(None, None, {}, True)[1] == "fd00:5::1:0/112"
    assert [ipam.request_pool(None, None, {}, False)[1] for _ in range(4)] == [
        "10.5.0.0/26", "10.5.0.64/26", "10.5.0.128/26", "10.5.0.192/26",
    ]


def test_carving_exhaustion_names_pools_and_changes_nothing(store):
    ipam = IpamService(store, "h")
    ipam.add_pool("10.7.0.0/28", block_size=28)  # smaller than /24: one subnet
    ipam.add_pool("10.8.0.0/23")
    assert ipam.request_pool(None, None, {}, False)[1] == "10.7.0.0/28"
    assert ipam.request_pool(None, None, {}, False)[1] == "10.8.0.0/24"
    assert ipam.request_pool(None, None, {}, False)[1] == "10.8.1.0/24"
    before = snapshot(store)
    with pytest.raises(Exhausted, match="10.7.0.0/28, 10.8.0.0/23") as info:
        ipam.request_pool(None, None, {}, False)
    assert "calico-cnm pool add" in str(info.value)
    with pytest.raises(Exhausted, match="no enabled IPv6 pool"):
        ipam.request_pool(None, None, {}, True)
    assert snapshot(store) == before


def test_disabled_pools_are_skipped(ipam):
    ipam.add_pool("10.50.0.0/16")
    ipam.update_pool("10.201.0.0/16", disabled=True)
    assert ipam.request_pool(None, None, {}, False)[1] == "10.50.0.0/24"
    with pytest.raises(InvalidRequest, match="disabled"):
        ipam.request_pool("10.201.9.0/24", None, {}, False)


def test_explicit_subnet_inside_or_equal_to_pool(ipam, store):
    assert ipam.request_pool("10.201.9.0/24", None, {"opt": "x"}, False) == (
        "10.201.9.0/24", "10.201.9.0/24", {},
    )
    assert ipam.request_pool("fd00:201::/48", None, {}, True)[1] == "fd00:201::/48"
    info = ipam.get_subnet("10.201.9.0/24")
    assert (info.cidr, info.pool, info.sub_pool, info.options) == (
        "10.201.9.0/24", "10.201.0.0/16", None, {"opt": "x"},
    )


def test_refused_subnets_change_nothing(ipam, store):
    ipam.request_pool("10.201.9.0/24", None, {}, False)
    before = snapshot(store)
    with pytest.raises(InvalidRequest, match="calico-cnm pool add 172.30.0.0/16"):
        ipam.request_pool("172.30.0.0/16", None, {}, False)
    with pytest.raises(InvalidRequest, match="overlaps pool 10.201.0.0/16 without fitting"):
        ipam.request_pool("10.200.0.0/15", None, {}, False)
    with pytest.raises(InvalidRequest, match="network address is 10.201.10.0/24"):
        ipam.request_pool("10.201.10.1/24", None, {}, False)
    with pytest.raises(InvalidRequest, match="invalid subnet"):
        ipam.request_pool("10.201.10.0", None, {}, False)
    with pytest.raises(InvalidRequest, match="IPv6 subnet was requested"):
        ipam.request_pool("10.201.10.0/24", None, {}, True)
    with pytest.raises(InvalidRequest, match="too small"):
        ipam.request_pool("10.201.10.0/31", None, {}, False)
    with pytest.raises(Conflict, match="overlaps subnet 10.201.9.0/24"):
        ipam.request_pool("10.201.9.0/24", None, {}, False)
    with pytest.raises(Conflict, match="overlaps subnet 10.201.9.0/24"):
        ipam.request_pool("10.201.8.0/23", None, {}, False)
    with pytest.raises(Conflict, match="overlaps subnet 10.201.9.0/24"):
        ipam.request_pool("10.201.9.64/26", None, {}, False)
    with pytest.raises(InvalidRequest, match="ip-range 10.201.11.0/25 is not inside subnet"):
        ipam.request_pool("10.201.10.0/24", "10.201.11.0/25", {}, False)
    with pytest.raises(InvalidRequest, match="needs an explicit subnet"):
        ipam.request_pool(None, "10.201.11.0/25", {}, False)
    with pytest.raises(NotFound, match="unknown IPAM pool id"):
        ipam.release_pool("10.201.77.0/24")
    with pytest.raises(NotFound):
        ipam.get_subnet("nope")
    assert snapshot(store) == before


# ------------------------------------------------------------------- addresses


def test_gateway_defaults_to_first_address_and_kind(ipam, store):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    assert ipam.request_address(pool_id, None, GATEWAY) == "10.201.0.1/24"
    assert ipam.request_address(pool_id, "", {}) == "10.201.0.2/24"
    allocation = ipam.list_allocations()[0]
    assert allocation == Allocation(
        "10.201.0.1", "10.201.0.0/24", None, "gateway", "10.201.0.0/26", "host-a"
    )
    assert ipam.get_subnet(pool_id).gateway == "10.201.0.1"


def test_explicit_gateway_and_aux_addresses(ipam, store):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/16", "10.201.1.0/24", {}, False)
    assert ipam.request_address(pool_id, "10.201.0.254", GATEWAY) == "10.201.0.254/16"
    assert ipam.request_address(pool_id, "10.201.0.5", {}) == "10.201.0.5/16"
    kinds = {a.address: a.kind for a in ipam.list_allocations()}
    assert kinds == {"10.201.0.254": "gateway", "10.201.0.5": "aux"}
    assert ipam.get_subnet(pool_id).gateway == "10.201.0.254"
    # Automatic addresses come from the ip-range, not from next to the gateway.
    assert ipam.request_address(pool_id, None, {}) == "10.201.1.0/16"


def test_refused_addresses_change_nothing(ipam, store):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    ipam.request_address(pool_id, None, GATEWAY)
    ipam.request_address(pool_id, "10.201.0.9", {})
    before = snapshot(store)
    with pytest.raises(Conflict, match="address 10.201.0.9 is already in use"):
        ipam.request_address(pool_id, "10.201.0.9", {})
    with pytest.raises(Conflict, match="address 10.201.0.1 is already in use"):
        ipam.request_address(pool_id, None, GATEWAY)
    with pytest.raises(InvalidRequest, match="not inside subnet 10.201.0.0/24"):
        ipam.request_address(pool_id, "10.201.1.9", {})
    with pytest.raises(InvalidRequest, match="not inside subnet 10.201.0.0/24"):
        ipam.request_address(pool_id, "10.201.1.1", GATEWAY)
    with pytest.raises(InvalidRequest, match="network address"):
        ipam.request_address(pool_id, "10.201.0.0", {})
    with pytest.raises(InvalidRequest, match="broadcast address"):
        ipam.request_address(pool_id, "10.201.0.255", {})
    with pytest.raises(InvalidRequest, match="not inside subnet"):
        ipam.request_address(pool_id, "fd00:201::5", {})
    with pytest.raises(InvalidRequest, match="not an IP address"):
        ipam.request_address(pool_id, "10.201.0", {})
    with pytest.raises(NotFound, match="unknown IPAM pool id"):
        ipam.request_address("10.201.99.0/24", None, {})
    with pytest.raises(NotFound, match="10.201.0.77 is not allocated"):
        ipam.release_address(pool_id, "10.201.0.77")
    with pytest.raises(NotFound, match="not allocated"):
        ipam.release_address(pool_id, "10.201.0.200")  # block does not even exist
    with pytest.raises(NotFound, match="not in subnet"):
        ipam.release_address(pool_id, "10.201.5.1")
    with pytest.raises(NotFound):
        ipam.assign_handle("10.201.0.50", "ep")
    with pytest.raises(NotFound, match="not in any network subnet"):
        ipam.assign_handle("10.9.9.9", "ep")
    assert snapshot(store) == before


def test_ip_range_is_honoured(ipam):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", "10.201.0.128/29", {}, False)
    got = [address_only(ipam.request_address(pool_id, None, {})) for _ in range(8)]
    assert got == [f"10.201.0.{n}" for n in range(128, 136)]
    with pytest.raises(Exhausted, match="ip-range 10.201.0.128/29 of subnet 10.201.0.0/24"):
        ipam.request_address(pool_id, None, {})
    # Explicit addresses outside the range but inside the subnet are fine.
    assert ipam.request_address(pool_id, "10.201.0.3", {}) == "10.201.0.3/24"


def test_ip_range_never_gives_network_or_broadcast(ipam):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", "10.201.0.0/30", {}, False)
    got = [address_only(ipam.request_address(pool_id, None, {})) for _ in range(3)]
    assert got == ["10.201.0.1", "10.201.0.2", "10.201.0.3"]
    pool_id, _cidr, _ = ipam.request_pool("10.201.1.0/24", "10.201.1.252/30", {}, False)
    got = [address_only(ipam.request_address(pool_id, None, {})) for _ in range(3)]
    assert got == ["10.201.1.252", "10.201.1.253", "10.201.1.254"]
    with pytest.raises(Exhausted):
        ipam.request_address(pool_id, None, {})


def test_small_subnet_exhaustion_gives_each_usable_address_once(ipam, store):
    pool_id, cidr, _ = ipam.request_pool("10.201.3.16/28", None, {}, False)
    got = [ipam.request_address(pool_id, None, {}) for _ in range(14)]
    assert all(reply.endswith("/28") for reply in got)
    addresses = [address_only(reply) for reply in got]
    assert sorted(addresses) == sorted(str(ip) for ip in list(IPNetwork(cidr))[1:-1])
    before = snapshot(store)
    with pytest.raises(Exhausted, match="no free address left in subnet 10.201.3.16/28"):
        ipam.request_address(pool_id, None, {})
    assert snapshot(store) == before
    # The subnet shares its /26 block; the block holds exactly these addresses.
    assert list(blocks(store)) == ["10.201.3.0/26"]
    ipam.release_address(pool_id, "10.201.3.20")
    assert ipam.request_address(pool_id, None, {}) == "10.201.3.20/28"


def test_ipv6_small_subnet_exhaustion(ipam, store):
    pool_id, cidr, _ = ipam.request_pool("fd00:201::100/120", None, {}, True)
    gateway = ipam.request_address(pool_id, None, GATEWAY)
    assert gateway == "fd00:201::101/120"
    got = {address_only(ipam.request_address(pool_id, None, {})) for _ in range(254)}
    expected = {str(ip) for ip in list(IPNetwork(cidr))[2:]}  # all but network and gateway
    assert got == expected  # the last address is usable in IPv6
    with pytest.raises(Exhausted, match="fd00:201::100/120"):
        ipam.request_address(pool_id, None, {})
    assert len(blocks(store)) == 4  # four /122 blocks


def test_release_address_frees_and_deletes_empty_blocks(ipam, store):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    first = address_only(ipam.request_address(pool_id, None, {}))
    assert list(blocks(store)) == ["10.201.0.0/26"]
    ipam.release_address(pool_id, first)
    assert blocks(store) == {}
    with pytest.raises(NotFound):
        ipam.release_address(pool_id, first)


def test_addresses_are_reported_with_the_subnet_prefix(ipam):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/16", None, {}, False)
    assert ipam.request_address(pool_id, None, {}) == "10.201.0.1/16"
    pool_id, _cidr, _ = ipam.request_pool("fd00:201:0:1::/64", None, {}, True)
    assert ipam.request_address(pool_id, None, {}) == "fd00:201:0:1::1/64"
    assert ipam.request_address(pool_id, "fd00:201:0:1::ffff:1", {}) == "fd00:201:0:1::ffff:1/64"


# -------------------------------------------------------------------- affinity


def test_two_hosts_get_different_blocks(ipam, store):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    other = IpamService(store, "host-b")
    a = [address_only(ipam.request_address(pool_id, None, {})) for _ in range(3)]
    b = [address_only(other.request_address(pool_id, None, {})) for _ in range(3)]
    assert a == ["10.201.0.1", "10.201.0.2", "10.201.0.3"]
    assert b == ["10.201.0.64", "10.201.0.65", "10.201.0.66"]
    assert ipam.request_address(pool_id, None, {}) == "10.201.0.4/24"
    hosts = {cidr: block.host for cidr, block in blocks(store).items()}
    assert hosts == {"10.201.0.0/26": "host-a", "10.201.0.64/26": "host-b"}
    by_host = {a.address: a.host for a in ipam.list_allocations()}
    assert by_host["10.201.0.64"] == "host-b"


def test_full_own_block_claims_the_next_one(ipam, store):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    for _ in range(63):  # 10.201.0.1 .. 10.201.0.63
        ipam.request_address(pool_id, None, {})
    assert ipam.request_address(pool_id, None, {}) == "10.201.0.64/24"
    assert {c: b.host for c, b in blocks(store).items()} == {
        "10.201.0.0/26": "host-a",
        "10.201.0.64/26": "host-a",
    }


def test_borrowing_when_every_block_is_claimed_by_another_host(ipam, store):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    # host-a claims every block of the /24 (one explicit address in each).
    for address in ("10.201.0.10", "10.201.0.70", "10.201.0.130", "10.201.0.200"):
        ipam.request_address(pool_id, address, {})
    other = IpamService(store, "host-b")
    borrowed = address_only(other.request_address(pool_id, None, {}))
    assert borrowed == "10.201.0.1"
    owner = {a.address: a.host for a in ipam.list_allocations()}
    assert owner[borrowed] == "host-a"  # affinity unchanged: borrowed, not stolen
    assert len(blocks(store)) == 4


def test_subnet_smaller_than_a_block_shares_the_grid_block(ipam, store):
    first, _c, _ = ipam.request_pool("10.201.4.0/28", None, {}, False)
    second, _c, _ = ipam.request_pool("10.201.4.16/28", None, {}, False)
    assert ipam.request_address(first, None, {}) == "10.201.4.1/28"
    other = IpamService(store, "host-b")
    # The /26 exists (host-a's): host-b cannot claim it, so it borrows.
    assert other.request_address(second, None, {}) == "10.201.4.17/28"
    assert {c: b.host for c, b in blocks(store).items()} == {"10.201.4.0/26": "host-a"}


def test_lost_block_claim_is_retried(ipam, store):
    """Another host creating the block between our read and our create: retry, no error."""
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    real_create = store.create
    raced = []

    def racing_create(key, value, guard=None):
        if not raced and key == block_key("10.201.0.0/26"):
            raced.append(key)
            intruder = AllocationBlock("10.201.0.0/26", "host-z")
            intruder.allocate("10.201.0.1", "other")
            real_create(key, dumps(intruder.to_dict()))
        return real_create(key, value, guard)

    store.create = racing_create
    try:
        got = ipam.request_address(pool_id, None, {})
    finally:
        del store.create
    assert raced
    # host-z owns the first block now; host-a claims the second one.
    assert got == "10.201.0.64/24"
    hosts = {c: b.host for c, b in blocks(store).items()}
    assert hosts == {"10.201.0.0/26": "host-z", "10.201.0.64/26": "host-a"}


# --------------------------------------------------------------------- handles


def test_assign_handle_and_release_handle(ipam, store):
    v4, _c, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    v6, _c, _ = ipam.request_pool("fd00:201::/64", None, {}, True)
    a4 = ipam.request_address(v4, None, {})
    a6 = ipam.request_address(v6, None, {})
    aux = ipam.request_address(v4, "10.201.0.100", {})
    other = ipam.request_address(v4, None, {})
    ipam.assign_handle(a4, "ep1")  # "a.b.c.d/nn" is accepted
    ipam.assign_handle(address_only(a6), "ep1")
    ipam.assign_handle(aux, "ep2")  # a container's --ip arrives like an aux address
    ipam.assign_handle(aux, "ep2")  # idempotent
    table = {a.address: (a.handle, a.kind) for a in ipam.list_allocations()}
    assert table == {
        "10.201.0.1": ("ep1", "container"),
        "10.201.0.2": (None, "container"),
        "10.201.0.100": ("ep2", "container"),
        "fd00:201::1": ("ep1", "container"),
    }
    assert ipam.release_handle("ep1") == ["10.201.0.1", "fd00:201::1"]
    assert ipam.release_handle("ep1") == []
    remaining = [a.address for a in ipam.list_allocations()]
    assert remaining == [address_only(other), "10.201.0.100"]


def test_release_pool_releases_leaked_addresses(ipam, store):
    keep, _c, _ = ipam.request_pool("10.201.1.0/24", None, {}, False)
    kept = ipam.request_address(keep, None, {})
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    ipam.request_address(pool_id, None, GATEWAY)
    for _ in range(70):  # spills into a second block
        ipam.request_address(pool_id, None, {})
    freed = ipam.release_pool(pool_id)
    assert len(freed) == 71
    assert [a.address for a in ipam.list_allocations()] == [address_only(kept)]
    assert list(blocks(store)) == ["10.201.1.0/26"]
    assert list(reservations(store)) == ["10.201.1.0/24"]
    with pytest.raises(NotFound):
        ipam.release_pool(pool_id)


def test_release_pool_spares_a_newer_network_on_the_same_subnet(ipam, store):
    """A sweep never frees addresses of a later reservation of the same CIDR."""
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/28", None, {}, False)
    ipam.request_address(pool_id, None, {})
    ipam.release_pool(pool_id)
    again, _cidr, _ = ipam.request_pool("10.201.0.0/28", None, {}, False)
    fresh = address_only(ipam.request_address(again, None, {}))
    # A stale sweep of the first reservation (simulated) must keep the new address.
    stale = SubnetReservation.from_dict(store.get(subnet_key("10.201.0.0/28")).data)
    old = type(stale)(**{**stale.__dict__, "id": "old-reservation"})
    assert ipam._sweep_block(block_key("10.201.0.0/26"), old) == []
    assert [a.address for a in ipam.list_allocations()] == [fresh]


def _after_the_reservation_read(store, change):
    """Makes store.get run change(entry) once, right after the service's first read
    of a reservation: as another request does between that read and the block write."""
    real_get = store.get
    done = []

    def get(key):
        entry = real_get(key)
        if key.startswith(subnet_key("10.201.0.0/24")) and not done and entry is not None:
            done.append(key)
            change(entry)
        return entry

    store.get = get
    return done


@pytest.mark.parametrize("address", [None, "10.201.0.9"])
def test_nothing_is_allocated_for_a_subnet_released_after_it_was_read(ipam, store, address):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    done = _after_the_reservation_read(store, lambda entry: store.delete(entry.key))
    try:
        with pytest.raises(NotFound, match="10.201.0.0/24"):
            ipam.request_address(pool_id, address, {})
    finally:
        del store.get
    assert done
    assert store.list(BLOCKS_PREFIX) == []


def test_an_allocation_reads_again_a_reservation_changed_after_it_was_read(ipam, store):
    """Another host joining the subnet rewrites its reservation: the guarded block write
    fails, and the allocation is made on the fresh record."""
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)

    def join(entry):
        rec = SubnetReservation.from_dict(entry.data)
        joined = type(rec)(**{**rec.__dict__, "hosts": (*rec.hosts, "other-host")})
        store.update(entry.key, dumps(joined.to_dict()), entry.revision)

    done = _after_the_reservation_read(store, join)
    try:
        address = address_only(ipam.request_address(pool_id, None, {}))
    finally:
        del store.get
    assert done
    assert [a.address for a in ipam.list_allocations()] == [address]


def test_list_pools_reports_usage(ipam):
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    ipam.request_address(pool_id, None, GATEWAY)
    ipam.request_address(pool_id, None, {})
    ipam.request_address(pool_id, "10.201.0.200", {})
    usage = {u.pool.cidr: u for u in ipam.list_pools()}
    v4 = usage["10.201.0.0/16"]
    assert (v4.capacity, v4.allocated, v4.subnets, v4.blocks) == (
        65536, 3, ("10.201.0.0/24",), 2,
    )
    assert v4.to_dict()["allocated"] == 3
    assert usage["fd00:201::/48"].allocated == 0


def test_list_subnets(ipam):
    a, _c, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    b, _c, _ = ipam.request_pool("10.201.1.0/24", "10.201.1.128/25", {}, False)
    ipam.request_address(a, None, GATEWAY)
    infos = ipam.list_subnets()
    assert [(i.pool_id, i.gateway, i.sub_pool) for i in infos] == [
        (a, "10.201.0.1", None),
        (b, None, "10.201.1.128/25"),
    ]
    assert not infos[0].v6
    assert infos[0].prefixlen == 24


# ---------------------------------------------------------------------- faults


def test_endless_conflicts_give_unavailable_and_change_nothing(store):
    ipam = IpamService(store, "host-a", max_attempts=3)
    ipam.add_pool("10.201.0.0/16")
    pool_id, _cidr, _ = ipam.request_pool("10.201.0.0/24", None, {}, False)
    ipam.request_address(pool_id, None, GATEWAY)
    before = snapshot(store)

    # Every write loses: the allocator's move to another block (or a new one) loses too.
    def always_conflicting(key, value, revision, guard=None):
        raise RevisionConflict(key)

    def always_taken(key, value, guard=None):
        raise AlreadyExists(key)

    store.update, store.create = always_conflicting, always_taken
    try:
        with pytest.raises(Unavailable, match="after 3 attempts"):
            ipam.request_address(pool_id, None, {})
        with pytest.raises(Unavailable):
            ipam.request_pool(None, None, {}, False)
    finally:
        del store.update, store.create
    assert snapshot(store) == before


def test_unreachable_store_is_reported_as_unavailable(ipam, store):
    def down(key):
        raise DatastoreUnavailable("connection refused")

    store.get = down
    try:
        with pytest.raises(Unavailable, match="connection refused"):
            ipam.request_pool(None, None, {}, False)
    finally:
        del store.get
