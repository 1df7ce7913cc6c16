"""Encapsulated traffic is accepted only from known nodes, and only filtered while a
pool encapsulates (other VXLAN users of the host are left alone otherwise)."""

from __future__ import annotations

import json

from datastore.base import ROOT, Event
from plugin.policy import HostPolicy
from profiles.compiler import INPUT_CHAIN, NODES_SET, PolicyModel


def test_no_encapsulation_no_tunnel_rules():
    model = PolicyModel()
    model.set_tunnels(False, False, ["10.0.0.2"])
    state = model.policy().family(4)
    assert not any("4789" in rule or "ipencap" in rule
                   for rule in state.tables["filter"][INPUT_CHAIN])
    assert NODES_SET not in state.ipsets


def test_vxlan_and_ipip_only_from_known_nodes():
    model = PolicyModel()
    model.set_tunnels(True, True, ["10.0.0.2", "10.0.0.3", "fd00::2"])
    state = model.policy().family(4)
    rules = state.tables["filter"][INPUT_CHAIN]
    assert rules[0] == (f"-p udp -m udp --dport 4789 -m set ! --match-set {NODES_SET} "
                        "src -j DROP")
    assert rules[1] == f"-p ipencap -m set ! --match-set {NODES_SET} src -j DROP"
    assert state.ipsets[NODES_SET].members == {"10.0.0.2", "10.0.0.3"}
    assert NODES_SET not in model.policy().family(6).ipsets


def _event(key: str, data: object) -> Event:
    return Event("put", ROOT + key, json.dumps(data), 1)


def test_host_policy_takes_other_nodes_and_pool_modes_from_events():
    policy = HostPolicy("h1")
    policy.apply_events([
        _event("pools", {"pools": [{"cidr": "10.240.0.0/16", "block_size": 26,
                                    "vxlan_mode": "cross-subnet"}]}),
        _event("nodes/h1", {"name": "h1", "ipv4": "10.123.1.11/24"}),
        _event("nodes/h2", {"name": "h2", "ipv4": "10.123.1.12/24"}),
    ])
    state = policy.policy().family(4)
    assert state.ipsets[NODES_SET].members == {"10.123.1.12"}  # not this node itself
    assert "4789" in state.tables["filter"][INPUT_CHAIN][0]
    policy.apply_events([Event("delete", ROOT + "nodes/h2", None, 2)])
    assert policy.policy().family(4).ipsets[NODES_SET].members == frozenset()
