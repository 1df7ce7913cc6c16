"""Compile endpoints, profiles, pools and published ports into desired iptables chains
and ipsets, per IP family. Pure: no I/O, no kernel, no datastore.

Two ways in, one output (:class:`CompiledPolicy`: per family a :class:`DesiredState`
of tables, ipsets and hooks):

* :class:`PolicyModel` holds the inputs and is updated one change at a time
  (``set_endpoint``, ``remove_endpoint``, ``set_profile``, ``remove_profile``,
  ``set_pools``, ``set_port_mappings``, ``set_settings``); ``policy()`` is cheap: it
  never loops over the endpoints (see "Cost" below). The per-host agent keeps one.
* :func:`compile_policy` is the whole-input function: a fresh model fed everything.
  Both give equal states for equal inputs, whatever the order of the changes.

``profiles.iptables`` (the writer) feeds the output to the kernel:

1. ``render_ipset_restore(...)`` text -> ``ipset restore`` (creates/updates the sets
   the rules reference, so it must run first);
2. per table, ``iptables-restore --noflush`` (IPv4) or ``ip6tables-restore --noflush``
   (IPv6) input that the writer renders: it flushes and rewrites exactly the changed
   chains and deletes the given ones, atomically per table;
3. insert each of :attr:`DesiredState.hooks` at position 1 of its built-in chain when it
   is missing there (``-I FORWARD 1 -j cali-FORWARD``; ahead of Docker's chains; Docker
   rewrites FORWARD when it restarts, so check on every resync);
4. ``render_ipset_destroy(...)`` -> ``ipset restore``: destroys sets no rule refers to
   any more (it must run after the rules stopped referencing them).

The writer rewrites only what changed from the previous state to the new one
(:func:`diff`).

Rules are strings in ``iptables-save`` syntax *without* the ``-A CHAIN`` prefix,
e.g. ``"-m set --match-set cali4-t-web src -g cali-allow"``; the writer adds it.
They read back from ``iptables-save`` unchanged (checked against iptables 1.8.9, nft
backend), except that protocol numbers come back as names (``-p 47`` -> ``-p gre``).

Naming (every chain starts with ``cali-``; chains <= 28 characters, sets <= 31)::

    filter  cali-FORWARD            conntrack, then dispatch by interface (-i/-o cali+)
            cali-INPUT              workload -> host: conntrack, IPv6 NDP, then the action
            cali-from-wl-dispatch   per profile list: -m set --match-set cali4-e-<profiles>
                                    src,src -g cali-plo-<profiles>; ...; -j DROP
            cali-to-wl-dispatch     published-port accepts, then per profile list:
                                    ... dst,dst -g cali-pli-<profiles>; ...; -j DROP
            cali-pli-<profiles>     inbound profiles of a profile list, in order, DROP
            cali-plo-<profiles>     outbound profiles of a profile list, in order, DROP
            cali-pi-<profile>       a profile's inbound rules
            cali-po-<profile>       a profile's outbound rules
            cali-allow              sets the allow mark bit (reached with -g)
    nat     cali-PREROUTING         DNAT for published ports (hook: dst-type LOCAL)
            cali-OUTPUT             the same for connections made on the host
            cali-POSTROUTING        MASQUERADE nat-outgoing pools, never between pools
    ipsets  cali4-e-<profiles>  cali6-e-<profiles>   hash:net,iface: (address, host
                                    interface) of this host's endpoints with that list
            cali4-t-<tag>   cali6-t-<tag>    hash:ip, addresses of endpoints with the tag
            cali4-p-all     cali6-p-all      hash:net, every pool
            cali4-p-masq    cali6-p-masq     hash:net, pools with nat_outgoing

``<profile>``/``<tag>`` are the names; ``<profiles>`` is an endpoint's profile names
joined by commas (hashed unless it is one name): a "profile list". A name that would be
too long (or has characters outside ``[A-Za-z0-9_.-]``) becomes
``<prefix>_<first 16 base32 characters of sha256(name)>``, e.g. ``cali-pi_mfrggzdfmztwq2lk``:
deterministic, and the ``_`` keeps it apart from every readable name.

Endpoint dispatch with sets: Docker attaches profiles per network, so the endpoints
of a network share one profile list. For each list in use there is one
``hash:net,iface`` set per family whose members are ``<address>,<host interface>`` of
every local endpoint with that list. From a workload, ``--match-set S src,src``
matches the source address *and* the incoming interface: it picks the endpoint's
profile list and is the anti-spoofing check in one (a container sending from an
address that is not its own, or a neighbour's, is in no set). To a workload,
``dst,dst`` matches the destination address and the outgoing interface. Whatever
comes from or goes to ``cali+`` and matches no set drops. So an endpoint is only set
members: adding one is ``ipset add`` per address, never an iptables commit, and the
rule count does not grow with endpoints (only with profiles, rules, profile lists and
published ports). ``cali-INPUT`` (workload to host, when not simply dropped) goes
through the same from-workload dispatch.

Policy semantics: the profile-list chain clears the mark bit, then for each profile
in order jumps to the profile chain and RETURNs (to ``cali-FORWARD``, which then
accepts unless the other endpoint's dispatch drops) when the bit is set. In a profile
chain an ``allow`` rule does ``-g cali-allow`` (sets the bit; the end of cali-allow
returns straight to the profile-list chain), a ``deny`` rule does ``-j DROP``
(final), and falling off the end returns with the bit clear, so the next profile is
tried. After the last profile: ``-j DROP``.

Fail closed: an endpoint whose profile is missing or fails to render, that has no
profile, whose interface name is unusable or shared with another endpoint, or whose
address does not parse is simply in no endpoint set, so everything from and to its
interface drops. Such problems never raise: they are listed in ``warnings``.

Cost: ``set_endpoint`` is O(its addresses x its tags); a profile change re-renders
that profile and, only if its tags changed, revisits the endpoints carrying it;
``policy()`` is O(profiles + profile lists + tags + published ports) plus rebuilding
the frozensets of the sets that changed since the last call. Unchanged chains and
sets come back as the same objects, so :func:`diff` is cheap too.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import netaddr

from datastore.errors import InvalidRequest
from profiles.model import (
    ICMP_PROTOCOLS,
    Port,
    Profile,
    Rule,
    check_name,
    normalize_cidr,
    normalize_ports,
    normalize_protocol,
    port_weight,
)

FILTER = "filter"
NAT = "nat"
TABLES = (FILTER, NAT)
FAMILIES = (4, 6)

CHAIN_PREFIX = "cali-"
MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1
MAX_SET_NAME = 31  # IPSET_MAXNAMELEN - 1
MULTIPORT_MAX = 15  # a range takes two of the 15 slots
DEFAULT_MARK = 0x1000000
IPSET_MAXELEM = 1048576

FORWARD_CHAIN = "cali-FORWARD"
INPUT_CHAIN = "cali-INPUT"
FROM_DISPATCH = "cali-from-wl-dispatch"
TO_DISPATCH = "cali-to-wl-dispatch"
ALLOW_CHAIN = "cali-allow"
PREROUTING_CHAIN = "cali-PREROUTING"
OUTPUT_CHAIN = "cali-OUTPUT"
POSTROUTING_CHAIN = "cali-POSTROUTING"

ENDPOINT_SET_TYPE = "hash:net,iface"
# Known nodes' addresses: the only sources encapsulated traffic is accepted from.
NODES_SET = "cali4-nodes"
VXLAN_PORT = 4789
WORKLOAD_TO_HOST_ACTIONS = ("drop", "accept", "return")
PORT_MAPPING_PROTOCOLS = ("tcp", "udp", "sctp")
# ICMPv6 a workload must be able to send to its host: MLD (130-132, 143), router
# solicitation (133), neighbour solicitation/advertisement (135, 136).
NDP_ICMPV6_TYPES = (130, 131, 132, 133, 135, 136, 143)

_SAFE = re.compile(r"[A-Za-z0-9_.-]+")
_IFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


# --- names -------------------------------------------------------------------------


def _digest(ident: str) -> str:
    raw = hashlib.sha256(ident.encode()).digest()
    return base64.b32encode(raw).decode().lower()[:16]


def chain_name(kind: str, ident: str) -> str:
    """``cali-<kind>-<ident>``, or ``cali-<kind>_<hash>`` when that would not fit."""
    name = f"{CHAIN_PREFIX}{kind}-{ident}"
    if len(name) <= MAX_CHAIN_NAME and _SAFE.fullmatch(ident):
        return name
    return f"{CHAIN_PREFIX}{kind}_{_digest(ident)}"


def set_name(version: int, kind: str, ident: str) -> str:
    """``cali<version>-<kind>-<ident>``, or ``...-<kind>_<hash>`` when that would not fit."""
    name = f"cali{version}-{kind}-{ident}"
    if len(name) <= MAX_SET_NAME and _SAFE.fullmatch(ident):
        return name
    return f"cali{version}-{kind}_{_digest(ident)}"


def profile_chain_names(profile_name: str) -> tuple[str, str]:
    """(inbound chain, outbound chain) of a profile."""
    return chain_name("pi", profile_name), chain_name("po", profile_name)


def profile_list_chain_name(profiles: Sequence[str], inbound: bool) -> str:
    """The chain shared by endpoints with these profiles (in this order), per direction."""
    return chain_name("pli" if inbound else "plo", ",".join(profiles))


def endpoint_set_name(profiles: Sequence[str], version: int) -> str:
    """The ``hash:net,iface`` set of the local endpoints with this profile list."""
    return set_name(version, "e", ",".join(profiles))


def endpoint_set_member(address: str, iface: str) -> str:
    """A member of an endpoint set, as ``ipset`` writes it: ``10.0.0.5,cali0123``."""
    return f"{address},{iface}"


def tag_set_name(tag: str, version: int) -> str:
    return set_name(version, "t", tag)


def pool_set_names(version: int) -> tuple[str, str]:
    """(every pool, nat-outgoing pools)."""
    return f"cali{version}-p-all", f"cali{version}-p-masq"


def is_own_chain(name: str) -> bool:
    return name.startswith(CHAIN_PREFIX)


def is_own_set(name: str) -> bool:
    return name.startswith(("cali4-", "cali6-"))


# --- inputs and outputs ------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A workload endpoint. Addresses may carry a prefix ("10.0.0.5/24"): it is ignored."""

    id: str
    iface: str
    ipv4: Sequence[str] = ()
    ipv6: Sequence[str] = ()
    profiles: Sequence[str] = ()


