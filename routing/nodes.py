"""The node registry: one record per host, and its heartbeat and status.

``nodes/<name>`` is what other hosts route by: the node's addresses (interface form,
with the prefix of its subnet, so "same subnet" can be decided), its uplink, AS number
and tunnel addresses. It changes rarely, so every agent may watch it. The heartbeat and
the status report (routing mode, tunnels, routes per peer, errors, last resync) go to
``/calico-cnm/status/v1/nodes/<name>``, rewritten every resync, which no agent has to
react to: it lives outside the prefix the agents watch, so a heartbeat is one write and
no watch events (under the watched prefix it reached every agent, n² events per
interval).

Address autodetection is pure: :func:`detect_address` picks from the interface
addresses that the netlink wrapper lists, as Calico does (first found, an interface
name pattern, or the source address towards a destination), never from devices of
ours, Docker's or tunnels.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dataplane.netlink import InterfaceAddress
from datastore.base import (
    ROOT,
    STATUS_ROOT,
    AlreadyExists,
    Datastore,
    RevisionConflict,
    cas_attempts,
    dumps,
)
from datastore.errors import InvalidRequest, NotFound
from routing.planner import NodeInfo

NODES = ROOT + "nodes/"
NODE_STATUS = STATUS_ROOT + "nodes/"
LEGACY_NODE_STATUS = ROOT + "nodestatus/"  # where heartbeats were, under the watch

# Devices whose addresses are never a node's: ours, Docker's, bridges, veths, tunnels.
EXCLUDED_INTERFACES = re.compile(
    r"^(lo|cali.*|docker.*|br-.*|veth.*|tunl.*|vxlan.*|virbr.*|flannel.*|cni.*|kube-.*"
    r"|wg.*|ip6tnl.*|sit.*|gre.*)$"
)


def node_key(name: str) -> str:
    return NODES + name


def status_key(name: str) -> str:
    return NODE_STATUS + name


@dataclass
class NodeRecord:
    name: str
    ipv4: str | None = None  # "10.0.0.5/24": the address and its subnet
    ipv6: str | None = None
    interface: str | None = None  # the uplink (VXLAN's parent; its MTU sizes veths)
    mtu: int | None = None
    as_number: int | None = None  # given by the node's --as-number; None: the default
    vxlan_ipv4: str | None = None  # tunnel addresses, from a pool of that mode
    ipip_ipv4: str | None = None

    def info(self) -> NodeInfo:
        return NodeInfo(self.name, self.ipv4, self.ipv6, self.vxlan_ipv4, self.ipip_ipv4)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class NodeStatus:
    """What a node last said about itself (its heartbeat, :data:`NODE_STATUS`)."""

    name: str
    heartbeat: float  # wall-clock seconds: compared across hosts
    started: float
    last_resync: float | None = None
    errors: list[str] = field(default_factory=list)
    tunnels: dict[str, Any] = field(default_factory=dict)
    peers: list[dict[str, Any]] = field(default_factory=list)
    routes: int = 0
    routing: str = "static"
    bgp: dict[str, Any] | None = None  # BIRD's state and sessions (routing bgp)

    def alive(self, now: float, timeout: float) -> bool:
        return now - self.heartbeat <= timeout

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeStatus:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# ------------------------------------------------------------------ autodetection


def detect_address(
    addresses: Iterable[InterfaceAddress],
    version: int,
    method: str = "first-found",
    source_for: Callable[[str], str | None] | None = None,
) -> InterfaceAddress | None:
    """This node's address of one family by Calico's methods, or None.

    ``first-found``: the first global address of an interface that is up and not
    excluded; ``interface=REGEX``: the first one on an interface whose whole name
    matches; ``can-reach=DEST``: the address the kernel would send from towards DEST
    (``source_for`` asks the kernel).
    """
    candidates = [
        a for a in addresses
        if ipaddress.ip_interface(a.address).version == version and a.up
        and _global(a.address)
    ]
    kind, _, value = method.partition("=")
    if kind == "interface":
        pattern = re.compile(value)
        return next((a for a in candidates if pattern.fullmatch(a.ifname)), None)
    if kind == "can-reach":
        if source_for is None:
            return None
        source = source_for(value)
        if source is None:
            return None
        return next((a for a in candidates
                     if ipaddress.ip_interface(a.address).ip == ipaddress.ip_address(source)),
                    None)
    return next((a for a in candidates if not EXCLUDED_INTERFACES.match(a.ifname)), None)


def _global(address: str) -> bool:
    ip = ipaddress.ip_interface(address).ip
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def configured_address(value: str, addresses: Iterable[InterfaceAddress]) -> InterfaceAddress:
    """--node-ip: the address as given; its prefix and interface come from the
    interface that holds it when the prefix is left out."""
    given = ipaddress.ip_interface(value)
    for candidate in addresses:
        if ipaddress.ip_interface(candidate.address).ip == given.ip:
            if "/" in value:
                return replace(candidate, address=str(given))
            return candidate
    if "/" not in value:
        raise InvalidRequest(
            f"node address {value} is on no interface of this host: give it with its "
            "prefix length (e.g. 10.0.0.5/24)"
        )
    return InterfaceAddress(ifname="", address=str(given), up=True, kind=None)


# ------------------------------------------------------------------ the registry


class NodeRegistry:
    """Node records and statuses in the datastore (compare-and-swap, retried)."""

    def __init__(self, store: Datastore, max_attempts: int = 50) -> None:
        self._store = store
        self._max_attempts = max_attempts
        self._legacy_cleared: set[str] = set()

    def get(self, name: str) -> NodeRecord:
        entry = self._store.get(node_key(name))
        if entry is None:
            raise NotFound(f"no node {name!r} is registered")
        return NodeRecord.from_dict(entry.data)

    def list(self) -> list[NodeRecord]:
        return [NodeRecord.from_dict(e.data) for e in self._store.list(NODES)]

    def statuses(self) -> dict[str, NodeStatus]:
        result = {}
        for entry in self._store.list(NODE_STATUS):
            status = NodeStatus.from_dict(entry.data)
            result[status.name] = status
        return result

    def register(self, record: NodeRecord) -> NodeRecord:
        """Write this node's addresses, uplink and AS number; tunnel addresses already
        recorded are kept (they are allocated separately)."""

        def change(current: NodeRecord | None) -> NodeRecord:
            if current is None:
                return record
            return replace(record, vxlan_ipv4=current.vxlan_ipv4, ipip_ipv4=current.ipip_ipv4)

        return self.update(record.name, change)

    def update(self, name: str, change: Callable[[NodeRecord | None], NodeRecord | None]
               ) -> NodeRecord:
        """Read-change-swap the node record; change() returning None deletes it."""
        key = node_key(name)
        for _ in cas_attempts(f"updating node {name}", self._max_attempts):
            entry = self._store.get(key)
            current = NodeRecord.from_dict(entry.data) if entry is not None else None
            wanted = change(current)
            try:
                if wanted is None:
                    if entry is not None:
                        self._store.delete(key, entry.revision)
                    return current or NodeRecord(name)
                if current is not None and wanted.to_dict() == current.to_dict():
                    return current
                text = dumps(wanted.to_dict())
                if entry is None:
                    self._store.create(key, text)
                else:
                    self._store.update(key, text, entry.revision)
                return wanted
            except (AlreadyExists, RevisionConflict):
                continue
        raise AssertionError("unreachable")

    def report(self, status: NodeStatus) -> None:
        self._store.put_json(status_key(status.name), status.to_dict())
        if status.name not in self._legacy_cleared:
            self._store.delete(LEGACY_NODE_STATUS + status.name)  # an older version's
            self._legacy_cleared.add(status.name)

    def forget(self, name: str) -> None:
        self._store.delete(node_key(name))
        self._store.delete(status_key(name))
        self._store.delete(LEGACY_NODE_STATUS + name)


def now() -> float:
    return time.time()


def local_node(
    name: str,
    addresses: list[InterfaceAddress],
    link_mtu: Callable[[str], int],
    source_for: Callable[[str], str | None],
    node_ip: str | None = None,
    node_ipv6: str | None = None,
    ip_autodetection: str = "first-found",
    ipv6_autodetection: str = "first-found",
    as_number: int | None = None,
) -> NodeRecord:
    """This host's node record from its interfaces (given or autodetected addresses).

    InvalidRequest when neither family has an address: the node cannot be routed to.
    """
    found: dict[int, InterfaceAddress | None] = {}
    for version, given, method in ((4, node_ip, ip_autodetection),
                                   (6, node_ipv6, ipv6_autodetection)):
        found[version] = (configured_address(given, addresses) if given
                          else detect_address(addresses, version, method, source_for))
    v4, v6 = found[4], found[6]
    if v4 is None and v6 is None:
        raise InvalidRequest(
            f"no address found for node {name} (IPv4 by {ip_autodetection}, IPv6 by "
            f"{ipv6_autodetection}); set --node-ip or --ip-autodetection"
        )
    interface = next((a.ifname for a in (v4, v6) if a is not None and a.ifname), None)
    mtu = None
    if interface:
        try:
            mtu = link_mtu(interface)
        except NotFound:
            mtu = None
    return NodeRecord(
        name=name, ipv4=v4.address if v4 else None, ipv6=v6.address if v6 else None,
        interface=interface, mtu=mtu, as_number=as_number,
    )
