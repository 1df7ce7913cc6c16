"""Compile endpoints, profiles, pools and published ports into desired iptables chains
and ipsets, per IP family. Pure: no I/O, no kernel, no datastore.

``profiles.iptables`` (the writer) feeds the output to the kernel:

1. ``render_ipset_restore(...)`` text -> ``ipset restore`` (creates/updates the sets
   the rules reference, so it must run first);
2. per table ``render_restore(...)`` text -> ``iptables-restore --noflush`` (IPv4) or
   ``ip6tables-restore --noflush`` (IPv6): flushes and rewrites exactly the given chains
   and deletes the given ones, atomically per table;
3. insert each of :attr:`DesiredState.hooks` at position 1 of its built-in chain when it
   is missing there (``-I FORWARD 1 -j cali-FORWARD``; ahead of Docker's chains; Docker
   rewrites FORWARD when it restarts, so check on every resync);
4. ``render_ipset_destroy(...)`` -> ``ipset restore``: destroys sets no rule refers to
   any more (it must run after the rules stopped referencing them).

:func:`plan_restore` builds all of these texts from the previous and the new state,
rewriting only what changed (:func:`diff`).

Rules are strings in ``iptables-save`` syntax *without* the ``-A CHAIN`` prefix,
e.g. ``"-m set --match-set cali4-t-web src -g cali-allow"``; ``render_restore`` adds it.
They read back from ``iptables-save`` unchanged (checked against iptables 1.8.9, nft
backend), except that protocol numbers come back as names (``-p 47`` -> ``-p gre``).

Naming (every chain starts with ``cali-``; chains <= 28 characters, sets <= 31)::

    filter  cali-FORWARD            conntrack, then dispatch by interface (-i/-o cali+)
            cali-INPUT              workload -> host: conntrack, IPv6 NDP, then the action
            cali-from-wl-dispatch   -i <iface> -g cali-fw-<suffix>, ..., -j DROP
            cali-to-wl-dispatch     -o <iface> -g cali-tw-<suffix>, ..., -j DROP
            cali-fwd-<chars>        dispatch subtrees (see below), ending in DROP
            cali-twd-<chars>
            cali-fw-<suffix>        from workload: anti-spoof, -g cali-plo-<profiles>
            cali-tw-<suffix>        to workload: published ports, -g cali-pli-<profiles>
            cali-sp-<suffix>        anti-spoof for an endpoint with several addresses
            cali-pli-<profiles>     inbound profiles of a profile list, in order, DROP
            cali-plo-<profiles>     outbound profiles of a profile list, in order, DROP
            cali-pi-<profile>       a profile's inbound rules
            cali-po-<profile>       a profile's outbound rules
            cali-allow              sets the allow mark bit (reached with -g)
    nat     cali-PREROUTING         DNAT for published ports (hook: dst-type LOCAL)
            cali-OUTPUT             the same for connections made on the host
            cali-POSTROUTING        MASQUERADE nat-outgoing pools, never between pools
    ipsets  cali4-t-<tag>   cali6-t-<tag>    hash:ip, addresses of endpoints with the tag
            cali4-p-all     cali6-p-all      hash:net, every pool
            cali4-p-masq    cali6-p-masq     hash:net, pools with nat_outgoing

``<suffix>`` is the interface name without the ``cali`` prefix (Docker's veths are
``cali`` + 11 characters of the endpoint ID); ``<profile>``/``<tag>`` are the names;
``<profiles>`` is an endpoint's profile names joined by commas (hashed unless it is
one name).
A name that would be too long (or has characters outside ``[A-Za-z0-9_.-]``) becomes
``<prefix>_<first 16 base32 characters of sha256(name)>``, e.g. ``cali-pi_mfrggzdfmztwq2lk``:
deterministic, and the ``_`` keeps it apart from every readable name.

Policy semantics (the profile, profile-list and endpoint chains): the endpoint chain
does its own checks (anti-spoof, published ports) and goes (``-g``) to the chain of
its profile list, shared by every endpoint with the same profiles in the same order.
That chain clears the mark bit, then for each profile in order jumps to the profile
chain and RETURNs (to ``cali-FORWARD``, which then accepts unless the other
endpoint's chain drops) when the bit is set. In a profile chain an ``allow`` rule does
``-g cali-allow`` (sets the bit; the end of cali-allow returns straight to the
profile-list chain), a ``deny`` rule does ``-j DROP`` (final), and falling off the end
returns with the bit clear, so the next profile is tried. After the last profile:
``-j DROP``. Endpoint chains never copy profile rules, and per endpoint there are only
its 1-3 own rules plus its dispatch rule per direction: the rule count is linear in
endpoints + profile lists + profile rules. (Few rules per endpoint matter on the
nf_tables backend: every commit re-validates the whole ruleset reachable from the
hooks, so its cost grows with the total rule count.)

Dispatch: the dispatch chains match interface names as a prefix tree. A chain holds at
most :data:`DISPATCH_LEAF` direct ``-i <iface> -g <chain>`` rules; above that it
branches on the next character of the name (``-i cali3+ -g cali-fwd-3``). A new
connection walks one path of the tree, and adding an endpoint rewrites only the
chains on its path.

Fail closed: an endpoint whose profile is missing or invalid, whose interface name is
unusable or whose address does not parse gets DROP-only chains
(:func:`fail_closed_chains`); an interface with no chain at all falls off the
dispatch chains into DROP.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

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

CHAIN_PREFIX = "cali-"
MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1
MAX_SET_NAME = 31  # IPSET_MAXNAMELEN - 1
MULTIPORT_MAX = 15  # a range takes two of the 15 slots
DISPATCH_LEAF = 32
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

WORKLOAD_TO_HOST_ACTIONS = ("drop", "accept", "return")
PORT_MAPPING_PROTOCOLS = ("tcp", "udp", "sctp")
# ICMPv6 a workload must be able to send to its host: MLD (130-132, 143), router
# solicitation (133), neighbour solicitation/advertisement (135, 136).
NDP_ICMPV6_TYPES = (130, 131, 132, 133, 135, 136, 143)

_V = TypeVar("_V")
_MISSING: Any = object()
_SAFE = re.compile(r"[A-Za-z0-9_.-]+")
_IFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_FAIL_CLOSED = '-m comment --comment "calico-cnm: no usable policy, fail closed" -j DROP'


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


def tag_set_name(tag: str, version: int) -> str:
    return set_name(version, "t", tag)


def pool_set_names(version: int) -> tuple[str, str]:
    """(every pool, nat-outgoing pools)."""
    return f"cali{version}-p-all", f"cali{version}-p-masq"


def _iface_suffix(iface: str, prefix: str) -> str:
    return iface[len(prefix):] if iface.startswith(prefix) else iface


def endpoint_chain_names(iface: str, iface_prefix: str = "cali") -> tuple[str, str]:
    """(to-workload chain, from-workload chain) of an endpoint's host interface."""
    suffix = _iface_suffix(iface, iface_prefix)
    return chain_name("tw", suffix), chain_name("fw", suffix)