@dataclass(frozen=True)
class Pool:
    cidr: str
    nat_outgoing: bool = False


@dataclass(frozen=True)
class PortMapping:
    """``docker run -p [host_ip:]host_port:container_port[/protocol]``.

    ``host_ip`` None, "" or the unspecified address means every local address.
    """

    container_ip: str
    protocol: str
    host_port: int
    container_port: int
    host_ip: str | None = None


@dataclass(frozen=True)
class PolicySettings:
    """workload_to_host: what happens to new connections from a workload to the host
    itself: "drop"; "accept" or "return" (to the host's own INPUT rules) after the
    endpoint's outbound profiles allowed them. mark: the one bit of the packet mark
    used for "a profile allowed it". iface_prefix: host-side veth names."""

    workload_to_host: str = "drop"
    mark: int = DEFAULT_MARK
    iface_prefix: str = "cali"

    def __post_init__(self) -> None:
        if self.workload_to_host not in WORKLOAD_TO_HOST_ACTIONS:
            raise InvalidRequest(
                f"workload_to_host '{self.workload_to_host}' is not one of drop, accept, return"
            )
        if self.mark <= 0 or self.mark & (self.mark - 1) or self.mark >= 1 << 32:
            raise InvalidRequest(f"mark {self.mark:#x} must be a single bit of 32")
        if not _IFACE.fullmatch(self.iface_prefix) or len(self.iface_prefix) > 14:
            raise InvalidRequest(f"iface_prefix '{self.iface_prefix}' is not usable")


@dataclass(frozen=True)
class IpSet:
    """type: "hash:ip" | "hash:net" | "hash:net,iface"; family: "inet" | "inet6";
    members in canonical form ("10.0.0.5", "10.0.0.0/8", "10.0.0.5,cali0123")."""

    type: str
    family: str
    members: frozenset[str] = frozenset()


class Hook(NamedTuple):
    """A rule the writer keeps at position 1 of a built-in chain."""

    table: str
    chain: str
    rule: str


@dataclass
class DesiredState:
    """Everything one IP family needs. ``tables[table][chain]`` is the chain's rules.

    Never mutate a state (or its lists) that a compile returned: the model hands the
    same objects out again for what did not change."""

    version: int
    tables: dict[str, dict[str, list[str]]]
    ipsets: dict[str, IpSet]
    hooks: list[Hook]
    warnings: list[str] = field(default_factory=list)

    @property
    def filter(self) -> dict[str, list[str]]:
        return self.tables[FILTER]

    @property
    def nat(self) -> dict[str, list[str]]:
        return self.tables[NAT]

    def rule_count(self) -> int:
        return sum(len(rules) for chains in self.tables.values() for rules in chains.values())


