"""Network subnets as one record each: the overlap protocol, subnets shared by hosts,
their gateway, and the migration from the single document of earlier versions.

Interleavings are forced deterministically by running another service's call from
inside a datastore write (the real SQLite store underneath); the tests assert on
replies and stored records.
"""

from __future__ import annotations

import threading

import pytest

from datastore.base import ROOT, DatastoreUnavailable, dumps
from datastore.errors import CalicoCnmError, Conflict, InvalidRequest, NotFound
from datastore.sqlite import SqliteDatastore
from ipam_driver.block_store import BLOCKS_PREFIX, block_key
from ipam_driver.blocks import AllocationBlock
from ipam_driver.pools import SubnetReservation
from ipam_driver.service import (
    LEGACY_SUBNETS_KEY,
    SUBNETS_PREFIX,
    IpamService,
    SubnetInfo,
    subnet_key,
)

GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "ipam.db")


@pytest.fixture
def store(path):
    db = SqliteDatastore(path)
    yield db
    db.close()


@pytest.fixture
def a(store):
    service = IpamService(store, "host-a")
    service.add_pool("10.201.0.0/16")
    service.add_pool("fd00:201::/48")
    return service


@pytest.fixture
def b(store, a):
    return IpamService(store, "host-b")


def snapshot(store):
    return [(e.key, e.value, e.revision) for e in store.list(ROOT)]


def records(store):
    return {e.data["cidr"]: e.data for e in store.list(SUBNETS_PREFIX)}


def gateway_records(store):
    return {
        str(ip): record.attrs
        for e in store.list(BLOCKS_PREFIX)
        for ip, record in AllocationBlock.from_dict(e.data).allocations()
        if record.attrs.get("kind") == "gateway"
    }


def pending(cidr, pool="10.201.0.0/16", host="host-z", **extra):
    return dumps(SubnetReservation(cidr, pool, 26, f"id-{cidr}", hosts=(host,),
                                   **extra).to_dict())


# ---------------------------------------------------------------------- records


def test_one_settled_record_per_subnet(a, store):
    a.request_pool("10.201.1.0/24", "10.201.1.128/25", {"o": "1"}, False)
    a.request_pool("fd00:201:0:1::/64", None, {}, True)
    keys = [e.key for e in store.list(SUBNETS_PREFIX)]
    assert keys == [ROOT + "ipam/subnets/10.201.1.0-24", ROOT + "ipam/subnets/fd00:201:0:1::-64"]
    entry = store.get(subnet_key("10.201.1.0/24"))
    data = entry.data
    assert {k: data[k] for k in ("cidr", "pool", "block_size", "sub_pool", "options", "hosts")} == {
        "cidr": "10.201.1.0/24", "pool": "10.201.0.0/16", "block_size": 26,
        "sub_pool": "10.201.1.128/25", "options": {"o": "1"}, "hosts": ["host-a"],
    }
    # Settled with its create revision (the record was written twice: create, settle).
    assert data["created_revision"] == entry.revision - 1
    assert "migrated" not in data
    assert store.get(LEGACY_SUBNETS_KEY) is None


def test_subnet_info_and_claimed_hosts(a, b):
    a.request_pool("10.201.1.0/24", None, {}, False)
    b.request_pool("10.201.1.0/24", None, {}, False)
    info = a.get_subnet("10.201.1.0/24")
    assert info.hosts == ("host-a", "host-b")
    assert info.to_dict()["hosts"] == ["host-a", "host-b"]
    assert a.claimed_hosts("10.201.1.0/24") == ["host-a", "host-b"]
    assert [i.hosts for i in b.list_subnets()] == [("host-a", "host-b")]
    with pytest.raises(NotFound, match="unknown IPAM pool id"):
        a.claimed_hosts("10.201.2.0/24")
    assert isinstance(info, SubnetInfo)


def test_records_of_earlier_versions_name_only_their_creator():
    old = {"cidr": "10.1.0.0/24", "pool": "10.1.0.0/16", "block_size": 26, "id": "x",
           "sub_pool": None, "options": {}, "host": "h9"}
    rec = SubnetReservation.from_dict(old)
    assert rec.hosts == ("h9",)
    assert not rec.settled
    assert SubnetReservation.from_dict({**old, "host": None}).hosts == ()
    assert SubnetReservation.from_dict(rec.settle(7).to_dict()) == rec.settle(7)
    assert rec.with_host("h1").with_host("h9").hosts == ("h1", "h9")


