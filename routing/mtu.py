"""The MTU of a container's veth: the node's uplink MTU less the encapsulation overhead
of the pools its network's subnets come from (VXLAN 50, IP-in-IP 20)."""

from __future__ import annotations

import netaddr

from datastore.base import Datastore
from ipam_driver.pools import PoolSet
from ipam_driver.service import POOLS_KEY
from routing.nodes import NodeRecord, node_key
from routing.planner import IPIP_OVERHEAD, VXLAN_OVERHEAD


def veth_mtu(store: Datastore, hostname: str, subnets: list[str]) -> int | None:
    """None when this node has not registered its uplink yet (the kernel's default)."""
    entry = store.get(node_key(hostname))
    if entry is None:
        return None
    uplink = NodeRecord.from_dict(entry.data).mtu
    if not uplink:
        return None
    pools_entry = store.get(POOLS_KEY)
    pools = PoolSet.from_dict(pools_entry.data if pools_entry else None)
    overhead = 0
    for subnet in subnets:
        pool = pools.containing(netaddr.IPNetwork(subnet))
        if pool is None:
            continue
        if pool.vxlan:
            overhead = max(overhead, VXLAN_OVERHEAD)
        elif pool.ipip:
            overhead = max(overhead, IPIP_OVERHEAD)
    return uplink - overhead