def antispoof_chain_name(iface: str, iface_prefix: str = "cali") -> str:
    return chain_name("sp", _iface_suffix(iface, iface_prefix))


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
    """type: "hash:ip" | "hash:net"; family: "inet" | "inet6"; members in canonical form."""

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
    """Everything one IP family needs. ``tables[table][chain]`` is the chain's rules."""

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


class CompileCache:
    """What earlier :func:`compile_policy` calls computed, reused by the next call when
    the inputs it came from are unchanged: parsed endpoint addresses, rendered profiles
    (compared with a snapshot, so a profile changed in place is noticed), endpoint
    chains and dispatch subtrees. Compiling N+1 endpoints after N then costs a few
    milliseconds instead of re-rendering all of them, and unchanged chains come back
    as the same list objects, which makes :func:`diff` cheap.

    The output is the same with or without a cache. Each call keeps only what it
    used, so the cache follows the policy's size. One cache per caller (not
    thread-safe); never mutate the states a cached compile returns.
    """

    def __init__(self) -> None:
        self._previous: dict[Hashable, Any] = {}
        self._current: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def get(self, key: Hashable, compute: Callable[[], _V]) -> _V:
        value = self.lookup(key)
        if value is _MISSING:
            value = self._current[key] = compute()
        return value

    def lookup(self, key: Hashable) -> Any:
        """The value kept for ``key`` (now kept for the next call too), or _MISSING."""
        value = self._current.get(key, _MISSING)
        if value is _MISSING:
            value = self._previous.pop(key, _MISSING)
            if value is not _MISSING:
                self._current[key] = value
        return value

    def store(self, key: Hashable, value: Any) -> None:
        self._current[key] = value

    def finish(self) -> None:
        """End of a compile: forget what it did not use."""
        self._previous = self._current
        self._current = {}


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


