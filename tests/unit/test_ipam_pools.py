"""Pools: the pure model (ipam_driver.pools) and the service's pool operations."""

from __future__ import annotations

import json

import pytest
from netaddr import IPNetwork

from datastore.base import ROOT, dumps
from datastore.errors import Conflict, Exhausted, InvalidRequest, NotFound
from datastore.sqlite import SqliteDatastore
from ipam_driver.block_store import block_key
from ipam_driver.blocks import AllocationBlock
from ipam_driver.pools import Pool, PoolSet, carve, make_pool, parse_address, parse_cidr
from ipam_driver.service import POOLS_KEY, SUBNETS_PREFIX, IpamService


@pytest.fixture
def store(tmp_path):
    db = SqliteDatastore(str(tmp_path / "ipam.db"))
    yield db
    db.close()


@pytest.fixture
def ipam(store):
    return IpamService(store, "host-a")


def snapshot(store):
    return [(e.key, e.value, e.revision) for e in store.list(ROOT)]


# ------------------------------------------------------------------ pure model


@pytest.mark.parametrize("text", ["", "10.0.0.0", "10.0.0/8", "10.0.0.0/33", "x/8", "fd00::/129"])
def test_parse_cidr_refuses_invalid(text):
    with pytest.raises(InvalidRequest, match="invalid pool"):
        parse_cidr(text, "pool")


def test_parse_cidr_names_the_network_address_for_host_bits():
    with pytest.raises(InvalidRequest, match="host bits are set; the network address is 10.1.2.0/"):
        parse_cidr("10.1.2.3/24", "pool")
    with pytest.raises(InvalidRequest, match="fd00:1::/64"):
        parse_cidr("fd00:1::5/64", "pool")
    assert parse_cidr("10.1.2.0/24") == IPNetwork("10.1.2.0/24")


def test_parse_address():
    assert str(parse_address("10.0.0.5")) == "10.0.0.5"
    assert str(parse_address("10.0.0.5/24")) == "10.0.0.5"
    with pytest.raises(InvalidRequest):
        parse_address("10.0.5")
    with pytest.raises(InvalidRequest):
        parse_address("")


def test_make_pool_defaults_and_bounds():
    assert make_pool("10.0.0.0/16").block_size == 26
    assert make_pool("fd00::/48").block_size == 122
    assert make_pool("10.0.0.0/20", block_size=20).block_size == 20
    for bad in (19, 31, 32):
        with pytest.raises(InvalidRequest, match="between /20 and /30"):
            make_pool("10.0.0.0/8", block_size=bad)
    for bad in (115, 127, 128):
        with pytest.raises(InvalidRequest, match="between /116 and /126"):
            make_pool("fd00::/48", block_size=bad)
    with pytest.raises(InvalidRequest, match="expected an integer"):
        make_pool("10.0.0.0/16", block_size="26")  # type: ignore[arg-type]


def test_make_pool_refuses_pool_smaller_than_a_block():
    with pytest.raises(InvalidRequest, match="smaller than one /26 block"):
        make_pool("10.0.0.0/27")
    assert make_pool("10.0.0.0/27", block_size=27).cidr == "10.0.0.0/27"
    with pytest.raises(InvalidRequest, match="smaller than one /122 block"):
        make_pool("fd00::/124")


@pytest.mark.parametrize(
    "cidr", ["127.0.0.0/16", "169.254.0.0/16", "224.0.0.0/8", "0.0.0.0/0", "fe80::/64", "ff02::/64"]
)
def test_make_pool_refuses_unroutable_ranges(cidr):
    with pytest.raises(InvalidRequest, match="cannot hold container addresses"):
        make_pool(cidr)


def test_pool_round_trip():
    pool = make_pool("10.0.0.0/16", ipip=True, nat_outgoing=True, block_size=28)
    assert Pool.from_dict(json.loads(json.dumps(pool.to_dict()))) == pool
    assert "deleting" not in pool.to_dict()


