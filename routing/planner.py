"""The route planner: nodes + blocks + pools -> what this host's kernel should hold.

Pure (no I/O). For every allocation block affine to another node, a route towards
that node, by the pool's mode:

* direct: ``<block> via <node address>``, only to a node on this node's L2 subnet
  (a node on another subnet cannot be reached without encapsulation or BGP: it is
  reported unreachable);
* VXLAN: ``<block> via <node's VXLAN tunnel address> dev vxlan.calico onlink``, plus a
  permanent neighbour entry (tunnel address -> the node's VTEP MAC) and an FDB entry
  (VTEP MAC -> node address) on the VXLAN device;
* IP-in-IP: ``<block> via <node address> dev tunl0 onlink``.

``cross-subnet`` encapsulates only towards nodes on another subnet. Blocks affine to
this node become blackhole routes (a freed address of ours is not routed back out);
an address borrowed from another node's block is routed as a /32 (/128) to the node
that borrowed it, on every node but that one.

With BGP (``bgp=True``) the routes of pools without encapsulation are BIRD's: the
plan leaves them out (and reports the peer as reached by BGP); VXLAN and IP-in-IP
pool routes and the local blackholes stay the agent's.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dataplane.netlink import Route

VXLAN_DEVICE = "vxlan.calico"
VXLAN_VNI = 4096
VXLAN_PORT = 4789
IPIP_DEVICE = "tunl0"
VXLAN_OVERHEAD = 50
IPIP_OVERHEAD = 20

MODE_ALWAYS = "always"
MODE_CROSS_SUBNET = "cross-subnet"
MODE_NEVER = "never"
ENCAP_MODES = (MODE_ALWAYS, MODE_CROSS_SUBNET, MODE_NEVER)

DIRECT = "direct"
VXLAN = "vxlan"
IPIP = "ipip"
BGP = "bgp"


def vtep_mac(node_name: str) -> str:
    """A VTEP MAC that every node derives alike from the node's name: locally
    administered, unicast (first byte 0x66), then 5 bytes of the name's SHA-1."""
    digest = hashlib.sha1(node_name.encode()).digest()
    return ":".join(f"{byte:02x}" for byte in (0x66, *digest[:5]))


@dataclass(frozen=True)
class NodeInfo:
    """What the planner needs of a node: its addresses (interface form, with the
    prefix of its subnet) and tunnel addresses."""

    name: str
    ipv4: str | None = None
    ipv6: str | None = None
    vxlan_ipv4: str | None = None
    ipip_ipv4: str | None = None

    def address(self, version: int) -> str | None:
        value = self.ipv4 if version == 4 else self.ipv6
        return str(ipaddress.ip_interface(value).ip) if value else None

    def same_subnet(self, other: NodeInfo, version: int) -> bool:
        mine = self.ipv4 if version == 4 else self.ipv6
        theirs = other.address(version)
        if not mine or theirs is None:
            return False
        return ipaddress.ip_address(theirs) in ipaddress.ip_interface(mine).network


@dataclass(frozen=True)
class PoolInfo:
    cidr: str
    vxlan_mode: str = MODE_NEVER
    ipip_mode: str = MODE_NEVER

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.cidr)


@dataclass(frozen=True)
class BlockInfo:
    """A block and the addresses in it that another node borrowed (address -> node)."""

    cidr: str
    host: str | None
    borrowed: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    vni: int
    port: int
    local: str
    mac: str
    address: str | None  # this node's tunnel address, if it has one yet
    mtu_overhead: int = VXLAN_OVERHEAD


@dataclass(frozen=True)
class IpipDevice:
    name: str
    address: str | None
    mtu_overhead: int = IPIP_OVERHEAD


@dataclass
class PeerReport:
    """How this node reaches one other node."""

    name: str
    modes: set[str] = field(default_factory=set)
    routes: int = 0
    unreachable: list[str] = field(default_factory=list)


@dataclass
class RoutePlan:
    routes: set[Route] = field(default_factory=set)
    vxlan: VxlanDevice | None = None
    ipip: IpipDevice | None = None
    neighbours: dict[tuple[str, str], str] = field(default_factory=dict)  # (dev, ip) -> mac
    fdb: dict[tuple[str, str], str] = field(default_factory=dict)  # (dev, mac) -> dst
    peers: dict[str, PeerReport] = field(default_factory=dict)
    # Addresses of known nodes: the only sources allowed to send us encapsulated traffic.
    node_addresses: set[str] = field(default_factory=set)

    def peer(self, name: str) -> PeerReport:
        return self.peers.setdefault(name, PeerReport(name))