# --- endpoints -----------------------------------------------------------------------


def fail_closed_chains(
    endpoint: Endpoint, settings: PolicySettings | None = None
) -> dict[str, list[str]]:
    """DROP-only to/from chains for an endpoint whose policy cannot be rendered."""
    prefix = (settings or PolicySettings()).iface_prefix
    to_chain, from_chain = endpoint_chain_names(endpoint.iface, prefix)
    return {to_chain: [_FAIL_CLOSED], from_chain: [_FAIL_CLOSED]}


def _parse_addresses(values: Iterable[str], version: int) -> list[str]:
    """Canonical addresses (prefix stripped); raises ValueError on a bad one."""
    result = []
    for value in values:
        address = ipaddress.ip_address(str(value).split("/", 1)[0])
        if address.version != version:
            raise ValueError(f"{value} is not an IPv{version} address")
        result.append(str(address))
    return result


class _Context:
    """Per-compile caches: profile validity, rendered profile chains, jump lists."""

    def __init__(
        self,
        profiles: Mapping[str, Profile],
        settings: PolicySettings,
        cache: CompileCache | None = None,
    ) -> None:
        self.profiles = profiles
        self.settings = settings
        self.cache = cache
        self.mark = f"{settings.mark:#x}"
        self._problems: dict[str, str | None] = {}
        self._rendered: dict[tuple[str, int], dict[str, list[str]]] = {}
        self._lists: dict[tuple[tuple[str, ...], bool], tuple[str, list[str]]] = {}

    def profile_problem(self, name: str) -> str | None:
        """Why a profile cannot be used (None if it can); renders it once per family."""
        if name in self._problems:
            return self._problems[name]
        problem: str | None = None
        profile = self.profiles.get(name) if isinstance(name, str) else None
        if profile is None:
            problem = f"profile {name!r} does not exist"
        else:
            cached = self.cache.lookup(("profile", name)) if self.cache is not None else None
            try:
                if cached is None or cached is _MISSING or cached[0] != profile:
                    cached = None
            except Exception:  # noqa: BLE001 - an odd object: render it again
                cached = None
            if cached is not None:
                problem, rendered = cached[1], cached[2]
            else:
                rendered = {}
                try:
                    check_name(name, "profile name")
                    if profile.name != name:
                        raise InvalidRequest(f"is stored under the name {name!r}")
                    for version in (4, 6):
                        rendered[version] = render_profile_chains(profile, version)
                except Exception as exc:  # noqa: BLE001 - any failure must fail closed
                    problem = f"profile {name!r} cannot be rendered: {exc}"
                if self.cache is not None:
                    try:
                        snapshot = copy.deepcopy(profile)
                    except Exception:  # noqa: BLE001 - not cached then
                        pass
                    else:
                        self.cache.store(("profile", name), (snapshot, problem, rendered))
            if problem is None:
                for version in (4, 6):
                    self._rendered[name, version] = rendered[version]
        self._problems[name] = problem
        return problem

    def profile_chains(self, name: str, version: int) -> dict[str, list[str]]:
        return self._rendered[name, version]

    def profile_list(self, names: tuple[str, ...], inbound: bool) -> tuple[str, list[str]]:
        """(name, rules) of the chain that tries the profiles in order, then drops."""
        key = (names, inbound)
        found = self._lists.get(key)
        if found is None:
            check = f"-m mark --mark {self.mark}/{self.mark} -j RETURN"
            lines = [f"-j MARK --set-xmark 0x0/{self.mark}"]
            for name in names:
                chains = profile_chain_names(name)
                lines += [f"-j {chains[0] if inbound else chains[1]}", check]
            lines.append("-j DROP")
            found = (profile_list_chain_name(names, inbound), lines)
            if self.cache is not None:
                found = self.cache.get(("list", self.mark, names, inbound), lambda: found)
            self._lists[key] = found
        return found