def test_pool_id_must_be_the_exact_cidr(a):
    a.request_pool("10.201.1.0/24", None, {}, False)
    with pytest.raises(NotFound):
        a.get_subnet("10.201.1.0-24")  # same key spelling, not the same pool id


# ------------------------------------------------------------ overlap protocol


def test_a_record_created_just_before_ours_wins(a, store):
    """Another host's overlapping record appears between our checks and our create:
    it is older, so ours is deleted and the retry refuses, naming it."""
    real_create = store.create

    def create(key, value, guard=None):
        if key == subnet_key("10.201.1.0/24"):
            real_create(subnet_key("10.201.0.0/23"), pending("10.201.0.0/23"))
        return real_create(key, value, guard)

    store.create = create
    try:
        with pytest.raises(Conflict, match="overlaps subnet 10.201.0.0/23"):
            a.request_pool("10.201.1.0/24", None, {}, False)
    finally:
        del store.create
    assert list(records(store)) == ["10.201.0.0/23"]
    # Pending records are not Docker's to see.
    assert a.list_subnets() == []
    with pytest.raises(NotFound):
        a.get_subnet("10.201.0.0/23")
    with pytest.raises(NotFound):
        a.request_address("10.201.0.0/23", None, {})


def test_a_record_created_just_after_ours_yields(a, store):
    real_create = store.create

    def create(key, value, guard=None):
        entry = real_create(key, value, guard)
        if key == subnet_key("10.201.1.0/24"):
            real_create(subnet_key("10.201.0.0/23"), pending("10.201.0.0/23"))
        return entry

    store.create = create
    try:
        assert a.request_pool("10.201.1.0/24", None, {}, False)[0] == "10.201.1.0/24"
    finally:
        del store.create
    assert records(store)["10.201.1.0/24"]["created_revision"]
    # Whoever meets the later record decides it: it is doomed and deleted.
    z = IpamService(store, "host-z")
    with pytest.raises(Conflict, match="overlaps subnet 10.201.1.0/24"):
        z.request_pool("10.201.0.0/23", None, {}, False)
    assert list(records(store)) == ["10.201.1.0/24"]


def test_carving_moves_on_when_its_subnet_loses(a, store):
    real_create = store.create

    def create(key, value, guard=None):
        if key == subnet_key("10.201.0.0/24"):
            real_create(subnet_key("10.201.0.0/25"), pending("10.201.0.0/25"))
        return real_create(key, value, guard)

    store.create = create
    try:
        assert a.request_pool(None, None, {}, False)[1] == "10.201.1.0/24"
    finally:
        del store.create
    assert sorted(records(store)) == ["10.201.0.0/25", "10.201.1.0/24"]


def test_a_pending_record_of_a_crashed_creator_is_finished_by_the_next_request(a, b, store):
    store.create(subnet_key("10.201.5.0/24"), pending("10.201.5.0/24"))
    assert b.request_pool("10.201.5.0/24", None, {}, False)[0] == "10.201.5.0/24"
    data = records(store)["10.201.5.0/24"]
    assert data["hosts"] == ["host-b", "host-z"] and data["created_revision"]
    assert b.request_address("10.201.5.0/24", None, {}) == "10.201.5.1/24"


def test_a_pending_record_that_lost_is_deleted_by_the_next_request(a, store):
    a.request_pool("10.201.0.0/23", None, {}, False)
    # Created later than the /23 (an interrupted request that never checked).
    store.create(subnet_key("10.201.1.0/24"), pending("10.201.1.0/24"))
    with pytest.raises(Conflict, match="overlaps subnet 10.201.0.0/23"):
        IpamService(store, "host-c").request_pool("10.201.1.0/24", None, {}, False)
    assert list(records(store)) == ["10.201.0.0/23"]


def test_a_failed_request_leaves_no_pending_record(a, store):
    before = snapshot(store)
    real_update = store.update

    def update(key, value, revision, guard=None):
        if key.startswith(SUBNETS_PREFIX):
            raise DatastoreUnavailable("etcd went away")
        return real_update(key, value, revision, guard)

    store.update = update
    try:
        with pytest.raises(CalicoCnmError, match="etcd went away"):
            a.request_pool("10.201.1.0/24", None, {}, False)
    finally:
        del store.update
    assert snapshot(store) == before


# --------------------------------------------------- remove_pool vs request_pool