@dataclass
class CompiledPolicy:
    v4: DesiredState
    v6: DesiredState

    def family(self, version: int) -> DesiredState:
        return self.v4 if version == 4 else self.v6

    @property
    def warnings(self) -> list[str]:
        """Problems found (shared by both families), e.g. a missing profile."""
        return self.v4.warnings


# --- rule rendering ------------------------------------------------------------------


def _protocol_arg(protocol: str | int) -> str:
    return "ipv6-icmp" if protocol == "icmpv6" else str(protocol)


def _port_chunks(ports: Sequence[Port]) -> list[str]:
    """Split a port list into multiport arguments of at most 15 slots each."""
    chunks: list[str] = []
    current: list[str] = []
    used = 0
    for port in normalize_ports(list(ports)):
        weight = port_weight(port)
        if used + weight > MULTIPORT_MAX:
            chunks.append(",".join(current))
            current, used = [], 0
        current.append(str(port))
        used += weight
    if current:
        chunks.append(",".join(current))
    return chunks


def _range(cidr: str) -> str:
    network = netaddr.IPNetwork(cidr)
    first = netaddr.IPAddress(network.first, network.version)
    last = netaddr.IPAddress(network.last, network.version)
    return f"{first}-{last}"


def _net_matches(
    flag: str, range_flag: str, positive: str | None, negated: str | None
) -> tuple[list[str], list[str]]:
    """(address match, extra matches): one -s/-d per rule, so a negation next to a
    positive CIDR becomes an iprange match."""
    if positive is not None:
        extra = []
        if negated is not None:
            extra.append(f"-m iprange ! {range_flag} {_range(normalize_cidr(negated))}")
        return [f"{flag} {normalize_cidr(positive)}"], extra
    if negated is not None:
        return [f"! {flag} {normalize_cidr(negated)}"], []
    return [], []


def render_rule(rule: Rule, version: int, allow_target: str = f"-g {ALLOW_CHAIN}") -> list[str]:
    """The iptables rules (without ``-A CHAIN``) for one profile rule in one family.

    Returns [] when the rule cannot match this family (an IPv6 CIDR or icmpv6 in the
    IPv4 rules, and the other way round). Port lists longer than multiport's 15 slots
    become several rules (positive lists: any chunk may match) or several multiport
    matches in one rule (negated lists: no chunk may match). Raises
    :class:`InvalidRequest` for an invalid rule.
    """
    rule.validate()
    rule_version = rule.ip_version
    if rule_version is not None and rule_version != version:
        return []
    protocol = normalize_protocol(rule.protocol) if rule.protocol is not None else None
    src, src_extra = _net_matches("-s", "--src-range", rule.src_net, rule.not_src_net)
    dst, dst_extra = _net_matches("-d", "--dst-range", rule.dst_net, rule.not_dst_net)
    head = [*src, *dst]
    if protocol is not None:
        head.append(f"-p {_protocol_arg(protocol)}")
    head += src_extra + dst_extra
    for tag, negated, direction in (
        (rule.src_tag, False, "src"), (rule.dst_tag, False, "dst"),
        (rule.not_src_tag, True, "src"), (rule.not_dst_tag, True, "dst"),
    ):
        if tag is not None:
            bang = "! " if negated else ""
            head.append(f"-m set {bang}--match-set {tag_set_name(tag, version)} {direction}")
    tail: list[str] = []
    for ports, option in ((rule.not_src_ports, "--sports"), (rule.not_dst_ports, "--dports")):
        if ports is not None:
            tail += [f"-m multiport ! {option} {chunk}" for chunk in _port_chunks(ports)]
    if protocol in ICMP_PROTOCOLS and rule.icmp_type is not None:
        value = str(rule.icmp_type)
        if rule.icmp_code is not None:
            value += f"/{rule.icmp_code}"
        if protocol == "icmp":
            tail.append(f"-m icmp --icmp-type {value}")
        else:
            tail.append(f"-m icmp6 --icmpv6-type {value}")
    tail.append(allow_target if rule.action == "allow" else "-j DROP")
    src_chunks: list[str] = [""]
    dst_chunks: list[str] = [""]
    if rule.src_ports is not None:
        src_chunks = [f"-m multiport --sports {c}" for c in _port_chunks(rule.src_ports)]
    if rule.dst_ports is not None:
        dst_chunks = [f"-m multiport --dports {c}" for c in _port_chunks(rule.dst_ports)]
    return [
        " ".join(part for part in (*head, src_chunk, dst_chunk, *tail) if part)
        for src_chunk in src_chunks
        for dst_chunk in dst_chunks
    ]


def render_profile_chains(profile: Profile, version: int) -> dict[str, list[str]]:
    """A profile's inbound and outbound chains in one family. Raises InvalidRequest."""
    profile.validate()
    inbound, outbound = profile_chain_names(profile.name)
    return {
        inbound: [line for rule in profile.inbound_rules for line in render_rule(rule, version)],
        outbound: [line for rule in profile.outbound_rules for line in render_rule(rule, version)],
    }


# --- published ports and pools ---------------------------------------------------------


class _Mapping(NamedTuple):
    version: int
    container: str
    host: str | None  # None: every local address
    protocol: str
    host_port: int
    container_port: int


def _check_mapping(mapping: PortMapping) -> _Mapping | str:
    """The mapping in canonical form, or what is wrong with it."""
    try:
        container = ipaddress.ip_address(str(mapping.container_ip).split("/", 1)[0])
    except ValueError:
        return f"container address {mapping.container_ip!r} is invalid"
    host: str | None = None
    if mapping.host_ip not in (None, ""):
        try:
            host_address = ipaddress.ip_address(str(mapping.host_ip))
        except ValueError:
            return f"host address {mapping.host_ip!r} is invalid"
        if host_address.version != container.version:
            return f"host address {host_address} and container address {container} " \
                   "are different IP versions"
        if host_address.is_loopback:
            return f"host address {host_address} is a loopback address; publishing there " \
                   "is not supported (connections to loopback are not DNATed)"
        if not host_address.is_unspecified:
            host = str(host_address)
    if mapping.protocol not in PORT_MAPPING_PROTOCOLS:
        return f"protocol {mapping.protocol!r} is not one of tcp, udp, sctp"
    for label, port in (("host", mapping.host_port), ("container", mapping.container_port)):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            return f"{label} port {port!r} is not in 1-65535"
    return _Mapping(
        container.version, str(container), host, mapping.protocol,
        mapping.host_port, mapping.container_port,
    )


