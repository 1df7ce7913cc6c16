"""Rolling upgrades: records written by a newer version, with fields this one does not
know, are read, and records this version rewrites keep those fields. A profile rule
with conditions this version cannot enforce fails closed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from datastore.base import dumps
from datastore.errors import Conflict
from datastore.sqlite import SqliteDatastore
from driver.records import EndpointRecord, NetworkRecord, endpoint_key, network_key
from ipam_driver.blocks import AllocationBlock
from ipam_driver.pools import Pool, PoolSet, SubnetReservation
from profiles.model import Profile, Rule
from profiles.store import ProfileStore, profile_key
from routing.bgp_store import CONFIG_KEY, BgpStore, settings_from
from routing.nodes import NodeRecord, NodeStatus
from tests.unit.test_cluster_networks import Host

FUTURE = {"future_field": {"added": "later"}}


def _newer(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, **FUTURE}


def test_every_stored_record_reads_with_a_newer_versions_fields() -> None:
    network = NetworkRecord.from_dict(_newer({
        "id": "n" * 64, "ipv4": _newer({"cidr": "10.1.0.0/24", "gateway": "10.1.0.1"}),
        "ipv6": None, "name": "web", "hostname": "h1"}))
    assert network.ipv4 is not None and network.ipv4.cidr == "10.1.0.0/24"
    assert network.name == "web"
    endpoint = EndpointRecord.from_dict(_newer({
        "id": "e" * 64, "network_id": "n" * 64, "hostname": "h1", "ipv4": "10.1.0.2/24",
        "ipv6": None, "ports": [_newer({"protocol": "tcp", "container_port": 80,
                                        "host_port": 8080})]}))
    assert endpoint.ports[0].host_port == 8080
    pool = Pool.from_dict(_newer({"cidr": "10.1.0.0/16", "block_size": 26}))
    assert pool.cidr == "10.1.0.0/16"
    assert PoolSet.from_dict(_newer({"pools": [pool.to_dict()]})).pools == [pool]
    reservation = SubnetReservation.from_dict(_newer({
        "cidr": "10.1.0.0/24", "pool": "10.1.0.0/16", "block_size": 26, "id": "r1",
        "hosts": ["h1"], "created_revision": 3}))
    assert list(reservation.hosts) == ["h1"]
    block = AllocationBlock.from_dict(_newer({"cidr": "10.1.0.0/26", "host": "h1",
                                              "allocations": {}}))
    assert block.host == "h1"
    assert NodeRecord.from_dict(_newer({"name": "h1", "ipv4": "10.0.0.1/24"})).ipv4 \
        == "10.0.0.1/24"
    assert NodeStatus.from_dict(_newer({"name": "h1", "heartbeat": 1.0,
                                        "started": 0.5})).heartbeat == 1.0
    assert settings_from(_newer({"as_number": 64600, "mesh": False})).default_as == 64600


@pytest.fixture
def host(tmp_path: Path) -> Host:
    path = str(tmp_path / "state.db")
    made = Host("h1", SqliteDatastore(path), path)
    made.app.extensions["calico_cnm.ipam"].add_pool("10.96.0.0/12")
    return made


def test_network_and_endpoint_records_keep_a_newer_versions_fields_when_rewritten(
        host: Host) -> None:
    store = host.service._store
    host.network("n" * 64, "web", "10.99.0.0/24")
    host.endpoint("n" * 64, "e" * 64, "10.99.0.0/24")
    for key in (network_key("n" * 64), endpoint_key("h1", "e" * 64)):
        entry = store.get(key)
        store.update(key, dumps(_newer(entry.data)), entry.revision)
    # Join rewrites the endpoint; a cluster removal marks the network (rewrites it).
    host.call("NetworkDriver.Join", {"NetworkID": "n" * 64, "EndpointID": "e" * 64,
                                     "SandboxKey": "/var/run/docker/netns/x"})
    assert store.get(endpoint_key("h1", "e" * 64)).data["state"] == "joined"
    host.service._mark_removing("n" * 64)
    assert store.get(network_key("n" * 64)).data["removing"] is True
    for key in (network_key("n" * 64), endpoint_key("h1", "e" * 64)):
        assert store.get(key).data["future_field"] == FUTURE["future_field"], key


def test_bgp_documents_keep_a_newer_versions_keys(tmp_path: Path) -> None:
    store = SqliteDatastore(str(tmp_path / "state.db"))
    store.create(CONFIG_KEY, dumps(_newer({"as_number": 64512, "mesh": True})))
    BgpStore(store).configure(mesh=False)
    assert store.get(CONFIG_KEY).data == _newer({"as_number": 64512, "mesh": False})


def test_a_newer_profile_is_read_failing_closed_and_not_rewritten(tmp_path: Path) -> None:
    store = SqliteDatastore(str(tmp_path / "state.db"))
    newer = {
        "name": "web", "tags": ["web"], "priority": 5,
        "rules": {
            "inbound": [
                {"action": "allow", "protocol": "tcp", "src_tag": "web",
                 "src_service_account": "frontend"},        # cannot be enforced: left out
                {"action": "deny", "src_net": "10.9.0.0/16", "http_method": "POST"},
                {"action": "allow", "src_tag": "db"},
            ],
            "outbound": [{"action": "allow"}],
            "forward": [{"action": "allow"}],
        },
    }
    store.create(profile_key("web"), json.dumps(newer))
    profile = ProfileStore(store).get("web")
    assert profile.inbound_rules == [Rule.from_dict({"action": "deny",
                                                     "src_net": "10.9.0.0/16"}),
                                     Rule.from_dict({"action": "allow", "src_tag": "db"})]
    assert profile.outbound_rules == [Rule.from_dict({"action": "allow"})]
    _, notes = Profile.from_stored(newer)
    assert len(notes) == 4 and any("src_service_account" in n for n in notes)
    # A change by this version would write back less than it read: refused.
    before = store.get(profile_key("web")).data
    with pytest.raises(Conflict, match="newer calico-cnm"):
        ProfileStore(store).add_rule("web", "outbound", Rule.from_dict({"action": "deny"}))
    assert store.get(profile_key("web")).data == before
    # Replacing it whole (apply) is the user's choice.
    assert ProfileStore(store).put(Profile("web", ["web"])) == "updated"
    # What a user gives is still checked strictly.
    with pytest.raises(Exception, match="unknown profile key 'priority'"):
        Profile.from_dict(newer)
