"""The pure route planner: nodes + pools + blocks -> routes, tunnels, neighbours, FDB."""

from __future__ import annotations

from dataplane.netlink import Route
from routing.planner import (
    IPIP_DEVICE,
    VXLAN_DEVICE,
    BlockInfo,
    NodeInfo,
    PoolInfo,
    plan_routes,
    vtep_mac,
)

H1 = NodeInfo("h1", "10.123.1.11/24", "fd00:123:1::11/64", vxlan_ipv4="10.240.3.0")
H2 = NodeInfo("h2", "10.123.1.12/24", "fd00:123:1::12/64", vxlan_ipv4="10.240.3.64")
H3 = NodeInfo("h3", "10.123.2.13/24", "fd00:123:2::13/64", vxlan_ipv4="10.240.3.128")
NODES = {n.name: n for n in (H1, H2, H3)}
BLOCKS = [
    BlockInfo("10.240.0.0/26", "h1"),
    BlockInfo("10.240.0.64/26", "h2"),
    BlockInfo("10.240.0.128/26", "h3"),
]


def test_direct_routes_reach_nodes_on_the_same_subnet_only():
    plan = plan_routes(H1, NODES, [PoolInfo("10.240.0.0/16")], BLOCKS)
    assert plan.routes == {
        Route("10.240.0.0/26", blackhole=True),
        Route("10.240.0.64/26", via="10.123.1.12"),
    }
    assert plan.vxlan is None and plan.ipip is None
    assert plan.peers["h2"].modes == {"direct"} and plan.peers["h2"].routes == 1
    (reason,) = plan.peers["h3"].unreachable
    assert "10.240.0.128/26" in reason and "another subnet" in reason


def test_vxlan_always_encapsulates_to_every_node():
    plan = plan_routes(H1, NODES, [PoolInfo("10.240.0.0/16", vxlan_mode="always")], BLOCKS)
    assert Route("10.240.0.64/26", via="10.240.3.64", dev=VXLAN_DEVICE, onlink=True) in plan.routes
    assert Route("10.240.0.128/26", via="10.240.3.128", dev=VXLAN_DEVICE, onlink=True) \
        in plan.routes
    assert plan.vxlan is not None
    assert (plan.vxlan.local, plan.vxlan.mac, plan.vxlan.vni, plan.vxlan.port) == (
        "10.123.1.11", vtep_mac("h1"), 4096, 4789)
    assert plan.neighbours[(VXLAN_DEVICE, "10.240.3.128")] == vtep_mac("h3")
    assert plan.fdb[(VXLAN_DEVICE, vtep_mac("h3"))] == "10.123.2.13"
    assert plan.node_addresses >= {"10.123.1.12", "10.123.2.13"}


def test_cross_subnet_encapsulates_only_to_the_far_segment():
    pools = [PoolInfo("10.240.0.0/16", vxlan_mode="cross-subnet")]
    plan = plan_routes(H1, NODES, pools, BLOCKS)
    assert Route("10.240.0.64/26", via="10.123.1.12") in plan.routes
    assert Route("10.240.0.128/26", via="10.240.3.128", dev=VXLAN_DEVICE, onlink=True) \
        in plan.routes
    assert (VXLAN_DEVICE, "10.240.3.64") not in plan.neighbours
    assert plan.peers["h2"].modes == {"direct"} and plan.peers["h3"].modes == {"vxlan"}


def test_ipip_routes_via_the_node_address_on_tunl0():
    pools = [PoolInfo("10.240.0.0/16", ipip_mode="always")]
    plan = plan_routes(NodeInfo("h1", "10.123.1.11/24", ipip_ipv4="10.240.9.0"), NODES,
                       pools, BLOCKS)
    assert Route("10.240.0.128/26", via="10.123.2.13", dev=IPIP_DEVICE, onlink=True) \
        in plan.routes
    assert plan.ipip is not None and plan.ipip.address == "10.240.9.0"


def test_a_node_without_a_tunnel_address_is_reported_not_guessed():
    nodes = {**NODES, "h3": NodeInfo("h3", "10.123.2.13/24")}
    plan = plan_routes(H1, nodes, [PoolInfo("10.240.0.0/16", vxlan_mode="always")], BLOCKS)
    assert not any(r.dst == "10.240.0.128/26" for r in plan.routes)
    assert "no VXLAN tunnel address" in plan.peers["h3"].unreachable[0]


def test_borrowed_addresses_are_routed_to_the_borrower_everywhere_else():
    blocks = [BlockInfo("10.240.0.64/26", "h2", {"10.240.0.70": "h1", "10.240.0.71": "h3"})]
    plan = plan_routes(H2, NODES, [PoolInfo("10.240.0.0/16", vxlan_mode="cross-subnet")],
                       blocks)
    assert Route("10.240.0.64/26", blackhole=True) in plan.routes
    assert Route("10.240.0.70/32", via="10.123.1.11") in plan.routes
    assert Route("10.240.0.71/32", via="10.240.3.128", dev=VXLAN_DEVICE, onlink=True) \
        in plan.routes
    # The borrower itself routes its address to its veth (the driver does): no route here.
    plan_h1 = plan_routes(H1, NODES, [PoolInfo("10.240.0.0/16")], blocks)
    assert Route("10.240.0.70/32", via="10.123.1.11") not in plan_h1.routes
    assert Route("10.240.0.64/26", via="10.123.1.12") in plan_h1.routes


def test_ipv6_blocks_are_routed_directly_via_the_node_ipv6_address():
    blocks = [BlockInfo("fd00:240::40/122", "h2"), BlockInfo("fd00:240::80/122", "h3")]
    plan = plan_routes(H1, NODES, [PoolInfo("fd00:240::/48")], blocks)
    assert Route("fd00:240::40/122", via="fd00:123:1::12") in plan.routes
    assert "another subnet" in plan.peers["h3"].unreachable[0]


def test_vtep_macs_are_deterministic_unicast_and_distinct():
    assert vtep_mac("h1") == vtep_mac("h1")
    assert vtep_mac("h1") != vtep_mac("h2")
    first = int(vtep_mac("h1").split(":")[0], 16)
    assert first == 0x66 and not first & 1  # unicast, locally administered


def test_unregistered_block_hosts_are_reported():
    plan = plan_routes(H1, NODES, [PoolInfo("10.240.0.0/16")],
                       [BlockInfo("10.240.1.0/26", "gone")])
    assert not plan.routes
    assert "not registered" in plan.peers["gone"].unreachable[0]
