"""What the agent feeds the policy model, read from a real SQLite datastore: a full
load, and watch events applied in memory, which must end where a fresh load ends."""

from __future__ import annotations

from pathlib import Path

from datastore.base import ROOT, dumps
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
from plugin.policy import HostPolicy, compile_host_policy
from plugin.settings import Settings
from profiles.compiler import (
    FROM_DISPATCH,
    PREROUTING_CHAIN,
    TO_DISPATCH,
    CompiledPolicy,
    PolicySettings,
    endpoint_set_name,
    profile_chain_names,
    profile_list_chain_name,
)
from profiles.grammar import parse_rule
from profiles.model import Profile
from profiles.store import ProfileStore, profile_key

LOCAL = "a" * 64
REMOTE = "b" * 64
LOCAL_IFACE = "cali" + "a" * 11


def _store(tmp_path: Path) -> SqliteDatastore:
    store = SqliteDatastore(str(tmp_path / "state.db"))
    IpamService(store, "h1").add_pool("10.1.0.0/16", nat_outgoing=True)
    ProfileStore(store).create(Profile.network_default("web"))
    network = NetworkRecord(id="n1", ipv4=Subnet("10.1.0.0/24", "10.1.0.1"), ipv6=None,
                            profiles=["web"], name="web")
    store.create(network_key("n1"), dumps(network.to_dict()))
    local = EndpointRecord(id=LOCAL, network_id="n1", hostname="h1", ipv4="10.1.0.5/24",
                           ipv6=None, state="joined",
                           ports=[PortMapping("tcp", 80, 8080)])
    remote = EndpointRecord(id=REMOTE, network_id="n1", hostname="h2", ipv4="10.1.0.70/24",
                            ipv6=None, state="joined")
    for record in (local, remote):
        store.create(endpoint_key(record.hostname, record.id), dumps(record.to_dict()))
    return store


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


def test_a_full_load_enforces_the_network_profile(tmp_path: Path) -> None:
    policy = compile_host_policy(_store(tmp_path), Settings(hostname="h1"))
    chains = policy.v4.filter
    inbound, outbound = profile_chain_names("web")
    assert inbound in _reachable(chains, TO_DISPATCH)
    assert outbound in _reachable(chains, FROM_DISPATCH)
    # The local endpoint is dispatched by (address, interface); the remote one is not.
    assert policy.v4.ipsets[endpoint_set_name(["web"], 4)].members == {
        f"10.1.0.5,{LOCAL_IFACE}"
    }
    # The tag set holds both hosts' addresses.
    assert policy.v4.ipsets["cali4-t-web"].members == {"10.1.0.5", "10.1.0.70"}
    # Its published port, and the pool (nat-outgoing).
    assert policy.v4.nat[PREROUTING_CHAIN] == [
        "-p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.1.0.5:80"
    ]
    assert policy.v4.ipsets["cali4-p-masq"].members == {"10.1.0.0/16"}
    assert policy.warnings == []


def _same(events_policy: CompiledPolicy, store: SqliteDatastore) -> None:
    fresh = HostPolicy("h1").load(store).policy()
    assert events_policy.v4 == fresh.v4
    assert events_policy.v6 == fresh.v6


