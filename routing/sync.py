"""This host's routing inputs, kept in memory from the datastore, and programmed.

The agent hands every watch batch to :meth:`RouteSync.apply_events`: node records,
the pools document and allocation blocks update the model in place (the events carry
the values, so nothing is read), and a change re-plans and rewrites only what
differs. :meth:`RouteSync.load` reads it all again (the periodic resync).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from datastore.base import Datastore, Event
from ipam_driver.block_store import BLOCKS_PREFIX
from ipam_driver.blocks import AllocationBlock
from ipam_driver.pools import PoolSet
from ipam_driver.service import KIND_GATEWAY, POOLS_KEY
from routing.nodes import NODES, NodeRecord
from routing.planner import BlockInfo, PoolInfo, RoutePlan, plan_routes
from routing.writer import RoutingNetlink, WriteReport, write_plan

log = logging.getLogger(__name__)

ROUTING_PREFIXES = (NODES, POOLS_KEY, BLOCKS_PREFIX)


def block_info(data: Any) -> BlockInfo:
    """A block as the planner sees it: its host, and the container addresses in it
    that another host allocated (borrowed). Gateways are on every host: not routed."""
    block = AllocationBlock.from_dict(data)
    borrowed = {}
    for ip, record in block.allocations():
        borrower = record.attrs.get("requested_by")
        if borrower and borrower != block.host and record.attrs.get("kind") != KIND_GATEWAY:
            borrowed[str(ip)] = str(borrower)
    return BlockInfo(str(block.cidr), block.host, borrowed)


def pool_infos(data: Any) -> list[PoolInfo]:
    return [PoolInfo(p.cidr, p.vxlan_mode, p.ipip_mode) for p in PoolSet.from_dict(data).pools]


class RouteSync:
    def __init__(self, store: Datastore, hostname: str,
                 netlink_factory: Callable[[], RoutingNetlink], bgp: bool = False) -> None:
        self._bgp = bgp
        self._store = store
        self._hostname = hostname
        self._netlink_factory = netlink_factory
        self._nodes: dict[str, NodeRecord] = {}
        self._pools: list[PoolInfo] = []
        self._blocks: dict[str, BlockInfo] = {}
        self.loaded = False
        self.plan: RoutePlan | None = None
        self.last_report: WriteReport | None = None

    # -- inputs ----------------------------------------------------------------------

    def load(self) -> None:
        self._nodes = {}
        for entry in self._store.list(NODES):
            self._put_node(entry.key, entry.value)
        pools = self._store.get(POOLS_KEY)
        self._pools = pool_infos(pools.data if pools else None)
        self._blocks = {}
        for entry in self._store.list(BLOCKS_PREFIX):
            self._put_block(entry.key, entry.value)
        self.loaded = True

    def apply_events(self, events: Iterable[Event]) -> bool:
        """Applies the routing-relevant events; whether any was."""
        changed = False
        for event in events:
            if event.key.startswith(NODES):
                if event.kind == "delete" or event.value is None:
                    self._nodes = {n: r for n, r in self._nodes.items()
                                   if event.key != NODES + n}
                else:
                    self._put_node(event.key, event.value)
            elif event.key == POOLS_KEY:
                self._pools = pool_infos(json.loads(event.value) if event.value else None)
            elif event.key.startswith(BLOCKS_PREFIX):
                if event.kind == "delete" or event.value is None:
                    self._blocks.pop(event.key, None)
                else:
                    self._put_block(event.key, event.value)
            else:
                continue
            changed = True
        return changed

    def apply_node(self, record: NodeRecord) -> None:
        """This host's own record, as just registered (before its watch event)."""
        self._nodes[record.name] = record

    def _put_node(self, key: str, value: str) -> None:
        try:
            record = NodeRecord.from_dict(json.loads(value))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("node record %s is unreadable: %s", key, exc)
            return
        self._nodes[record.name] = record

    def _put_block(self, key: str, value: str) -> None:
        try:
            self._blocks[key] = block_info(json.loads(value))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("block %s is unreadable: %s", key, exc)

    @property
    def me(self) -> NodeRecord | None:
        return self._nodes.get(self._hostname)

    @property
    def nodes(self) -> dict[str, NodeRecord]:
        return dict(self._nodes)

    @property
    def blocks(self) -> list[BlockInfo]:
        return list(self._blocks.values())

    @property
    def pools(self) -> list[PoolInfo]:
        return list(self._pools)

    # -- output ----------------------------------------------------------------------

    def program(self) -> WriteReport:
        if not self.loaded:
            self.load()
        me = self.me
        if me is None:
            # Not registered yet: plan nothing rather than remove routes blindly.
            report = WriteReport(errors=[f"node {self._hostname} is not registered yet"])
            self.last_report = report
            return report
        plan = plan_routes(me.info(), {n: r.info() for n, r in self._nodes.items()},
                           self._pools, self._blocks.values(), bgp=self._bgp)
        with self._netlink_factory() as netlink:  # type: ignore[attr-defined]
            report = write_plan(netlink, plan, me.interface, me.mtu)
        if report.changed:
            log.info("routes: %d added, %d removed", len(report.added), len(report.removed))
        for error in report.errors:
            log.warning("routing: %s", error)
        self.plan = plan
        self.last_report = report
        return report