def test_poolset_overlap_and_order():
    pools = PoolSet()
    pools.add(make_pool("10.2.0.0/16"))
    pools.add(make_pool("fd00::/48"))
    pools.add(make_pool("10.1.0.0/16"))
    assert [p.cidr for p in pools.pools] == ["10.1.0.0/16", "10.2.0.0/16", "fd00::/48"]
    with pytest.raises(Conflict, match="overlaps existing pool 10.1.0.0/16, 10.2.0.0/16"):
        pools.add(make_pool("10.0.0.0/8"))
    assert PoolSet.from_dict(json.loads(json.dumps(pools.to_dict()))) == pools


def test_carve():
    pool = IPNetwork("10.0.0.0/16")
    assert carve(pool, [], 24) == IPNetwork("10.0.0.0/24")
    taken = [IPNetwork("10.0.0.0/24"), IPNetwork("10.0.1.128/25")]
    assert carve(pool, taken, 24) == IPNetwork("10.0.2.0/24")
    # A small subnet taken at the start still leaves room further up.
    assert carve(pool, [IPNetwork("10.0.0.16/28")], 24) == IPNetwork("10.0.1.0/24")
    # A pool smaller than the subnet size is one subnet.
    assert carve(IPNetwork("10.9.0.0/28"), [], 24) == IPNetwork("10.9.0.0/28")
    assert carve(IPNetwork("10.9.0.0/28"), [IPNetwork("10.9.0.0/28")], 24) is None
    full = [IPNetwork("10.9.0.0/24"), IPNetwork("10.9.1.0/24")]
    assert carve(IPNetwork("10.9.0.0/23"), full, 24) is None
    # IPv6: a /48 cut into /64s, cheaply.
    v6 = IPNetwork("fd00:5::/48")
    assert carve(v6, [IPNetwork("fd00:5::/64")], 64) == IPNetwork("fd00:5:0:1::/64")


# ---------------------------------------------------------------- service: pools


def test_add_and_list_pools(ipam, store):
    pool = ipam.add_pool("10.10.0.0/16", ipip=True, nat_outgoing=True)
    ipam.add_pool("fd00:10::/48", block_size=120)
    assert pool == Pool("10.10.0.0/16", 26, ipip_mode="always", nat_outgoing=True)
    assert [p.cidr for p in ipam.get_pools()] == ["10.10.0.0/16", "fd00:10::/48"]
    assert ipam.get_pool("fd00:10::/48").block_size == 120
    stored = store.get(POOLS_KEY).data
    assert stored["pools"][0] == {
        "cidr": "10.10.0.0/16",
        "block_size": 26,
        "ipip_mode": "always",
        "vxlan_mode": "never",
        "nat_outgoing": True,
        "disabled": False,
    }
    usage = {u.pool.cidr: u for u in ipam.list_pools()}
    assert usage["10.10.0.0/16"].capacity == 65536
    assert usage["10.10.0.0/16"].allocated == 0
    assert usage["fd00:10::/48"].capacity == 2**80


def test_refused_pools_change_nothing(ipam, store):
    ipam.add_pool("10.10.0.0/16")
    before = snapshot(store)
    with pytest.raises(InvalidRequest, match="invalid pool"):
        ipam.add_pool("10.10.0/16")
    with pytest.raises(InvalidRequest, match="network address is 10.20.0.0/16"):
        ipam.add_pool("10.20.1.0/16")
    with pytest.raises(InvalidRequest, match="smaller than one"):
        ipam.add_pool("10.30.0.0/28")
    with pytest.raises(InvalidRequest, match="between /20 and /30"):
        ipam.add_pool("10.30.0.0/16", block_size=31)
    with pytest.raises(Conflict, match="overlaps existing pool 10.10.0.0/16"):
        ipam.add_pool("10.10.128.0/17")
    with pytest.raises(Conflict, match="overlaps existing pool 10.10.0.0/16"):
        ipam.add_pool("10.0.0.0/8")
    with pytest.raises(Conflict):
        ipam.add_pool("10.10.0.0/16")
    assert snapshot(store) == before


