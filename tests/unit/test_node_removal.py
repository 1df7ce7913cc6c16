"""`calico-cnm node remove`: a host removed for good leaves nothing that blocks or
misroutes the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from datastore.errors import Conflict, NotFound
from datastore.sqlite import SqliteDatastore
from driver.records import EndpointRecord, NetworkRecord, Subnet, endpoint_key, network_key
from ipam_driver.service import IpamService
from plugin.node_removal import remove_node
from routing.nodes import NodeRecord, NodeRegistry, NodeStatus, now


def _host(store: SqliteDatastore, name: str, heartbeat: float) -> IpamService:
    registry = NodeRegistry(store)
    registry.register(NodeRecord(name, ipv4="10.123.1.1/24"))
    registry.report(NodeStatus(name, heartbeat=heartbeat, started=heartbeat))
    return IpamService(store, name)


def test_remove_releases_endpoints_claims_blocks_and_the_record(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h1 = _host(store, "h1", now())
    h2 = _host(store, "h2", now() - 600)
    h1.add_pool("10.240.0.0/16")
    # "web" on both hosts: h1 created it (gateway in h1's block), h2 joined.
    pool_id, _, _ = h1.request_pool("10.240.1.0/24", None, None, False)
    gateway = h1.request_address(pool_id, None,
                                 {"RequestAddressType": "com.docker.network.gateway"})
    h2.request_pool("10.240.1.0/24", None, None, False)
    h2.request_address(pool_id, None, {"RequestAddressType": "com.docker.network.gateway"})
    address = h2.request_address(pool_id, None, None).split("/")[0]  # h2's own block
    h2.assign_handle(address, "e" * 64)
    for name, network_id in (("h1", "a" * 64), ("h2", "b" * 64)):
        store.put_json(network_key(network_id), NetworkRecord(
            id=network_id, ipv4=Subnet("10.240.1.0/24", gateway.split("/")[0], pool_id),
            ipv6=None, name="web", hostname=name).to_dict())
    store.put_json(endpoint_key("h2", "e" * 64), EndpointRecord(
        id="e" * 64, network_id="b" * 64, hostname="h2", ipv4=f"{address}/24",
        ipv6=None).to_dict())

    with pytest.raises(Conflict, match="alive"):
        remove_node(store, "h1", timeout=30, force=False)
    removal = remove_node(store, "h2", timeout=30, force=False)  # down for 10 minutes
    assert removal.endpoints == ["e" * 64] and removal.networks == ["b" * 64]
    assert address in removal.addresses
    allocations = h1.list_allocations()
    assert [a.address for a in allocations] == [gateway.split("/")[0]]  # h1's network stays
    assert all(a.host != "h2" for a in allocations)
    assert h1.claimed_hosts(pool_id) == ["h1"]
    assert store.get(endpoint_key("h2", "e" * 64)) is None
    assert store.get(network_key("a" * 64)) is not None
    with pytest.raises(NotFound):
        NodeRegistry(store).get("h2")
    assert "h2" not in NodeRegistry(store).statuses()


def test_unknown_node_is_not_found(tmp_path: Path):
    with pytest.raises(NotFound, match="ghost"):
        remove_node(SqliteDatastore(str(tmp_path / "s.db")), "ghost", 30, force=True)


def test_heartbeats_are_outside_the_watched_prefix_and_replace_an_older_ones(
        tmp_path: Path):
    # Every agent watches ROOT: a heartbeat there reached every host every interval.
    from datastore.base import ROOT
    from routing.nodes import LEGACY_NODE_STATUS

    store = SqliteDatastore(str(tmp_path / "state.db"))
    store.put_json(LEGACY_NODE_STATUS + "h1", {"name": "h1", "heartbeat": 1, "started": 1})
    revision = store.current_revision()
    registry = NodeRegistry(store)
    registry.report(NodeStatus("h1", heartbeat=now(), started=now()))
    events = store.watch(ROOT, revision, 0.1)
    assert [e.kind for e in events] == ["delete"]  # only the older version's key, once
    revision = store.current_revision()
    registry.report(NodeStatus("h1", heartbeat=now(), started=now()))
    assert store.watch(ROOT, revision, 0.1) == []
    assert registry.statuses()["h1"].alive(now(), 30)