def _pool_of(pools: Iterable[PoolInfo], block: ipaddress.IPv4Network | ipaddress.IPv6Network
             ) -> PoolInfo | None:
    for pool in pools:
        network = pool.network
        if network.version == block.version and block.subnet_of(network):  # type: ignore[arg-type]
            return pool
    return None


def _encapsulates(mode: str, same_subnet: bool) -> bool:
    return mode == MODE_ALWAYS or (mode == MODE_CROSS_SUBNET and not same_subnet)


def peer_mode(me: NodeInfo, peer: NodeInfo, pool: PoolInfo | None, version: int) -> str:
    """direct, vxlan or ipip: how traffic for pool goes from me to peer."""
    if pool is None or version == 6:
        return DIRECT
    same = me.same_subnet(peer, version)
    if _encapsulates(pool.vxlan_mode, same):
        return VXLAN
    if _encapsulates(pool.ipip_mode, same):
        return IPIP
    return DIRECT


def plan_routes(
    me: NodeInfo,
    nodes: Mapping[str, NodeInfo],
    pools: Iterable[PoolInfo],
    blocks: Iterable[BlockInfo],
    bgp: bool = False,
) -> RoutePlan:
    pools = list(pools)
    plan = RoutePlan()
    v4_pools = [p for p in pools if p.network.version == 4]
    if any(p.vxlan_mode != MODE_NEVER for p in v4_pools) and me.address(4):
        plan.vxlan = VxlanDevice(
            VXLAN_DEVICE, VXLAN_VNI, VXLAN_PORT, me.address(4) or "", vtep_mac(me.name),
            me.vxlan_ipv4,
        )
    if any(p.ipip_mode != MODE_NEVER for p in v4_pools):
        plan.ipip = IpipDevice(IPIP_DEVICE, me.ipip_ipv4)
    for node in nodes.values():
        if node.name == me.name:
            continue
        plan.node_addresses.update(a for a in (node.address(4), node.address(6)) if a)
        plan.peer(node.name)

    def route_to(node_name: str, dst: str, pool: PoolInfo | None) -> None:
        node = nodes.get(node_name)
        version = ipaddress.ip_network(dst).version
        report = plan.peer(node_name)
        if node is None:
            report.unreachable.append(f"{dst}: node {node_name} is not registered")
            return
        address = node.address(version)
        if address is None:
            report.unreachable.append(f"{dst}: node has no IPv{version} address")
            return
        mode = peer_mode(me, node, pool, version)
        if bgp and (pool is None or (pool.vxlan_mode == MODE_NEVER
                                     and pool.ipip_mode == MODE_NEVER)):
            report.modes.add(BGP)  # BIRD learns and installs it
            report.routes += 1
            return
        if mode == VXLAN:
            if plan.vxlan is None or not node.vxlan_ipv4:
                report.unreachable.append(f"{dst}: node has no VXLAN tunnel address yet")
                return
            tunnel = str(ipaddress.ip_interface(node.vxlan_ipv4).ip)
            mac = vtep_mac(node.name)
            plan.routes.add(Route(dst, via=tunnel, dev=VXLAN_DEVICE, onlink=True))
            plan.neighbours[(VXLAN_DEVICE, tunnel)] = mac
            plan.fdb[(VXLAN_DEVICE, mac)] = address
        elif mode == IPIP:
            plan.routes.add(Route(dst, via=address, dev=IPIP_DEVICE, onlink=True))
        else:
            if not me.same_subnet(node, version):
                report.unreachable.append(
                    f"{dst}: node {address} is on another subnet and the pool has no "
                    "encapsulation (use --vxlan-mode/--ipip-mode, or BGP)"
                )
                return
            plan.routes.add(Route(dst, via=address))
        report.modes.add(mode)
        report.routes += 1

    for block in sorted(blocks, key=lambda b: b.cidr):
        network = ipaddress.ip_network(block.cidr)
        pool = _pool_of(pools, network)
        if block.host == me.name:
            plan.routes.add(Route(block.cidr, blackhole=True))
        elif block.host:
            route_to(block.host, block.cidr, pool)
        full = network.max_prefixlen
        for address, borrower in sorted(block.borrowed.items()):
            if borrower != me.name:
                route_to(borrower, f"{address}/{full}", pool)
    return plan
