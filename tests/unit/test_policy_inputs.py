"""What the agent feeds the policy compiler, read from a real SQLite datastore."""

from __future__ import annotations

from pathlib import Path

from datastore.base import dumps
from datastore.sqlite import SqliteDatastore
from driver.records import (
    EndpointRecord,
    NetworkRecord,
    PortMapping,
    Subnet,
    endpoint_key,
    network_key,
)
from ipam_driver.service import IpamService
from plugin.policy import compile_host_policy, gather
from plugin.settings import Settings
from profiles.compiler import endpoint_chain_names, profile_chain_names
from profiles.model import Profile
from profiles.store import ProfileStore


def _store(tmp_path: Path) -> SqliteDatastore:
    store = SqliteDatastore(str(tmp_path / "state.db"))
    IpamService(store, "h1").add_pool("10.1.0.0/16", nat_outgoing=True)
    ProfileStore(store).create(Profile.network_default("web"))
    network = NetworkRecord(id="n1", ipv4=Subnet("10.1.0.0/24", "10.1.0.1"), ipv6=None,
                            profiles=["web"], name="web")
    store.create(network_key("n1"), dumps(network.to_dict()))
    local = EndpointRecord(id="a" * 64, network_id="n1", hostname="h1", ipv4="10.1.0.5/24",
                           ipv6=None, state="joined",
                           ports=[PortMapping("tcp", 80, 8080)])
    remote = EndpointRecord(id="b" * 64, network_id="n1", hostname="h2", ipv4="10.1.0.70/24",
                            ipv6=None, state="joined")
    for record in (local, remote):
        store.create(endpoint_key(record.hostname, record.id), dumps(record.to_dict()))
    return store


def test_gather_splits_local_and_remote_and_takes_profiles_from_the_network(
        tmp_path: Path) -> None:
    inputs = gather(_store(tmp_path), "h1")
    assert [e.iface for e in inputs.local] == ["cali" + "a" * 11]
    assert inputs.local[0].profiles == ("web",)
    assert [e.ipv4 for e in inputs.remote] == [("10.1.0.70/24",)]
    assert [(m.container_ip, m.host_port, m.container_port) for m in inputs.port_mappings] == [
        ("10.1.0.5", 8080, 80)]
    assert [(p.cidr, p.nat_outgoing) for p in inputs.pools] == [("10.1.0.0/16", True)]


def _reachable(chains: dict[str, list[str]], start: str) -> set[str]:
    """Every chain a packet can reach from start through -j/-g."""
    seen, todo = set(), [start]
    while todo:
        chain = todo.pop()
        if chain in seen:
            continue
        seen.add(chain)
        for rule in chains.get(chain, []):
            words = rule.split()
            for flag in ("-j", "-g"):
                if flag in words and words[words.index(flag) + 1] in chains:
                    todo.append(words[words.index(flag) + 1])
    return seen


def test_compiled_host_policy_enforces_the_network_profile(tmp_path: Path) -> None:
    policy = compile_host_policy(_store(tmp_path), Settings(hostname="h1"))
    chains = policy.v4.filter
    inbound, outbound = profile_chain_names("web")
    to_chain, from_chain = endpoint_chain_names("cali" + "a" * 11)
    assert inbound in chains and outbound in chains
    assert inbound in _reachable(chains, to_chain)
    assert outbound in _reachable(chains, from_chain)
    # The tag set holds both hosts' addresses; nothing failed closed.
    members = set().union(*(s.members for s in policy.v4.ipsets.values()))
    assert {"10.1.0.5", "10.1.0.70"} <= members
    assert policy.warnings == []
