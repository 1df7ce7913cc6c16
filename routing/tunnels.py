"""Tunnel addresses: each node's address on vxlan.calico / tunl0, from a pool of that
mode, so that the host itself can reach remote workloads (and get their replies).

A node's tunnel address gets a subnet of its own (one block of the pool, reserved
like a network's subnet with only this node claiming it), so no network's subnet
or gateway can collide with it, and the block, affine to the node, is routed to it
by every other node like any other. Its handle is ``<mode>-tunnel-addr-<node>``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from netaddr import IPAddress, IPNetwork

from datastore.errors import Conflict
from ipam_driver.pools import carve
from ipam_driver.service import TUNNEL_OPTION, IpamService
from routing.nodes import NodeRecord, NodeRegistry

log = logging.getLogger(__name__)

MODES = ("vxlan", "ipip")
ATTEMPTS = 10


def tunnel_handle(mode: str, node: str) -> str:
    return f"{mode}-tunnel-addr-{node}"


def ensure_tunnel_addresses(ipam: IpamService, registry: NodeRegistry,
                            node: NodeRecord) -> NodeRecord:
    """Gives the node a tunnel address for each mode some IPv4 pool uses (keeping one
    it has while it still lies in such a pool); returns the record as stored."""
    pools = [p for p in ipam.get_pools() if p.version == 4 and not p.deleting]
    changes: dict[str, str | None] = {}
    for mode in MODES:
        current = getattr(node, f"{mode}_ipv4")
        wanted = [p for p in pools if getattr(p, mode)]
        if current and any(IPAddress(current) in p.network for p in wanted):
            continue
        if not wanted:
            continue  # kept: the pool may come back; node remove releases it
        address = _allocate(ipam, mode, node.name, [p for p in wanted if p.usable] or wanted)
        if address is not None:
            changes[f"{mode}_ipv4"] = address
    if not changes:
        return node
    log.info("tunnel addresses of %s: %s", node.name, changes)
    return registry.update(node.name, lambda r: replace(r or node, **changes))


def _allocate(ipam: IpamService, mode: str, name: str, pools: list) -> str | None:
    handle = tunnel_handle(mode, name)
    for allocation in ipam.list_allocations():
        if allocation.handle == handle:
            return allocation.address  # allocated before a crash: take it back
    for _ in range(ATTEMPTS):
        taken = [IPNetwork(s.cidr) for s in ipam.list_subnets()]
        for pool in pools:
            cidr = carve(pool.network, taken, pool.block_size)
            if cidr is None:
                continue
            try:
                pool_id, _, _ = ipam.request_pool(str(cidr), None, {TUNNEL_OPTION: handle}, False)
            except Conflict:
                break  # another node took it meanwhile: look again
            if ipam.claimed_hosts(pool_id) != [name]:
                ipam.release_pool(pool_id)  # joined another's reservation: not ours
                break
            address = ipam.request_address(pool_id, str(IPAddress(cidr.first + 1)), None)
            ip = address.split("/")[0]
            ipam.assign_handle(ip, handle)
            return ip
        else:
            log.warning("no room for a %s tunnel address of %s in %s", mode, name,
                        ", ".join(p.cidr for p in pools))
            return None
    return None