def test_request_created_after_the_removal_listed_backs_off(store, path):
    remover = IpamService(store, "a")
    remover.add_pool("10.60.0.0/16")
    requester_store = SqliteDatastore(path)
    requester = IpamService(requester_store, "b")
    real_create = requester_store.create
    removed = []

    def create(key, value, guard=None):
        # The requester has read the pools (usable); the whole removal runs now.
        if key.startswith(SUBNETS_PREFIX) and not removed:
            remover.remove_pool("10.60.0.0/16")
            removed.append(True)
        return real_create(key, value, guard)

    requester_store.create = create
    try:
        with pytest.raises(InvalidRequest, match="not inside any Calico pool"):
            requester.request_pool("10.60.1.0/24", None, {}, False)
    finally:
        requester_store.close()
    assert removed
    assert remover.get_pools() == []
    assert store.list(SUBNETS_PREFIX) == []


def test_removal_dooms_a_pending_reservation_in_its_pool(store, path):
    remover = IpamService(store, "a")
    remover.add_pool("10.60.0.0/16")
    requester_store = SqliteDatastore(path)
    requester = IpamService(requester_store, "b")
    real_create = requester_store.create

    def create(key, value, guard=None):
        entry = real_create(key, value, guard)
        if key.startswith(SUBNETS_PREFIX):
            # The removal sees the pending record and decides it itself: doomed.
            remover.remove_pool("10.60.0.0/16")
        return entry

    requester_store.create = create
    try:
        with pytest.raises(InvalidRequest, match="not inside any Calico pool"):
            requester.request_pool("10.60.1.0/24", None, {}, False)
    finally:
        requester_store.close()
    assert remover.get_pools() == []
    assert store.list(SUBNETS_PREFIX) == []


def test_removal_refused_by_a_reservation_settled_first(store, path):
    remover = IpamService(store, "a")
    remover.add_pool("10.60.0.0/16")
    requester_store = SqliteDatastore(path)
    requester = IpamService(requester_store, "b")
    real_update = requester_store.update
    outcome = []

    def update(key, value, revision, guard=None):
        entry = real_update(key, value, revision, guard)
        if key.startswith(SUBNETS_PREFIX) and not outcome:
            try:
                remover.remove_pool("10.60.0.0/16")
                outcome.append("removed")
            except Conflict as exc:
                outcome.append(str(exc))
        return entry

    requester_store.update = update
    try:
        assert requester.request_pool("10.60.1.0/24", None, {}, False)[0] == "10.60.1.0/24"
    finally:
        requester_store.close()
    assert "in use by network subnet(s) 10.60.1.0/24" in outcome[0]
    assert not remover.get_pool("10.60.0.0/16").deleting


# ------------------------------------------------------------------- sharing


def test_two_hosts_share_one_subnet_and_its_gateway(a, b, store):
    assert a.request_pool("10.201.1.0/24", "10.201.1.128/25", {}, False) == (
        "10.201.1.0/24", "10.201.1.0/24", {},
    )
    assert a.request_address("10.201.1.0/24", "10.201.1.254", GATEWAY) == "10.201.1.254/24"
    assert b.request_pool("10.201.1.0/24", "10.201.1.128/25", {}, False) == (
        "10.201.1.0/24", "10.201.1.0/24", {},
    )
    assert list(records(store)) == ["10.201.1.0/24"]
    assert records(store)["10.201.1.0/24"]["hosts"] == ["host-a", "host-b"]
    # dockerd on B asks for the same gateway (explicitly, or with no address).
    assert b.request_address("10.201.1.0/24", "10.201.1.254", GATEWAY) == "10.201.1.254/24"
    assert b.request_address("10.201.1.0/24", None, GATEWAY) == "10.201.1.254/24"
    assert gateway_records(store)["10.201.1.254"]["hosts"] == ["host-a", "host-b"]
    assert [x.address for x in a.list_allocations()] == ["10.201.1.254"]
    # Containers come from the ip-range, each host from its own block (A claimed
    # 10.201.1.192/26 with the gateway).
    a_ip = a.request_address("10.201.1.0/24", None, {})
    b_ip = b.request_address("10.201.1.0/24", None, {})
    assert (a_ip, b_ip) == ("10.201.1.192/24", "10.201.1.128/24")
    assert a.get_subnet("10.201.1.0/24").gateway == "10.201.1.254"