def test_watch_events_keep_the_model_equal_to_a_fresh_load(tmp_path: Path) -> None:
    store = _store(tmp_path)
    host = HostPolicy("h1").load(store)
    revision = store.current_revision()

    def catch_up() -> CompiledPolicy:
        nonlocal revision
        events = store.watch(ROOT, revision, 0)
        if events:
            revision = events[-1].revision
        host.apply_events(events)
        policy = host.policy()
        _same(policy, store)
        return policy

    # A new network (name not resolved yet: no profiles) and a container on it.
    other = NetworkRecord(id="n2", ipv4=Subnet("10.1.1.0/24", "10.1.1.1"), ipv6=None)
    store.create(network_key("n2"), dumps(other.to_dict()))
    newcomer = EndpointRecord(id="c" * 64, network_id="n2", hostname="h1",
                              ipv4="10.1.1.5/24", ipv6=None, state="joined")
    store.create(endpoint_key("h1", newcomer.id), dumps(newcomer.to_dict()))
    policy = catch_up()
    assert endpoint_set_name(["db"], 4) not in policy.v4.ipsets  # no profile: drops
    # The name is resolved: the network gets its default profile.
    ProfileStore(store).create(Profile.network_default("db"))
    other.profiles = ["db"]
    other.name = "db"
    entry = store.get(network_key("n2"))
    assert entry is not None
    store.update(network_key("n2"), dumps(other.to_dict()), entry.revision)
    policy = catch_up()
    assert policy.v4.ipsets[endpoint_set_name(["db"], 4)].members == {
        "10.1.1.5,cali" + "c" * 11
    }
    # A rule change reaches the profile chain.
    ProfileStore(store).add_rule("db", "inbound", parse_rule("allow tcp from tag web"))
    policy = catch_up()
    assert any("cali4-t-web" in rule for rule in policy.v4.filter[profile_chain_names("db")[0]])
    # An unreadable profile record fails its endpoints closed.
    entry = store.get(profile_key("web"))
    assert entry is not None
    store.update(profile_key("web"), '{"name": "web", "rules": {"inbound": [{}]}}',
                 entry.revision)
    policy = catch_up()
    assert endpoint_set_name(["web"], 4) not in policy.v4.ipsets
    assert any("profile 'web' cannot be read" in w for w in policy.warnings)
    entry = store.get(profile_key("web"))
    assert entry is not None
    store.update(profile_key("web"), dumps(Profile.network_default("web").to_dict()),
                 entry.revision)
    # The remote endpoint leaves; the local one stops publishing; pools change.
    store.delete(endpoint_key("h2", REMOTE))
    record = EndpointRecord.from_dict(store.get(endpoint_key("h1", LOCAL)).data)  # type: ignore[union-attr]
    record.ports = []
    store.put_json(endpoint_key("h1", LOCAL), record.to_dict())
    IpamService(store, "h1").add_pool("fd00:1::/48")
    policy = catch_up()
    assert policy.v4.ipsets["cali4-t-web"].members == {"10.1.0.5"}
    assert policy.v4.nat[PREROUTING_CHAIN] == []
    assert policy.v6.ipsets["cali6-p-all"].members == {"fd00:1::/48"}
    # A network record goes away: its endpoints keep the profiles they were created
    # with (none here), so they drop.
    store.delete(network_key("n2"))
    policy = catch_up()
    assert endpoint_set_name(["db"], 4) not in policy.v4.ipsets
    # The endpoint goes too; profile "db" is no longer used: no chains for it.
    store.delete(endpoint_key("h1", newcomer.id))
    policy = catch_up()
    assert profile_list_chain_name(["db"], inbound=True) not in policy.v4.filter
    assert policy.warnings == []


def test_events_that_do_not_concern_policy_are_ignored(tmp_path: Path) -> None:
    store = _store(tmp_path)
    host = HostPolicy("h1", PolicySettings(workload_to_host="accept")).load(store)
    revision = store.current_revision()
    IpamService(store, "h1").add_pool("10.2.0.0/16")
    store.put_json(ROOT + "ipam/blocks/10.2.0.0-26", {"cidr": "10.2.0.0/26"})
    events = store.watch(ROOT, revision, 0)
    assert host.apply_events(events[-1:]) is False
    assert host.apply_events(events) is True
    policy = host.policy()
    assert policy.v4.ipsets["cali4-p-all"].members == {"10.1.0.0/16", "10.2.0.0/16"}
    assert "-j ACCEPT" in policy.v4.filter["cali-INPUT"][-1]


def test_unreadable_endpoint_and_network_records_fail_closed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    entry = store.get(network_key("n1"))
    assert entry is not None
    store.update(network_key("n1"), "not json", entry.revision)
    policy = HostPolicy("h1").load(store).policy()
    assert endpoint_set_name(["web"], 4) not in policy.v4.ipsets
    entry = store.get(endpoint_key("h1", LOCAL))
    assert entry is not None
    store.update(endpoint_key("h1", LOCAL), '{"id": "x"}', entry.revision)
    policy = HostPolicy("h1").load(store).policy()
    assert all(LOCAL_IFACE not in member for s in policy.v4.ipsets.values()
               for member in s.members)


def test_a_port_published_on_one_family_s_address_warns_about_nothing() -> None:
    """`-p 10.0.0.9:8080:80` (or dockerd's 0.0.0.0 and :: pair) on a dual-stack
    container publishes on that family only; the other family is not a problem."""
    from driver.records import PortMapping as RecordPort
    from plugin.policy import endpoint_port_mappings

    record = EndpointRecord(
        id="a" * 64, network_id="n1", hostname="h1", ipv4="10.1.0.5/24",
        ipv6="fd00:1::5/64", state="joined",
        ports=[RecordPort("tcp", 80, 8080, "0.0.0.0"), RecordPort("tcp", 80, 8080, "::"),
               RecordPort("tcp", 81, 8081, "")],
    )
    mappings = endpoint_port_mappings(record)
    assert sorted((m.container_ip, m.host_ip or "", m.host_port) for m in mappings) == [
        ("10.1.0.5", "", 8081), ("10.1.0.5", "0.0.0.0", 8080),
        ("fd00:1::5", "", 8081), ("fd00:1::5", "::", 8080)]