def test_update_pool(ipam):
    ipam.add_pool("10.10.0.0/16")
    updated = ipam.update_pool("10.10.0.0/16", disabled=True, nat_outgoing=True)
    assert updated.disabled and updated.nat_outgoing and not updated.ipip
    assert ipam.get_pool("10.10.0.0/16") == updated
    with pytest.raises(NotFound, match="no pool 10.11.0.0/16"):
        ipam.update_pool("10.11.0.0/16", disabled=False)


def test_remove_pool(ipam, store):
    ipam.add_pool("10.10.0.0/16")
    ipam.add_pool("10.20.0.0/16")
    ipam.remove_pool("10.10.0.0/16")
    assert [p.cidr for p in ipam.get_pools()] == ["10.20.0.0/16"]
    with pytest.raises(NotFound, match="no pool 10.10.0.0/16"):
        ipam.remove_pool("10.10.0.0/16")


def test_remove_pool_in_use_by_a_subnet_is_refused(ipam, store):
    ipam.add_pool("10.10.0.0/16")
    pool_id, _cidr, _ = ipam.request_pool("10.10.3.0/24", None, {}, False)
    ipam.request_address(pool_id, None, {})
    before = snapshot(store)
    with pytest.raises(Conflict, match="in use by network subnet.* 10.10.3.0/24"):
        ipam.remove_pool("10.10.0.0/16")
    assert snapshot(store) == before
    ipam.release_pool(pool_id)
    ipam.remove_pool("10.10.0.0/16")
    assert ipam.get_pools() == []
    assert store.list(ROOT + "ipam/blocks/") == []


def test_remove_pool_with_leaked_addresses_is_refused(ipam, store):
    ipam.add_pool("10.10.0.0/16")
    # An address left behind without any subnet (e.g. written by an older version).
    block = AllocationBlock("10.10.0.64/26", "host-b")
    block.allocate("10.10.0.70", "ep-lost")
    block.allocate("10.10.0.71", "ep-lost")
    store.create(block_key(block.cidr), dumps(block.to_dict()))
    before = snapshot(store)
    message = r"still has 2 address\(es\) in use \(10.10.0.70, 10.10.0.71\)"
    with pytest.raises(Conflict, match=message):
        ipam.remove_pool("10.10.0.0/16")
    assert snapshot(store) == before
    assert ipam.release_handle("ep-lost") == ["10.10.0.70", "10.10.0.71"]
    ipam.remove_pool("10.10.0.0/16")


def test_remove_pool_deletes_its_empty_blocks_only(ipam, store):
    ipam.add_pool("10.10.0.0/16")
    ipam.add_pool("10.20.0.0/16")
    other = AllocationBlock("10.20.0.0/26", "host-a")
    other.allocate("10.20.0.5")
    store.create(block_key(other.cidr), dumps(other.to_dict()))
    # An empty block (a crash between release and delete) does not keep the pool alive.
    store.create(block_key("10.10.0.0/26"), dumps(AllocationBlock("10.10.0.0/26").to_dict()))
    ipam.remove_pool("10.10.0.0/16")
    assert [e.key for e in store.list(ROOT + "ipam/blocks/")] == [block_key("10.20.0.0/26")]


def test_interrupted_removal_leaves_a_pool_that_gives_no_subnets(ipam, store):
    ipam.add_pool("10.10.0.0/16")
    entry = store.get(POOLS_KEY)
    data = entry.data
    data["pools"][0]["deleting"] = True
    store.update(POOLS_KEY, dumps(data), entry.revision)
    with pytest.raises(InvalidRequest, match="being removed"):
        ipam.request_pool("10.10.1.0/24", None, {}, False)
    with pytest.raises(Exhausted, match="no enabled IPv4 pool"):
        ipam.request_pool(None, None, {}, False)
    with pytest.raises(Conflict, match="being removed"):
        ipam.add_pool("10.10.0.0/17")
    ipam.remove_pool("10.10.0.0/16")
    assert ipam.get_pools() == []


