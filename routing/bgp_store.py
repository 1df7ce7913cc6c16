"""BGP settings in the datastore: the cluster's BGP configuration, explicit peers and
per-node BGP settings, as operators write them (`calico-cnm bgp ...`, `node set`,
`apply -f`) and agents read them.

Keys (all small, written rarely, watched by every agent running BGP):

* ``bgp/config``: ``{"as_number": N, "mesh": true|false}`` (absent: AS 64512, mesh on);
* ``bgp/peers/global/<address>``: a peer of every node;
* ``bgp/peers/node/<node>/<address>``: a peer of one node;
* ``bgp/nodes/<node>``: ``{"as_number": N|null, "rr_cluster_id": "a.b.c.d"|null}``.

Node settings live apart from the node record (``nodes/<name>``), which the node's
agent rewrites from its interfaces: an operator's setting survives that, and can be
made before the node first starts (a route reflector is configured, then started).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datastore.base import ROOT, AlreadyExists, Datastore, RevisionConflict, cas_attempts, dumps
from datastore.errors import InvalidRequest, NotFound
from routing.bird import DEFAULT_AS_NUMBER, BgpPeer, BgpSettings

BGP = ROOT + "bgp/"
CONFIG_KEY = BGP + "config"
PEERS = BGP + "peers/"
GLOBAL_PEERS = PEERS + "global/"
NODE_PEERS = PEERS + "node/"
NODE_SETTINGS = BGP + "nodes/"
MAX_AS_NUMBER = 4294967295
_NODE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


@dataclass(frozen=True)
class NodeBgp:
    """An operator's BGP settings for one node (None: not set)."""

    name: str
    as_number: int | None = None
    rr_cluster_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"as_number": self.as_number, "rr_cluster_id": self.rr_cluster_id}


# ------------------------------------------------------------------ validation


def as_number(value: object) -> int:
    """An AS number (1 to 4294967295), from an int or its text."""
    try:
        number = int(str(value), 10)
    except (TypeError, ValueError):
        raise InvalidRequest(f"AS number {value!r} is not a number") from None
    if not 1 <= number <= MAX_AS_NUMBER:
        raise InvalidRequest(f"AS number {number} is out of range (1 to {MAX_AS_NUMBER})")
    return number


def cluster_id(value: object) -> str:
    """A route-reflector cluster id in dotted form ("244.0.0.1"), from that or a
    32-bit number."""
    text = str(value).strip()
    try:
        if text.isdigit():
            return str(ipaddress.IPv4Address(int(text)))
        return str(ipaddress.IPv4Address(text))
    except (ValueError, ipaddress.AddressValueError):
        raise InvalidRequest(
            f"route-reflector cluster id {value!r} is not an IPv4-style id such as "
            "244.0.0.1 (or a 32-bit number)") from None


def peer_address(value: object) -> str:
    try:
        address = ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise InvalidRequest(f"peer address {value!r} is not an IP address") from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise InvalidRequest(f"peer address {address} cannot be a BGP neighbour")
    return str(address)


def node_name(value: object) -> str:
    text = str(value)
    if not _NODE_NAME.match(text):
        raise InvalidRequest(f"node name {value!r} is not valid")
    return text


def settings_from(data: Any) -> BgpSettings:
    """The BGP configuration document (None: the defaults)."""
    if not isinstance(data, dict):
        return BgpSettings()
    return BgpSettings(default_as=int(data.get("as_number", DEFAULT_AS_NUMBER)),
                       mesh=bool(data.get("mesh", True)))


def peer_from(key: str, data: Any) -> BgpPeer:
    """A peer from its key and document (the key names the scope)."""
    node = None
    if key.startswith(NODE_PEERS):
        node = key[len(NODE_PEERS):].split("/", 1)[0]
    return BgpPeer(str(data["address"]), int(data["as_number"]), node)


def node_settings_from(key: str, data: Any) -> NodeBgp:
    name = key[len(NODE_SETTINGS):]
    as_value = data.get("as_number") if isinstance(data, dict) else None
    rr = data.get("rr_cluster_id") if isinstance(data, dict) else None
    return NodeBgp(name, int(as_value) if as_value is not None else None,
                   str(rr) if rr is not None else None)


def peer_key(address: str, node: str | None) -> str:
    if node is None:
        return GLOBAL_PEERS + address
    return f"{NODE_PEERS}{node}/{address}"


# ------------------------------------------------------------------ the store


