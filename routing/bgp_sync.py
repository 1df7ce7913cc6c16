"""This host's BGP inputs, kept in memory from the datastore, rendered as bird.conf.

The BGP documents (configuration, peers, node settings) are kept here from watch
events like :class:`routing.sync.RouteSync` keeps nodes, pools and blocks; the two
together are everything :func:`routing.bird.render_bird_config` needs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping

from datastore.base import Datastore, Event
from routing.bgp_store import (
    BGP,
    CONFIG_KEY,
    NODE_SETTINGS,
    PEERS,
    NodeBgp,
    node_settings_from,
    peer_from,
    settings_from,
)
from routing.bird import BgpNode, BgpPeer, BgpSettings, render_bird_config
from routing.nodes import NodeRecord
from routing.planner import BlockInfo, PoolInfo

log = logging.getLogger(__name__)


def effective_as(record: NodeRecord | None, settings: NodeBgp | None,
                 bgp: BgpSettings) -> int:
    """A node's AS: `node set --as`, else its agent's --as-number, else the default."""
    if settings is not None and settings.as_number is not None:
        return settings.as_number
    if record is not None and record.as_number is not None:
        return record.as_number
    return bgp.default_as


def router_id(record: NodeRecord) -> str:
    """The node's IPv4 address; an IPv6-only node gets a stable id from its name."""
    if record.ipv4:
        return str(ipaddress.ip_interface(record.ipv4).ip)
    digest = hashlib.sha1(record.name.encode()).digest()
    return str(ipaddress.IPv4Address(bytes([10, *digest[:3]])))


def bgp_nodes(records: Iterable[NodeRecord], settings: Mapping[str, NodeBgp],
              bgp: BgpSettings) -> list[BgpNode]:
    result = []
    for record in records:
        mine = settings.get(record.name)
        result.append(BgpNode(record.name, record.ipv4, record.ipv6,
                              effective_as(record, mine, bgp),
                              mine.rr_cluster_id if mine else None))
    return result


class BgpModel:
    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self.settings = BgpSettings()
        self._peers: dict[str, BgpPeer] = {}
        self._nodes: dict[str, NodeBgp] = {}

    def load(self, store: Datastore) -> None:
        config = store.get(CONFIG_KEY)
        self.settings = settings_from(config.data if config else None)
        self._peers = {}
        self._nodes = {}
        for entry in store.list(BGP):
            self._put(entry.key, entry.value)

    def apply_events(self, events: Iterable[Event]) -> bool:
        changed = False
        for event in events:
            if not event.key.startswith(BGP):
                continue
            if event.kind == "delete" or event.value is None:
                self._peers.pop(event.key, None)
                self._nodes = {n: s for n, s in self._nodes.items()
                               if NODE_SETTINGS + n != event.key}
                if event.key == CONFIG_KEY:
                    self.settings = BgpSettings()
            else:
                self._put(event.key, event.value)
            changed = True
        return changed

    def _put(self, key: str, value: str) -> None:
        try:
            data = json.loads(value)
            if key == CONFIG_KEY:
                self.settings = settings_from(data)
            elif key.startswith(PEERS):
                self._peers[key] = peer_from(key, data)
            elif key.startswith(NODE_SETTINGS):
                node = node_settings_from(key, data)
                self._nodes[node.name] = node
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("BGP document %s is unreadable: %s", key, exc)

    @property
    def node_settings(self) -> dict[str, NodeBgp]:
        return dict(self._nodes)

    def render(self, nodes: Mapping[str, NodeRecord], pools: list[PoolInfo],
               blocks: list[BlockInfo]) -> str:
        """This node's bird.conf; ValueError when this node is not registered or the
        documents make no valid configuration."""
        me = nodes.get(self._hostname)
        if me is None:
            raise ValueError(f"node {self._hostname} is not registered yet")
        everyone = bgp_nodes(nodes.values(), self._nodes, self.settings)
        mine = next(n for n in everyone if n.name == self._hostname)
        return render_bird_config(mine, everyone, list(self._peers.values()), pools,
                                  blocks, self.settings, router_id=router_id(me))
