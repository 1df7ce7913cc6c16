"""The pure compiler: rule text, names, fail-closed, linearity, diffs, and behaviour.

Behaviour is checked with a small iptables evaluator (``Fake``) that runs packets
through the compiled chains the way netfilter would (jump, goto, RETURN, marks,
ipsets, multiport, conntrack state), so the tests assert what happens to traffic,
not only what the text looks like.
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
    DISPATCH_LEAF,
    FORWARD_CHAIN,
    FROM_DISPATCH,
    INPUT_CHAIN,
    MAX_CHAIN_NAME,
    MAX_SET_NAME,
    OUTPUT_CHAIN,
    POSTROUTING_CHAIN,
    PREROUTING_CHAIN,
    TO_DISPATCH,
    CompileCache,
    CompiledPolicy,
    DesiredState,
    Endpoint,
    Hook,
    IpSet,
    PolicySettings,
    Pool,
    PortMapping,
    chain_name,
    compile_policy,
    diff,
    endpoint_chain_names,
    fail_closed_chains,
    plan_restore,
    profile_chain_names,
    profile_list_chain_name,
    render_endpoint_chains,
    render_ipset_destroy,
    render_ipset_restore,
    render_profile_chains,
    render_restore,
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
            address = packet.src if args[1] == "src" else packet.dst
            if ipset.type == "hash:ip":
                return str(netaddr.IPAddress(address)) in ipset.members
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
    tw, _ = endpoint_chain_names(W1.iface)
    assert compiled.v6.filter[tw][0] == (
        "-d fd00::1/128 -p udp -m udp --dport 53 -m conntrack --ctstate DNAT "
        "--ctorigdstport 5353 -j ACCEPT"
    )
    assert compiled.warnings == []


def test_published_port_on_one_host_address():
    compiled = world(port_mappings=[PortMapping("10.0.0.1", "tcp", 8080, 80, "172.16.0.1")])
    assert compiled.v4.nat[PREROUTING_CHAIN] == [
        "-d 172.16.0.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.1:80"
    ]
    fake = Fake(compiled.v4)
    assert fake.nat(PREROUTING_CHAIN, Packet(src=OUTSIDE, dst="172.16.0.2", dport=8080)) \
        == "RETURN"


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
    tw, fw = endpoint_chain_names(W1.iface)
    assert (tw, fw) == ("cali-tw-e1e1e1e1e1e", "cali-fw-e1e1e1e1e1e")
    state = compiled.v4
    assert state.filter["cali-pi-web"] == ["-m set --match-set cali4-t-web src -g cali-allow"]
    assert state.filter["cali-po-web"] == ["-g cali-allow"]
    assert state.filter[ALLOW_CHAIN] == [f"-j MARK --set-xmark {MARK}/{MARK}"]
    assert state.filter[tw] == ["-g cali-pli-web"]
    assert state.filter[fw] == ["! -s 10.0.0.1/32 -j DROP", "-g cali-plo-web"]
    assert state.filter["cali-pli-web"] == [CLEAR, "-j cali-pi-web", ALLOWED, "-j DROP"]
    assert state.filter["cali-plo-web"] == [CLEAR, "-j cali-po-web", ALLOWED, "-j DROP"]
    assert state.filter[TO_DISPATCH] == [f"-o {W1.iface} -g {tw}", "-j DROP"]
    assert state.filter[FROM_DISPATCH] == [f"-i {W1.iface} -g {fw}", "-j DROP"]
    assert state.ipsets["cali4-t-web"] == IpSet("hash:ip", "inet", frozenset({"10.0.0.1"}))
    assert compiled.v6.filter["cali-pi-web"] == [
        "-m set --match-set cali6-t-web src -g cali-allow"
    ]
    assert compiled.v6.filter[fw][0] == "! -s fd00::1/128 -j DROP"


def test_profiles_in_order_in_the_endpoint_chain():
    endpoint = Endpoint("o" * 64, "calioooooooooo", ["10.0.0.9"], [], ["db", "empty", "web", "db"])
    state = compile_policy([endpoint], PROFILES).v4
    tw, _ = endpoint_chain_names(endpoint.iface)
    shared = profile_list_chain_name(["db", "empty", "web"], inbound=True)
    assert shared.startswith("cali-pli_")  # several names: hashed
    assert state.filter[tw] == [f"-g {shared}"]
    assert state.filter[shared] == [
        CLEAR, "-j cali-pi-db", ALLOWED, "-j cali-pi-empty", ALLOWED, "-j cali-pi-web", ALLOWED,
        "-j DROP",
    ]
    assert state.filter["cali-pi-empty"] == []


def test_endpoints_with_the_same_profiles_share_one_profile_list_chain():
    same = [Endpoint(f"{i}" * 64, f"cali{i}same", [f"10.0.0.{i}"], [], ["db", "web"])
            for i in range(1, 4)]
    other = Endpoint("9" * 64, "cali9other", ["10.0.0.9"], [], ["web", "db"])
    state = compile_policy([*same, other], PROFILES).v4
    inbound = profile_list_chain_name(["db", "web"], inbound=True)
    outbound = profile_list_chain_name(["db", "web"], inbound=False)
    for endpoint in same:
        tw, fw = endpoint_chain_names(endpoint.iface)
        assert state.filter[tw] == [f"-g {inbound}"]
        assert state.filter[fw][-1] == f"-g {outbound}"
    # Another order is another list (the first allow wins, so order matters).
    tw, _ = endpoint_chain_names(other.iface)
    assert state.filter[tw] == [f"-g {profile_list_chain_name(['web', 'db'], inbound=True)}"]
    lists = [name for name in state.filter if name.startswith(("cali-pli", "cali-plo"))]
    assert len(lists) == 4

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
    assert state.filter["cali-tw-0123"] == ["-g cali-pli-web"]
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


def _only_drops(chains: dict[str, list[str]]) -> bool:
    return all(rule.endswith("-j DROP") for rules in chains.values() for rule in rules) and all(
        rules for rules in chains.values()
    )


def test_missing_profile_fails_closed():
    endpoint = Endpoint("x" * 64, "calixxxxxxxxxxx", ["10.0.0.9"], [], ["web", "missing"])
    chains = render_endpoint_chains(endpoint, {"web": WEB})
    assert chains == fail_closed_chains(endpoint)
    assert set(chains) == set(endpoint_chain_names(endpoint.iface))
    assert _only_drops(chains)
    compiled = compile_policy([W1, endpoint], {"web": WEB})
    assert "profile 'missing' does not exist" in "\n".join(compiled.warnings)
    fake = Fake(compiled.v4)
    assert fake.forward(between(W1, endpoint)) == "DROP"
    assert fake.forward(between(endpoint, W1)) == "DROP"


def test_profile_that_fails_to_render_fails_closed():
    broken = Profile("broken", inbound_rules=[Rule("allow", protocol="icmp", icmp_type=255)])
    endpoint = Endpoint("x" * 64, "calixxxxxxxxxxx", ["10.0.0.9"], [], ["web", "broken"])
    profiles = {"web": WEB, "broken": broken}
    for version in (4, 6):
        chains = render_endpoint_chains(endpoint, profiles, version)
        assert _only_drops(chains) and "ACCEPT" not in str(chains)
    compiled = compile_policy([endpoint, W1], profiles)
    assert "cali-pi-broken" not in compiled.v4.filter
    assert "ICMP type 255" in "\n".join(compiled.warnings)
    # A profile stored under another name is not trusted either.
    chains = render_endpoint_chains(W1, {"web": Profile.network_default("other")})
    assert _only_drops(chains)


def test_other_unusable_endpoints_fail_closed():
    bad_address = Endpoint("x" * 64, "calixxxxxxxxxxx", ["10.0.0.300"], [], ["web"])
    wrong_family = Endpoint("y" * 64, "caliyyyyyyyyyyy", ["fd00::1"], [], ["web"])
    assert _only_drops(render_endpoint_chains(bad_address, {"web": WEB}))
    assert _only_drops(render_endpoint_chains(wrong_family, {"web": WEB}, 6))
    twin = Endpoint("z" * 64, W1.iface, ["10.0.0.77"], [], ["web"])
    compiled = compile_policy([W1, twin, bad_address], {"web": WEB})
    tw, fw = endpoint_chain_names(W1.iface)
    assert _only_drops({tw: compiled.v4.filter[tw], fw: compiled.v4.filter[fw]})
    text = "\n".join(compiled.warnings)
    assert "is used by endpoints" in text and "bad address" in text
    # Unusable interface names get no chain at all: the dispatch default drops.
    odd = Endpoint("w" * 64, "eth0", ["10.0.0.78"], [], ["web"])
    compiled = compile_policy([odd], {"web": WEB})
    assert "does not start with 'cali'" in compiled.warnings[0]
    assert compiled.v4.filter[FROM_DISPATCH] == ["-j DROP"]


def test_render_endpoint_chains_never_raises():
    class Exploding(dict):
        def get(self, key, default=None):
            raise RuntimeError("boom")

    chains = render_endpoint_chains(W1, Exploding())
    assert chains == fail_closed_chains(W1)


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


def test_rule_count_is_linear_in_endpoints_plus_rules():
    profiles = _scale_profiles(50, 20)
    counts = {}
    for count in (1000, 2000, 4000):
        state = compile_policy(_scale_endpoints(count, 3), profiles).v4
        counts[count] = state.rule_count()
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
    per_endpoint_low = (counts[2000] - counts[1000]) / 1000
    per_endpoint_high = (counts[4000] - counts[2000]) / 2000
    # Each endpoint adds its two chains (3 rules: the goto to its profile list each,
    # anti-spoof) and two to three dispatch rules, whatever the number of endpoints.
    assert 5 <= per_endpoint_low <= 7 and 5 <= per_endpoint_high <= 7
    assert abs(per_endpoint_high - per_endpoint_low) < 1.5


def test_50_profiles_per_endpoint_stay_linear():
    profiles = _scale_profiles(50, 20)
    small = compile_policy(_scale_endpoints(500, 50), profiles).v4.rule_count()
    large = compile_policy(_scale_endpoints(1000, 50), profiles).v4.rule_count()
    # The 50 distinct profile lists (2 x (50 jumps + 50 checks + 2) rules each) are
    # shared: an endpoint adds the same handful of rules with 50 profiles as with one.
    assert 5 <= (large - small) / 500 <= 7
    fixed = 50 * 21 + 50 * 2 * 102
    assert large < fixed + 1000 * 7 + 100


def test_dispatch_reaches_every_endpoint_through_a_shallow_tree():
    endpoints = _scale_endpoints(5000, 1)
    state = compile_policy(endpoints, _scale_profiles(50, 1)).v4
    fake = Fake(state)
    longest = 0
    for endpoint in endpoints[::50]:
        packet = Packet(src=OUTSIDE, dst=endpoint.ipv4[0], iif="eth0", oif=endpoint.iface)
        fake.forward(packet)
        tw, _ = endpoint_chain_names(endpoint.iface)
        assert tw in fake.visited
        walked = sum(len(state.filter[c]) for c in fake.visited if c.startswith("cali-twd-")
                     or c == TO_DISPATCH)
        longest = max(longest, walked)
    # A new connection checks a few dozen dispatch rules, not thousands: hex interface
    # names branch 16 ways per level, and a leaf holds at most DISPATCH_LEAF rules.
    assert longest <= 3 * (DISPATCH_LEAF + 1)
    dispatch = [n for n in state.filter if n.startswith(("cali-twd-", "cali-fwd-"))]
    assert all(len(state.filter[n]) <= DISPATCH_LEAF + 1 for n in dispatch)
    assert len(dispatch) < 5000 / 8


def test_compiling_5000_endpoints_with_50_profiles_is_fast():
    profiles = _scale_profiles(50, 10)
    endpoints = _scale_endpoints(5000, 2)
    started = time.perf_counter()
    compiled = compile_policy(endpoints, profiles, [Pool("10.0.0.0/8", nat_outgoing=True)])
    elapsed = time.perf_counter() - started
    assert compiled.warnings == []
    assert elapsed < 1.5, f"compile took {elapsed:.2f}s"


def test_adding_one_endpoint_changes_only_a_few_chains_and_sets():
    profiles = _scale_profiles(50, 10)
    endpoints = _scale_endpoints(5000, 2)
    before = compile_policy(endpoints, profiles)
    newcomer = Endpoint("n" * 64, "cali0newcomer0", ["10.200.0.1"], ["fd00::c8:1"], ["p3", "p4"])
    after = compile_policy([*endpoints, newcomer], profiles)
    for version in (4, 6):
        changes = diff(before.family(version), after.family(version))
        changed = changes.changed_chains["filter"]
        tw, fw = endpoint_chain_names(newcomer.iface)
        assert tw in changed and fw in changed
        assert len(changed) <= 8, changed
        assert changes.changed_chains["nat"] == []
        assert changes.deleted_chains == {"filter": [], "nat": []}
        assert changes.changed_sets == sorted(tag_set_name(t, version) for t in ("t3", "t4"))
        plan = plan_restore(before.family(version), after.family(version))
        assert plan.ipsets.count("\n") == 2  # two "add" lines, no set rewritten
        assert len(plan.tables["filter"]) < 5000



# --- the compile cache ---------------------------------------------------------------------


def _compile_both(cache: CompileCache, **kwargs: object) -> CompiledPolicy:
    """Compile with the cache and without; the two must be equal."""
    args: dict[str, object] = {
        "endpoints": [W1, W2, D1, X1], "profiles": PROFILES,
        "pools": [Pool("10.0.0.0/16", nat_outgoing=True)],
    }
    args.update(kwargs)
    cached = compile_policy(**args, cache=cache)  # type: ignore[arg-type]
    fresh = compile_policy(**args)  # type: ignore[arg-type]
    assert cached.v4 == fresh.v4 and cached.v6 == fresh.v6
    return cached


def test_a_cached_compile_equals_a_fresh_one_through_every_kind_of_change():
    cache = CompileCache()
    web = Profile("web", ["web"], [parse_rule("allow from tag web")], [parse_rule("allow")])
    profiles = {**PROFILES, "web": web}
    _compile_both(cache, profiles=profiles)
    newcomer = Endpoint("n" * 64, "calinnnnnnnnnnn", ["10.0.0.9"], ["fd00::9"], ["db", "web"])
    _compile_both(cache, profiles=profiles, endpoints=[W1, W2, D1, X1, newcomer])
    _compile_both(cache, profiles=profiles, endpoints=[W1, D1, newcomer])
    # A profile changed in place (same object) is noticed.
    web.inbound_rules.append(parse_rule("deny tcp to ports 22"))
    state = _compile_both(cache, profiles=profiles).v4
    assert state.filter["cali-pi-web"][-1] == "-p tcp -m multiport --dports 22 -j DROP"
    web.tags.append("www")
    _compile_both(cache, profiles=profiles)
    # A profile that goes away or stops rendering fails its endpoints closed.
    unusable = Profile("db", ["db"], [Rule("allow", protocol="tcp", dst_ports=[])])
    state = _compile_both(cache, profiles={**profiles, "db": unusable}).v4
    tw, _ = endpoint_chain_names(D1.iface)
    assert state.filter[tw] == fail_closed_chains(D1)[tw]
    _compile_both(cache, profiles={"web": web})
    _compile_both(cache, profiles=profiles)
    # Settings, port mappings, remote endpoints, pools, a duplicate interface.
    _compile_both(cache, profiles=profiles, settings=PolicySettings(mark=0x400))
    _compile_both(cache, profiles=profiles,
                  settings=PolicySettings(workload_to_host="return", mark=0x400))
    _compile_both(cache, profiles=profiles,
                  port_mappings=[PortMapping("10.0.0.1", "tcp", 8080, 80)])
    _compile_both(cache, profiles=profiles,
                  remote_endpoints=[Endpoint("r" * 64, "", ["10.9.0.1"], [], ["web"])])
    _compile_both(cache, profiles=profiles, pools=[])
    twin = Endpoint("t" * 64, W1.iface, ["10.0.0.8"], [], ["web"])
    _compile_both(cache, profiles=profiles, endpoints=[W1, W2, twin])
    _compile_both(cache, profiles=profiles, endpoints=[W1, W2])
    # Odd inputs (lists inside endpoints, bad addresses) are handled the same way.
    odd = Endpoint("o" * 64, "calioooooooooo", ["10.0.0.300"], [], ["web"])
    _compile_both(cache, profiles=profiles, endpoints=[W1, odd])


def test_the_cache_keeps_only_what_the_last_compile_used():
    cache = CompileCache()
    profiles = _scale_profiles(10, 2)
    compile_policy(_scale_endpoints(500, 2), profiles, cache=cache)
    large = len(cache)
    compile_policy(_scale_endpoints(5, 2), profiles, cache=cache)
    assert len(cache) < large / 20


def test_a_cached_compile_reuses_unchanged_chains_and_is_fast():
    profiles = _scale_profiles(50, 10)
    endpoints = _scale_endpoints(5000, 2)
    cache = CompileCache()
    before = compile_policy(endpoints, profiles, cache=cache)
    newcomer = Endpoint("n" * 64, "cali0newcomer0", ["10.200.0.1"], ["fd00::c8:1"], ["p3", "p4"])
    started = time.perf_counter()
    uncached = compile_policy([*endpoints, newcomer], profiles)
    fresh = time.perf_counter() - started
    started = time.perf_counter()
    after = compile_policy([*endpoints, newcomer], profiles, cache=cache)
    cached = time.perf_counter() - started
    assert after.v4 == uncached.v4
    unchanged = [n for n in before.v4.filter if n in after.v4.filter
                 and before.v4.filter[n] == after.v4.filter[n]]
    assert len(unchanged) > 10000
    reused = [n for n in unchanged if after.v4.filter[n] is before.v4.filter[n]]
    assert len(reused) > len(unchanged) - 10  # all but the few fixed chains
    assert cached < fresh / 2, f"cached {cached * 1000:.0f} ms, fresh {fresh * 1000:.0f} ms"

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


def test_render_restore_text():
    text = render_restore({"cali-b": ["-j DROP"], "cali-a": ["-s 10.0.0.0/8 -j RETURN",
                                                            "-j cali-b"]},
                          "filter", delete=["cali-old"])
    assert text == (
        "*filter\n"
        ":cali-a - [0:0]\n"
        ":cali-b - [0:0]\n"
        ":cali-old - [0:0]\n"
        "-A cali-a -s 10.0.0.0/8 -j RETURN\n"
        "-A cali-a -j cali-b\n"
        "-A cali-b -j DROP\n"
        "-X cali-old\n"
        "COMMIT\n"
    )
    assert render_restore({}, "nat") == "*nat\nCOMMIT\n"
    for bad in ("FORWARD", "DOCKER", "cali-" + "x" * 30, "cali-a b"):
        with pytest.raises(ValueError, match="not one of ours"):
            render_restore({bad: []}, "filter")


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
    assert plan_restore(world().v4, world().v4).tables == {}


def test_diff_when_an_endpoint_and_its_profile_go_away():
    before = world().v4
    after = world(endpoints=[W1, W2, X1]).v4  # D1 (profile db) is gone
    changes = diff(before, after)
    tw, fw = endpoint_chain_names(D1.iface)
    gone = sorted([tw, fw, "cali-pi-db", "cali-po-db", "cali-pli-db", "cali-plo-db"])
    assert changes.deleted_chains["filter"] == gone
    assert changes.changed_chains["filter"] == [FROM_DISPATCH, TO_DISPATCH]
    assert changes.changed_sets == [] and changes.deleted_sets == []
    plan = plan_restore(before, after)
    assert plan.tables["filter"].endswith(
        "".join(f"-X {name}\n" for name in gone) + "COMMIT\n"
    )


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
    plan = plan_restore(before, after)
    assert plan.destroy_sets == "destroy cali4-t-web\n"
