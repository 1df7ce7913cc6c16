"""The pure compiler: rule text, names, fail-closed, linearity, diffs, the incremental
model, and behaviour.

Behaviour is checked with a small iptables evaluator (``Fake``) that runs packets
through the compiled chains the way netfilter would (jump, goto, RETURN, marks,
ipsets including ``hash:net,iface`` with ``src,src``/``dst,dst``, multiport,
conntrack state), so the tests assert what happens to traffic, not only what the
text looks like.
"""

from __future__ import annotations

import random
import re
import shlex
import time
from dataclasses import dataclass, field

import netaddr
import pytest

from datastore.errors import InvalidRequest
from profiles.compiler import (
    ALLOW_CHAIN,
    ENDPOINT_SET_TYPE,
    FORWARD_CHAIN,
    FROM_DISPATCH,
    INPUT_CHAIN,
    MAX_CHAIN_NAME,
    MAX_SET_NAME,
    OUTPUT_CHAIN,
    POSTROUTING_CHAIN,
    PREROUTING_CHAIN,
    TO_DISPATCH,
    CompiledPolicy,
    DesiredState,
    Endpoint,
    Hook,
    IpSet,
    PolicyModel,
    PolicySettings,
    Pool,
    PortMapping,
    chain_name,
    compile_policy,
    diff,
    endpoint_set_member,
    endpoint_set_name,
    profile_chain_names,
    profile_list_chain_name,
    render_ipset_destroy,
    render_ipset_restore,
    render_profile_chains,
    render_rule,
    set_name,
    tag_set_name,
)
from profiles.grammar import parse_rule
from profiles.model import Profile, Rule

MARK = "0x1000000"
CLEAR = f"-j MARK --set-xmark 0x0/{MARK}"
ALLOWED = f"-m mark --mark {MARK}/{MARK} -j RETURN"

# --- an iptables evaluator ------------------------------------------------------------

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "sctp": 132}


@dataclass
class Packet:
    src: str
    dst: str
    proto: str = "tcp"
    dport: int | None = 80
    sport: int | None = 40000
    iif: str = ""
    oif: str = ""
    ctstate: str = "NEW"
    icmp_type: int | None = None
    icmp_code: int | None = None
    orig_dport: int | None = None  # set: the packet was DNATed from this port
    mark: int = 0
    local: set[str] = field(default_factory=set)  # the host's own addresses


def _iface_matches(pattern: str, name: str) -> bool:
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


def _in_ports(spec: str, port: int | None) -> bool:
    if port is None:
        return False
    for item in spec.split(","):
        low, _, high = item.partition(":")
        if int(low) <= port <= int(high or low):
            return True
    return False


class Fake:
    """Runs a packet through one family's compiled tables."""

    def __init__(self, state: DesiredState) -> None:
        self.state = state
        self.visited: list[str] = []

    def run(self, table: str, chain: str, packet: Packet) -> str:
        self.visited.append(chain)
        for rule in self.state.tables[table][chain]:
            verdict = self._rule(table, rule, packet)
            if verdict is not None:
                return verdict
        return "RETURN"

    def _rule(self, table: str, rule: str, packet: Packet) -> str | None:
        tokens = shlex.split(rule)
        index = 0
        negate = False
        while tokens[index] not in ("-j", "-g"):
            token = tokens[index]
            if token == "!":
                negate, index = True, index + 1
                continue
            if token == "-m":
                index += 2
                continue
            width = 2 if token == "--match-set" else 1
            args = tokens[index + 1: index + 1 + width]
            index += 1 + width
            if self._match(token, args, packet) == negate:
                return None
            negate = False
        kind, target, rest = tokens[index], tokens[index + 1], tokens[index + 2:]
        if target in ("ACCEPT", "DROP", "RETURN"):
            return target
        if target == "MARK":
            value, mask = (int(x, 16) for x in rest[1].split("/"))
            packet.mark = (packet.mark & ~mask) ^ value
            return None
        if target in ("DNAT", "MASQUERADE"):
            return " ".join([target, *rest])
        verdict = self.run(table, target, packet)
        if kind == "-g":
            return verdict
        return None if verdict == "RETURN" else verdict

    def _match(self, option: str, args: list[str], packet: Packet) -> bool:
        arg = args[0]
        if option == "-i":
            return _iface_matches(arg, packet.iif)
        if option == "-o":
            return _iface_matches(arg, packet.oif)
        if option in ("-s", "-d"):
            address = packet.src if option == "-s" else packet.dst
            return netaddr.IPAddress(address) in netaddr.IPNetwork(arg)
        if option == "-p":
            wanted = PROTOCOL_NUMBERS.get(arg, int(arg) if arg.isdigit() else -1)
            return wanted == PROTOCOL_NUMBERS.get(packet.proto, -2)
        if option == "--ctstate":
            states = arg.split(",")
            return packet.ctstate in states or ("DNAT" in states and packet.orig_dport is not None)
        if option == "--ctorigdstport":
            return packet.orig_dport == int(arg)
        if option == "--match-set":
            ipset = self.state.ipsets[arg]
            directions = args[1].split(",")
            address = packet.src if directions[0] == "src" else packet.dst
            if ipset.type == "hash:ip":
                assert len(directions) == 1
                return str(netaddr.IPAddress(address)) in ipset.members
            if ipset.type == ENDPOINT_SET_TYPE:
                # (address, interface): "src" takes the incoming, "dst" the outgoing one.
                assert len(directions) == 2
                iface = packet.iif if directions[1] == "src" else packet.oif
                if f"{netaddr.IPAddress(address)},{iface}" in ipset.members:
                    return True
                for member in (m for m in ipset.members if "/" in m):
                    net, _, member_iface = member.partition(",")
                    if member_iface == iface and \
                            netaddr.IPAddress(address) in netaddr.IPNetwork(net):
                        return True
                return False
            assert len(directions) == 1
            return any(netaddr.IPAddress(address) in netaddr.IPNetwork(m) for m in ipset.members)
        if option in ("--dports", "--dport"):
            return _in_ports(arg, packet.dport)
        if option in ("--sports", "--sport"):
            return _in_ports(arg, packet.sport)
        if option in ("--icmp-type", "--icmpv6-type"):
            icmp_type, _, code = arg.partition("/")
            if packet.icmp_type != int(icmp_type):
                return False
            return not code or packet.icmp_code == int(code)
        if option == "--mark":
            value, mask = (int(x, 16) for x in arg.split("/"))
            return packet.mark & mask == value
        if option in ("--src-range", "--dst-range"):
            low, high = arg.split("-")
            address = packet.src if option == "--src-range" else packet.dst
            return netaddr.IPAddress(low) <= netaddr.IPAddress(address) <= netaddr.IPAddress(high)
        if option == "--comment":
            return True
        if option == "--dst-type":
            return arg == "LOCAL" and packet.dst in packet.local
        raise AssertionError(f"the fake does not know {option}")

    def forward(self, packet: Packet) -> str:
        self.visited = []
        return self.run("filter", FORWARD_CHAIN, packet)

    def host_input(self, packet: Packet) -> str:
        self.visited = []
        return self.run("filter", INPUT_CHAIN, packet)

    def nat(self, chain: str, packet: Packet) -> str:
        return self.run("nat", chain, packet)


# --- a small world ----------------------------------------------------------------------

WEB = Profile.network_default("web")
DB = Profile(
    "db", ["db"],
    inbound_rules=[parse_rule("deny tcp to ports 22"), parse_rule("allow from tag web")],
    outbound_rules=[parse_rule("allow")],
)
EMPTY = Profile("empty")  # no rules: every packet falls through to the next profile
PROFILES = {p.name: p for p in (WEB, DB, EMPTY)}

W1 = Endpoint("e1" * 32, "calie1e1e1e1e1e", ["10.0.0.1/24"], ["fd00::1"], ["web"])
W2 = Endpoint("e2" * 32, "calie2e2e2e2e2e", ["10.0.0.2"], ["fd00::2"], ["web"])
D1 = Endpoint("d1" * 32, "calid1d1d1d1d1d", ["10.0.0.3"], [], ["db"])
X1 = Endpoint("f1" * 32, "calif1f1f1f1f1f", ["10.0.0.4"], [], ["empty", "web"])
OUTSIDE = "192.168.1.9"


def world(**kwargs: object) -> CompiledPolicy:
    args: dict[str, object] = {
        "endpoints": [W1, W2, D1, X1],
        "profiles": PROFILES,
        "pools": [Pool("10.0.0.0/16", nat_outgoing=True), Pool("10.1.0.0/16"),
                  Pool("fd00::/64", nat_outgoing=True)],
    }
    args.update(kwargs)
    return compile_policy(**args)  # type: ignore[arg-type]