def test_refused_removal_clears_a_stale_deleting_mark(ipam, store):
    ipam.add_pool("10.10.0.0/16")
    ipam.request_pool("10.10.1.0/24", None, {}, False)
    entry = store.get(POOLS_KEY)
    data = entry.data
    data["pools"][0]["deleting"] = True
    store.update(POOLS_KEY, dumps(data), entry.revision)
    # The pool is in use, so it must keep working: the refusal clears the mark.
    with pytest.raises(Conflict, match="10.10.1.0/24"):
        ipam.remove_pool("10.10.0.0/16")
    assert not ipam.get_pool("10.10.0.0/16").deleting
    assert ipam.request_pool("10.10.2.0/24", None, {}, False)[0] == "10.10.2.0/24"


def test_ensure_default_pools(store):
    ipam = IpamService(store, "host-a")
    created = ipam.ensure_default_pools(["192.168.0.0/16", "fd80:24e2::/64"])
    assert [p.cidr for p in created] == ["192.168.0.0/16", "fd80:24e2::/64"]
    # Second start: nothing changes.
    before = snapshot(store)
    assert ipam.ensure_default_pools(["192.168.0.0/16", "fd80:24e2::/64"]) == []
    assert snapshot(store) == before


def test_ensure_default_pools_only_fills_missing_families(ipam):
    ipam.add_pool("10.10.0.0/16")
    created = ipam.ensure_default_pools(["192.168.0.0/16", "fd80:24e2::/64"])
    assert [p.cidr for p in created] == ["fd80:24e2::/64"]
    assert [p.cidr for p in ipam.get_pools()] == ["10.10.0.0/16", "fd80:24e2::/64"]
    with pytest.raises(InvalidRequest):
        ipam.ensure_default_pools(["not-a-cidr"])


def test_subnet_reservations_untouched_by_pool_changes(ipam, store):
    ipam.add_pool("10.10.0.0/16")
    ipam.request_pool("10.10.1.0/24", None, {}, False)
    before = [(e.key, e.value, e.revision) for e in store.list(SUBNETS_PREFIX)]
    ipam.update_pool("10.10.0.0/16", ipip=True)
    ipam.add_pool("10.20.0.0/16")
    assert [(e.key, e.value, e.revision) for e in store.list(SUBNETS_PREFIX)] == before
    assert [k for k, _v, _r in before] == [ROOT + "ipam/subnets/10.10.1.0-24"]


def test_encapsulation_modes_are_validated_and_stored(ipam):
    pool = ipam.add_pool("10.20.0.0/16", vxlan_mode="cross-subnet")
    assert (pool.vxlan_mode, pool.ipip_mode) == ("cross-subnet", "never")
    assert ipam.get_pool("10.20.0.0/16").vxlan
    with pytest.raises(InvalidRequest, match="both IP-in-IP and VXLAN"):
        ipam.update_pool("10.20.0.0/16", ipip_mode="always")
    with pytest.raises(InvalidRequest, match="invalid --vxlan-mode 'sometimes'"):
        ipam.add_pool("10.30.0.0/16", vxlan_mode="sometimes")
    with pytest.raises(InvalidRequest, match="IPv6"):
        ipam.add_pool("fd00:30::/48", vxlan_mode="always")
    assert [p.cidr for p in ipam.get_pools()] == ["10.20.0.0/16"]  # nothing else written
    updated = ipam.update_pool("10.20.0.0/16", vxlan_mode="never", ipip_mode="always")
    assert (updated.ipip_mode, updated.vxlan_mode) == ("always", "never")


def test_legacy_pool_records_read_their_ipip_flag():
    legacy = {"cidr": "10.0.0.0/16", "block_size": 26, "ipip": True, "nat_outgoing": False,
              "disabled": False}
    assert Pool.from_dict(legacy).ipip_mode == "always"
    assert Pool.from_dict({**legacy, "ipip": False}).ipip_mode == "never"
