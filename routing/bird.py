"""The BIRD 2 configuration generator: nodes + peers + pools + blocks -> bird.conf.

Pure (no I/O): :func:`render_bird_config` returns the text of one BIRD 2 (Debian
``bird2`` 2.0.12) configuration covering IPv4 and IPv6. The output is deterministic
(everything sorted), so an unchanged input gives byte-identical text and the agent
reloads BIRD only when the text changes.

Topology, as Calico lays it out:

* mesh on (the default): a ``Mesh_<addr>`` iBGP session to every other node, per
  family both ends have;
* mesh off: a node with a route-reflector cluster id is a reflector; a client peers
  only with the reflectors, a reflector with the other reflectors (plain iBGP) and with
  every client (``rr client; rr cluster id``). These sessions are named
  ``Node_<addr>``, as Calico names its reflector peerings;
* explicit peers: ``Global_<addr>`` (every node) or ``Node_<addr>`` (one node),
  typically eBGP to a top-of-rack router.

Between two nodes exactly one side connects: a node is ``passive`` towards a peer with
a higher address, so the higher address opens the session.

Routes: this node's affine blocks and the addresses it borrowed from other nodes'
blocks are *originated by BIRD* in a ``static`` protocol (``blackhole``), not learned
from the kernel. The agent programs the matching kernel blackholes itself (protocol
202); BIRD never exports them back (the kernel protocols export BGP routes only).
Originating them here keeps the advertisement a function of the datastore alone: it
does not flap while the agent replaces its kernel routes during a resync, does not
depend on BIRD's kernel scan, and needs no filter keyed on a foreign route protocol.

Filters: only prefixes inside BGP-carried pools (pools without encapsulation; the
agent programs VXLAN and IP-in-IP pool routes) are imported from BGP and installed
in the kernel. Towards other nodes a node exports its own routes and (for
reflection) BGP routes inside those pools; towards explicit peers only its own
routes. Every session has explicit filters (RFC 8212). The kernel protocols learn
non-Calico kernel routes (e.g. a default route) so multihop BGP next hops resolve
recursively, and never learn anything inside a pool.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from routing.planner import MODE_NEVER, BlockInfo, PoolInfo

DEFAULT_AS_NUMBER = 64512
CONNECT_DELAY_TIME = 2
CONNECT_RETRY_TIME = 5
KERNEL_SCAN_TIME = 2
DEVICE_SCAN_TIME = 10
# Seconds a restarted BIRD waits for its peers before updating the kernel.
GRACEFUL_RESTART_WAIT = 10
# Devices whose routes say nothing about how to reach a BGP neighbour.
DIRECT_EXCLUDED = ("cali*", "docker*", "br-*", "veth*", "tunl*", "vxlan*")

# Peer types, as `node status` shows them.
PEER_MESH = "node-to-node mesh"
PEER_GLOBAL = "global"
PEER_NODE = "node specific"
PEER_REFLECTOR = "route reflector"
PEER_RR_CLIENT = "route reflector client"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class BgpSettings:
    default_as: int = DEFAULT_AS_NUMBER
    mesh: bool = True


@dataclass(frozen=True)
class BgpPeer:
    """An explicit BGP peer: for every node (``node`` None) or for one node."""

    address: str
    as_number: int
    node: str | None = None


@dataclass(frozen=True)
class BgpNode:
    """A node's BGP facts. Addresses in interface form ("10.0.0.5/24") or plain."""

    name: str
    ipv4: str | None = None
    ipv6: str | None = None
    as_number: int | None = None  # None: the settings' default AS
    rr_cluster_id: str | None = None  # set: a route reflector (when the mesh is off)

    def address(self, version: int) -> IPAddress | None:
        value = self.ipv4 if version == 4 else self.ipv6
        return ipaddress.ip_interface(value).ip if value else None

    def asn(self, settings: BgpSettings) -> int:
        return self.as_number if self.as_number is not None else settings.default_as

    @property
    def reflector(self) -> bool:
        return self.rr_cluster_id is not None


def identifier(prefix: str, address: IPAddress | str) -> str:
    """A BIRD symbol for a session: ``Mesh_10_0_0_5``, ``Node_fd00__1``."""
    text = str(ipaddress.ip_address(str(address)))
    return prefix + "_" + text.replace(".", "_").replace(":", "_")


def bgp_pools(pools: Iterable[PoolInfo]) -> list[PoolInfo]:
    """The pools whose routes BGP carries: those without encapsulation. The agent
    programs VXLAN and IP-in-IP pool routes itself, with or without BGP (one owner
    per route, and the same tested path in both routing modes)."""
    return [p for p in pools if p.vxlan_mode == MODE_NEVER and p.ipip_mode == MODE_NEVER]


@dataclass(frozen=True)
class _Session:
    name: str
    version: int
    local: IPAddress
    local_as: int
    neighbor: IPAddress
    neighbor_as: int
    export: str  # filter name
    passive: bool = False
    rr_cluster_id: str | None = None  # set: the neighbour is our reflector client
    next_hop_self: bool = False
    comment: str = ""
    peer_type: str = ""  # shown by `node status` (BIRD's protocol description)