def between(origin: Endpoint | str, destination: Endpoint | str, **kwargs: object) -> Packet:
    """A packet from one endpoint (or outside address) to another."""
    values: dict[str, object] = {}
    if isinstance(origin, Endpoint):
        values.update(src=origin.ipv4[0].split("/")[0], iif=origin.iface)
    else:
        values.update(src=origin, iif="eth0")
    if isinstance(destination, Endpoint):
        values.update(dst=destination.ipv4[0].split("/")[0], oif=destination.iface)
    else:
        values.update(dst=destination, oif="eth0")
    values.update(kwargs)
    return Packet(**values)  # type: ignore[arg-type]


# --- behaviour -------------------------------------------------------------------------------


def test_default_network_profile_lets_members_talk_and_keeps_others_out():
    fake = Fake(world().v4)
    assert fake.forward(between(W1, W2)) == "ACCEPT"
    assert fake.forward(between(W2, W1, proto="udp", dport=53)) == "ACCEPT"
    assert fake.forward(between(OUTSIDE, W1)) == "DROP"
    # Outbound is allowed to anywhere.
    assert fake.forward(between(W1, OUTSIDE)) == "ACCEPT"


def test_deny_before_allow_is_final():
    fake = Fake(world().v4)
    assert fake.forward(between(W1, D1, dport=22)) == "DROP"
    assert fake.forward(between(W1, D1, dport=5432)) == "ACCEPT"
    # db's outbound allows, but web's inbound only admits tag web.
    assert fake.forward(between(D1, W1)) == "DROP"


def test_a_profile_without_a_match_falls_through_to_the_next():
    fake = Fake(world().v4)
    # X1 carries "empty" then "web": its outbound falls through to web's allow, and it
    # is in the web tag set because of its second profile.
    assert fake.forward(between(X1, W1)) == "ACCEPT"
    assert fake.forward(between(W1, X1)) == "ACCEPT"
    assert fake.forward(between(OUTSIDE, X1)) == "DROP"


def test_no_profile_at_all_drops():
    bare = Endpoint("b" * 64, "calibbbbbbbbbbb", ["10.0.0.9"], [], [])
    fake = Fake(world(endpoints=[W1, bare]).v4)
    assert fake.forward(between(W1, bare)) == "DROP"
    assert fake.forward(between(bare, OUTSIDE)) == "DROP"