def test_releases_by_each_host_and_the_last_one_sweeps_once(a, b, store):
    a.request_pool("10.201.1.0/24", None, {}, False)
    a.request_address("10.201.1.0/24", None, GATEWAY)
    b.request_pool("10.201.1.0/24", None, {}, False)
    b.request_address("10.201.1.0/24", None, GATEWAY)
    leaked_a = a.request_address("10.201.1.0/24", None, {}).split("/")[0]
    leaked_b = b.request_address("10.201.1.0/24", None, {}).split("/")[0]
    # docker network rm on A: the gateway stays (B's network uses it), then A's claim goes.
    a.release_address("10.201.1.0/24", "10.201.1.1")
    assert "10.201.1.1" in gateway_records(store)
    assert gateway_records(store)["10.201.1.1"]["hosts"] == ["host-b"]
    a.release_address("10.201.1.0/24", "10.201.1.1")  # repeated: still a no-op
    assert a.release_pool("10.201.1.0/24") == []
    assert b.claimed_hosts("10.201.1.0/24") == ["host-b"]
    assert {x.address for x in b.list_allocations()} == {"10.201.1.1", leaked_a, leaked_b}
    with pytest.raises(NotFound, match="not claimed by host host-a"):
        a.release_pool("10.201.1.0/24")
    # The last host: its gateway release frees it, its pool release sweeps the rest.
    b.release_address("10.201.1.0/24", "10.201.1.1")
    assert "10.201.1.1" not in gateway_records(store)
    assert sorted(b.release_pool("10.201.1.0/24")) == sorted([leaked_a, leaked_b])
    assert store.list(SUBNETS_PREFIX) == [] and store.list(BLOCKS_PREFIX) == []
    with pytest.raises(NotFound):
        b.release_pool("10.201.1.0/24")


def test_the_last_release_sweeps_a_shared_gateway_once(a, b, store):
    a.request_pool("10.201.1.0/24", None, {}, False)
    a.request_address("10.201.1.0/24", None, GATEWAY)
    b.request_pool("10.201.1.0/24", None, {}, False)
    b.request_address("10.201.1.0/24", None, GATEWAY)
    assert b.release_pool("10.201.1.0/24") == []
    assert a.release_pool("10.201.1.0/24") == ["10.201.1.1"]
    assert store.list(BLOCKS_PREFIX) == []


def test_sharing_refusals_name_the_existing_subnet_and_write_nothing(a, b, store):
    a.request_pool("10.201.1.0/24", "10.201.1.128/25", {}, False)
    a.request_address("10.201.1.0/24", "10.201.1.254", GATEWAY)
    before = snapshot(store)
    with pytest.raises(Conflict, match="network of host-a with ip-range 10.201.1.128/25") as info:
        b.request_pool("10.201.1.0/24", "10.201.1.0/25", {}, False)
    assert "not ip-range 10.201.1.0/25" in str(info.value)
    with pytest.raises(Conflict, match="ip-range 10.201.1.128/25.*not no ip-range"):
        b.request_pool("10.201.1.0/24", None, {}, False)
    existing = r"overlaps subnet 10.201.1.0/24 \(ip-range 10.201.1.128/25\)"
    with pytest.raises(Conflict, match=existing):
        b.request_pool("10.201.1.0/25", None, {}, False)
    with pytest.raises(Conflict, match=existing):
        b.request_pool("10.201.0.0/23", None, {}, False)
    with pytest.raises(Conflict, match="already used by another network on this host"):
        a.request_pool("10.201.1.0/24", "10.201.1.128/25", {}, False)
    assert snapshot(store) == before
    b.request_pool("10.201.1.0/24", "10.201.1.128/25", {}, False)
    before = snapshot(store)
    with pytest.raises(Conflict, match="already has gateway 10.201.1.254.*not 10.201.1.1"):
        b.request_address("10.201.1.0/24", "10.201.1.1", GATEWAY)
    with pytest.raises(Conflict, match="already used by another network on this host"):
        b.request_pool("10.201.1.0/24", "10.201.1.128/25", {}, False)
    assert snapshot(store) == before


def test_a_single_host_subnet_is_never_shared_implicitly(a, store):
    a.request_pool("10.201.1.0/24", None, {}, False)
    a.request_address("10.201.1.0/24", None, GATEWAY)
    before = snapshot(store)
    with pytest.raises(Conflict, match="address 10.201.1.1 is already in use"):
        a.request_address("10.201.1.0/24", None, GATEWAY)
    assert snapshot(store) == before


