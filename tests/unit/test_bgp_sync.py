"""BGP routing's split of work and its inputs: the planner leaves plain-pool routes
to BIRD (and keeps VXLAN routes and local blackholes), and the BGP model follows
datastore events into the configuration it renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataplane.netlink import Route
from datastore.base import Event
from datastore.sqlite import SqliteDatastore
from routing.bgp_store import CONFIG_KEY, NODE_SETTINGS, BgpStore, peer_key
from routing.bgp_sync import BgpModel, router_id
from routing.nodes import NodeRecord
from routing.planner import BGP, VXLAN, BlockInfo, NodeInfo, PoolInfo, plan_routes

H1 = NodeInfo("h1", "10.123.1.11/24", vxlan_ipv4="10.250.0.1/32")
H3 = NodeInfo("h3", "10.123.2.13/24", vxlan_ipv4="10.250.0.65/32")
POOLS = [PoolInfo("10.240.0.0/16"), PoolInfo("10.250.0.0/16", vxlan_mode="always")]
BLOCKS = [BlockInfo("10.240.0.0/26", "h1"), BlockInfo("10.240.0.64/26", "h3"),
          BlockInfo("10.250.0.64/26", "h3")]


def test_with_bgp_plain_pool_routes_are_birds_and_vxlan_routes_stay_the_agents():
    plan = plan_routes(H1, {"h1": H1, "h3": H3}, POOLS, BLOCKS, bgp=True)
    assert Route("10.240.0.0/26", blackhole=True) in plan.routes
    assert not [r for r in plan.routes if r.dst == "10.240.0.64/26"]
    assert Route("10.250.0.64/26", via="10.250.0.65", dev="vxlan.calico",
                 onlink=True) in plan.routes
    report = plan.peers["h3"]
    assert report.modes == {BGP, VXLAN} and report.unreachable == []
    # Without BGP the far segment is unreachable for the plain pool: BGP is the fix.
    static = plan_routes(H1, {"h1": H1, "h3": H3}, POOLS, BLOCKS)
    assert static.peers["h3"].unreachable


def _records() -> dict[str, NodeRecord]:
    return {"h1": NodeRecord("h1", ipv4="10.123.1.11/24", ipv6="fd00:123:1::11/64"),
            "h2": NodeRecord("h2", ipv4="10.123.1.12/24"),
            "rr1": NodeRecord("rr1", ipv4="10.123.1.21/24")}


def _event(key: str, data: object | None, revision: int) -> Event:
    kind = "delete" if data is None else "put"
    return Event(kind=kind, key=key, value=None if data is None else json.dumps(data),
                 revision=revision)


def test_model_follows_events_into_the_rendered_configuration():
    model = BgpModel("h1")
    pools, blocks = [PoolInfo("10.240.0.0/16")], [BlockInfo("10.240.0.0/26", "h1")]
    text = model.render(_records(), pools, blocks)
    assert "protocol bgp Mesh_10_123_1_12" in text and "Mesh_10_123_1_21" in text
    assert model.apply_events([
        _event(CONFIG_KEY, {"as_number": 64512, "mesh": False}, 2),
        _event(NODE_SETTINGS + "rr1", {"as_number": None, "rr_cluster_id": "244.0.0.1"}, 3),
        _event(peer_key("10.123.1.1", "h1"), {"address": "10.123.1.1", "as_number": 65001}, 4),
        _event(peer_key("10.123.1.2", "h2"), {"address": "10.123.1.2", "as_number": 65001}, 5),
    ])
    text = model.render(_records(), pools, blocks)
    assert "Mesh_" not in text
    assert "protocol bgp Node_10_123_1_21" in text  # the reflector only
    assert "Node_10_123_1_12" not in text
    assert "protocol bgp Node_10_123_1_1 " in text and "10_123_1_2 " not in text
    assert "route 10.240.0.0/26 blackhole;" in text
    # The peer removed, the mesh back on: the configuration follows.
    model.apply_events([_event(peer_key("10.123.1.1", "h1"), None, 6),
                        _event(CONFIG_KEY, None, 7)])
    text = model.render(_records(), pools, blocks)
    assert "Node_10_123_1_1 " not in text and "Mesh_10_123_1_12" in text
    assert not model.apply_events([_event("/calico-cnm/v1/endpoints/h1/x", {}, 8)])


def test_model_loads_what_the_store_holds(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    BgpStore(store).configure(as_number_value=64999, mesh=True)
    BgpStore(store).set_node("h2", as_value=64602)
    model = BgpModel("h1")
    model.load(store)
    text = model.render(_records(), [PoolInfo("10.240.0.0/16")], [])
    assert "local 10.123.1.11 as 64999;" in text
    assert "neighbor 10.123.1.12 as 64602;" in text


def test_unregistered_node_and_ipv6_only_router_ids():
    with pytest.raises(ValueError, match="not registered"):
        BgpModel("h9").render(_records(), [], [])
    v6 = NodeRecord("v6only", ipv6="fd00::5/64")
    assert router_id(v6) == router_id(NodeRecord("v6only", ipv6="fd00::6/64"))
    assert router_id(v6).startswith("10.")
    assert router_id(NodeRecord("x", ipv4="10.0.0.5/24")) == "10.0.0.5"
