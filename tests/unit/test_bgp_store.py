"""BGP documents in the datastore: validation that changes nothing on bad input,
defaults, peers of every node or one, node settings surviving re-registration, and
the apply/get kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from datastore.errors import InvalidRequest, NotFound
from datastore.sqlite import SqliteDatastore
from ipam_driver.service import IpamService
from plugin.declarative import apply_documents, get_documents, parse_documents
from profiles.store import ProfileStore
from routing.bgp_store import BGP, BgpStore
from routing.bgp_sync import effective_as
from routing.bird import BgpPeer, BgpSettings
from routing.nodes import NodeRecord, NodeRegistry


@pytest.fixture
def store(tmp_path: Path) -> SqliteDatastore:
    return SqliteDatastore(str(tmp_path / "state.db"))


def _keys(store: SqliteDatastore) -> list[str]:
    return [e.key for e in store.list(BGP)]


def test_defaults_then_as_and_mesh_change_independently(store):
    bgp = BgpStore(store)
    assert bgp.settings() == BgpSettings(64512, True)
    bgp.configure(mesh=False)
    assert bgp.configure(as_number_value="65100") == BgpSettings(65100, False)
    assert bgp.configure(mesh=True) == BgpSettings(65100, True)


@pytest.mark.parametrize("call, message", [
    (lambda b: b.configure(as_number_value=0), "out of range"),
    (lambda b: b.configure(as_number_value="4294967296"), "out of range"),
    (lambda b: b.configure(as_number_value="sixty"), "not a number"),
    (lambda b: b.add_peer("10.0.0.300", 65001), "not an IP address"),
    (lambda b: b.add_peer("127.0.0.1", 65001), "cannot be a BGP neighbour"),
    (lambda b: b.add_peer("10.0.0.1", 65001, node="bad name"), "node name"),
    (lambda b: b.set_node("h1", rr_cluster_id="1.2.3"), "cluster id"),
    (lambda b: b.set_node("h1", as_value=-5), "out of range"),
])
def test_bad_input_is_refused_and_changes_nothing(store, call, message):
    bgp = BgpStore(store)
    with pytest.raises(InvalidRequest, match=message):
        call(bgp)
    assert _keys(store) == []


def test_peers_global_and_per_node_and_removal_names_the_scope(store):
    bgp = BgpStore(store)
    assert bgp.add_peer("10.123.1.1", 65001)[1] is True
    assert bgp.add_peer("10.123.1.1", 65002)[1] is False  # updated in place
    bgp.add_peer("10.123.2.1", 65001, node="h3")
    assert bgp.peers() == [BgpPeer("10.123.1.1", 65002), BgpPeer("10.123.2.1", 65001, "h3")]
    with pytest.raises(NotFound, match="peer of node h3"):
        bgp.remove_peer("10.123.2.1")
    assert bgp.remove_peer("10.123.2.1", node="h3").node == "h3"
    assert bgp.peers() == [BgpPeer("10.123.1.1", 65002)]


def test_node_settings_survive_its_agent_rewriting_the_record(store):
    bgp, registry = BgpStore(store), NodeRegistry(store)
    bgp.set_node("rr1", rr_cluster_id="4026531841")  # a number is an id too
    bgp.set_node("rr1", as_value=64700)
    registry.register(NodeRecord("rr1", ipv4="10.123.1.21/24", as_number=64999))
    settings = bgp.node("rr1")
    assert (settings.as_number, settings.rr_cluster_id) == (64700, "240.0.0.1")
    record = registry.get("rr1")
    assert effective_as(record, settings, bgp.settings()) == 64700
    bgp.set_node("rr1", clear_as=True)
    assert effective_as(record, bgp.node("rr1"), bgp.settings()) == 64999
    assert effective_as(NodeRecord("h9"), None, BgpSettings(65010)) == 65010
    bgp.set_node("rr1", clear_rr=True)
    assert _keys(store) == []  # nothing left to say: no document


def test_forget_node_removes_its_settings_and_own_peers_only(store):
    bgp = BgpStore(store)
    bgp.set_node("h3", as_value=64603)
    bgp.add_peer("10.123.2.1", 65001, node="h3")
    bgp.add_peer("10.123.1.1", 65001)
    bgp.forget_node("h3")
    assert bgp.peers() == [BgpPeer("10.123.1.1", 65001)] and bgp.nodes() == {}


DOCUMENTS = [
    {"kind": "bgpconfig", "as_number": 64520, "mesh": False},
    {"kind": "bgppeer", "address": "10.123.1.1", "as_number": 65001},
    {"kind": "bgppeer", "address": "10.123.2.1", "as_number": 65001, "node": "h3"},
    {"kind": "node", "name": "rr1", "as_number": None,
     "route_reflector_cluster_id": "244.0.0.1"},
]


def test_apply_then_get_round_trips_and_a_second_apply_changes_nothing(store):
    ipam, profiles, bgp = IpamService(store, "h1"), ProfileStore(store), BgpStore(store)
    results = apply_documents(parse_documents(DOCUMENTS), ipam, profiles, bgp)
    assert results == ["bgpconfig: updated", "bgppeer 10.123.1.1: created",
                       "bgppeer 10.123.2.1 of node h3: created", "node rr1: updated"]
    got = (get_documents("bgpconfig", ipam, profiles, bgp)
           + get_documents("bgppeers", ipam, profiles, bgp)
           + get_documents("nodes", ipam, profiles, bgp))
    assert got == DOCUMENTS
    again = apply_documents(parse_documents(got), ipam, profiles, bgp)
    assert all(line.endswith("unchanged") for line in again), again


@pytest.mark.parametrize("document, message", [
    ({"kind": "bgppeer", "address": "10.0.0.1"}, "needs an address and an as_number"),
    ({"kind": "bgppeer", "address": "nope", "as_number": 1}, "address: peer address"),
    ({"kind": "bgpconfig", "mesh": "yes"}, "mesh: 'yes' is not true or false"),
    ({"kind": "bgpconfig", "as_number": True}, "as_number"),
    ({"kind": "node", "name": "h1", "colour": "red"}, "unknown node key 'colour'"),
    ({"kind": "node", "name": "h1", "route_reflector_cluster_id": "x"},
     "route_reflector_cluster_id"),
])
def test_bad_documents_name_the_document_and_field(store, document, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        parse_documents([{"kind": "bgpconfig"}, document])
    assert str(caught.value).startswith("document 2")


def test_a_peer_given_twice_in_one_file_is_refused():
    with pytest.raises(InvalidRequest, match="also given in document 1"):
        parse_documents([DOCUMENTS[1], DOCUMENTS[1]])