def _host_length(version: int) -> str:
    return "/32" if version == 4 else "/128"


def _dnat_rule(mapping: _Mapping) -> str:
    host = "" if mapping.host is None else f"-d {mapping.host}{_host_length(mapping.version)} "
    target = mapping.container if mapping.version == 4 else f"[{mapping.container}]"
    protocol = mapping.protocol
    return (
        f"{host}-p {protocol} -m {protocol} --dport {mapping.host_port}"
        f" -j DNAT --to-destination {target}:{mapping.container_port}"
    )


def _forward_accept(mapping: _Mapping, iface: str) -> str:
    """Lets DNATed connections of a published port through, ahead of the profiles."""
    protocol = mapping.protocol
    return (
        f"-d {mapping.container}{_host_length(mapping.version)} -o {iface}"
        f" -p {protocol} -m {protocol}"
        f" --dport {mapping.container_port} -m conntrack --ctstate DNAT"
        f" --ctorigdstport {mapping.host_port} -j ACCEPT"
    )


def _parse_pools(pools: Iterable[Pool], warnings: list[str]) -> list[tuple[str, int, bool]]:
    """(cidr, version, nat_outgoing); a /0 becomes its two halves (hash:net has no /0)."""
    parsed = []
    for pool in pools:
        try:
            network = netaddr.IPNetwork(normalize_cidr(pool.cidr))
        except InvalidRequest as exc:
            warnings.append(f"pool {pool.cidr!r} skipped: {exc}")
            continue
        parts = network.subnet(1) if network.prefixlen == 0 else [network]
        parsed += [(str(part), part.version, bool(pool.nat_outgoing)) for part in parts]
    return parsed


# --- fixed chains and hooks ---------------------------------------------------------------


def _hooks(version: int) -> list[Hook]:
    loopback = "127.0.0.0/8" if version == 4 else "::1/128"
    return [
        Hook(FILTER, "FORWARD", f"-j {FORWARD_CHAIN}"),
        Hook(FILTER, "INPUT", f"-j {INPUT_CHAIN}"),
        Hook(NAT, "PREROUTING", f"-m addrtype --dst-type LOCAL -j {PREROUTING_CHAIN}"),
        Hook(NAT, "OUTPUT", f"! -d {loopback} -m addrtype --dst-type LOCAL -j {OUTPUT_CHAIN}"),
        Hook(NAT, "POSTROUTING", f"-j {POSTROUTING_CHAIN}"),
    ]


