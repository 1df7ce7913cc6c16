"""Policy in the real kernel: profiles compiled by profiles.compiler, written by
profiles.iptables.PolicyWriter into a throwaway "host" namespace, and checked with real
traffic (ICMP, TCP, UDP; IPv4 and IPv6) between workload namespaces on routed veths,
an "outside" namespace routed from the host, and the host itself.

One set of namespaces serves the whole module (building it is the slow part); every
test applies the complete policy it needs, so the tests do not depend on each other's
order. A probe that gets no answer within PROBE_TIMEOUT counts as dropped.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from dataplane.netlink import Netlink
from profiles.compiler import (
    CompiledPolicy,
    Endpoint,
    PolicySettings,
    Pool,
    PortMapping,
    compile_policy,
    endpoint_set_name,
    profile_list_chain_name,
)
from profiles.grammar import parse_rule
from profiles.iptables import ApplyReport, PolicyWriter
from profiles.model import Profile
from tests.functional import helpers
from tests.functional.helpers import (
    NET1,
    NET2,
    Capture,
    Dataplane,
    Lab,
    Probe,
    Servers,
    add_outside,
    expect,
    in_ns,
    ip,
    probe_all,
)

pytestmark = pytest.mark.root

PROBE_TIMEOUT = 0.5
HOST_ADDRESS = "203.0.113.1"  # the host's address on the outside link
OUTSIDE_ADDRESS = "203.0.113.2"
WEB = Profile.network_default("web")
DB = Profile.network_default("db")
POOLS = (
    Pool(NET1.subnet4, nat_outgoing=True), Pool(NET2.subnet4),
    Pool(str(NET1.subnet6)), Pool(str(NET2.subnet6)),
)
UDP_PORTS = (53, 54, 5000, 6000)


def rules(*texts: str) -> list:
    return [parse_rule(text) for text in texts]


def settled(peers: list[str], count: int, timeout: float = 2.0) -> list[str]:
    """The peers a server recorded, once it has accepted ``count`` connections (a
    client's connect returns before the server thread's accept)."""
    deadline = time.monotonic() + timeout
    while len(peers) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return sorted(peers)


@dataclass
class World:
    lab: Lab
    host: str
    outside: str
    writer: PolicyWriter
    servers: Servers
    workloads: dict[str, helpers.Endpoint] = field(default_factory=dict)

    def ns(self, name: str) -> str:
        return self.outside if name == "outside" else (
            self.host if name == "host" else self.workloads[name].workload
        )

    def ip4(self, name: str) -> str:
        return self.workloads[name].ip4

    def ip6(self, name: str) -> str:
        address = self.workloads[name].ip6
        assert address
        return address

    def iface(self, name: str) -> str:
        return self.workloads[name].host_ifname

    def compile(
        self,
        assign: Mapping[str, Sequence[str]],
        profiles: Mapping[str, Profile],
        pools: Sequence[Pool] = POOLS,
        mappings: Sequence[PortMapping] = (),
        settings: PolicySettings | None = None,
        extra_ipv4: Mapping[str, Sequence[str]] | None = None,
        extra_ipv6: Mapping[str, Sequence[str]] | None = None,
    ) -> CompiledPolicy:
        """The policy with the named workloads as endpoints carrying the given profiles
        (workloads left out have no chains, like a container the host does not know)."""
        endpoints = []
        for name, names in assign.items():
            workload = self.workloads[name]
            ipv6 = [workload.ip6] if workload.ip6 else []
            endpoints.append(Endpoint(
                id=f"endpoint-{name}", iface=workload.host_ifname,
                ipv4=[workload.ip4, *(extra_ipv4 or {}).get(name, ())],
                ipv6=[*ipv6, *(extra_ipv6 or {}).get(name, ())],
                profiles=list(names),
            ))
        return compile_policy(endpoints, profiles, pools, mappings, settings)

    def apply(self, *args: object, **kwargs: object) -> ApplyReport:
        policy = self.compile(*args, **kwargs)  # type: ignore[arg-type]
        return self.writer.apply(policy)

    def probe(self, src: str, dst: str, proto: str, port: int = 0, v6: bool = False,
              bind: str | None = None) -> Probe:
        """A probe from one named place to another (a workload, "host", "outside", or
        a literal address)."""
        if dst in self.workloads:
            address = self.ip6(dst) if v6 else self.ip4(dst)
        elif dst == "host":
            address = HOST_ADDRESS
        elif dst == "outside":
            address = OUTSIDE_ADDRESS
        else:
            address = dst
        return Probe(self.ns(src), address, proto, port, bind)

    def iptables(self, *args: str, v6: bool = False) -> str:
        tool = "ip6tables" if v6 else "iptables"
        return in_ns(self.host, tool, "-w", *args).stdout

    def chains(self, v6: bool = False) -> set[str]:
        """Every chain of ours in both tables of the host namespace."""
        names: set[str] = set()
        for table in ("filter", "nat"):
            for line in self.iptables("-t", table, "-S", v6=v6).splitlines():
                if line.startswith("-N cali-"):
                    names.add(line.split()[1])
        return names

    def sets(self) -> set[str]:
        return {n for n in in_ns(self.host, "ipset", "list", "-n").stdout.split()
                if n.startswith("cali")}

    def members(self, name: str) -> set[str]:
        """The members of one of our sets, as the kernel lists them."""
        lines = in_ns(self.host, "ipset", "list", name).stdout.splitlines()
        return set(lines[lines.index("Members:") + 1:]) - {""}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("functional tests need root (network namespaces)")
    for tool in ("ip", "nsenter", "iptables", "ip6tables", "ipset"):
        if not shutil.which(tool):
            pytest.skip(f"policy tests need {tool}")
    lab = Lab()
    servers = Servers()
    writer: PolicyWriter | None = None
    try:
        host = lab.netns("host")
        with Netlink(netns=host) as netlink:
            netlink.enable_forwarding()
            dataplane = Dataplane(lab, netlink, host)
            workloads = {
                "a": dataplane.add_endpoint("a", NET1, "10.201.0.5", "fd00:98::5"),
                "b": dataplane.add_endpoint("b", NET1, "10.201.0.6", "fd00:98::6"),
                "c": dataplane.add_endpoint("c", NET2, "10.202.0.7", "fd00:99::7"),
                "d": dataplane.add_endpoint("d", NET1, "10.201.0.8", "fd00:98::8"),
            }
        outside = add_outside(lab, host, HOST_ADDRESS, OUTSIDE_ADDRESS,
                              routes=("10.0.0.0/8",))
        writer = PolicyWriter(netns=host)
        world = World(lab, host, outside, writer, servers, workloads)
        for name in workloads:
            for port in UDP_PORTS:
                servers.udp(world.ns(name), port)
            servers.udp(world.ns(name), 53, version=6)
            servers.tcp(world.ns(name), 80)
        servers.tcp(outside, 9000)
        yield world
    finally:
        servers.close()
        if writer is not None:
            try:
                writer.remove_all()
            finally:
                lab.cleanup()
        else:
            lab.cleanup()


NETWORKS = {"a": ["web"], "b": ["web"], "c": ["db"], "d": ["web"]}
PROFILES = {"web": WEB, "db": DB}


# --- tags, rules, order ------------------------------------------------------------------------


def test_a_network_reaches_itself_and_no_other_network(world: World) -> None:
    world.apply(NETWORKS, PROFILES)
    p = world.probe
    expect({
        p("a", "b", "icmp"): True, p("a", "b", "tcp", 80): True, p("a", "b", "udp", 53): True,
        p("b", "a", "icmp"): True, p("d", "a", "tcp", 80): True,
        p("a", "c", "icmp"): False, p("a", "c", "tcp", 80): False, p("a", "c", "udp", 53): False,
        p("c", "a", "icmp"): False, p("c", "b", "tcp", 80): False, p("c", "b", "udp", 53): False,
    })


def test_ipv6_follows_the_same_profiles(world: World) -> None:
    world.apply(NETWORKS, PROFILES)
    p = world.probe
    expect({
        p("a", "b", "icmp", v6=True): True, p("a", "b", "tcp", 80, v6=True): True,
        p("b", "a", "udp", 53, v6=True): True,
        p("a", "c", "icmp", v6=True): False, p("c", "a", "tcp", 80, v6=True): False,
        p("c", "b", "udp", 53, v6=True): False,
    })


SERVICE = Profile("svc", ["svc"], inbound_rules=rules(
    "deny tcp from tag db to ports 1010",
    "deny tcp from cidr 10.201.0.5/32 to ports 2222",
    "allow tcp to ports " + ",".join(str(port) for port in range(1001, 1021)) + ",3000:3010",
    "allow udp to ports 53",
    "allow tcp from not tag web to ports 4000",
    "allow tcp from not cidr 10.201.0.0/24 to ports 2222",
    "allow udp to not ports 1:5999",
    "allow icmp from tag db",
    "allow tcp from cidr 10.201.0.0/24 not cidr 10.201.0.5/32 to ports 4500",
    "deny tcp from tag db to ports 3005",  # too late: the port list above allowed it
), outbound_rules=rules("allow"))


def test_ports_ranges_long_lists_cidrs_and_negations(world: World) -> None:
    world.apply({**NETWORKS, "b": ["svc"]}, {**PROFILES, "svc": SERVICE})
    p = world.probe
    expect({
        # 21 ports and a range: more than multiport's 15, split over several rules.
        p("a", "b", "tcp", 1001): True, p("a", "b", "tcp", 1018): True,
        p("a", "b", "tcp", 1020): True, p("a", "b", "tcp", 3005): True,
        p("a", "b", "tcp", 1021): False, p("a", "b", "tcp", 2999): False,
        # Deny before allow (first match wins), and an allow before a deny.
        p("c", "b", "tcp", 1010): False, p("a", "b", "tcp", 1010): True,
        p("c", "b", "tcp", 3005): True,
        # CIDR deny; "not cidr" allow.
        p("a", "b", "tcp", 2222): False, p("c", "b", "tcp", 2222): True,
        p("d", "b", "tcp", 2222): False,
        # "not tag".
        p("c", "b", "tcp", 4000): True, p("a", "b", "tcp", 4000): False,
        # A CIDR with a hole ("cidr X not cidr Y").
        p("d", "b", "tcp", 4500): True, p("a", "b", "tcp", 4500): False,
        # UDP ports and "not ports".
        p("a", "b", "udp", 53): True, p("a", "b", "udp", 54): False,
        p("a", "b", "udp", 6000): True, p("a", "b", "udp", 5000): False,
        # ICMP from a tag only.
        p("c", "b", "icmp"): True, p("a", "b", "icmp"): False,
    })
    # Every rule form reads back from the kernel as written: a resync right after
    # rewrites no chain.
    report = world.writer.resync(world.compile({**NETWORKS, "b": ["svc"]},
                                               {**PROFILES, "svc": SERVICE}))
    assert report.chains_written == 0 and report.chains_deleted == 0
    assert report.hooks_inserted == 0


def test_profiles_are_tried_in_order_and_a_deny_is_final(world: World) -> None:
    profiles = {
        **PROFILES,
        "first": Profile("first", ["first"], rules("deny tcp to ports 81"), rules("allow")),
        "second": Profile("second", ["second"], rules("allow"), rules("allow")),
        "empty": Profile("empty", ["empty"], [], rules("allow")),
    }
    p = world.probe
    world.apply({**NETWORKS, "b": ["first", "second"]}, profiles)
    expect({p("a", "b", "tcp", 81): False, p("a", "b", "tcp", 82): True,
            p("c", "b", "tcp", 82): True})
    world.apply({**NETWORKS, "b": ["second", "first"]}, profiles)
    expect({p("a", "b", "tcp", 81): True})
    # A profile where nothing matches falls through to the next; none matching drops.
    world.apply({**NETWORKS, "b": ["empty", "web"]}, profiles)
    expect({p("a", "b", "tcp", 81): True, p("c", "b", "tcp", 81): False})
    world.apply({**NETWORKS, "b": ["empty"]}, profiles)
    expect({p("a", "b", "tcp", 81): False, p("b", "outside", "tcp", 9000): True})


def test_an_endpoint_without_a_usable_profile_fails_closed(world: World) -> None:
    policy = world.compile({**NETWORKS, "b": ["web", "missing"]}, PROFILES)
    assert any("missing" in warning for warning in policy.warnings)
    world.writer.apply(policy)
    p = world.probe
    expect({p("a", "b", "icmp"): False, p("b", "a", "icmp"): False,
            p("a", "d", "icmp"): True})
    # A workload the policy does not know at all (no chains): dropped both ways.
    world.apply({"a": ["web"], "b": ["web"]}, PROFILES)
    expect({p("a", "d", "tcp", 80): False, p("d", "a", "tcp", 80): False,
            p("a", "b", "tcp", 80): True})


# --- addresses, conntrack, the host ------------------------------------------------------------


def test_a_spoofed_source_is_dropped(world: World) -> None:
    a, b = world.workloads["a"], world.workloads["b"]
    spoof4, spoof6 = "10.201.0.99", "fd00:98::99"
    # A neighbour's addresses (d: same network, so in the same endpoint set, but
    # behind another interface).
    neighbour4, neighbour6 = world.ip4("d"), world.ip6("d")
    ip(a.workload, "addr", "add", f"{spoof4}/32", "dev", a.container_ifname)
    ip(a.workload, "-6", "addr", "add", f"{spoof6}/128", "dev", a.container_ifname, "nodad")
    ip(a.workload, "addr", "add", f"{neighbour4}/32", "dev", a.container_ifname)
    ip(a.workload, "-6", "addr", "add", f"{neighbour6}/128", "dev", a.container_ifname,
       "nodad")
    # Take the IPv4 reverse-path filter out of the way so that only our chains can
    # stop the spoofed packets (IPv6 has no rp_filter at all).
    sysctl = f"net.ipv4.conf.{a.host_ifname}.rp_filter"
    saved = [in_ns(world.host, "sysctl", "-n", key).stdout.strip()
             for key in ("net.ipv4.conf.all.rp_filter", sysctl)]
    in_ns(world.host, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", f"{sysctl}=0")
    try:
        def arrived(extra4: Sequence[str], extra6: Sequence[str]) -> dict[str, bool]:
            world.writer.apply(world.compile(
                NETWORKS, PROFILES, extra_ipv4={"a": extra4}, extra_ipv6={"a": extra6}))
            with Capture(b.workload, b.container_ifname) as capture:
                probe_all([Probe(a.workload, b.ip4, "icmp", bind=spoof4),
                           Probe(a.workload, str(b.ip6), "icmp", bind=spoof6),
                           Probe(a.workload, b.ip4, "icmp", bind=neighbour4),
                           Probe(a.workload, str(b.ip6), "icmp", bind=neighbour6),
                           Probe(a.workload, b.ip4, "icmp", bind=a.ip4)], timeout=0.3)
            return {
                "v4": bool(capture.echo_requests(src=spoof4, dst=b.ip4)),
                "v6": bool(capture.echo_requests(src=spoof6, dst=b.ip6)),
                "neighbour4": bool(capture.echo_requests(src=neighbour4, dst=b.ip4)),
                "neighbour6": bool(capture.echo_requests(src=neighbour6, dst=b.ip6)),
                "own": bool(capture.echo_requests(src=a.ip4, dst=b.ip4)),
            }

        nothing = {"v4": False, "v6": False, "neighbour4": False, "neighbour6": False}
        assert arrived([], []) == {**nothing, "own": True}
        # Control: once the endpoint owns those addresses, the same packets arrive.
        assert arrived([spoof4], [spoof6]) == {**nothing, "v4": True, "v6": True, "own": True}
    finally:
        in_ns(world.host, "sysctl", "-qw", f"net.ipv4.conf.all.rp_filter={saved[0]}",
              f"{sysctl}={saved[1]}")
        ip(a.workload, "addr", "del", f"{spoof4}/32", "dev", a.container_ifname)
        ip(a.workload, "-6", "addr", "del", f"{spoof6}/128", "dev", a.container_ifname)
        ip(a.workload, "addr", "del", f"{neighbour4}/32", "dev", a.container_ifname)
        ip(a.workload, "-6", "addr", "del", f"{neighbour6}/128", "dev", a.container_ifname)


def test_a_spoofed_source_cannot_reach_the_host_either(world: World) -> None:
    # With workload_to_host accept, the host answers a's own address; a spoofed one
    # is dropped by the same endpoint sets on the INPUT side. A host route sends the
    # host's answers to the spoofed address back to a, so only our rules decide.
    a = world.workloads["a"]
    spoof4 = "10.201.0.98"
    gateway = NET1.gateway4
    ip(a.workload, "addr", "add", f"{spoof4}/32", "dev", a.container_ifname)
    ip(world.host, "route", "add", f"{spoof4}/32", "dev", a.host_ifname)
    try:
        accept = PolicySettings(workload_to_host="accept")
        for extra, answered in (([], False), ([spoof4], True)):
            world.apply(NETWORKS, PROFILES, settings=accept, extra_ipv4={"a": extra})
            expect({Probe(a.workload, gateway, "icmp", bind=spoof4): answered,
                    Probe(a.workload, gateway, "icmp", bind=a.ip4): True})
    finally:
        ip(world.host, "route", "del", f"{spoof4}/32", "dev", a.host_ifname)
        ip(a.workload, "addr", "del", f"{spoof4}/32", "dev", a.container_ifname)


def test_replies_pass_where_new_connections_do_not(world: World) -> None:
    # a may open connections to b (b accepts tag web) but accepts nothing itself.
    closed = Profile("closed", ["web"], inbound_rules=[], outbound_rules=rules("allow"))
    world.apply({"a": ["closed"], "b": ["web"], "c": ["db"]}, {**PROFILES, "closed": closed})
    p = world.probe
    expect({
        p("a", "b", "tcp", 80): True, p("a", "b", "udp", 53): True, p("a", "b", "icmp"): True,
        p("a", "b", "icmp", v6=True): True,
        p("b", "a", "tcp", 80): False, p("b", "a", "udp", 53): False,
        p("b", "a", "icmp"): False,
    })


@pytest.mark.parametrize("action", ["drop", "accept", "return"])
def test_workload_to_host(world: World, action: str) -> None:
    gateway = NET1.gateway4
    # The host's own INPUT rules, which "return" hands the decision to.
    world.iptables("-A", "INPUT", "-p", "tcp", "--dport", "7777", "-j", "DROP")
    try:
        world.apply(NETWORKS, PROFILES, settings=PolicySettings(workload_to_host=action))
        p = world.probe
        reached = {"drop": (False, False), "accept": (True, True), "return": (False, True)}
        blocked_port, open_port = reached[action]
        expect({
            p("a", gateway, "tcp", 7777): blocked_port,
            p("a", gateway, "tcp", 7778): open_port,
            p("a", gateway, "icmp"): action != "drop",
            # Replies to the host's own connections always pass.
            p("host", "a", "tcp", 80): True, p("host", "c", "icmp"): True,
        })
        # Outbound profiles still apply before accept/return: a deny is final.
        deny = Profile("nohost", ["web"], rules("allow from tag web"),
                       rules(f"deny to cidr {gateway}/32", "allow"))
        world.apply({**NETWORKS, "a": ["nohost"]}, {**PROFILES, "nohost": deny},
                    settings=PolicySettings(workload_to_host=action))
        expect({p("a", gateway, "tcp", 7778): False, p("a", "b", "tcp", 80): True})
    finally:
        world.iptables("-D", "INPUT", "-p", "tcp", "--dport", "7777", "-j", "DROP")


# --- NAT: outgoing and published ports -----------------------------------------------------------


def test_nat_outgoing_masquerades_only_to_outside_every_pool(world: World) -> None:
    open_ = Profile("open", ["open"], rules("allow"), rules("allow"))
    world.apply({"a": ["web"], "c": ["open"]}, {**PROFILES, "open": open_})
    outside_peers = world.servers.peers[(world.outside, 9000, 4)]
    c_peers = world.servers.peers[(world.ns("c"), 80, 4)]
    outside_peers.clear()
    c_peers.clear()
    p = world.probe
    expect({p("a", "outside", "tcp", 9000): True, p("c", "outside", "tcp", 9000): True,
            p("a", "c", "tcp", 80): True})
    # a's pool has nat-outgoing: the outside sees the host; c's pool has not.
    assert settled(outside_peers, 2) == sorted([HOST_ADDRESS, world.ip4("c")])
    # Between pools nothing is masqueraded.
    assert settled(c_peers, 1) == [world.ip4("a")]


def test_published_port_from_the_outside_and_from_the_host(world: World) -> None:
    mapping = PortMapping(world.ip4("a"), "tcp", 8080, 80)
    # a accepts nothing from outside its network: the published port opens only :80.
    world.apply(NETWORKS, PROFILES, mappings=[mapping])
    peers = world.servers.peers[(world.ns("a"), 80, 4)]
    peers.clear()
    p = world.probe
    expect({
        p("outside", "host", "tcp", 8080): True, p("host", "host", "tcp", 8080): True,
        p("outside", "a", "tcp", 80): False,  # not published: the profile decides
        p("outside", "host", "tcp", 8081): True,  # the host itself refuses (RST)
    })
    # No source NAT on the way in: the container sees the real client.
    assert OUTSIDE_ADDRESS in settled(peers, 2) and len(peers) == 2
    # Unpublished when the mapping goes away.
    world.apply(NETWORKS, PROFILES)
    peers.clear()
    probe_all([p("outside", "host", "tcp", 8080)], PROBE_TIMEOUT)
    assert settled(peers, 1, timeout=0.3) == []


# --- the writer: incremental updates, drift, cleanup ----------------------------------------------


def test_incremental_updates_take_effect_and_touch_only_what_changed(world: World) -> None:
    db = Profile("db", ["db"], rules("allow from tag db"), rules("allow"))
    profiles = {"web": WEB, "db": db}
    world.writer.resync(world.compile(NETWORKS, profiles))
    p = world.probe
    expect({p("a", "c", "tcp", 5432): False})
    # A new rule in a profile: one profile chain per family is rewritten.
    db.inbound_rules.append(parse_rule("allow tcp from tag web to ports 5432"))
    report = world.apply(NETWORKS, profiles)
    assert not report.full and report.chains_written == 2 and report.chains_deleted == 0
    expect({p("a", "c", "tcp", 5432): True, p("a", "c", "tcp", 5433): False})
    # An endpoint goes away: it leaves its profile list's set (and the tag set), and
    # its workload is cut off. No iptables rule changes.
    member = f"{world.ip4('d')},{world.iface('d')}"
    assert member in world.members(endpoint_set_name(["web"], 4))
    report = world.apply({k: v for k, v in NETWORKS.items() if k != "d"}, profiles)
    assert not report.full and report.chains_written == 0 and report.chains_deleted == 0
    assert report.sets_written == 4  # endpoint set and tag set "web", both families
    assert member not in world.members(endpoint_set_name(["web"], 4))
    assert world.iface("d") not in world.members(endpoint_set_name(["web"], 6))
    expect({p("a", "d", "tcp", 80): False, p("d", "a", "tcp", 80): False,
            p("d", "a", "tcp", 80, v6=True): False})
    # And comes back: only set members again.
    report = world.apply(NETWORKS, profiles)
    assert not report.full and report.chains_written == 0 and report.sets_written == 4
    expect({p("a", "d", "tcp", 80): True, p("d", "a", "tcp", 80, v6=True): True})
    # A profile list nobody used before: its chains, its sets, one dispatch rule each
    # way, per family (edited in place, no chain flushed).
    alone = Profile("alone", ["alone"], rules("allow from tag web"), rules("allow"))
    report = world.apply({**NETWORKS, "d": ["alone"]}, {**profiles, "alone": alone})
    assert not report.full and report.chains_deleted == 0
    # Per family: pi, po, pli, plo of "alone" and both dispatch chains.
    assert report.chains_written == 12
    expect({p("a", "d", "tcp", 80): True, p("c", "d", "tcp", 80): False})
    # Nothing changed: nothing is written.
    assert not world.apply({**NETWORKS, "d": ["alone"]}, {**profiles, "alone": alone}).changed
    # The kernel holds exactly what was applied.
    assert not world.writer.resync(
        world.compile({**NETWORKS, "d": ["alone"]}, {**profiles, "alone": alone})
    ).chains_written


def test_sets_follow_the_rules_that_use_them(world: World) -> None:
    world.apply(NETWORKS, PROFILES)
    assert {"cali4-t-db", "cali6-t-db", "cali4-t-web"} <= world.sets()
    members = in_ns(world.host, "ipset", "list", "cali4-t-web").stdout
    assert all(world.ip4(n) in members for n in ("a", "b", "d"))
    assert {"cali4-e-db", "cali6-e-db", "cali4-e-web"} <= world.sets()
    # c leaves: nothing refers to tag db any more and no endpoint has profile db: its
    # sets go (after the rules).
    report = world.apply({k: v for k, v in NETWORKS.items() if k != "c"}, PROFILES)
    assert report.sets_deleted == 4 and not report.fallback
    assert not {"cali4-t-db", "cali6-t-db", "cali4-e-db", "cali6-e-db"} & world.sets()
    # b leaves: it leaves the tag set, which stays.
    world.apply({"a": ["web"], "d": ["web"]}, PROFILES)
    members = in_ns(world.host, "ipset", "list", "cali4-t-web").stdout
    assert world.ip4("b") not in members and world.ip4("a") in members
    world.apply(NETWORKS, PROFILES)
    expect({world.probe("a", "b", "tcp", 80): True, world.probe("c", "b", "tcp", 80): False})


def test_resync_restores_deleted_hooks_and_flushed_chains(world: World) -> None:
    policy = world.compile(NETWORKS, PROFILES)
    world.writer.apply(policy)
    assert world.writer.hooks_intact()
    p = world.probe
    denied = {p("a", "c", "tcp", 80): False, p("c", "a", "icmp", v6=True): False}
    expect(denied)
    # Someone deletes the FORWARD hook (FORWARD's policy is ACCEPT here): no policy.
    world.iptables("-D", "FORWARD", "-j", "cali-FORWARD")
    world.iptables("-D", "FORWARD", "-j", "cali-FORWARD", v6=True)
    assert not world.writer.hooks_intact()
    expect({probe: True for probe in denied})
    report = world.writer.resync(policy)
    assert report.hooks_inserted == 2 and report.chains_written == 0
    assert world.writer.hooks_intact()
    expect(denied)
    # Docker restarting puts its own jump on top of FORWARD: ours goes back first.
    world.iptables("-N", "DOCKER-USER")
    world.iptables("-I", "FORWARD", "1", "-j", "DOCKER-USER")
    try:
        assert not world.writer.hooks_intact()
        assert world.writer.resync(policy).hooks_inserted == 1
        forward = world.iptables("-S", "FORWARD").splitlines()
        assert forward[1:] == ["-A FORWARD -j cali-FORWARD", "-A FORWARD -j DOCKER-USER"]
    finally:
        world.iptables("-D", "FORWARD", "-j", "DOCKER-USER")
        world.iptables("-X", "DOCKER-USER")
    # Someone flushes one of our top chains: noticed by the cheap check.
    world.iptables("-F", "cali-FORWARD")
    assert not world.writer.hooks_intact()
    world.writer.resync(policy)
    assert world.writer.hooks_intact()
    # ... or a profile list's chain: only a resync notices, and repairs it.
    world.iptables("-F", profile_list_chain_name(["db"], inbound=True))
    expect({p("a", "c", "tcp", 80): True})
    report = world.writer.resync(policy)
    assert report.chains_written == 1
    expect(denied)


def test_a_failed_incremental_write_falls_back_to_a_resync(world: World) -> None:
    # c's profile list sorts after web's: its dispatch rules go in at position 2 of
    # the dispatch chains, ahead of the final DROP.
    late = Profile("zz", ["zz"], rules("allow from tag web"), rules("allow"))
    profiles = {**PROFILES, "zz": late}
    assign = {**NETWORKS, "c": ["zz"]}
    others = {name: names for name, names in assign.items() if name != "c"}
    world.writer.resync(world.compile(others, profiles))
    # Behind the writer's back, the chain loses its rules: the insert fails, the
    # whole table transaction is refused, and the writer resyncs instead.
    world.iptables("-F", "cali-to-wl-dispatch")
    report = world.apply(assign, profiles)
    assert report.fallback and report.full
    assert "cali-to-wl-dispatch" in report.errors[0]
    p = world.probe
    expect({p("a", "c", "tcp", 80): True, p("c", "b", "tcp", 80): False,
            p("a", "b", "icmp"): True, p("c", "a", "icmp", v6=True): False})
    assert not world.writer.resync(world.compile(assign, profiles)).chains_written


def test_remove_all_leaves_no_chain_set_or_hook(world: World) -> None:
    world.apply(NETWORKS, PROFILES, mappings=[PortMapping(world.ip4("a"), "tcp", 8080, 80)])
    assert world.chains() and world.sets()
    world.writer.remove_all()
    for v6 in (False, True):
        for table in ("filter", "nat"):
            assert "cali" not in world.iptables("-t", table, "-S", v6=v6)
    assert world.sets() == set()
    assert not world.writer.hooks_intact()
    # Without policy the host forwards everything again (FORWARD's policy is ACCEPT).
    expect({world.probe("c", "a", "tcp", 80): True})
    # And a writer can start over.
    world.apply(NETWORKS, PROFILES)
    expect({world.probe("c", "a", "tcp", 80): False})