def test_carving_never_shares(a, b):
    assert a.request_pool(None, None, {}, False)[1] == "10.201.0.0/24"
    assert b.request_pool(None, None, {}, False)[1] == "10.201.1.0/24"
    assert a.claimed_hosts("10.201.0.0/24") == ["host-a"]
    assert a.claimed_hosts("10.201.1.0/24") == ["host-b"]


def test_a_claim_racing_the_last_release_keeps_the_subnet(a, b, store):
    a.request_pool("10.201.1.0/24", None, {}, False)
    kept = a.request_address("10.201.1.0/24", None, {}).split("/")[0]
    real_delete = store.delete
    raced = []

    def delete(key, revision=None):
        if key == subnet_key("10.201.1.0/24") and not raced:
            raced.append(True)
            b.request_pool("10.201.1.0/24", None, {}, False)  # lands first
        return real_delete(key, revision)

    store.delete = delete
    try:
        assert a.release_pool("10.201.1.0/24") == []  # not the last host any more
    finally:
        del store.delete
    assert raced
    assert b.claimed_hosts("10.201.1.0/24") == ["host-b"]
    assert [x.address for x in b.list_allocations()] == [kept]


def test_a_claim_losing_to_the_last_release_makes_a_new_reservation(a, b, store):
    a.request_pool("10.201.1.0/24", None, {}, False)
    leaked = a.request_address("10.201.1.0/24", None, {}).split("/")[0]
    old_id = records(store)["10.201.1.0/24"]["id"]
    real_update = store.update
    freed = []

    def update(key, value, revision, guard=None):
        if key == subnet_key("10.201.1.0/24") and not freed:
            freed.append(a.release_pool("10.201.1.0/24"))  # the delete lands first
        return real_update(key, value, revision, guard)

    store.update = update
    try:
        assert b.request_pool("10.201.1.0/24", None, {}, False)[0] == "10.201.1.0/24"
    finally:
        del store.update
    assert freed == [[leaked]]
    data = records(store)["10.201.1.0/24"]
    assert data["hosts"] == ["host-b"] and data["id"] != old_id
    assert b.list_allocations() == []


def test_a_gateway_allocated_by_another_host_meanwhile_is_shared(a, b, store, path):
    a.request_pool("10.201.1.0/24", None, {}, False)
    b.request_pool("10.201.1.0/24", None, {}, False)
    b_store = SqliteDatastore(path)
    b2 = IpamService(b_store, "host-b")
    real_create = b_store.create

    def create(key, value, guard=None):
        if key == block_key("10.201.1.0/26"):
            a.request_address("10.201.1.0/24", None, GATEWAY)  # A's write lands first
        return real_create(key, value, guard)

    b_store.create = create
    try:
        assert b2.request_address("10.201.1.0/24", None, GATEWAY) == "10.201.1.1/24"
    finally:
        b_store.close()
    assert gateway_records(store)["10.201.1.1"]["hosts"] == ["host-a", "host-b"]


# ----------------------------------------------------------------- migration


def legacy_document(store):
    """What an earlier version left: one document, records naming only their host,
    and addresses tied to the reservation ids."""
    subnets = {
        "10.201.1.0/24": {"cidr": "10.201.1.0/24", "pool": "10.201.0.0/16", "block_size": 26,
                          "id": "r1", "sub_pool": None, "options": {}, "host": "old-host"},
        "10.201.2.0/24": {"cidr": "10.201.2.0/24", "pool": "10.201.0.0/16", "block_size": 26,
                          "id": "r2", "sub_pool": "10.201.2.128/25", "options": {"k": "v"},
                          "host": "host-a"},
    }
    store.create(LEGACY_SUBNETS_KEY, dumps({"subnets": subnets}))
    block = AllocationBlock("10.201.1.0/26", "old-host")
    block.allocate("10.201.1.1", None, {"kind": "gateway", "subnet": "10.201.1.0/24",
                                        "reservation": "r1", "requested_by": "old-host"})
    block.allocate("10.201.1.2", "ep1", {"kind": "container", "subnet": "10.201.1.0/24",
                                         "reservation": "r1"})
    store.create(block_key(block.cidr), dumps(block.to_dict()))