def test_conntrack_accepts_established_and_drops_invalid():
    fake = Fake(world().v4)
    assert fake.forward(between(OUTSIDE, W1, ctstate="ESTABLISHED")) == "ACCEPT"
    assert fake.forward(between(OUTSIDE, W1, ctstate="RELATED")) == "ACCEPT"
    assert fake.forward(between(W1, W2, ctstate="INVALID")) == "DROP"
    assert fake.state.filter[FORWARD_CHAIN][:4] == [
        "-i cali+ -m conntrack --ctstate INVALID -j DROP",
        "-o cali+ -m conntrack --ctstate INVALID -j DROP",
        "-i cali+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-o cali+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]


def test_traffic_not_touching_workloads_is_left_alone():
    fake = Fake(world().v4)
    packet = Packet(src=OUTSIDE, dst="192.168.2.2", iif="eth0", oif="eth1")
    assert fake.forward(packet) == "RETURN"
    packet.ctstate = "INVALID"
    assert fake.forward(packet) == "RETURN"


def test_a_container_cannot_spoof_its_source():
    fake = Fake(world().v4)
    assert fake.forward(between(W1, W2, src="10.0.0.99")) == "DROP"
    assert fake.forward(between(W1, W2, src="10.0.0.2")) == "DROP"  # a neighbour's address
    # With several addresses, each of them is fine and nothing else is.
    multi = Endpoint("m" * 64, "calimmmmmmmmmmm", ["10.0.0.7", "10.0.0.8"], [], ["web"])
    fake = Fake(world(endpoints=[W1, multi]).v4)
    for source in ("10.0.0.7", "10.0.0.8"):
        assert fake.forward(between(multi, W1, src=source)) == "ACCEPT"
    assert fake.forward(between(multi, W1, src="10.0.0.1")) == "DROP"


def test_unknown_workload_interfaces_drop():
    fake = Fake(world().v4)
    assert fake.forward(Packet(src="10.0.0.50", dst=OUTSIDE, iif="cali0000000000", oif="eth0")) \
        == "DROP"
    assert fake.forward(Packet(src=OUTSIDE, dst="10.0.0.50", iif="eth0", oif="cali0000000000")) \
        == "DROP"


@pytest.mark.parametrize(
    ("action", "allowed", "spoofed"),
    [("drop", "DROP", "DROP"), ("accept", "ACCEPT", "DROP"), ("return", "RETURN", "DROP")],
)
def test_workload_to_host(action, allowed, spoofed):
    fake = Fake(world(settings=PolicySettings(workload_to_host=action)).v4)
    to_host = Packet(src="10.0.0.1", dst="172.16.0.1", iif=W1.iface)
    assert fake.host_input(to_host) == allowed
    assert fake.host_input(Packet(src="10.0.0.66", dst="172.16.0.1", iif=W1.iface)) == spoofed
    # Replies to connections the host made are always let in.
    assert fake.host_input(Packet(src="10.0.0.1", dst="172.16.0.1", iif=W1.iface,
                                  ctstate="ESTABLISHED")) == "ACCEPT"
    # The host's other interfaces are not our business.
    assert fake.host_input(Packet(src=OUTSIDE, dst="172.16.0.1", iif="eth0")) == "RETURN"


def test_workload_to_host_accept_still_applies_outbound_deny():
    locked = Profile("locked", outbound_rules=[parse_rule("deny tcp to ports 22"),
                                               parse_rule("allow")])
    endpoint = Endpoint("l" * 64, "calillllllllll", ["10.0.0.5"], [], ["locked"])
    fake = Fake(compile_policy([endpoint], {"locked": locked},
                               settings=PolicySettings(workload_to_host="accept")).v4)
    assert fake.host_input(Packet(src="10.0.0.5", dst="172.16.0.1", iif=endpoint.iface,
                                  dport=22)) == "DROP"
    assert fake.host_input(Packet(src="10.0.0.5", dst="172.16.0.1", iif=endpoint.iface,
                                  dport=80)) == "ACCEPT"


def test_ipv6_workloads_can_do_neighbour_discovery_with_the_host():
    fake = Fake(world().v6)
    ns = Packet(src="fe80::1", dst="ff02::1:ff00:1", proto="ipv6-icmp", dport=None,
                icmp_type=135, icmp_code=0, iif=W1.iface)
    assert fake.host_input(ns) == "ACCEPT"
    echo = Packet(src="fd00::1", dst="fd00::ffff", proto="ipv6-icmp", dport=None,
                  icmp_type=128, icmp_code=0, iif=W1.iface)
    assert fake.host_input(echo) == "DROP"
    assert "--icmpv6-type" not in " ".join(world().v4.filter[INPUT_CHAIN])


def test_ipv6_policy():
    fake = Fake(world().v6)
    packet = Packet(src="fd00::1", dst="fd00::2", iif=W1.iface, oif=W2.iface)
    assert fake.forward(packet) == "ACCEPT"
    assert fake.forward(Packet(src="fd00::99", dst="fd00::2", iif=W1.iface, oif=W2.iface)) \
        == "DROP"
    assert fake.forward(Packet(src="2001:db8::1", dst="fd00::2", iif="eth0", oif=W2.iface)) \
        == "DROP"
    # D1 has no IPv6 address: nothing in IPv6 flows to or from it.
    assert fake.forward(Packet(src="fd00::3", dst="fd00::2", iif=D1.iface, oif=W2.iface)) \
        == "DROP"
    assert fake.state.ipsets["cali6-t-web"] == IpSet("hash:ip", "inet6",
                                                     frozenset({"fd00::1", "fd00::2"}))


def test_published_port_is_dnated_and_forwarded():
    mappings = [PortMapping("10.0.0.1", "tcp", 8080, 80),
                PortMapping("fd00::1", "udp", 5353, 53, host_ip="::")]
    compiled = world(port_mappings=mappings)
    fake = Fake(compiled.v4)
    to_host = Packet(src=OUTSIDE, dst="172.16.0.1", dport=8080, local={"172.16.0.1"})
    for chain in (PREROUTING_CHAIN, OUTPUT_CHAIN):
        assert fake.nat(chain, to_host) == "DNAT --to-destination 10.0.0.1:80"
        assert fake.nat(chain, Packet(src=OUTSIDE, dst="172.16.0.1", dport=8081)) == "RETURN"
    # After DNAT the forward is allowed although outside is not tagged web...
    dnated = between(OUTSIDE, W1, dport=80, orig_dport=8080)
    assert fake.forward(dnated) == "ACCEPT"
    # ...but reaching the container port directly is still up to the profiles.
    assert fake.forward(between(OUTSIDE, W1, dport=80)) == "DROP"
    assert compiled.v6.nat[PREROUTING_CHAIN] == [
        "-p udp -m udp --dport 5353 -j DNAT --to-destination [fd00::1]:53"
    ]
    assert compiled.v6.filter[TO_DISPATCH][0] == (
        f"-d fd00::1/128 -o {W1.iface} -p udp -m udp --dport 53 -m conntrack --ctstate DNAT "
        "--ctorigdstport 5353 -j ACCEPT"
    )
    # The accept is for the published port's container only.
    assert fake.forward(between(OUTSIDE, W2, dport=80, orig_dport=8080)) == "DROP"
    assert compiled.warnings == []


def test_published_port_on_one_host_address():
    compiled = world(port_mappings=[PortMapping("10.0.0.1", "tcp", 8080, 80, "172.16.0.1")])
    assert compiled.v4.nat[PREROUTING_CHAIN] == [
        "-d 172.16.0.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.1:80"
    ]
    fake = Fake(compiled.v4)
    assert fake.nat(PREROUTING_CHAIN, Packet(src=OUTSIDE, dst="172.16.0.2", dport=8080)) \
        == "RETURN"


def test_one_host_port_published_in_both_families():
    compiled = world(port_mappings=[PortMapping("10.0.0.1", "tcp", 8080, 80),
                                    PortMapping("fd00::1", "tcp", 8080, 80)])
    assert compiled.warnings == []
    assert compiled.v4.nat[PREROUTING_CHAIN] == [
        "-p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.1:80"
    ]
    assert compiled.v6.nat[PREROUTING_CHAIN] == [
        "-p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00::1]:80"
    ]


def test_bad_or_foreign_port_mappings_are_skipped_with_a_warning():
    compiled = world(port_mappings=[
        PortMapping("10.0.0.1", "tcp", 8080, 80),
        PortMapping("10.0.0.2", "tcp", 8080, 81),  # same host port: the first one wins
        PortMapping("10.9.9.9", "tcp", 8081, 80),  # not a local endpoint
        PortMapping("10.0.0.1", "gre", 8082, 80),
        PortMapping("10.0.0.1", "tcp", 0, 80),
        PortMapping("nonsense", "tcp", 8083, 80),
        PortMapping("10.0.0.1", "tcp", 8084, 80, host_ip="fd00::1"),
        PortMapping("10.0.0.1", "tcp", 8085, 80, host_ip="127.0.0.1"),
    ])
    assert compiled.v4.nat[PREROUTING_CHAIN] == [
        "-p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.1:80"
    ]
    text = "\n".join(compiled.warnings)
    assert "host port tcp/8080 is already published" in text
    assert "10.9.9.9:80 skipped: not a usable local endpoint" in text
    assert "protocol 'gre' is not one of tcp, udp, sctp" in text
    assert "host port 0 is not in 1-65535" in text
    assert "container address 'nonsense' is invalid" in text
    assert "are different IP versions" in text
    assert "127.0.0.1 is a loopback address" in text


def test_nat_outgoing_masquerades_only_outside_every_pool():
    compiled = world(pools=[Pool("10.0.0.0/16", nat_outgoing=True), Pool("10.1.0.0/16"),
                            Pool("fd00::/64", nat_outgoing=True)])
    state = compiled.v4
    assert state.nat[POSTROUTING_CHAIN] == [
        "-m set --match-set cali4-p-masq src -m set ! --match-set cali4-p-all dst -j MASQUERADE"
    ]
    assert state.ipsets["cali4-p-all"] == IpSet("hash:net", "inet",
                                                frozenset({"10.0.0.0/16", "10.1.0.0/16"}))
    assert state.ipsets["cali4-p-masq"] == IpSet("hash:net", "inet", frozenset({"10.0.0.0/16"}))
    assert compiled.v6.ipsets["cali6-p-masq"].members == {"fd00::/64"}
    fake = Fake(state)
    assert fake.nat(POSTROUTING_CHAIN, Packet(src="10.0.0.1", dst=OUTSIDE)) == "MASQUERADE"
    assert fake.nat(POSTROUTING_CHAIN, Packet(src="10.0.0.1", dst="10.1.0.5")) == "RETURN"
    assert fake.nat(POSTROUTING_CHAIN, Packet(src="10.0.0.1", dst="10.0.0.2")) == "RETURN"
    assert fake.nat(POSTROUTING_CHAIN, Packet(src="10.1.0.1", dst=OUTSIDE)) == "RETURN"


def test_pools_of_size_zero_and_invalid_pools():
    compiled = world(pools=[Pool("0.0.0.0/0", nat_outgoing=True), Pool("10.0.0.0/33")])
    assert compiled.v4.ipsets["cali4-p-all"].members == {"0.0.0.0/1", "128.0.0.0/1"}
    assert any("pool '10.0.0.0/33' skipped" in w for w in compiled.warnings)


def test_negations_behave():
    profile = Profile("neg", inbound_rules=[
        parse_rule("allow tcp from cidr 10.0.0.0/16 not cidr 10.0.1.0/24 to not ports 22"),
        parse_rule("allow udp from not tag web"),
    ])
    endpoint = Endpoint("n" * 64, "calinnnnnnnnnnn", ["10.0.9.9"], [], ["neg"])
    fake = Fake(compile_policy([W1, endpoint], {"neg": profile, "web": WEB}).v4)
    assert fake.forward(between("10.0.2.1", endpoint)) == "ACCEPT"
    assert fake.forward(between("10.0.1.1", endpoint)) == "DROP"  # not cidr
    assert fake.forward(between("10.0.2.1", endpoint, dport=22)) == "DROP"  # not ports
    assert fake.forward(between("10.2.0.1", endpoint)) == "DROP"  # outside cidr
    assert fake.forward(between(OUTSIDE, endpoint, proto="udp")) == "ACCEPT"
    assert fake.forward(between(W1, endpoint, proto="udp")) == "DROP"  # is tagged web


def test_many_ports_behave_like_one_list():
    ports = list(range(1000, 1040))
    allow = Rule("allow", protocol="tcp", dst_ports=[*ports, "2000:2010"])
    block = Rule("deny", protocol="tcp", not_dst_ports=[*ports, "3000:3010"])
    profile = Profile("ports", inbound_rules=[block, allow])
    endpoint = Endpoint("p" * 64, "calipppppppppp", ["10.0.0.9"], [], ["ports"])
    fake = Fake(compile_policy([endpoint], {"ports": profile}).v4)
    for port in (1000, 1014, 1015, 1039):
        assert fake.forward(between(OUTSIDE, endpoint, dport=port)) == "ACCEPT"
    assert fake.forward(between(OUTSIDE, endpoint, dport=1040)) == "DROP"
    assert fake.forward(between(OUTSIDE, endpoint, dport=2005)) == "DROP"  # not in block list
    assert fake.forward(between(OUTSIDE, endpoint, dport=3005)) == "DROP"  # not in allow list


def test_icmp_type_and_code_behave():
    profile = Profile("ping", inbound_rules=[parse_rule("allow icmp type 8 code 0"),
                                             parse_rule("allow icmpv6 type 128")])
    endpoint = Endpoint("i" * 64, "caliiiiiiiiiiii", ["10.0.0.9"], ["fd00::9"], ["ping"])
    compiled = compile_policy([endpoint], {"ping": profile})
    fake = Fake(compiled.v4)
    ping = between(OUTSIDE, endpoint, proto="icmp", dport=None, icmp_type=8, icmp_code=0)
    assert fake.forward(ping) == "ACCEPT"
    ping.icmp_code = 1
    assert fake.forward(ping) == "DROP"
    fake6 = Fake(compiled.v6)
    ping6 = Packet(src="2001:db8::1", dst="fd00::9", proto="ipv6-icmp", dport=None,
                   icmp_type=128, icmp_code=5, iif="eth0", oif=endpoint.iface)
    assert fake6.forward(ping6) == "ACCEPT"


# --- text ------------------------------------------------------------------------------------


def test_default_network_profile_text():
    compiled = compile_policy([W1], {"web": WEB})
    state = compiled.v4
    assert endpoint_set_name(["web"], 4) == "cali4-e-web"
    assert state.filter["cali-pi-web"] == ["-m set --match-set cali4-t-web src -g cali-allow"]
    assert state.filter["cali-po-web"] == ["-g cali-allow"]
    assert state.filter[ALLOW_CHAIN] == [f"-j MARK --set-xmark {MARK}/{MARK}"]
    assert state.filter["cali-pli-web"] == [CLEAR, "-j cali-pi-web", ALLOWED, "-j DROP"]
    assert state.filter["cali-plo-web"] == [CLEAR, "-j cali-po-web", ALLOWED, "-j DROP"]
    # Endpoints are set members, never rules of their own.
    assert state.filter[FROM_DISPATCH] == [
        "-m set --match-set cali4-e-web src,src -g cali-plo-web", "-j DROP"
    ]
    assert state.filter[TO_DISPATCH] == [
        "-m set --match-set cali4-e-web dst,dst -g cali-pli-web", "-j DROP"
    ]
    assert state.ipsets["cali4-e-web"] == IpSet(
        "hash:net,iface", "inet", frozenset({"10.0.0.1,calie1e1e1e1e1e"})
    )
    assert state.ipsets["cali4-t-web"] == IpSet("hash:ip", "inet", frozenset({"10.0.0.1"}))
    assert sorted(state.filter) == sorted([
        FORWARD_CHAIN, INPUT_CHAIN, ALLOW_CHAIN, FROM_DISPATCH, TO_DISPATCH,
        "cali-pi-web", "cali-po-web", "cali-pli-web", "cali-plo-web",
    ])
    v6 = compiled.v6
    assert v6.filter["cali-pi-web"] == ["-m set --match-set cali6-t-web src -g cali-allow"]
    assert v6.filter[FROM_DISPATCH][0] == "-m set --match-set cali6-e-web src,src -g cali-plo-web"
    assert v6.ipsets["cali6-e-web"].members == {"fd00::1,calie1e1e1e1e1e"}
    assert endpoint_set_member("fd00::1", "calie1e1e1e1e1e") == "fd00::1,calie1e1e1e1e1e"


def test_profiles_in_order_in_the_profile_list_chain():
    endpoint = Endpoint("o" * 64, "calioooooooooo", ["10.0.0.9"], [], ["db", "empty", "web", "db"])
    state = compile_policy([endpoint], PROFILES).v4
    shared = profile_list_chain_name(["db", "empty", "web"], inbound=True)
    assert shared.startswith("cali-pli_")  # several names: hashed
    members = endpoint_set_name(["db", "empty", "web"], 4)
    assert members.startswith("cali4-e_")
    assert state.filter[TO_DISPATCH] == [f"-m set --match-set {members} dst,dst -g {shared}",
                                         "-j DROP"]
    assert state.filter[shared] == [
        CLEAR, "-j cali-pi-db", ALLOWED, "-j cali-pi-empty", ALLOWED, "-j cali-pi-web", ALLOWED,
        "-j DROP",
    ]
    assert state.filter["cali-pi-empty"] == []


def test_endpoints_with_the_same_profiles_share_one_set_and_chain():
    same = [Endpoint(f"{i}" * 64, f"cali{i}same", [f"10.0.0.{i}"], [], ["db", "web"])
            for i in range(1, 4)]
    other = Endpoint("9" * 64, "cali9other", ["10.0.0.9"], [], ["web", "db"])
    state = compile_policy([*same, other], PROFILES).v4
    shared = endpoint_set_name(["db", "web"], 4)
    assert state.ipsets[shared].members == {f"10.0.0.{i},cali{i}same" for i in range(1, 4)}
    # Another order is another list (the first allow wins, so order matters).
    assert state.ipsets[endpoint_set_name(["web", "db"], 4)].members == {"10.0.0.9,cali9other"}
    lists = [name for name in state.filter if name.startswith(("cali-pli", "cali-plo"))]
    assert len(lists) == 4
    assert len(state.filter[FROM_DISPATCH]) == len(state.filter[TO_DISPATCH]) == 3
    fake = Fake(state)
    assert fake.forward(between(same[0], other)) == "ACCEPT"
    assert fake.forward(between(other, same[2], dport=22)) == "DROP"  # db denies 22 first


def test_deny_before_allow_text():
    assert render_profile_chains(DB, 4)["cali-pi-db"] == [
        "-p tcp -m multiport --dports 22 -j DROP",
        "-m set --match-set cali4-t-web src -g cali-allow",
    ]


@pytest.mark.parametrize(
    ("text", "v4", "v6"),
    [
        ("allow", ["-g cali-allow"], ["-g cali-allow"]),
        ("deny from cidr 10.0.0.0/8", ["-s 10.0.0.0/8 -j DROP"], []),
        ("deny to cidr fd00::/8", [], ["-d fd00::/8 -j DROP"]),
        ("allow from not cidr 10.0.0.0/8 to not cidr 10.1.0.0/16",
         ["! -s 10.0.0.0/8 ! -d 10.1.0.0/16 -g cali-allow"], []),
        ("allow from cidr 10.0.0.0/8 not cidr 10.1.0.0/16",
         ["-s 10.0.0.0/8 -m iprange ! --src-range 10.1.0.0-10.1.255.255 -g cali-allow"], []),
        ("allow to cidr fd00::/8 not cidr fd00::/16",
         [], ["-d fd00::/8 -m iprange ! --dst-range fd00::-fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
              " -g cali-allow"]),
        ("allow from tag a not tag b to tag c not tag d",
         ["-m set --match-set cali4-t-a src -m set --match-set cali4-t-c dst "
          "-m set ! --match-set cali4-t-b src -m set ! --match-set cali4-t-d dst -g cali-allow"],
         ["-m set --match-set cali6-t-a src -m set --match-set cali6-t-c dst "
          "-m set ! --match-set cali6-t-b src -m set ! --match-set cali6-t-d dst -g cali-allow"]),
        ("allow tcp from ports 1024:65535 not ports 2000 to ports 80,443 not ports 81",
         ["-p tcp -m multiport --sports 1024:65535 -m multiport --dports 80,443 "
          "-m multiport ! --sports 2000 -m multiport ! --dports 81 -g cali-allow"] * 1,
         ["-p tcp -m multiport --sports 1024:65535 -m multiport --dports 80,443 "
          "-m multiport ! --sports 2000 -m multiport ! --dports 81 -g cali-allow"]),
        ("allow icmp type 8 code 0", ["-p icmp -m icmp --icmp-type 8/0 -g cali-allow"], []),
        ("deny icmp type 3", ["-p icmp -m icmp --icmp-type 3 -j DROP"], []),
        ("allow icmp", ["-p icmp -g cali-allow"], []),
        ("allow icmpv6 type 128", [], ["-p ipv6-icmp -m icmp6 --icmpv6-type 128 -g cali-allow"]),
        ("allow 47 from tag gre", ["-p 47 -m set --match-set cali4-t-gre src -g cali-allow"],
         ["-p 47 -m set --match-set cali6-t-gre src -g cali-allow"]),
    ],
)
def test_rule_text_per_family(text, v4, v6):
    rule = parse_rule(text)
    assert render_rule(rule, 4) == v4
    assert render_rule(rule, 6) == v6


def test_ports_are_split_into_multiport_groups_of_15():
    ports = list(range(1, 21))
    lines = render_rule(Rule("allow", protocol="tcp", dst_ports=ports), 4)
    assert lines == [
        "-p tcp -m multiport --dports " + ",".join(map(str, range(1, 16))) + " -g cali-allow",
        "-p tcp -m multiport --dports 16,17,18,19,20 -g cali-allow",
    ]
    # A range takes two slots: 7 ranges + 1 port fill one group, the next range spills.
    ranges = [f"{n}:{n + 1}" for n in range(100, 116, 2)]
    lines = render_rule(Rule("allow", protocol="udp", src_ports=[1, *ranges]), 4)
    assert [line.split()[5] for line in lines] == [",".join(["1", *ranges[:7]]), ranges[7]]
    # Negated groups all go into the same rule (no group may match).
    lines = render_rule(Rule("deny", protocol="tcp", not_dst_ports=ports), 4)
    assert len(lines) == 1
    assert lines[0].count("-m multiport ! --dports") == 2
    # Positive groups on both sides: every combination.
    lines = render_rule(Rule("allow", protocol="tcp", src_ports=ports, dst_ports=ports), 4)
    assert len(lines) == 4
    for line in lines:
        for group in re.findall(r"--[sd]ports (\S+)", line):
            assert sum(2 if ":" in p else 1 for p in group.split(",")) <= 15


def test_hooks():
    assert world().v4.hooks == [
        Hook("filter", "FORWARD", "-j cali-FORWARD"),
        Hook("filter", "INPUT", "-j cali-INPUT"),
        Hook("nat", "PREROUTING", "-m addrtype --dst-type LOCAL -j cali-PREROUTING"),
        Hook("nat", "OUTPUT", "! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j cali-OUTPUT"),
        Hook("nat", "POSTROUTING", "-j cali-POSTROUTING"),
    ]
    assert world().v6.hooks[3] == Hook(
        "nat", "OUTPUT", "! -d ::1/128 -m addrtype --dst-type LOCAL -j cali-OUTPUT"
    )


def test_other_mark_bit_and_interface_prefix():
    settings = PolicySettings(mark=0x200, iface_prefix="tap")
    endpoint = Endpoint("t" * 64, "tap0123", ["10.0.0.9"], [], ["web"])
    state = compile_policy([endpoint], {"web": WEB}, settings=settings).v4
    assert state.ipsets["cali4-e-web"].members == {"10.0.0.9,tap0123"}
    assert state.filter["cali-pli-web"][0] == "-j MARK --set-xmark 0x0/0x200"
    assert state.filter[ALLOW_CHAIN] == ["-j MARK --set-xmark 0x200/0x200"]
    assert state.filter[FORWARD_CHAIN][0].startswith("-i tap+ ")
    for bad in ({"mark": 0x3}, {"mark": 0}, {"workload_to_host": "reject"},
                {"iface_prefix": "ca li"}):
        with pytest.raises(InvalidRequest):
            PolicySettings(**bad)  # type: ignore[arg-type]


# --- names ---------------------------------------------------------------------------------


def test_readable_names_when_they_fit():
    assert profile_chain_names("web") == ("cali-pi-web", "cali-po-web")
    assert tag_set_name("web", 4) == "cali4-t-web"
    assert tag_set_name("web", 6) == "cali6-t-web"
    assert chain_name("pi", "a" * 20) == "cali-pi-" + "a" * 20
    assert set_name(4, "t", "a" * 23) == "cali4-t-" + "a" * 23


def test_long_names_are_hashed_deterministically_within_kernel_limits():
    long_name = "a" * 128
    inbound, outbound = profile_chain_names(long_name)
    assert inbound == chain_name("pi", long_name)
    assert re.fullmatch(r"cali-pi_[a-z2-7]{16}", inbound)
    assert re.fullmatch(r"cali4-t_[a-z2-7]{16}", tag_set_name(long_name, 4))
    assert chain_name("pi", "a" * 21) != chain_name("pi", "a" * 22)
    # Profile names differing only in case or length stay apart.
    names = {"a" * n for n in range(1, 129)} | {"A" * n for n in range(1, 129)}
    chains = {profile_chain_names(name)[0] for name in names}
    sets = {tag_set_name(name, 6) for name in names}
    assert len(chains) == len(sets) == len(names)
    assert max(map(len, chains)) <= MAX_CHAIN_NAME
    assert max(map(len, sets)) <= MAX_SET_NAME


def test_every_name_in_a_compiled_state_fits():
    rng = random.Random(7)
    profiles = {}
    for _ in range(40):
        name = "".join(rng.choice("abcXYZ019_.-") for _ in range(rng.randint(1, 128)))
        profiles[name] = Profile(name, [name], inbound_rules=[Rule("allow", src_tag=name)])
    endpoints = [
        Endpoint(str(i), f"cali{i:011x}", [f"10.0.{i // 256}.{i % 256}"], [f"fd00::{i:x}"],
                 [list(profiles)[i % 40]])
        for i in range(300)
    ]
    compiled = compile_policy(endpoints, profiles)
    assert compiled.warnings == []
    for state in (compiled.v4, compiled.v6):
        for chains in state.tables.values():
            for name, rules in chains.items():
                assert len(name) <= MAX_CHAIN_NAME and name.startswith("cali-")
                for rule in rules:
                    for target in re.findall(r"-[jg] (cali-\S+)", rule):
                        assert target in state.filter or target in state.nat
                    for ipset in re.findall(r"--match-set (\S+)", rule):
                        assert ipset in state.ipsets
        assert all(len(name) <= MAX_SET_NAME for name in state.ipsets)


# --- fail closed -------------------------------------------------------------------------------


def _in_no_set(state: DesiredState, endpoint: Endpoint) -> bool:
    suffix = f",{endpoint.iface}"
    return not any(
        member.endswith(suffix)
        for ipset in state.ipsets.values() if ipset.type == ENDPOINT_SET_TYPE
        for member in ipset.members
    )


def _cut_off(compiled: CompiledPolicy, endpoint: Endpoint, peer: Endpoint) -> None:
    """Nothing new flows to or from ``endpoint`` (IPv4), and it is in no endpoint set."""
    for state in (compiled.v4, compiled.v6):
        assert _in_no_set(state, endpoint)
    fake = Fake(compiled.v4)
    try:
        address = str(netaddr.IPAddress(str(endpoint.ipv4[0]).split("/")[0], 4))
    except (netaddr.AddrFormatError, TypeError, IndexError, KeyError):
        address = None
    if address is not None:
        assert fake.forward(between(peer, endpoint, dst=address)) == "DROP"
        assert fake.forward(between(endpoint, peer, src=address)) == "DROP"
        assert fake.forward(between(endpoint, OUTSIDE, src=address)) == "DROP"
    assert fake.forward(Packet(src=OUTSIDE, dst="10.0.0.250", iif="eth0",
                               oif=endpoint.iface)) == "DROP"


def test_missing_profile_fails_closed():
    endpoint = Endpoint("x" * 64, "calixxxxxxxxxxx", ["10.0.0.9"], [], ["web", "missing"])
    compiled = compile_policy([W1, endpoint], {"web": WEB})
    assert "profile 'missing' does not exist" in "\n".join(compiled.warnings)
    _cut_off(compiled, endpoint, W1)
    # Its list has no chains and no set; the others are untouched.
    names = profile_list_chain_name(["web", "missing"], inbound=True)
    assert names not in compiled.v4.filter
    assert endpoint_set_name(["web", "missing"], 4) not in compiled.v4.ipsets
    assert Fake(compiled.v4).forward(between(W1, OUTSIDE)) == "ACCEPT"


def test_profile_that_fails_to_render_fails_closed():
    broken = Profile("broken", inbound_rules=[Rule("allow", protocol="icmp", icmp_type=255)])
    endpoint = Endpoint("x" * 64, "calixxxxxxxxxxx", ["10.0.0.9"], [], ["web", "broken"])
    profiles = {"web": WEB, "broken": broken}
    compiled = compile_policy([endpoint, W1], profiles)
    assert "cali-pi-broken" not in compiled.v4.filter
    assert "ICMP type 255" in "\n".join(compiled.warnings)
    _cut_off(compiled, endpoint, W1)
    # A profile stored under another name is not trusted either.
    compiled = compile_policy([W1, D1], {"web": Profile.network_default("other"), "db": DB})
    assert "is stored under the name 'web'" in "\n".join(compiled.warnings)
    _cut_off(compiled, W1, D1)
    # Nor is something that is not a profile at all.
    compiled = compile_policy([W1, D1], {"web": "allow everything", "db": DB})  # type: ignore[dict-item]
    _cut_off(compiled, W1, D1)


def test_an_endpoint_without_profiles_drops_silently():
    bare = Endpoint("b" * 64, "calibbbbbbbbbbb", ["10.0.0.9"], [], [])
    compiled = compile_policy([W1, bare], PROFILES)
    _cut_off(compiled, bare, W1)
    assert compiled.warnings == []  # e.g. a network whose name is not known yet


def test_other_unusable_endpoints_fail_closed():
    bad_address = Endpoint("x" * 64, "calixxxxxxxxxxx", ["10.0.0.300"], [], ["web"])
    wrong_family = Endpoint("y" * 64, "caliyyyyyyyyyyy", ["fd00::1"], [], ["web"])
    twin = Endpoint("z" * 64, W1.iface, ["10.0.0.77"], [], ["web"])
    compiled = compile_policy([W1, twin, bad_address, wrong_family, W2], {"web": WEB})
    for endpoint in (bad_address, wrong_family, W1, twin):
        _cut_off(compiled, endpoint, W2)
    text = "\n".join(compiled.warnings)
    assert f"interface {W1.iface} is used by endpoints" in text and "bad address" in text
    assert "fd00::1 is not an IPv4 address" in text
    # Without the twin, W1 works again.
    compiled = compile_policy([W1, bad_address, W2], {"web": WEB})
    assert Fake(compiled.v4).forward(between(W1, W2)) == "ACCEPT"
    # Unusable interface names are in no set: the dispatch default drops.
    odd = Endpoint("w" * 64, "eth0", ["10.0.0.78"], [], ["web"])
    compiled = compile_policy([odd], {"web": WEB})
    assert "does not start with 'cali'" in compiled.warnings[0]
    assert compiled.v4.filter[FROM_DISPATCH] == ["-j DROP"]
    # ... and its address is in no tag set either (it would be trusted as a peer).
    assert compiled.v4.ipsets.get("cali4-t-web") is None


def test_odd_inputs_never_raise():
    odd = [
        Endpoint("1" * 64, "cali1111111111", [None], [], ["web"]),  # type: ignore[list-item]
        Endpoint("2" * 64, "cali2222222222", 5, [], ["web"]),  # type: ignore[arg-type]
        Endpoint("3" * 64, "cali3333333333", ["10.0.0.3"], [], [["web"]]),  # type: ignore[list-item]
        Endpoint("4" * 64, None, ["10.0.0.4"], [], ["web"]),  # type: ignore[arg-type]
    ]
    compiled = compile_policy([W1, *odd], {"web": WEB, "x": None},  # type: ignore[dict-item]
                              port_mappings=[PortMapping("10.0.0.1", "tcp", "80", 80)])  # type: ignore[arg-type]
    # One per odd endpoint and the mapping; the unused odd profile is nobody's problem.
    assert len(compiled.warnings) == 5
    for endpoint in (odd[0], odd[2]):
        _cut_off(compiled, endpoint, W1)
    assert _in_no_set(compiled.v4, odd[1]) and _in_no_set(compiled.v4, odd[3])
    assert Fake(compiled.v4).forward(between(W1, W1)) == "ACCEPT"


def test_injection_through_names_is_impossible():
    evil = 'x" -j ACCEPT'
    endpoint = Endpoint("e" * 64, "calieeeeeeeeeee", ["10.0.0.9"], [], [evil])
    compiled = compile_policy([endpoint], {evil: Profile(evil)})
    assert "ACCEPT" not in "\n".join(
        rule for name, rules in compiled.v4.filter.items() if name != FORWARD_CHAIN
        and name != INPUT_CHAIN for rule in rules
    )


# --- scale -------------------------------------------------------------------------------------


def _scale_profiles(count: int, rules: int) -> dict[str, Profile]:
    profiles = {}
    for index in range(count):
        inbound = [
            Rule("allow", protocol="tcp", src_tag=f"t{(index + r) % count}", dst_ports=[80 + r])
            for r in range(rules)
        ]
        profiles[f"p{index}"] = Profile(f"p{index}", [f"t{index}"], inbound, [Rule("allow")])
    return profiles


def _scale_endpoints(count: int, profiles_each: int, seed: int = 1) -> list[Endpoint]:
    rng = random.Random(seed)
    return [
        Endpoint(
            f"{i:064x}", f"cali{rng.getrandbits(44):011x}",
            [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"], [f"fd00::{i:x}"],
            [f"p{(i + k) % 50}" for k in range(profiles_each)],
        )
        for i in range(count)
    ]


def test_rule_count_does_not_grow_with_endpoints():
    profiles = _scale_profiles(50, 20)
    base = compile_policy([], profiles).v4.rule_count()  # fixed chains only
    for count in (1000, 2000, 4000):
        state = compile_policy(_scale_endpoints(count, 3), profiles).v4
        profile_rules = sum(
            len(r) for n, r in state.filter.items() if n.startswith(("cali-pi-", "cali-po-"))
        )
        assert profile_rules == 50 * 21  # each profile's rules once, never per endpoint
        list_rules = sum(
            len(r) for n, r in state.filter.items() if n.startswith(("cali-pli", "cali-plo"))
        )
        # 50 distinct profile lists (rotations of 3), each direction: clear, 2 per
        # profile, drop: once per list, never per endpoint.
        assert list_rules == 50 * 2 * 8
        # One dispatch rule per list and direction, plus the drops.
        assert len(state.filter[FROM_DISPATCH]) == len(state.filter[TO_DISPATCH]) == 51
        assert state.rule_count() == base + 50 * 21 + 50 * 2 * 8 + 2 * 50
        # Endpoints are set members: one per address, in the set of their list.
        members = [m for s in state.ipsets.values() if s.type == ENDPOINT_SET_TYPE
                   for m in s.members]
        assert len(members) == count


def test_rule_count_with_many_profiles_per_endpoint_is_a_sum_never_a_product():
    profiles = _scale_profiles(50, 20)
    small = compile_policy(_scale_endpoints(500, 50), profiles).v4.rule_count()
    large = compile_policy(_scale_endpoints(1000, 50), profiles).v4.rule_count()
    # The 50 distinct profile lists (2 x (50 jumps + 50 checks + 2) rules each) are
    # shared: an endpoint adds no rule with 50 profiles as with one.
    base = compile_policy([], profiles).v4.rule_count()
    assert small == large == base + 50 * 21 + 50 * 2 * 102 + 2 * 50


def test_rule_count_grows_by_three_per_published_port():
    profiles = _scale_profiles(50, 2)
    endpoints = _scale_endpoints(1000, 1)
    counts = []
    for published in (0, 10, 100):
        mappings = [PortMapping(e.ipv4[0], "tcp", 20000 + i, 80)
                    for i, e in enumerate(endpoints[:published])]
        counts.append(compile_policy(endpoints, profiles, port_mappings=mappings).v4.rule_count())
    # A DNAT rule in PREROUTING and in OUTPUT, and the forward accept.
    assert counts[1] - counts[0] == 30 and counts[2] - counts[0] == 300


def test_dispatch_reaches_every_endpoint_through_its_profile_list():
    endpoints = _scale_endpoints(2000, 1)
    state = compile_policy(endpoints, _scale_profiles(50, 1)).v4
    fake = Fake(state)
    for endpoint in endpoints[::40]:
        fake.forward(Packet(src=OUTSIDE, dst=endpoint.ipv4[0], iif="eth0", oif=endpoint.iface))
        inbound = profile_list_chain_name(endpoint.profiles, inbound=True)
        assert inbound in fake.visited
        # A spoofed source from the same interface is caught by the same rules.
        assert fake.forward(Packet(src="10.99.0.1", dst=OUTSIDE, iif=endpoint.iface,
                                   oif="eth0")) == "DROP"
    # A new connection checks one set per profile list in use, however many endpoints.
    assert len(state.filter[TO_DISPATCH]) == 51


def test_compiling_5000_endpoints_with_50_profiles_is_fast():
    profiles = _scale_profiles(50, 10)
    endpoints = _scale_endpoints(5000, 2)
    started = time.perf_counter()
    compiled = compile_policy(endpoints, profiles, [Pool("10.0.0.0/8", nat_outgoing=True)])
    elapsed = time.perf_counter() - started
    assert compiled.warnings == []
    assert elapsed < 1.5, f"compile took {elapsed:.2f}s"


def test_adding_one_endpoint_changes_only_set_members():
    profiles = _scale_profiles(50, 10)
    endpoints = _scale_endpoints(5000, 2)
    before = compile_policy(endpoints, profiles)
    newcomer = Endpoint("n" * 64, "cali0newcomer0", ["10.200.0.1"], ["fd00::c8:1"], ["p3", "p4"])
    after = compile_policy([*endpoints, newcomer], profiles)
    for version in (4, 6):
        changes = diff(before.family(version), after.family(version))
        assert changes.changed_chains == {"filter": [], "nat": []}
        assert changes.deleted_chains == {"filter": [], "nat": []}
        assert changes.deleted_sets == [] and not changes.hooks_changed
        assert changes.changed_sets == sorted([
            endpoint_set_name(["p3", "p4"], version),
            tag_set_name("t3", version), tag_set_name("t4", version),
        ])
        old, new = before.family(version), after.family(version)
        text = render_ipset_restore({n: new.ipsets[n] for n in changes.changed_sets},
                                    old.ipsets)
        address = "10.200.0.1" if version == 4 else "fd00::c8:1"
        assert sorted(text.splitlines()) == sorted([
            f"add {endpoint_set_name(['p3', 'p4'], version)} {address},cali0newcomer0 -exist",
            f"add {tag_set_name('t3', version)} {address} -exist",
            f"add {tag_set_name('t4', version)} {address} -exist",
        ])


# --- the incremental model ------------------------------------------------------------------


@dataclass
class _Inputs:
    """What a PolicyModel was told, to compile the same thing from scratch."""

    local: dict[str, Endpoint] = field(default_factory=dict)
    remote: dict[str, Endpoint] = field(default_factory=dict)
    profiles: dict[str, Profile] = field(default_factory=dict)
    pools: list[Pool] = field(default_factory=list)
    mappings: dict[str, list[PortMapping]] = field(default_factory=dict)
    settings: PolicySettings = field(default_factory=PolicySettings)

    def compile(self) -> CompiledPolicy:
        return compile_policy(
            self.local.values(), self.profiles, self.pools,
            [m for ms in self.mappings.values() for m in ms], self.settings,
            self.remote.values(),
        )


def _random_profile(rng: random.Random, name: str, tags: list[str]) -> Profile:
    inbound = []
    for _ in range(rng.randint(0, 3)):
        kind = rng.random()
        if kind < 0.4:
            inbound.append(Rule("allow", src_tag=rng.choice(tags)))
        elif kind < 0.6:
            inbound.append(Rule("deny", protocol="tcp", dst_ports=[rng.randint(1, 100)]))
        elif kind < 0.8:
            inbound.append(Rule("allow", not_src_tag=rng.choice(tags), protocol="udp"))
        else:
            inbound.append(Rule("allow", protocol="icmp", icmp_type=255))  # cannot render
    outbound = [Rule("allow", dst_tag=rng.choice(tags))] if rng.random() < 0.3 else [Rule("allow")]
    own = rng.sample(tags, rng.randint(0, 2))
    return Profile(name, own, inbound, outbound)


def _random_endpoint(rng: random.Random, ident: str, names: list[str]) -> Endpoint:
    index = rng.randint(1, 40)
    ipv4 = [f"10.0.0.{index}"]
    if rng.random() < 0.1:
        ipv4 = ["10.0.0.300"]
    elif rng.random() < 0.2:
        ipv4.append(f"10.0.1.{index}")
    ipv6 = [f"fd00::{index:x}"] if rng.random() < 0.7 else []
    iface = rng.choice([f"cali{rng.randint(1, 25):02d}", "eth9"] if rng.random() < 0.05
                       else [f"cali{rng.randint(1, 25):02d}"])
    profiles = rng.sample(names, rng.randint(0, 2))
    return Endpoint(ident, iface, ipv4, ipv6, profiles)


def test_the_model_equals_a_fresh_compile_through_every_kind_of_change():
    rng = random.Random(3)
    names = [f"p{i}" for i in range(6)]
    tags = [f"t{i}" for i in range(5)]
    model = PolicyModel()
    inputs = _Inputs()
    seen: set[str] = set()
    for step in range(600):
        op = rng.random()
        if op < 0.35:
            ident = f"l{rng.randint(1, 30)}"
            endpoint = _random_endpoint(rng, ident, names)
            mappings = None
            if rng.random() < 0.3:
                mappings = [PortMapping(str(endpoint.ipv4[0]), rng.choice(["tcp", "udp", "gre"]),
                                        rng.randint(8000, 8004), 80)]
                inputs.mappings[ident] = mappings
            model.set_endpoint(endpoint, local=True, port_mappings=mappings)
            inputs.local[ident] = endpoint
        elif op < 0.45:
            ident = f"r{rng.randint(1, 20)}"
            endpoint = _random_endpoint(rng, ident, names)
            model.set_endpoint(endpoint, local=False)
            inputs.remote[ident] = endpoint
        elif op < 0.6:
            ident = rng.choice([f"l{rng.randint(1, 30)}", f"r{rng.randint(1, 20)}"])
            model.remove_endpoint(ident)
            inputs.local.pop(ident, None)
            inputs.remote.pop(ident, None)
            inputs.mappings.pop(ident, None)
        elif op < 0.8:
            name = rng.choice(names)
            profile = _random_profile(rng, name, tags)
            model.set_profile(profile)
            inputs.profiles[name] = profile
        elif op < 0.88:
            name = rng.choice(names)
            model.remove_profile(name)
            inputs.profiles.pop(name, None)
        elif op < 0.93:
            pools = rng.sample([Pool("10.0.0.0/24", True), Pool("10.0.1.0/24"),
                                Pool("fd00::/64", True), Pool("10.0.0.0/33")], rng.randint(0, 3))
            model.set_pools(pools)
            inputs.pools = pools
        elif op < 0.97:
            mappings = [PortMapping(f"10.0.0.{rng.randint(1, 40)}", "tcp", rng.randint(8000, 8004),
                                    443)]
            model.set_port_mappings(mappings)
            inputs.mappings[""] = mappings
        else:
            settings = PolicySettings(workload_to_host=rng.choice(["drop", "accept", "return"]),
                                      mark=rng.choice([0x1000000, 0x400]))
            model.set_settings(settings)
            inputs.settings = settings
        got = model.policy()
        want = inputs.compile()
        assert got.v4 == want.v4, f"step {step}"
        assert got.v6 == want.v6, f"step {step}"
        text = "\n".join(got.warnings)
        for case, reached in (
            ("conflict", "is used by endpoints" in text),
            ("missing", "does not exist" in text),
            ("broken", "ICMP type 255" in text),
            ("bad address", "bad address" in text),
            ("published", bool(got.v4.nat[PREROUTING_CHAIN])),
            ("lists", len(got.v4.filter[FROM_DISPATCH]) > 3),
            ("tags", any(s.members for n, s in got.v6.ipsets.items() if "-t-" in n)),
            ("remote tags", any(m.startswith("10.0.0.") and m in s.members
                                for n, s in got.v4.ipsets.items() if "-t-" in n
                                for m in (str(e.ipv4[0]) for e in inputs.remote.values()))),
            ("mark", "0x400" in got.v4.filter[ALLOW_CHAIN][0]),
        ):
            if reached:
                seen.add(case)
    # The walk reached the interesting cases.
    assert seen == {"conflict", "missing", "broken", "bad address", "published", "lists",
                    "tags", "remote tags", "mark"}


def test_the_model_hands_out_unchanged_chains_and_sets_as_the_same_objects():
    profiles = _scale_profiles(50, 10)
    model = PolicyModel()
    for profile in profiles.values():
        model.set_profile(profile)
    for endpoint in _scale_endpoints(1000, 2):
        model.set_endpoint(endpoint)
    before = model.policy()
    model.set_endpoint(Endpoint("n" * 64, "cali0newcomer0", ["10.200.0.1"], [], ["p3", "p4"]))
    after = model.policy()
    changed = endpoint_set_name(["p3", "p4"], 4)
    for name, ipset in after.v4.ipsets.items():
        if name in (changed, tag_set_name("t3", 4), tag_set_name("t4", 4)):
            assert ipset is not before.v4.ipsets[name]
        else:
            assert ipset is before.v4.ipsets[name]
    for name, rules in after.v4.filter.items():
        if name not in (FROM_DISPATCH, TO_DISPATCH):  # rebuilt (small), equal
            assert rules is before.v4.filter[name]
        assert rules == before.v4.filter[name]


def test_a_profile_is_rendered_when_it_is_set():
    model = PolicyModel()
    web = Profile("web", ["web"], [parse_rule("allow from tag web")], [parse_rule("allow")])
    model.set_profile(web)
    model.set_endpoint(W1)
    web.inbound_rules.append(parse_rule("deny tcp to ports 22"))  # not set again: no effect
    assert model.policy().v4.filter["cali-pi-web"] == [
        "-m set --match-set cali4-t-web src -g cali-allow"
    ]
    model.set_profile(web)
    assert model.policy().v4.filter["cali-pi-web"][-1] == "-p tcp -m multiport --dports 22 -j DROP"


def test_profiles_coming_and_going_fail_endpoints_closed_and_back():
    model = PolicyModel()
    model.set_profile(WEB)
    model.set_endpoint(W1)
    model.set_endpoint(W2)
    assert Fake(model.policy().v4).forward(between(W1, W2)) == "ACCEPT"
    model.remove_profile("web")
    policy = model.policy()
    assert "profile 'web' does not exist" in "\n".join(policy.warnings)
    assert "2 local endpoint(s) with profiles web" in "\n".join(policy.warnings)
    assert Fake(policy.v4).forward(between(W1, W2)) == "DROP"
    assert "cali4-e-web" not in policy.v4.ipsets and "cali-pi-web" not in policy.v4.filter
    model.set_invalid_profile("web", "rules.inbound[0]: bad")
    assert "profile 'web' cannot be read: rules.inbound[0]: bad" in model.policy().warnings[0]
    model.set_profile(WEB)
    policy = model.policy()
    assert policy.warnings == [] and Fake(policy.v4).forward(between(W1, W2)) == "ACCEPT"
    assert policy.v4.ipsets["cali4-e-web"].members == {
        f"10.0.0.1,{W1.iface}", f"10.0.0.2,{W2.iface}"}


def test_a_tag_change_moves_addresses_between_tag_sets():
    model = PolicyModel()
    reader = Profile("reader", ["reader"], [parse_rule("allow from tag a"),
                                            parse_rule("allow from tag b")])
    model.set_profile(reader)
    model.set_profile(Profile("carrier", ["a"]))
    model.set_endpoint(W1)
    model.set_endpoint(Endpoint("c" * 64, "calicccccccccc", ["10.0.0.50"], [], ["carrier"]))
    model.set_endpoint(Endpoint("r" * 64, "", ["10.9.0.1"], [], ["carrier"]), local=False)
    model.set_endpoint(Endpoint("d" * 64, "calidddddddddd", ["10.0.0.60"], [], ["reader"]))
    sets = model.policy().v4.ipsets
    assert sets["cali4-t-a"].members == {"10.0.0.50", "10.9.0.1"}
    assert sets["cali4-t-b"].members == frozenset()
    model.set_profile(Profile("carrier", ["b"]))
    sets = model.policy().v4.ipsets
    assert sets["cali4-t-a"].members == frozenset()
    assert sets["cali4-t-b"].members == {"10.0.0.50", "10.9.0.1"}


def test_one_more_endpoint_costs_the_same_at_any_size():
    profiles = _scale_profiles(50, 10)

    def cost(size: int) -> float:
        model = PolicyModel()
        for profile in profiles.values():
            model.set_profile(profile)
        model.set_pools([Pool("10.0.0.0/8", nat_outgoing=True)])
        for endpoint in _scale_endpoints(size, 2):
            model.set_endpoint(endpoint)
        model.set_port_mappings([PortMapping(f"10.0.0.{i}", "tcp", 20000 + i, 80)
                                 for i in range(1, 50)])
        model.policy()
        times = []
        for i in range(15):
            endpoint = Endpoint(f"new{i}", f"calinew{i:07d}", [f"10.201.0.{i}"],
                                [f"fd00::c9:{i}"], [f"p{i}", f"p{i + 1}"])
            started = time.perf_counter()
            model.set_endpoint(endpoint)
            model.policy()
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    small, large = cost(200), cost(5000)
    assert large < 0.005, f"{large * 1000:.2f} ms per endpoint at 5,000"
    assert large < max(3 * small, 0.001), (small, large)


# --- tags -------------------------------------------------------------------------------------


def test_tag_sets_hold_every_endpoint_with_the_tag_on_any_host():
    remote = [
        Endpoint("r1", "", ["10.9.0.1"], ["fd09::1"], ["web"]),
        Endpoint("r2", "", ["10.9.0.2"], [], ["db"]),
        Endpoint("r3", "", ["not-an-address"], [], ["web"]),
    ]
    compiled = world(remote_endpoints=remote)
    assert compiled.v4.ipsets["cali4-t-web"].members == {
        "10.0.0.1", "10.0.0.2", "10.0.0.4", "10.9.0.1"
    }
    assert compiled.v6.ipsets["cali6-t-web"].members == {"fd00::1", "fd00::2", "fd09::1"}
    # Only tags that some rule in use refers to get a set ("db" is never matched on).
    assert "cali4-t-db" not in compiled.v4.ipsets
    assert "remote endpoint r3" in "\n".join(compiled.warnings)
    fake = Fake(compiled.v4)
    assert fake.forward(between("10.9.0.1", W1, iif="eth0")) == "ACCEPT"
    assert fake.forward(between("10.9.0.2", W1, iif="eth0")) == "DROP"


def test_unused_profiles_get_no_chains():
    compiled = compile_policy([W1], PROFILES)
    assert "cali-pi-db" not in compiled.v4.filter
    assert "cali-pi-web" in compiled.v4.filter


# --- restore texts and diffs -------------------------------------------------------------------


def test_render_ipset_restore_full_and_delta():
    sets = {"cali4-t-web": IpSet("hash:ip", "inet", frozenset({"10.0.0.2", "10.0.0.1"}))}
    assert render_ipset_restore(sets) == (
        "create cali4-t-web hash:ip family inet maxelem 1048576 -exist\n"
        "create cali4-tmp-ip hash:ip family inet maxelem 1048576 -exist\n"
        "flush cali4-tmp-ip\n"
        "add cali4-tmp-ip 10.0.0.1\n"
        "add cali4-tmp-ip 10.0.0.2\n"
        "swap cali4-tmp-ip cali4-t-web\n"
        "destroy cali4-tmp-ip\n"
    )
    after = {"cali4-t-web": IpSet("hash:ip", "inet", frozenset({"10.0.0.2", "10.0.0.3"}))}
    assert render_ipset_restore(after, previous=sets) == (
        "del cali4-t-web 10.0.0.1 -exist\n"
        "add cali4-t-web 10.0.0.3 -exist\n"
    )
    pools = {"cali6-p-all": IpSet("hash:net", "inet6", frozenset({"fd00::/64"}))}
    assert "create cali6-tmp-net hash:net family inet6" in render_ipset_restore(pools)
    endpoints = {"cali6-e-web": IpSet(ENDPOINT_SET_TYPE, "inet6",
                                      frozenset({"fd00::1,cali0123"}))}
    assert render_ipset_restore(endpoints).splitlines()[1:4] == [
        "create cali6-tmp-net-iface hash:net,iface family inet6 maxelem 1048576 -exist",
        "flush cali6-tmp-net-iface",
        "add cali6-tmp-net-iface fd00::1,cali0123",
    ]
    assert render_ipset_destroy(["cali6-t-x", "cali4-t-x"]) == (
        "destroy cali4-t-x\ndestroy cali6-t-x\n"
    )
    with pytest.raises(ValueError, match="not one of ours"):
        render_ipset_restore({"docker-set": IpSet("hash:ip", "inet")})
    with pytest.raises(ValueError, match="not one of ours"):
        render_ipset_destroy(["docker-set"])


def test_diff_against_nothing_rewrites_everything():
    state = world().v4
    changes = diff(None, state)
    assert changes.changed_chains["filter"] == sorted(state.filter)
    assert changes.changed_chains["nat"] == sorted(state.nat)
    assert changes.changed_sets == sorted(state.ipsets)
    assert changes.deleted_chains == {"filter": [], "nat": []}
    assert changes.hooks_changed and not changes.empty


def test_diff_of_equal_states_is_empty():
    assert diff(world().v4, world().v4).empty


def test_diff_when_an_endpoint_and_its_profile_go_away():
    before = world().v4
    after = world(endpoints=[W1, W2, X1]).v4  # D1 (profile db) is gone
    changes = diff(before, after)
    gone = sorted(["cali-pi-db", "cali-po-db", "cali-pli-db", "cali-plo-db"])
    assert changes.deleted_chains["filter"] == gone
    assert changes.changed_chains["filter"] == [FROM_DISPATCH, TO_DISPATCH]
    assert changes.changed_sets == [] and changes.deleted_sets == ["cali4-e-db"]
    assert render_ipset_destroy(changes.deleted_sets) == "destroy cali4-e-db\n"
    # One of several endpoints of a list goes: only a set member.
    changes = diff(before, world(endpoints=[W1, D1, X1]).v4)
    assert changes.changed_chains == {"filter": [], "nat": []}
    assert changes.changed_sets == ["cali4-e-web", "cali4-t-web"]


def test_diff_when_a_profile_changes():
    changed = Profile("web", ["web"], inbound_rules=[parse_rule("allow tcp from tag web")],
                      outbound_rules=[parse_rule("allow")])
    before = world().v4
    after = world(profiles={**PROFILES, "web": changed}).v4
    changes = diff(before, after)
    # Only the profile chain is rewritten; the endpoints only jump to it.
    assert changes.changed_chains == {"filter": ["cali-pi-web"], "nat": []}


def test_diff_when_a_tag_goes_away():
    before = world().v4
    quiet = Profile("web", ["web"], outbound_rules=[Rule("allow")])
    after = world(profiles={**PROFILES, "web": quiet, "db": Profile("db", ["db"])}).v4
    changes = diff(before, after)
    assert changes.deleted_sets == ["cali4-t-web"]
    assert render_ipset_destroy(changes.deleted_sets) == "destroy cali4-t-web\n"