def _sort_key(address: IPAddress) -> tuple[int, int]:
    return address.version, int(address)


def _prefix_set(networks: Iterable[IPNetwork]) -> str:
    return ", ".join(f"{n}+" for n in sorted(set(networks), key=_net_key))


def _net_key(network: IPNetwork) -> tuple[int, int, int]:
    return network.version, int(network.network_address), network.prefixlen


def _inside(network: IPNetwork, pools: Sequence[PoolInfo]) -> bool:
    return any(p.network.version == network.version
               and network.subnet_of(p.network)  # type: ignore[arg-type]
               for p in pools)


def local_routes(me: BgpNode, pools: Iterable[PoolInfo], blocks: Iterable[BlockInfo]
                 ) -> list[IPNetwork]:
    """What this node originates: its affine blocks and its borrowed host routes,
    inside BGP-carried pools only, sorted."""
    carried = bgp_pools(pools)
    routes: set[IPNetwork] = set()
    for block in blocks:
        network = ipaddress.ip_network(block.cidr)
        if not _inside(network, carried):
            continue
        if block.host == me.name:
            routes.add(network)
        elif block.host is not None:
            for address, node in block.borrowed.items():
                if node == me.name:
                    routes.add(ipaddress.ip_network(address))
    return sorted(routes, key=_net_key)


def _node_sessions(me: BgpNode, nodes: Iterable[BgpNode], settings: BgpSettings
                   ) -> list[_Session]:
    others = sorted({n.name: n for n in nodes if n.name != me.name}.values(),
                    key=lambda n: n.name)
    sessions = []
    for other in others:
        if settings.mesh:
            prefix, rr_cluster_id, peer_type = "Mesh", None, PEER_MESH
        elif me.reflector:
            prefix = "Node"
            rr_cluster_id = None if other.reflector else me.rr_cluster_id
            peer_type = PEER_REFLECTOR if other.reflector else PEER_RR_CLIENT
        elif other.reflector:
            prefix, rr_cluster_id, peer_type = "Node", None, PEER_REFLECTOR
        else:
            continue  # two clients never peer
        for version in (4, 6):
            mine, theirs = me.address(version), other.address(version)
            if mine is None or theirs is None or mine == theirs:
                continue
            sessions.append(_Session(
                name=identifier(prefix, theirs), version=version, local=mine,
                local_as=me.asn(settings), neighbor=theirs,
                neighbor_as=other.asn(settings), export=f"calico_export_nodes{version}",
                passive=int(theirs) > int(mine), rr_cluster_id=rr_cluster_id,
                comment=f"node {other.name}", peer_type=peer_type))
    return sessions


def _peer_sessions(me: BgpNode, peers: Iterable[BgpPeer], settings: BgpSettings,
                   taken: set[IPAddress]) -> tuple[list[_Session], list[str]]:
    """Explicit peers of this node; a node-specific peer wins over a global one at the
    same address, and a node session wins over both."""
    chosen: dict[IPAddress, BgpPeer] = {}
    for peer in sorted(peers, key=lambda p: (p.node is not None, p.address, p.as_number)):
        if peer.node is not None and peer.node != me.name:
            continue
        chosen[ipaddress.ip_address(peer.address)] = peer
    sessions, skipped = [], []
    for address in sorted(chosen, key=_sort_key):
        peer = chosen[address]
        mine = me.address(address.version)
        if address in taken:
            skipped.append(f"peer {address}: already a node session")
            continue
        if mine is None:
            skipped.append(f"peer {address}: this node has no IPv{address.version} address")
            continue
        prefix = "Global" if peer.node is None else "Node"
        sessions.append(_Session(
            name=identifier(prefix, address), version=address.version, local=mine,
            local_as=me.asn(settings), neighbor=address, neighbor_as=peer.as_number,
            export=f"calico_export_local{address.version}", next_hop_self=True,
            comment=("global peer" if peer.node is None else f"peer of node {peer.node}"),
            peer_type=PEER_GLOBAL if peer.node is None else PEER_NODE))
    return sessions, skipped


def _filters(version: int, pools: Sequence[PoolInfo]) -> list[str]:
    carried = [p.network for p in bgp_pools(pools) if p.network.version == version]
    every = [p.network for p in pools if p.network.version == version]
    v = version
    lines: list[str] = []

    def block(name: str, body: list[str]) -> None:
        lines.append(f"filter {name} {{")
        lines.extend(f"  {line}" for line in body)
        lines.append("}")
        lines.append("")

    inside = f"net ~ [ {_prefix_set(carried)} ]" if carried else None
    local = f'proto = "calico_local{v}"'
    block(f"calico_import{v}",
          ([f"if {inside} then accept;"] if inside else []) + ["reject;"])
    block(f"calico_export_local{v}",
          ([f"if {local} && {inside} then accept;"] if inside else []) + ["reject;"])
    block(f"calico_export_nodes{v}",
          ([f"if {local} && {inside} then accept;",
            f"if source = RTS_BGP && {inside} then accept;"] if inside else [])
          + ["reject;"])
    block(f"calico_kernel_export{v}",
          ([f"if source = RTS_BGP && {inside} then accept;"] if inside else [])
          + ["reject;"])
    block(f"calico_kernel_import{v}",
          ([f"if net ~ [ {_prefix_set(every)} ] then reject;"] if every else [])
          + ["accept;"])
    return lines