@dataclass
class _Local:
    endpoint: Endpoint
    to_chain: str
    from_chain: str
    addresses: dict[int, list[str]]
    profiles: tuple[str, ...]
    problem: str | None


def _endpoint_basics(
    endpoint: Endpoint, prefix: str
) -> tuple[str, str, dict[int, list[str]], str | None, tuple[str, ...]]:
    """(to chain, from chain, addresses, address problem, profile names)."""
    to_chain, from_chain = endpoint_chain_names(endpoint.iface, prefix)
    problem: str | None = None
    addresses: dict[int, list[str]] = {4: [], 6: []}
    try:
        addresses = {4: _parse_addresses(endpoint.ipv4, 4), 6: _parse_addresses(endpoint.ipv6, 6)}
    except ValueError as exc:
        problem = f"bad address: {exc}"
    return to_chain, from_chain, addresses, problem, tuple(dict.fromkeys(endpoint.profiles))


def _prepare_local(endpoint: Endpoint, ctx: _Context) -> _Local:
    prefix = ctx.settings.iface_prefix
    basics: tuple[str, str, dict[int, list[str]], str | None, tuple[str, ...]] | None = None
    if ctx.cache is not None:
        try:
            key = (
                "endpoint", prefix, endpoint.id, endpoint.iface, tuple(endpoint.ipv4),
                tuple(endpoint.ipv6), tuple(endpoint.profiles),
            )
            hash(key)
        except TypeError:
            pass
        else:
            basics = ctx.cache.get(key, lambda: _endpoint_basics(endpoint, prefix))
    if basics is None:
        basics = _endpoint_basics(endpoint, prefix)
    to_chain, from_chain, addresses, problem, names = basics
    if problem is None:
        for name in names:
            problem = ctx.profile_problem(name)
            if problem is not None:
                break
    return _Local(endpoint, to_chain, from_chain, addresses, names, problem)


def _iface_problem(iface: str, prefix: str) -> str | None:
    if not isinstance(iface, str) or not _IFACE.fullmatch(iface):
        return f"interface name {iface!r} is not usable"
    if not iface.startswith(prefix) or iface == prefix:
        return f"interface name {iface!r} does not start with {prefix!r} (plus a suffix)"
    return None


def _endpoint_chains(
    local: _Local, version: int, ctx: _Context, accepts: Sequence[str]
) -> dict[str, list[str]]:
    if ctx.cache is None:
        return _render_endpoint(local, version, ctx, accepts)
    key = (
        "chains", version, ctx.mark, ctx.settings.iface_prefix, local.endpoint.iface,
        tuple(local.addresses[version]), local.profiles, local.problem, tuple(accepts),
    )
    return ctx.cache.get(key, lambda: _render_endpoint(local, version, ctx, accepts))