def _fixed_filter_chains(
    version: int, settings: PolicySettings, mark: str
) -> dict[str, list[str]]:
    wl = f"{settings.iface_prefix}+"
    forward = [
        f"-i {wl} -m conntrack --ctstate INVALID -j DROP",
        f"-o {wl} -m conntrack --ctstate INVALID -j DROP",
        f"-i {wl} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-o {wl} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-i {wl} -j {FROM_DISPATCH}",
        f"-o {wl} -j {TO_DISPATCH}",
        f"-i {wl} -j ACCEPT",
        f"-o {wl} -j ACCEPT",
    ]
    inbound = [
        f"-i {wl} -m conntrack --ctstate INVALID -j DROP",
        f"-i {wl} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    if version == 6:
        inbound += [
            f"-i {wl} -p ipv6-icmp -m icmp6 --icmpv6-type {icmp_type} -j ACCEPT"
            for icmp_type in NDP_ICMPV6_TYPES
        ]
    if settings.workload_to_host == "drop":
        inbound.append(f"-i {wl} -j DROP")
    else:
        # The same dispatch as forwarded traffic: the source address and interface
        # must belong to an endpoint (anti-spoofing), whose outbound profiles then
        # drop or return; then the action ("return" falls off the end back to the
        # host's own INPUT rules).
        inbound.append(f"-i {wl} -j {FROM_DISPATCH}")
        if settings.workload_to_host == "accept":
            inbound.append(f"-i {wl} -j ACCEPT")
    return {
        FORWARD_CHAIN: forward,
        INPUT_CHAIN: inbound,
        ALLOW_CHAIN: [f"-j MARK --set-xmark {mark}/{mark}"],
    }


def _profile_list_rules(names: Sequence[str], inbound: bool, mark: str) -> list[str]:
    """The chain that tries the profiles in order, then drops."""
    check = f"-m mark --mark {mark}/{mark} -j RETURN"
    lines = [f"-j MARK --set-xmark 0x0/{mark}"]
    for name in names:
        chains = profile_chain_names(name)
        lines += [f"-j {chains[0] if inbound else chains[1]}", check]
    lines.append("-j DROP")
    return lines


def _parse_addresses(values: Iterable[str], version: int) -> list[str]:
    """Canonical addresses (prefix stripped); raises ValueError on a bad one."""
    result = []
    for value in values:
        address = ipaddress.ip_address(str(value).split("/", 1)[0])
        if address.version != version:
            raise ValueError(f"{value} is not an IPv{version} address")
        result.append(str(address))
    return result


def _iface_problem(iface: object, prefix: str) -> str | None:
    if not isinstance(iface, str) or not _IFACE.fullmatch(iface):
        return f"interface name {iface!r} is not usable"
    if not iface.startswith(prefix) or iface == prefix:
        return f"interface name {iface!r} does not start with {prefix!r} (plus a suffix)"
    return None


# --- the model -----------------------------------------------------------------------------


@dataclass
class _Profile:
    """A profile as the model keeps it: rendered once, when it is set."""

    problem: str | None
    chains: dict[int, dict[str, list[str]]]
    tags: tuple[str, ...]
    referenced: frozenset[str]


def _render_profile(name: str, profile: object) -> _Profile:
    try:
        tags = tuple(dict.fromkeys(t for t in getattr(profile, "tags", ()) if isinstance(t, str)))
    except Exception:  # noqa: BLE001 - an odd object: no tags
        tags = ()
    try:
        check_name(name, "profile name")
        if not isinstance(profile, Profile):
            raise InvalidRequest(f"is not a profile: {type(profile).__name__}")
        if profile.name != name:
            raise InvalidRequest(f"is stored under the name {name!r}")
        chains = {version: render_profile_chains(profile, version) for version in FAMILIES}
        referenced = frozenset(profile.referenced_tags())
    except Exception as exc:  # noqa: BLE001 - any failure must fail closed
        return _Profile(f"profile {name!r} cannot be rendered: {exc}", {}, tags, frozenset())
    return _Profile(None, chains, tags, referenced)


@dataclass
class _Member:
    """One endpoint as the model keeps it."""

    endpoint: Endpoint
    local: bool
    addresses: dict[int, tuple[str, ...]]
    profiles: tuple[str, ...]
    problem: str | None  # its own: bad address, unusable interface, odd profile names
    iface_ok: bool  # local, with a usable interface name (takes part in conflict checks)
    tags: tuple[str, ...] = ()  # the tags its addresses are counted in now
    listed: bool = False  # in its profile list's endpoint set now


@dataclass
class _List:
    """The local endpoints (listed ones) that share one profile list."""

    names: tuple[str, ...]
    endpoints: set[str] = field(default_factory=set)
    members: dict[int, set[str]] = field(default_factory=lambda: {4: set(), 6: set()})
    # (inbound chain, rules, outbound chain, rules, set name per family), made once.
    rendered: tuple[str, list[str], str, list[str], dict[int, str]] | None = None


_SetKey = tuple[str, object, int]  # ("t", tag, version) | ("e", profile names, version)


class PolicyModel:
    """The inputs of one host's policy, updated one change at a time, and the desired
    state they compile to (:meth:`policy`). See the module doc for the layout.

    Endpoints are keyed by ``Endpoint.id`` (setting one with a known id replaces it).
    ``local`` endpoints are this host's: they are dispatched through the endpoint
    sets; other hosts' endpoints (``local=False``) only fill tag sets (their
    ``iface`` is ignored). Profiles are rendered when they are set: changing a
    Profile object afterwards changes nothing until it is set again.
    Not thread-safe. Never mutate what :meth:`policy` returns.
    """

    def __init__(self, settings: PolicySettings | None = None) -> None:
        self._profiles: dict[str, _Profile] = {}
        self._pool_sets: dict[int, dict[str, IpSet]] = {4: {}, 6: {}}
        self._pool_warnings: list[str] = []
        self._mappings: dict[str, list[tuple[PortMapping, _Mapping | str]]] = {}
        self._settings = settings or PolicySettings()
        self._tunnel_rules: list[str] = []
        self._tunnel_sets: dict[str, IpSet] = {}
        self._reset_endpoints()
        self._configure()
        self.set_pools(())

    # -- inputs ------------------------------------------------------------------------

    @property
    def settings(self) -> PolicySettings:
        return self._settings

    def __len__(self) -> int:
        """How many endpoints (local and remote) the model holds."""
        return len(self._members)

    def set_settings(self, settings: PolicySettings) -> None:
        """Change the settings (rare: every endpoint is prepared again)."""
        if settings == self._settings:
            return
        members = [(member.endpoint, member.local) for member in self._members.values()]
        self._settings = settings
        self._reset_endpoints()
        self._configure()
        for endpoint, local in members:
            self.set_endpoint(endpoint, local)

    def set_endpoint(
        self, endpoint: Endpoint, local: bool = True,
        port_mappings: Iterable[PortMapping] | None = None,
    ) -> None:
        """Add or replace an endpoint. ``port_mappings`` (local endpoints): the ports
        it publishes, replacing those set with it before; None keeps them."""
        old = self._members.pop(endpoint.id, None)
        if old is not None:
            self._detach(old)
        member = self._prepare(endpoint, local)
        self._members[endpoint.id] = member
        self._attach(member)
        if port_mappings is not None:
            self.set_port_mappings(port_mappings, owner=endpoint.id)

    def remove_endpoint(self, endpoint_id: str) -> None:
        """Forget an endpoint and the ports it published (unknown ids are ignored)."""
        member = self._members.pop(endpoint_id, None)
        if member is not None:
            self._detach(member)
        if endpoint_id in self._mappings:
            self.set_port_mappings((), owner=endpoint_id)

    def set_profile(self, profile: Profile, name: str | None = None) -> None:
        """Add or replace a profile; ``name``: the name it is stored under (default:
        its own; a profile whose name differs is not trusted: it fails closed)."""
        key = name if name is not None else str(getattr(profile, "name", ""))
        self._replace_profile(key, _render_profile(key, profile))

    def set_invalid_profile(self, name: str, problem: str) -> None:
        """A profile that exists but cannot be read: its endpoints fail closed."""
        self._replace_profile(
            name, _Profile(f"profile {name!r} cannot be read: {problem}", {}, (), frozenset())
        )

    def remove_profile(self, name: str) -> None:
        self._replace_profile(name, None)

    def set_pools(self, pools: Iterable[Pool]) -> None:
        warnings: list[str] = []
        parsed = _parse_pools(pools, warnings)
        for version in FAMILIES:
            family = "inet" if version == 4 else "inet6"
            all_set, masq_set = pool_set_names(version)
            self._pool_sets[version] = {
                all_set: IpSet("hash:net", family, frozenset(
                    cidr for cidr, v, _ in parsed if v == version)),
                masq_set: IpSet("hash:net", family, frozenset(
                    cidr for cidr, v, nat in parsed if v == version and nat)),
            }
        self._pool_warnings = warnings

    def set_tunnels(self, vxlan: bool, ipip: bool, node_addresses: Iterable[str]) -> None:
        """While pools encapsulate, VXLAN (UDP 4789) and IP-in-IP (protocol 4) reach
        this host only from known nodes' addresses; the rest is dropped in cali-INPUT."""
        rules = []
        if vxlan:
            rules.append(f"-p udp -m udp --dport {VXLAN_PORT} -m set ! --match-set "
                         f"{NODES_SET} src -j DROP")
        if ipip:
            rules.append(f"-p ipencap -m set ! --match-set {NODES_SET} src -j DROP")
        self._tunnel_rules = rules
        addresses = frozenset(a for a in node_addresses if netaddr.valid_ipv4(a))
        self._tunnel_sets = {NODES_SET: IpSet("hash:ip", "inet", addresses)} if rules else {}

    def set_port_mappings(self, mappings: Iterable[PortMapping], owner: str = "") -> None:
        """Replace the port mappings of ``owner`` (an endpoint id, or "" for mappings
        not tied to an endpoint). A mapping applies to the local endpoint that has its
        container address."""
        for _, checked in self._mappings.pop(owner, []):
            if isinstance(checked, _Mapping):
                self._mapped[checked.container] -= 1
                if not self._mapped[checked.container]:
                    del self._mapped[checked.container]
        results = [(mapping, _check_mapping(mapping)) for mapping in mappings]
        if results:
            self._mappings[owner] = results
        for _, checked in results:
            if isinstance(checked, _Mapping):
                self._mapped[checked.container] += 1
        self._nat_dirty = True

    # -- output ------------------------------------------------------------------------

    def policy(self) -> CompiledPolicy:
        """The desired state of both families for the current inputs."""
        warnings = list(self._pool_warnings)
        usable: list[_List] = []
        list_warnings = []
        for names, group in self._lists.items():
            problem = self._list_problem(names)
            if problem is None:
                usable.append(group)
            elif names:
                list_warnings.append(
                    f"{len(group.endpoints)} local endpoint(s) with profiles "
                    f"{', '.join(names)}: {problem}; they fail closed"
                )
        usable.sort(key=lambda group: group.names)
        warnings += sorted(list_warnings)
        warnings += sorted(self._problems.values())
        for iface in sorted(self._conflicts):
            ids = " and ".join(sorted(self._ifaces[iface]))
            warnings.append(
                f"interface {iface} is used by endpoints {ids}; they all fail closed"
            )
        if self._nat_dirty:
            self._compile_nat()
        warnings += self._nat_warnings
        used = sorted({name for group in usable for name in group.names})
        needed: set[str] = set()
        for name in used:
            needed |= self._profiles[name].referenced
        states = {
            version: self._family(version, usable, used, needed, warnings)
            for version in FAMILIES
        }
        return CompiledPolicy(v4=states[4], v6=states[6])

    # -- internals -----------------------------------------------------------------------

    def _reset_endpoints(self) -> None:
        self._members: dict[str, _Member] = {}
        self._problems: dict[str, str] = {}  # endpoint id -> warning
        self._by_profile: dict[str, set[str]] = {}  # profile name -> endpoint ids
        self._tag_addresses: dict[int, dict[str, Counter[str]]] = {4: {}, 6: {}}
        self._lists: dict[tuple[str, ...], _List] = {}
        self._ifaces: dict[str, set[str]] = {}  # usable local iface -> endpoint ids
        self._conflicts: set[str] = set()  # ifaces with more than one endpoint
        self._listed_by_address: dict[str, set[str]] = {}  # address -> listed endpoint ids
        self._mapped: Counter[str] = Counter()  # container addresses of port mappings
        for _, checked in (pair for results in self._mappings.values() for pair in results):
            if isinstance(checked, _Mapping):
                self._mapped[checked.container] += 1
        self._sets: dict[_SetKey, IpSet] = {}  # member sets built since they last changed
        self._nat_dirty = True

    def _configure(self) -> None:
        settings = self._settings
        self._mark = f"{settings.mark:#x}"
        self._fixed = {v: _fixed_filter_chains(v, settings, self._mark) for v in FAMILIES}
        self._hooks = {v: _hooks(v) for v in FAMILIES}
        self._postrouting: dict[int, list[str]] = {}
        for version in FAMILIES:
            all_set, masq_set = pool_set_names(version)
            self._postrouting[version] = [
                f"-m set --match-set {masq_set} src -m set ! --match-set {all_set} dst "
                "-j MASQUERADE"
            ]
        self._prerouting: dict[int, list[str]] = {4: [], 6: []}
        self._output: dict[int, list[str]] = {4: [], 6: []}
        self._accepts: dict[int, list[str]] = {4: [], 6: []}
        self._nat_warnings: list[str] = []

    def _prepare(self, endpoint: Endpoint, local: bool) -> _Member:
        problem: str | None = None
        addresses: dict[int, tuple[str, ...]] = {4: (), 6: ()}
        profiles: tuple[str, ...] = ()
        try:
            addresses = {
                4: tuple(dict.fromkeys(_parse_addresses(endpoint.ipv4, 4))),
                6: tuple(dict.fromkeys(_parse_addresses(endpoint.ipv6, 6))),
            }
        except Exception as exc:  # noqa: BLE001 - any bad value fails closed
            problem = f"bad address: {exc}"
            addresses = {4: (), 6: ()}
        try:
            names = list(endpoint.profiles)
            odd = [name for name in names if not isinstance(name, str)]
            if odd:
                raise ValueError(f"profile name {odd[0]!r} is not a string")
            profiles = tuple(dict.fromkeys(names))
        except Exception as exc:  # noqa: BLE001
            problem = problem or f"bad profiles: {exc}"
        iface_ok = False
        if local:
            iface_problem = _iface_problem(endpoint.iface, self._settings.iface_prefix)
            iface_ok = iface_problem is None
            problem = iface_problem or problem
        return _Member(endpoint, local, addresses, profiles, problem, iface_ok)

    def _attach(self, member: _Member) -> None:
        endpoint_id = member.endpoint.id
        if member.problem is not None:
            where = "endpoint" if member.local else "remote endpoint"
            consequence = "it fails closed" if member.local else "left out of tag sets"
            self._problems[endpoint_id] = f"{where} {endpoint_id}: {member.problem}; " \
                                          f"{consequence}"
        for name in member.profiles:
            self._by_profile.setdefault(name, set()).add(endpoint_id)
        self._retag(member)
        if member.iface_ok:
            iface = member.endpoint.iface
            self._ifaces.setdefault(iface, set()).add(endpoint_id)
            self._refresh_iface(iface)

    def _detach(self, member: _Member) -> None:
        endpoint_id = member.endpoint.id
        self._problems.pop(endpoint_id, None)
        if member.listed:
            self._unlist(member)
        self._count_tags(member, -1)
        member.tags = ()
        for name in member.profiles:
            holders = self._by_profile.get(name)
            if holders is not None:
                holders.discard(endpoint_id)
                if not holders:
                    del self._by_profile[name]
        if member.iface_ok:
            iface = member.endpoint.iface
            owners = self._ifaces.get(iface, set())
            owners.discard(endpoint_id)
            if not owners:
                self._ifaces.pop(iface, None)
            self._refresh_iface(iface)

    def _refresh_iface(self, iface: str) -> None:
        """List or unlist the endpoints of one interface: an interface used by more
        than one endpoint fails all of them closed."""
        owners = self._ifaces.get(iface, set())
        if len(owners) > 1:
            self._conflicts.add(iface)
        else:
            self._conflicts.discard(iface)
        for endpoint_id in owners:
            member = self._members.get(endpoint_id)
            if member is None:
                continue  # being replaced: attached again right after
            wanted = member.problem is None and len(owners) == 1
            if wanted and not member.listed:
                self._list(member)
            elif not wanted and member.listed:
                self._unlist(member)

    def _list(self, member: _Member) -> None:
        group = self._lists.get(member.profiles)
        if group is None:
            group = self._lists[member.profiles] = _List(member.profiles)
        endpoint_id = member.endpoint.id
        group.endpoints.add(endpoint_id)
        iface = member.endpoint.iface
        for version in FAMILIES:
            if member.addresses[version]:
                group.members[version].update(
                    endpoint_set_member(address, iface) for address in member.addresses[version]
                )
                self._sets.pop(("e", member.profiles, version), None)
            for address in member.addresses[version]:
                self._listed_by_address.setdefault(address, set()).add(endpoint_id)
                if address in self._mapped:
                    self._nat_dirty = True
        member.listed = True

    def _unlist(self, member: _Member) -> None:
        group = self._lists[member.profiles]
        endpoint_id = member.endpoint.id
        group.endpoints.discard(endpoint_id)
        iface = member.endpoint.iface
        for version in FAMILIES:
            if member.addresses[version]:
                group.members[version].difference_update(
                    endpoint_set_member(address, iface) for address in member.addresses[version]
                )
                self._sets.pop(("e", member.profiles, version), None)
            for address in member.addresses[version]:
                holders = self._listed_by_address.get(address)
                if holders is not None:
                    holders.discard(endpoint_id)
                    if not holders:
                        del self._listed_by_address[address]
                if address in self._mapped:
                    self._nat_dirty = True
        if not group.endpoints:
            del self._lists[member.profiles]
        member.listed = False

    def _tags_of(self, member: _Member) -> tuple[str, ...]:
        if member.problem is not None:
            return ()  # no usable address (or a foreign interface): in no tag set
        found: dict[str, None] = {}
        for name in member.profiles:
            profile = self._profiles.get(name)
            if profile is not None:
                found.update(dict.fromkeys(profile.tags))
        return tuple(found)

    def _retag(self, member: _Member) -> None:
        tags = self._tags_of(member)
        if tags != member.tags:
            self._count_tags(member, -1)
            member.tags = tags
            self._count_tags(member, 1)

    def _count_tags(self, member: _Member, step: int) -> None:
        for version in FAMILIES:
            addresses = member.addresses[version]
            if not addresses:
                continue
            by_tag = self._tag_addresses[version]
            for tag in member.tags:
                counts = by_tag.get(tag)
                if counts is None:
                    counts = by_tag[tag] = Counter()
                for address in addresses:
                    counts[address] += step
                    if counts[address] <= 0:
                        del counts[address]
                if not counts:
                    del by_tag[tag]
                self._sets.pop(("t", tag, version), None)

    def _replace_profile(self, name: str, entry: _Profile | None) -> None:
        old = self._profiles.pop(name, None)
        if entry is not None:
            self._profiles[name] = entry
        self._nat_dirty = True  # usable profile lists may have changed
        if (old.tags if old else ()) != (entry.tags if entry else ()):
            for endpoint_id in self._by_profile.get(name, ()):
                self._retag(self._members[endpoint_id])

    def _list_problem(self, names: tuple[str, ...]) -> str | None:
        if not names:
            return "no profile"
        for name in names:
            profile = self._profiles.get(name)
            if profile is None:
                return f"profile {name!r} does not exist"
            if profile.problem is not None:
                return profile.problem
        return None

    def _rendered(self, group: _List) -> tuple[str, list[str], str, list[str], dict[int, str]]:
        if group.rendered is None:
            names = group.names
            group.rendered = (
                profile_list_chain_name(names, inbound=True),
                _profile_list_rules(names, True, self._mark),
                profile_list_chain_name(names, inbound=False),
                _profile_list_rules(names, False, self._mark),
                {version: endpoint_set_name(names, version) for version in FAMILIES},
            )
        return group.rendered

    def _member_set(self, key: _SetKey, kind: str, members: Iterable[str]) -> IpSet:
        found = self._sets.get(key)
        if found is None:
            family = "inet" if key[2] == 4 else "inet6"
            found = self._sets[key] = IpSet(kind, family, frozenset(members))
        return found

    def _compile_nat(self) -> None:
        """DNAT rules and forward accepts of the published ports, per family."""
        usable: dict[tuple[str, ...], bool] = {}
        prerouting: dict[int, list[str]] = {4: [], 6: []}
        accepts: dict[int, list[str]] = {4: [], 6: []}
        warnings: list[str] = []
        valid: list[_Mapping] = []
        for results in self._mappings.values():
            for mapping, checked in results:
                if isinstance(checked, str):
                    warnings.append(f"port mapping {mapping} skipped: {checked}")
                else:
                    valid.append(checked)
        valid.sort(key=lambda m: (m.version, m.protocol, m.host or "", m.host_port,
                                  m.container, m.container_port))
        taken: set[tuple[int, str, str | None, int]] = set()
        for mapping in valid:
            iface = None
            for endpoint_id in sorted(self._listed_by_address.get(mapping.container, ())):
                member = self._members[endpoint_id]
                names = member.profiles
                if names not in usable:
                    usable[names] = self._list_problem(names) is None
                if usable[names]:
                    iface = member.endpoint.iface
                    break
            if iface is None:
                warnings.append(
                    f"port mapping to {mapping.container}:{mapping.container_port} skipped: "
                    "not a usable local endpoint"
                )
                continue
            key = (mapping.version, mapping.protocol, mapping.host, mapping.host_port)
            if key in taken:
                warnings.append(
                    f"port mapping to {mapping.container}:{mapping.container_port} skipped: "
                    f"host port {mapping.protocol}/{mapping.host_port} is already published"
                )
                continue
            taken.add(key)
            prerouting[mapping.version].append(_dnat_rule(mapping))
            accepts[mapping.version].append(_forward_accept(mapping, iface))
        for version in FAMILIES:
            # Keep the old lists when nothing changed (cheap diffs downstream).
            if prerouting[version] != self._prerouting[version]:
                self._prerouting[version] = prerouting[version]
                self._output[version] = list(prerouting[version])
            if accepts[version] != self._accepts[version]:
                self._accepts[version] = accepts[version]
        self._nat_warnings = sorted(warnings)
        self._nat_dirty = False

    def _family(
        self,
        version: int,
        usable: Sequence[_List],
        used: Sequence[str],
        needed: Iterable[str],
        warnings: list[str],
    ) -> DesiredState:
        filter_chains = dict(self._fixed[version])
        if version == 4 and self._tunnel_rules:
            filter_chains[INPUT_CHAIN] = self._tunnel_rules + filter_chains[INPUT_CHAIN]
        for name in used:
            filter_chains.update(self._profiles[name].chains[version])
        from_rules: list[str] = []
        to_rules = list(self._accepts[version])
        ipsets: dict[str, IpSet] = {}
        for group in usable:
            inbound, inbound_rules, outbound, outbound_rules, set_names = self._rendered(group)
            filter_chains[inbound] = inbound_rules
            filter_chains[outbound] = outbound_rules
            name = set_names[version]
            from_rules.append(f"-m set --match-set {name} src,src -g {outbound}")
            to_rules.append(f"-m set --match-set {name} dst,dst -g {inbound}")
            ipsets[name] = self._member_set(
                ("e", group.names, version), ENDPOINT_SET_TYPE, group.members[version]
            )
        from_rules.append("-j DROP")
        to_rules.append("-j DROP")
        filter_chains[FROM_DISPATCH] = from_rules
        filter_chains[TO_DISPATCH] = to_rules
        by_tag = self._tag_addresses[version]
        for tag in needed:
            ipsets[tag_set_name(tag, version)] = self._member_set(
                ("t", tag, version), "hash:ip", by_tag.get(tag, ())
            )
        ipsets.update(self._pool_sets[version])
        if version == 4:
            ipsets.update(self._tunnel_sets)
        nat_chains = {
            PREROUTING_CHAIN: self._prerouting[version],
            OUTPUT_CHAIN: self._output[version],
            POSTROUTING_CHAIN: self._postrouting[version],
        }
        return DesiredState(
            version=version,
            tables={FILTER: filter_chains, NAT: nat_chains},
            ipsets=ipsets,
            hooks=list(self._hooks[version]),
            warnings=warnings,
        )


def compile_policy(
    endpoints: Iterable[Endpoint],
    profiles: Mapping[str, Profile],
    pools: Iterable[Pool] = (),
    port_mappings: Iterable[PortMapping] = (),
    settings: PolicySettings | None = None,
    remote_endpoints: Iterable[Endpoint] = (),
) -> CompiledPolicy:
    """Compile the desired state of both IP families from the whole input.

    ``endpoints`` are this host's endpoints (they are dispatched through the endpoint
    sets); ``remote_endpoints`` are the other hosts' (their addresses only fill tag
    sets; ``iface`` is ignored). Endpoint ids must be unique (a later endpoint with
    the same id replaces an earlier one). ``profiles`` maps name -> Profile and may
    hold more than the endpoints use: only used profiles get chains, and only tags
    their rules refer to get sets. Problems never raise: they are listed in
    ``warnings`` and fail closed. The same as a :class:`PolicyModel` fed all of it.
    """
    model = PolicyModel(settings)
    for name, profile in profiles.items():
        model.set_profile(profile, name=name)
    model.set_pools(pools)
    for endpoint in endpoints:
        model.set_endpoint(endpoint, local=True)
    for endpoint in remote_endpoints:
        model.set_endpoint(endpoint, local=False)
    model.set_port_mappings(port_mappings)
    return model.policy()


# --- rendering for the kernel, and diffs ------------------------------------------------


def _temp_set(ipset: IpSet) -> str:
    version = 4 if ipset.family == "inet" else 6
    kind = ipset.type.split(":", 1)[1].replace(",", "-")
    return f"cali{version}-tmp-{kind}"


def render_ipset_restore(
    sets: Mapping[str, IpSet], previous: Mapping[str, IpSet] | None = None
) -> str:
    """``ipset restore`` input bringing the given sets to their members.

    Without ``previous`` (or for a set not in it) the set is created if missing and
    replaced atomically: filled as a temporary set then swapped in. With ``previous``
    (what the kernel holds, e.g. the last applied state) only the differences are
    written: ``add`` / ``del`` lines. Every line carries ``-exist`` or works on the
    temporary set, so the text can be replayed safely.
    """
    lines: list[str] = []
    for name in sorted(sets):
        ipset = sets[name]
        if not is_own_set(name) or len(name) > MAX_SET_NAME or not _SAFE.fullmatch(name):
            raise ValueError(f"refusing to write set {name!r}: not one of ours")
        before = previous.get(name) if previous is not None else None
        if before is not None and (before.type, before.family) == (ipset.type, ipset.family):
            lines += [f"del {name} {m} -exist" for m in sorted(before.members - ipset.members)]
            lines += [f"add {name} {m} -exist" for m in sorted(ipset.members - before.members)]
            continue
        options = f"{ipset.type} family {ipset.family} maxelem {IPSET_MAXELEM}"
        temp = _temp_set(ipset)
        lines.append(f"create {name} {options} -exist")
        lines.append(f"create {temp} {options} -exist")
        lines.append(f"flush {temp}")
        lines += [f"add {temp} {member}" for member in sorted(ipset.members)]
        lines.append(f"swap {temp} {name}")
        lines.append(f"destroy {temp}")
    return "".join(line + "\n" for line in lines)


def render_ipset_destroy(names: Iterable[str]) -> str:
    """``ipset restore`` input destroying the sets (run after the rules let go of them)."""
    lines = []
    for name in sorted(names):
        if not is_own_set(name):
            raise ValueError(f"refusing to destroy set {name!r}: not one of ours")
        lines.append(f"destroy {name}\n")
    return "".join(lines)


@dataclass
class StateDiff:
    """What changed from one state to the next, by name.

    ``changed_chains[table]``: chains that are new or whose rules differ (rewrite them);
    ``deleted_chains[table]``: chains no longer wanted; the same for sets. ``hooks``:
    whether the hook list differs.
    """

    changed_chains: dict[str, list[str]]
    deleted_chains: dict[str, list[str]]
    changed_sets: list[str]
    deleted_sets: list[str]
    hooks_changed: bool

    @property
    def empty(self) -> bool:
        return not (
            any(self.changed_chains.values()) or any(self.deleted_chains.values())
            or self.changed_sets or self.deleted_sets or self.hooks_changed
        )


def diff(old: DesiredState | None, new: DesiredState) -> StateDiff:
    """Compare two states of one family; ``old`` None means nothing is known (all new)."""
    changed: dict[str, list[str]] = {}
    deleted: dict[str, list[str]] = {}
    for table, chains in new.tables.items():
        before = old.tables.get(table, {}) if old is not None else {}
        changed[table] = sorted(
            name for name, rules in chains.items() if before.get(name) != rules
        )
        deleted[table] = sorted(name for name in before if name not in chains)
    if old is not None:
        for table, chains in old.tables.items():
            if table not in new.tables:
                deleted[table] = sorted(chains)
    old_sets = old.ipsets if old is not None else {}
    return StateDiff(
        changed_chains=changed,
        deleted_chains=deleted,
        changed_sets=sorted(n for n, s in new.ipsets.items() if old_sets.get(n) != s),
        deleted_sets=sorted(n for n in old_sets if n not in new.ipsets),
        hooks_changed=old is None or old.hooks != new.hooks,
    )