def test_migration_moves_the_legacy_document(store):
    IpamService(store, "setup").add_pool("10.201.0.0/16")
    legacy_document(store)
    ipam = IpamService(store, "host-a")
    infos = {i.cidr: i for i in ipam.list_subnets()}
    assert store.get(LEGACY_SUBNETS_KEY) is None
    assert sorted(infos) == ["10.201.1.0/24", "10.201.2.0/24"]
    assert infos["10.201.1.0/24"].hosts == ("old-host",)
    assert infos["10.201.1.0/24"].gateway == "10.201.1.1"  # still tied by its id
    assert (infos["10.201.2.0/24"].sub_pool, infos["10.201.2.0/24"].options) == (
        "10.201.2.128/25", {"k": "v"},
    )
    data = records(store)
    assert {c: (d["id"], d["migrated"], d["hosts"]) for c, d in data.items()} == {
        "10.201.1.0/24": ("r1", True, ["old-host"]),
        "10.201.2.0/24": ("r2", True, ["host-a"]),
    }
    assert all(d["created_revision"] for d in data.values())
    # Idempotent: nothing left to do for anyone.
    before = snapshot(store)
    assert len(IpamService(store, "host-c").list_subnets()) == 2
    assert snapshot(store) == before
    # The migrated subnets behave as any other: overlap, addresses, the last release.
    with pytest.raises(Conflict, match="overlaps subnet 10.201.1.0/24"):
        ipam.request_pool("10.201.0.0/23", None, {}, False)
    assert ipam.request_address("10.201.2.0/24", None, {}) == "10.201.2.128/24"
    old = IpamService(store, "old-host")
    assert old.release_pool("10.201.1.0/24") == ["10.201.1.1", "10.201.1.2"]


def test_migration_by_several_processes_at_once(path):
    setup = SqliteDatastore(path)
    IpamService(setup, "setup").add_pool("10.201.0.0/16")
    legacy_document(setup)
    barrier = threading.Barrier(8)
    seen: list[list[str]] = []
    lock = threading.Lock()

    def use(host: str) -> None:
        store = SqliteDatastore(path)
        ipam = IpamService(store, host)
        barrier.wait(timeout=30)
        cidrs = [i.cidr for i in ipam.list_subnets()]
        with lock:
            seen.append(cidrs)
        store.close()

    threads = [threading.Thread(target=use, args=(f"h{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == [["10.201.1.0/24", "10.201.2.0/24"]] * 8
    assert setup.get(LEGACY_SUBNETS_KEY) is None
    data = records(setup)
    assert {c: d["id"] for c, d in data.items()} == {"10.201.1.0/24": "r1", "10.201.2.0/24": "r2"}
    assert all(d["created_revision"] for d in data.values())
    setup.close()


def test_an_interrupted_migration_is_finished(store):
    IpamService(store, "setup").add_pool("10.201.0.0/16")
    legacy_document(store)
    # A migrator died after creating one record, before settling it.
    store.create(subnet_key("10.201.1.0/24"),
                 pending("10.201.1.0/24", host="old-host", migrated=True))
    ipam = IpamService(store, "host-a")
    assert [i.cidr for i in ipam.list_subnets()] == ["10.201.1.0/24", "10.201.2.0/24"]
    assert all(d["created_revision"] for d in records(store).values())
    assert store.get(LEGACY_SUBNETS_KEY) is None


def test_a_slow_migrator_never_resurrects_a_released_subnet(store, path):
    IpamService(store, "setup").add_pool("10.201.0.0/16")
    legacy_document(store)
    slow_store = SqliteDatastore(path)
    slow = IpamService(slow_store, "host-s")
    real_create = slow_store.create
    interleaved = []

    def create(key, value, guard=None):
        if not interleaved:
            # Before the slow migrator's first create: another process migrates,
            # and the network on 10.201.1.0/24 is removed.
            fast = IpamService(store, "old-host")
            fast.list_subnets()
            fast.release_pool("10.201.1.0/24")
            interleaved.append(key)
        return real_create(key, value, guard)

    slow_store.create = create
    try:
        assert [i.cidr for i in slow.list_subnets()] == ["10.201.2.0/24"]
    finally:
        slow_store.close()
    assert interleaved == [subnet_key("10.201.1.0/24")]
    # The record it created could never settle and was deleted when listed.
    assert list(records(store)) == ["10.201.2.0/24"]
    assert store.get(LEGACY_SUBNETS_KEY) is None
    # The subnet is free for a new network.
    again = IpamService(store, "host-a")
    assert again.request_pool("10.201.1.0/24", None, {}, False)[0] == "10.201.1.0/24"
    assert records(store)["10.201.1.0/24"]["id"] != "r1"