def _render_endpoint(
    local: _Local, version: int, ctx: _Context, accepts: Sequence[str]
) -> dict[str, list[str]]:
    if local.problem is not None:
        return {local.to_chain: [_FAIL_CLOSED], local.from_chain: [_FAIL_CLOSED]}
    addresses = local.addresses[version]
    if not addresses:
        # No address in this family: nothing legitimate flows either way.
        return {local.to_chain: ["-j DROP"], local.from_chain: ["-j DROP"]}
    host = "/32" if version == 4 else "/128"
    chains: dict[str, list[str]] = {}
    if len(addresses) == 1:
        spoof = [f"! -s {addresses[0]}{host} -j DROP"]
    else:
        spoof_chain = antispoof_chain_name(local.endpoint.iface, ctx.settings.iface_prefix)
        chains[spoof_chain] = [f"-s {a}{host} -j RETURN" for a in addresses] + ["-j DROP"]
        spoof = [f"-j {spoof_chain}"]
    for inbound in (True, False):
        name, rules = ctx.profile_list(local.profiles, inbound)
        chains[name] = rules
        if inbound:
            chains[local.to_chain] = [*accepts, f"-g {name}"]
        else:
            chains[local.from_chain] = [*spoof, f"-g {name}"]
    return chains


def render_endpoint_chains(
    endpoint: Endpoint,
    profiles: Mapping[str, Profile],
    version: int = 4,
    settings: PolicySettings | None = None,
    port_mappings: Sequence[PortMapping] = (),
) -> dict[str, list[str]]:
    """The to/from chains (and anti-spoof chain) of one endpoint in one family, with
    the profile-list chains they go to.

    Never raises and never leaves a chain out: when a profile is missing or fails to
    render, or anything else about the endpoint is unusable, the result is
    :func:`fail_closed_chains`. The profile chains themselves are not included.
    """
    settings = settings or PolicySettings()
    try:
        ctx = _Context(profiles, settings)
        local = _prepare_local(endpoint, ctx)
        if local.problem is None:
            local.problem = _iface_problem(endpoint.iface, settings.iface_prefix)
        mine = set(local.addresses[version])
        accepts = []
        for mapping in port_mappings:
            checked = _check_mapping(mapping)
            if isinstance(checked, _Mapping) and checked.container in mine:
                accepts.append(_forward_accept(checked))
        return _endpoint_chains(local, version, ctx, accepts)
    except Exception:  # noqa: BLE001 - fail closed whatever went wrong
        return fail_closed_chains(endpoint, settings)


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


