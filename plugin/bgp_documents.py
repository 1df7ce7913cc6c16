"""The BGP kinds of `calico-cnm apply -f` / `get`: bgpconfig, bgppeer and node.

    - kind: bgpconfig          # the cluster's: default AS, node-to-node mesh
      as_number: 64512
      mesh: true
    - kind: bgppeer            # an explicit peer: of every node, or of one (node:)
      address: 10.0.0.1
      as_number: 65001
      node: h1
    - kind: node               # one node's BGP settings; null clears a setting
      name: rr1
      as_number: null
      route_reflector_cluster_id: 244.0.0.1

Like the other kinds, a document states the whole desired state of its object
(a key left out takes its default), and apply never deletes anything: `bgp peer
remove` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datastore.errors import InvalidRequest
from routing.bgp_store import BgpStore, as_number, cluster_id, node_name, peer_address
from routing.bird import DEFAULT_AS_NUMBER

BGP_KINDS = ("bgpconfig", "bgppeer", "node")
_KEYS = {
    "bgpconfig": ("kind", "as_number", "mesh"),
    "bgppeer": ("kind", "address", "as_number", "node"),
    "node": ("kind", "name", "as_number", "route_reflector_cluster_id"),
}


@dataclass(frozen=True)
class BgpConfigDocument:
    as_number: int
    mesh: bool


@dataclass(frozen=True)
class BgpPeerDocument:
    address: str
    as_number: int
    node: str | None


@dataclass(frozen=True)
class NodeDocument:
    name: str
    as_number: int | None
    route_reflector_cluster_id: str | None


BgpDocument = BgpConfigDocument | BgpPeerDocument | NodeDocument


def parse_bgp_document(item: Mapping[str, Any]) -> BgpDocument:
    kind = str(item["kind"])
    for key in item:
        if key not in _KEYS[kind]:
            raise InvalidRequest(f"unknown {kind} key '{key}' (known: {', '.join(_KEYS[kind])})")
    if kind == "bgpconfig":
        mesh = item.get("mesh", True)
        if not isinstance(mesh, bool):
            raise InvalidRequest(f"mesh: {mesh!r} is not true or false")
        return BgpConfigDocument(_as(item.get("as_number", DEFAULT_AS_NUMBER)), mesh)
    if kind == "bgppeer":
        if "address" not in item or "as_number" not in item:
            raise InvalidRequest("a bgppeer needs an address and an as_number")
        node = item.get("node")
        try:
            address = peer_address(item["address"])
        except InvalidRequest as exc:
            raise InvalidRequest(f"address: {exc}") from None
        return BgpPeerDocument(address, _as(item["as_number"]),
                               _name(node) if node is not None else None)
    if "name" not in item:
        raise InvalidRequest("name: a node document needs the node's name")
    rr = item.get("route_reflector_cluster_id")
    try:
        rr_id = cluster_id(rr) if rr is not None else None
    except InvalidRequest as exc:
        raise InvalidRequest(f"route_reflector_cluster_id: {exc}") from None
    number = item.get("as_number")
    return NodeDocument(_name(item["name"]), _as(number) if number is not None else None,
                        rr_id)


def _as(value: object) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(f"as_number: {value!r} is not a number")
    try:
        return as_number(value)
    except InvalidRequest as exc:
        raise InvalidRequest(f"as_number: {exc}") from None


def _name(value: object) -> str:
    try:
        return node_name(value)
    except InvalidRequest as exc:
        raise InvalidRequest(f"node: {exc}") from None


def bgp_label(document: BgpDocument) -> str:
    if isinstance(document, BgpConfigDocument):
        return "bgpconfig"
    if isinstance(document, BgpPeerDocument):
        return f"bgppeer {document.address}" + (f" of node {document.node}"
                                                if document.node else "")
    return f"node {document.name}"


def apply_bgp_document(document: BgpDocument, bgp: BgpStore) -> str:
    """Applies one document: created, updated or unchanged."""
    if isinstance(document, BgpConfigDocument):
        before = bgp.settings()
        after = bgp.configure(document.as_number, document.mesh)
        return "unchanged" if before == after else "updated"
    if isinstance(document, BgpPeerDocument):
        before = bgp.peer(document.address, document.node)
        peer, _ = bgp.add_peer(document.address, document.as_number, document.node)
        if before is None:
            return "created"
        return "unchanged" if before == peer else "updated"
    before_node = bgp.node(document.name)
    after_node = bgp.set_node(document.name, document.as_number,
                              document.route_reflector_cluster_id,
                              clear_as=document.as_number is None,
                              clear_rr=document.route_reflector_cluster_id is None)
    return "unchanged" if before_node == after_node else "updated"


def get_bgp_documents(kind: str, bgp: BgpStore) -> list[dict[str, Any]] | None:
    """The documents of a BGP kind (None: not a BGP kind)."""
    if kind == "bgpconfig":
        settings = bgp.settings()
        return [{"kind": "bgpconfig", "as_number": settings.default_as,
                 "mesh": settings.mesh}]
    if kind in ("bgppeer", "bgppeers"):
        documents = []
        for peer in bgp.peers():
            document: dict[str, Any] = {"kind": "bgppeer", "address": peer.address,
                                        "as_number": peer.as_number}
            if peer.node is not None:
                document["node"] = peer.node
            documents.append(document)
        return documents
    if kind in ("node", "nodes"):
        return [{"kind": "node", "name": n.name, "as_number": n.as_number,
                 "route_reflector_cluster_id": n.rr_cluster_id}
                for n in sorted(bgp.nodes().values(), key=lambda n: n.name)]
    return None