class BgpStore:
    """Reads and writes the BGP documents; every write is validated first and is a
    compare-and-swap, so concurrent operators do not undo each other."""

    def __init__(self, store: Datastore, max_attempts: int = 50) -> None:
        self._store = store
        self._max_attempts = max_attempts

    def _swap(self, key: str, change: Callable[[Any], Any]) -> None:
        """Read-change-swap one document; change() returning None deletes it."""
        for _ in cas_attempts(f"updating {key[len(ROOT):]}", self._max_attempts):
            entry = self._store.get(key)
            wanted = change(entry.data if entry is not None else None)
            try:
                if wanted is None:
                    if entry is not None:
                        self._store.delete(key, entry.revision)
                    return
                text = dumps(wanted)
                if entry is None:
                    self._store.create(key, text)
                elif text != dumps(entry.data):
                    self._store.update(key, text, entry.revision)
                return
            except (AlreadyExists, RevisionConflict):
                continue

    # -- the cluster's configuration

    def settings(self) -> BgpSettings:
        entry = self._store.get(CONFIG_KEY)
        return settings_from(entry.data if entry is not None else None)

    def configure(self, as_number_value: object | None = None, mesh: bool | None = None
                  ) -> BgpSettings:
        number = as_number(as_number_value) if as_number_value is not None else None

        def change(current: Any) -> dict[str, Any]:
            settings = settings_from(current)
            kept = current if isinstance(current, dict) else {}  # a newer version's keys
            return {**kept,
                    "as_number": number if number is not None else settings.default_as,
                    "mesh": mesh if mesh is not None else settings.mesh}

        self._swap(CONFIG_KEY, change)
        return self.settings()

    # -- explicit peers

    def peers(self) -> list[BgpPeer]:
        return sorted((peer_from(e.key, e.data) for e in self._store.list(PEERS)),
                      key=lambda p: (p.node or "", p.address))

    def peer(self, address: str, node: str | None = None) -> BgpPeer | None:
        key = peer_key(address, node)
        entry = self._store.get(key)
        return peer_from(key, entry.data) if entry is not None else None

    def add_peer(self, address: object, as_value: object, node: str | None = None
                 ) -> tuple[BgpPeer, bool]:
        """Adds or changes a peer; whether it was new."""
        peer = BgpPeer(peer_address(address), as_number(as_value),
                       node_name(node) if node is not None else None)
        key = peer_key(peer.address, peer.node)
        existed = self._store.get(key) is not None
        self._swap(key, lambda _: {"address": peer.address, "as_number": peer.as_number})
        return peer, not existed

    def remove_peer(self, address: object, node: str | None = None) -> BgpPeer:
        text = peer_address(address)
        key = peer_key(text, node_name(node) if node is not None else None)
        entry = self._store.get(key)
        if entry is None:
            where = f" of node {node}" if node else " (global)"
            others = [p for p in self.peers() if p.address == text]
            hint = ("; it is a peer of " + ", ".join(
                f"node {p.node}" if p.node else "every node (global)" for p in others)
                + " (give --node accordingly)") if others else ""
            raise NotFound(f"no BGP peer {text}{where}{hint}")
        peer = peer_from(key, entry.data)
        self._store.delete(key)
        return peer

    # -- per-node settings

    def node(self, name: str) -> NodeBgp:
        entry = self._store.get(NODE_SETTINGS + node_name(name))
        if entry is None:
            return NodeBgp(name)
        return node_settings_from(entry.key, entry.data)

    def nodes(self) -> dict[str, NodeBgp]:
        result = {}
        for entry in self._store.list(NODE_SETTINGS):
            settings = node_settings_from(entry.key, entry.data)
            result[settings.name] = settings
        return result

    def set_node(self, name: str, as_value: object | None = None,
                 rr_cluster_id: object | None = None, clear_as: bool = False,
                 clear_rr: bool = False) -> NodeBgp:
        """Sets (or clears) a node's AS number and route-reflector cluster id; a node
        left with neither has no document."""
        name = node_name(name)
        number = as_number(as_value) if as_value is not None else None
        rr = cluster_id(rr_cluster_id) if rr_cluster_id is not None else None

        def change(current: Any) -> dict[str, Any] | None:
            existing = node_settings_from(NODE_SETTINGS + name, current or {})
            wanted = NodeBgp(
                name,
                None if clear_as else (number if number is not None else existing.as_number),
                None if clear_rr else (rr if rr is not None else existing.rr_cluster_id))
            if wanted.as_number is None and wanted.rr_cluster_id is None:
                return None
            kept = current if isinstance(current, dict) else {}  # a newer version's keys
            return {**kept, **wanted.to_dict()}

        self._swap(NODE_SETTINGS + name, change)
        return self.node(name)

    def forget_node(self, name: str) -> None:
        """A removed node's settings and its own peers."""
        self._store.delete(NODE_SETTINGS + name)
        for entry in self._store.list(f"{NODE_PEERS}{name}/"):
            self._store.delete(entry.key)