def _forward_accept(mapping: _Mapping) -> str:
    """Lets DNATed connections of a published port through, ahead of the profiles."""
    protocol = mapping.protocol
    return (
        f"-d {mapping.container}{_host_length(mapping.version)} -p {protocol} -m {protocol}"
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


# --- the whole thing -------------------------------------------------------------------


def _dispatch_chains(
    root: str,
    kind: str,
    flag: str,
    prefix: str,
    entries: Sequence[tuple[str, str]],
    cache: CompileCache | None = None,
) -> dict[str, list[str]]:
    """Interface dispatch as a prefix tree; ``entries`` are (iface, target chain)."""

    def subtree(chain: str, depth: int, items: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
        if cache is None:
            return build(chain, depth, items)
        key = ("dispatch", flag, kind, prefix, chain, depth, items)
        return cache.get(key, lambda: build(chain, depth, items))

    def build(chain: str, depth: int, items: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
        chains: dict[str, list[str]] = {}
        rules: list[str] = []
        if len(items) <= DISPATCH_LEAF:
            rules = [f"{flag} {iface} -g {target}" for iface, target in items]
        else:
            groups: dict[str, list[tuple[str, str]]] = {}
            for iface, target in items:
                if len(iface) == depth:
                    rules.append(f"{flag} {iface} -g {target}")
                else:
                    groups.setdefault(iface[: depth + 1], []).append((iface, target))
            for stem in sorted(groups):
                group = groups[stem]
                if len(group) == 1:
                    iface, target = group[0]
                    rules.append(f"{flag} {iface} -g {target}")
                    continue
                sub = chain_name(kind, stem[len(prefix):])
                rules.append(f"{flag} {stem}+ -g {sub}")
                chains.update(subtree(sub, depth + 1, tuple(group)))
        rules.append("-j DROP")
        chains[chain] = rules
        return chains

    return dict(subtree(root, len(prefix), tuple(sorted(entries))))


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
        # The endpoint's outbound profiles first (they drop or return), then the action;
        # "return" falls off the end back to the host's own INPUT rules.
        inbound.append(f"-i {wl} -j {FROM_DISPATCH}")
        if settings.workload_to_host == "accept":
            inbound.append(f"-i {wl} -j ACCEPT")
    return {
        FORWARD_CHAIN: forward,
        INPUT_CHAIN: inbound,
        ALLOW_CHAIN: [f"-j MARK --set-xmark {mark}/{mark}"],
    }


def compile_policy(
    endpoints: Iterable[Endpoint],
    profiles: Mapping[str, Profile],
    pools: Iterable[Pool] = (),
    port_mappings: Iterable[PortMapping] = (),
    settings: PolicySettings | None = None,
    remote_endpoints: Iterable[Endpoint] = (),
    cache: CompileCache | None = None,
) -> CompiledPolicy:
    """Compile the desired state of both IP families.

    ``endpoints`` are this host's endpoints (they get chains); ``remote_endpoints`` are
    the other hosts' (their addresses only fill tag sets; ``iface`` is ignored).
    ``profiles`` maps name -> Profile and may hold more than the endpoints use: only
    used profiles get chains, and only tags their rules refer to get sets.
    Problems never raise: they are listed in ``warnings`` and fail closed.
    ``cache``: reuse what the previous call with this cache computed (same output,
    much faster when little changed; see :class:`CompileCache`).
    """
    try:
        return _compile(
            endpoints, profiles, pools, port_mappings, settings or PolicySettings(),
            remote_endpoints, cache,
        )
    finally:
        if cache is not None:
            cache.finish()


def _compile(
    endpoints: Iterable[Endpoint],
    profiles: Mapping[str, Profile],
    pools: Iterable[Pool],
    port_mappings: Iterable[PortMapping],
    settings: PolicySettings,
    remote_endpoints: Iterable[Endpoint],
    cache: CompileCache | None,
) -> CompiledPolicy:
    ctx = _Context(profiles, settings, cache)
    warnings: list[str] = []
    by_iface: dict[str, _Local] = {}
    for endpoint in endpoints:
        iface_problem = _iface_problem(endpoint.iface, settings.iface_prefix)
        if iface_problem is not None:
            warnings.append(f"endpoint {endpoint.id}: {iface_problem}; it gets no chains")
            continue
        local = _prepare_local(endpoint, ctx)
        other = by_iface.get(endpoint.iface)
        if other is not None:
            problem = f"interface {endpoint.iface} is used by endpoints {other.endpoint.id} " \
                      f"and {endpoint.id}"
            other.problem = problem
            warnings.append(f"endpoint {endpoint.id}: {problem}; both fail closed")
            continue
        by_iface[endpoint.iface] = local
        if local.problem is not None:
            warnings.append(f"endpoint {endpoint.id}: {local.problem}; it fails closed")
    locals_ = list(by_iface.values())

    used = sorted({name for local in locals_ if local.problem is None for name in local.profiles})
    needed_tags: set[str] = set()
    for name in used:
        needed_tags |= profiles[name].referenced_tags()
    tag_members = _tag_members(locals_, remote_endpoints, profiles, needed_tags, warnings)

    mappings: list[_Mapping] = []
    for mapping in port_mappings:
        checked = _check_mapping(mapping)
        if isinstance(checked, str):
            warnings.append(f"port mapping {mapping} skipped: {checked}")
        else:
            mappings.append(checked)
    pool_list = _parse_pools(pools, warnings)

    # Interface dispatch is the same in both families.
    prefix = settings.iface_prefix
    to_entries = [(local.endpoint.iface, local.to_chain) for local in locals_]
    from_entries = [(local.endpoint.iface, local.from_chain) for local in locals_]
    dispatch = _dispatch_chains(TO_DISPATCH, "twd", "-o", prefix, to_entries, ctx.cache)
    dispatch.update(_dispatch_chains(FROM_DISPATCH, "fwd", "-i", prefix, from_entries, ctx.cache))

    states = {
        version: _compile_family(
            version, ctx, locals_, used, tag_members[version], pool_list, mappings, dispatch,
            warnings,
        )
        for version in (4, 6)
    }
    return CompiledPolicy(v4=states[4], v6=states[6])


def _tag_members(
    locals_: Sequence[_Local],
    remote_endpoints: Iterable[Endpoint],
    profiles: Mapping[str, Profile],
    needed_tags: set[str],
    warnings: list[str],
) -> dict[int, dict[str, set[str]]]:
    """Per family, tag -> addresses of every endpoint (any host) whose profiles carry it."""
    members: dict[int, dict[str, set[str]]] = {
        version: {tag: set() for tag in needed_tags} for version in (4, 6)
    }
    if not needed_tags:
        return members
    tags_of: dict[tuple[str, ...], list[str]] = {}

    def tags_for(names: tuple[str, ...]) -> list[str]:
        tags = tags_of.get(names)
        if tags is None:
            found: dict[str, None] = {}
            for name in names:
                profile = profiles.get(name) if isinstance(name, str) else None
                if profile is not None:
                    found.update((tag, None) for tag in profile.tags if tag in needed_tags)
            tags = tags_of[names] = list(found)
        return tags

    for local in locals_:
        for tag in tags_for(local.profiles):
            members[4][tag].update(local.addresses[4])
            members[6][tag].update(local.addresses[6])
    for endpoint in remote_endpoints:
        tags = tags_for(tuple(endpoint.profiles))
        if not tags:
            continue
        try:
            v4 = _parse_addresses(endpoint.ipv4, 4)
            v6 = _parse_addresses(endpoint.ipv6, 6)
        except ValueError as exc:
            warnings.append(f"remote endpoint {endpoint.id}: {exc}; left out of tag sets")
            continue
        for tag in tags:
            members[4][tag].update(v4)
            members[6][tag].update(v6)
    return members


def _compile_family(
    version: int,
    ctx: _Context,
    locals_: Sequence[_Local],
    used_profiles: Sequence[str],
    tag_members: Mapping[str, set[str]],
    pools: Sequence[tuple[str, int, bool]],
    mappings: Sequence[_Mapping],
    dispatch: Mapping[str, list[str]],
    warnings: list[str],
) -> DesiredState:
    settings = ctx.settings
    filter_chains = _fixed_filter_chains(version, settings, ctx.mark)
    prerouting: list[str] = []
    masquerade_rule = ""

    # Published ports: DNAT in nat, and an accept at the top of the endpoint's to-chain.
    by_address = (
        {address: local for local in locals_ for address in local.addresses[version]}
        if mappings else {}
    )
    accepts: dict[str, list[str]] = {}
    taken: set[tuple[str, str | None, int]] = set()
    for mapping in mappings:
        if mapping.version != version:
            continue
        local = by_address.get(mapping.container)
        if local is None or local.problem is not None:
            warnings.append(
                f"port mapping to {mapping.container}:{mapping.container_port} skipped: "
                "not a usable local endpoint"
            )
            continue
        key = (mapping.protocol, mapping.host, mapping.host_port)
        if key in taken:
            warnings.append(
                f"port mapping to {mapping.container}:{mapping.container_port} skipped: "
                f"host port {mapping.protocol}/{mapping.host_port} is already published"
            )
            continue
        taken.add(key)
        prerouting.append(_dnat_rule(mapping))
        accepts.setdefault(local.to_chain, []).append(_forward_accept(mapping))

    # Profiles (only those in use and renderable), then endpoints and dispatch.
    for name in used_profiles:
        filter_chains.update(ctx.profile_chains(name, version))
    for local in locals_:
        filter_chains.update(
            _endpoint_chains(local, version, ctx, accepts.get(local.to_chain, ()))
        )
    filter_chains.update(dispatch)

    # Sets: tags, pools; masquerade nat-outgoing pools to anything outside every pool.
    family = "inet" if version == 4 else "inet6"
    ipsets = {
        tag_set_name(tag, version): IpSet("hash:ip", family, frozenset(members))
        for tag, members in tag_members.items()
    }
    all_set, masq_set = pool_set_names(version)
    ipsets[all_set] = IpSet(
        "hash:net", family, frozenset(cidr for cidr, v, _ in pools if v == version)
    )
    ipsets[masq_set] = IpSet(
        "hash:net", family, frozenset(cidr for cidr, v, nat in pools if v == version and nat)
    )
    masquerade_rule = (
        f"-m set --match-set {masq_set} src -m set ! --match-set {all_set} dst -j MASQUERADE"
    )
    nat_chains = {
        PREROUTING_CHAIN: prerouting,
        OUTPUT_CHAIN: list(prerouting),
        POSTROUTING_CHAIN: [masquerade_rule],
    }
    return DesiredState(
        version=version,
        tables={FILTER: filter_chains, NAT: nat_chains},
        ipsets=ipsets,
        hooks=_hooks(version),
        warnings=warnings,
    )


# --- rendering for the kernel, and diffs ------------------------------------------------


def render_restore(
    table_chains: Mapping[str, Sequence[str]], table: str, delete: Iterable[str] = ()
) -> str:
    """``iptables-restore --noflush`` input that flushes and rewrites exactly the given
    chains (creating missing ones) and deletes the chains in ``delete``.

    Deleted chains are flushed first and removed last, in the same transaction, so
    chains that referenced them can be rewritten alongside.
    """
    names = sorted(table_chains)
    doomed = sorted(set(delete) - set(names))
    for name in (*names, *doomed):
        if not is_own_chain(name) or len(name) > MAX_CHAIN_NAME or not _SAFE.fullmatch(name):
            raise ValueError(f"refusing to write chain {name!r}: not one of ours")
    lines = [f"*{table}"]
    lines += [f":{name} - [0:0]" for name in (*names, *doomed)]
    for name in names:
        lines += [f"-A {name} {rule}" for rule in table_chains[name]]
    lines += [f"-X {name}" for name in doomed]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _temp_set(ipset: IpSet) -> str:
    version = 4 if ipset.family == "inet" else 6
    return f"cali{version}-tmp-{ipset.type.split(':')[1]}"


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


@dataclass
class RestorePlan:
    """The texts a writer feeds to the kernel, in this order: ``ipsets``
    (``ipset restore``), each of ``tables`` (``iptables-restore --noflush`` or
    ``ip6tables-restore --noflush``), then the hooks, then ``destroy_sets``."""

    ipsets: str
    tables: dict[str, str]
    destroy_sets: str
    diff: StateDiff


def plan_restore(old: DesiredState | None, new: DesiredState) -> RestorePlan:
    """Texts that take the kernel from ``old`` (as applied) to ``new``, touching only
    what changed. Pass ``old=None`` for a full resync."""
    changes = diff(old, new)
    tables = {}
    for table in sorted(set(changes.changed_chains) | set(changes.deleted_chains)):
        names = changes.changed_chains.get(table, [])
        doomed = changes.deleted_chains.get(table, [])
        if names or doomed:
            chains = new.tables.get(table, {})
            tables[table] = render_restore({n: chains[n] for n in names}, table, doomed)
    sets = {name: new.ipsets[name] for name in changes.changed_sets}
    return RestorePlan(
        ipsets=render_ipset_restore(sets, old.ipsets if old is not None else None),
        tables=tables,
        destroy_sets=render_ipset_destroy(changes.deleted_sets),
        diff=changes,
    )
