"""`calico-cnm node remove NAME`: forget a host for good, releasing what it held.

Its endpoint records and their addresses, its networks' claims on their subnets (the
last claim releases a subnet), its tunnel addresses, the affinity of its blocks (a
block still holding addresses, e.g. a gateway other hosts use, stays without a host;
an empty one is deleted), its node record and status, and its BGP settings and own
peers. Every other host's agent then removes its routes to that node's blocks (they
are gone from the datastore) and its BGP sessions to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from datastore.base import Datastore
from datastore.errors import Conflict, NotFound
from driver.records import ENDPOINTS, NETWORKS, EndpointRecord, NetworkRecord
from ipam_driver.service import TUNNEL_OPTION, IpamService
from routing.bgp_store import BgpStore
from routing.nodes import NodeRegistry, now
from routing.tunnels import MODES, tunnel_handle

log = logging.getLogger(__name__)


@dataclass
class Removal:
    endpoints: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)


def remove_node(store: Datastore, name: str, timeout: float, force: bool,
                ipam_factory: type[IpamService] = IpamService) -> Removal:
    registry = NodeRegistry(store)
    registry.get(name)  # NotFound for an unknown node
    status = registry.statuses().get(name)
    if status is not None and status.alive(now(), timeout) and not force:
        raise Conflict(
            f"node {name} is alive (heartbeat {now() - status.heartbeat:.0f} s ago): stop "
            "its plugin first, or pass --force"
        )
    ipam = ipam_factory(store, name)  # acts as that host: its claims, its blocks
    removal = Removal()
    for entry in store.list(f"{ENDPOINTS}{name}/"):
        record = EndpointRecord.from_dict(entry.data)
        store.delete(entry.key)
        removal.endpoints.append(record.id)
        removal.addresses += ipam.release_handle(record.id)
    for entry in store.list(NETWORKS):
        network = NetworkRecord.from_dict(entry.data)
        if network.hostname != name:
            continue
        for subnet in (network.ipv4, network.ipv6):
            if subnet is None:
                continue
            pool_id = subnet.pool_id or subnet.cidr
            try:
                if subnet.gateway:  # as Docker would: the gateway, then the subnet
                    ipam.release_address(pool_id, subnet.gateway)
            except NotFound:
                pass
            try:
                removal.addresses += ipam.release_pool(pool_id)
            except NotFound:
                pass
        store.delete(entry.key)
        removal.networks.append(network.id)
    for mode in MODES:
        handle = tunnel_handle(mode, name)
        for subnet in ipam.list_subnets():
            if subnet.options.get(TUNNEL_OPTION) == handle:
                removal.addresses += ipam.release_pool(subnet.pool_id)
        removal.addresses += ipam.release_handle(handle)
    removal.blocks = ipam.release_affinity(name)
    registry.forget(name)
    BgpStore(store).forget_node(name)  # its AS, reflector id and own peers
    log.info("removed node %s: %d endpoint(s), %d network(s), %d address(es), %d block(s)",
             name, len(removal.endpoints), len(removal.networks), len(removal.addresses),
             len(removal.blocks))
    return removal