def _session_lines(session: _Session) -> list[str]:
    v = session.version
    lines = [f"protocol bgp {session.name} {{  # {session.comment}",
             f'  description "{session.peer_type}";',
             f"  local {session.local} as {session.local_as};",
             f"  neighbor {session.neighbor} as {session.neighbor_as};",
             "  multihop;"]
    if session.passive:
        lines.append("  passive on;  # the higher address connects")
    if session.rr_cluster_id is not None:
        lines.append("  rr client;")
        lines.append(f"  rr cluster id {session.rr_cluster_id};")
    lines += ["  graceful restart on;",
              f"  connect delay time {CONNECT_DELAY_TIME};",
              f"  connect retry time {CONNECT_RETRY_TIME};",
              f"  ipv{v} {{",
              f"    import filter calico_import{v};",
              f"    export filter {session.export};"]
    lines.append("    next hop self;" if session.next_hop_self else "    gateway recursive;")
    lines += ["    add paths on;", "  };", "}", ""]
    return lines


def _cluster_id(value: str | int) -> str:
    return str(ipaddress.IPv4Address(int(value) if str(value).isdigit() else value))


def render_bird_config(me: BgpNode, nodes: list[BgpNode], peers: list[BgpPeer],
                       pools: list[PoolInfo], blocks: list[BlockInfo],
                       settings: BgpSettings, router_id: str | None = None) -> str:
    """This node's bird.conf (BIRD 2). ``router_id`` defaults to the node's IPv4
    address; a node without one must be given it. Raises ValueError on bad input."""
    if me.rr_cluster_id is not None:
        me = BgpNode(me.name, me.ipv4, me.ipv6, me.as_number, _cluster_id(me.rr_cluster_id))
    nodes = [BgpNode(n.name, n.ipv4, n.ipv6, n.as_number,
                     None if n.rr_cluster_id is None else _cluster_id(n.rr_cluster_id))
             for n in nodes]
    rid = router_id if router_id is not None else (
        str(me.address(4)) if me.address(4) is not None else None)
    if rid is None:
        raise ValueError(f"node {me.name} has no IPv4 address: a router id must be given")
    rid = str(ipaddress.IPv4Address(rid))
    versions = [v for v in (4, 6) if me.address(v) is not None]

    node_sessions = _node_sessions(me, nodes, settings)
    peer_sessions, skipped = _peer_sessions(
        me, peers, settings, {s.neighbor for s in node_sessions})
    sessions = sorted(node_sessions + peer_sessions,
                      key=lambda s: (s.version, int(s.neighbor), s.name))
    originated = local_routes(me, pools, blocks)

    out = ["# Generated by calico-cnm from the datastore; do not edit.",
           f"# Node {me.name}, AS {me.asn(settings)}, "
           f"mesh {'on' if settings.mesh else 'off'}"
           + (f", route reflector (cluster id {me.rr_cluster_id})" if me.reflector
              and not settings.mesh else "") + ".",
           "",
           "log stderr { info, remote, warning, error, auth, fatal, bug };",
           f"router id {rid};",
           "# Started with -R, BIRD holds back kernel updates until every peer is back",
           "# (240 s by default): a peer that is down must not stall this node's routes.",
           f"graceful restart wait {GRACEFUL_RESTART_WAIT};",
           "",
           "protocol device {",
           f"  scan time {DEVICE_SCAN_TIME};",
           "}",
           "",
           "# Interface routes, so that BGP next hops resolve (gateway recursive).",
           "protocol direct {",
           *[f"  ipv{v};" for v in versions],
           "  interface " + ", ".join(f'-"{d}"' for d in DIRECT_EXCLUDED) + ', "*";',
           "}",
           ""]
    for v in versions:
        out += _filters(v, pools)
    for v in versions:
        out += ["# BGP routes inside pools into the kernel (ECMP merged); non-pool kernel",
                "# routes learned for next-hop resolution only.",
                f"protocol kernel kernel{v} {{",
                "  learn;",
                "  persist;",
                f"  scan time {KERNEL_SCAN_TIME};",
                "  graceful restart;",
                "  merge paths on;",
                f"  ipv{v} {{",
                f"    import filter calico_kernel_import{v};",
                f"    export filter calico_kernel_export{v};",
                "  };",
                "}",
                ""]
    for v in versions:
        mine = [n for n in originated if n.version == v]
        out += ["# This node's blocks and borrowed addresses, originated here (the agent",
                "# programs the kernel blackholes itself; they are not exported to it).",
                f"protocol static calico_local{v} {{",
                f"  ipv{v};",
                *[f"  route {n} blackhole;" for n in mine],
                "}",
                ""]
    for note in skipped:
        out.append(f"# skipped {note}")
    if skipped:
        out.append("")
    for session in sessions:
        out += _session_lines(session)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"
