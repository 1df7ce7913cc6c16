"""Converges this host's routed dataplane to the endpoint records in the datastore.

Idempotent: run it at start-up, on every endpoint change and periodically, and
the kernel ends up with exactly one veth per endpoint record, a host route
per endpoint address, and nothing left over from endpoints that are gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dataplane.netlink import Netlink
from datastore.base import Datastore
from datastore.errors import NotFound
from driver.records import (
    ENDPOINTS,
    HOST_IFNAME_PREFIX,
    EndpointRecord,
    NetworkRecord,
    network_key,
)

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    routes_added: list[str] = field(default_factory=list)
    routes_removed: list[str] = field(default_factory=list)
    links_removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.routes_added or self.routes_removed or self.links_removed)


def reconcile_routes(store: Datastore, hostname: str, netlink: Netlink) -> ReconcileReport:
    report = ReconcileReport()
    # Read the kernel before the datastore: whatever the kernel shows was made
    # after its endpoint record was written, so that record is seen below.
    links = set(netlink.list_links(HOST_IFNAME_PREFIX))
    routes = netlink.list_host_routes(HOST_IFNAME_PREFIX)
    records = [EndpointRecord.from_dict(e.data) for e in store.list(f"{ENDPOINTS}{hostname}/")]

    # A "left" endpoint's veth is being deleted; a "created" one may be mid-Join:
    # its routes are neither restored nor removed.
    live = [r for r in records if r.state != "left"]
    owned = {r.host_ifname for r in live}
    for ifname in sorted(links - owned):
        log.info("removing %s: no live endpoint owns it", ifname)
        netlink.delete_link(ifname)
        report.links_removed.append(ifname)

    kept = {(address, r.host_ifname) for r in live for address in r.addresses}
    for address, ifname in sorted(routes.items()):
        if (address, ifname) not in kept and ifname not in report.links_removed:
            log.info("removing route %s dev %s: no endpoint has it", address, ifname)
            netlink.delete_route(address)
            report.routes_removed.append(address)

    networks: dict[str, NetworkRecord | None] = {}
    for record in live:
        missing = [a for a in record.addresses
                   if record.joined and record.host_ifname in links
                   and routes.get(a) != record.host_ifname]
        if not missing:
            continue
        if record.network_id not in networks:
            entry = store.get(network_key(record.network_id))
            try:
                networks[record.network_id] = (
                    NetworkRecord.from_dict(entry.data) if entry else None
                )
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("network record of %s is unreadable: %s", record.id[:12], exc)
                networks[record.network_id] = None  # restore the routes all the same
        network = networks[record.network_id]
        try:
            if network is not None:
                gateways = [s.gateway for s in (network.ipv4, network.ipv6) if s and s.gateway]
                netlink.configure_host_end(record.host_ifname, gateways)
            for address in missing:
                netlink.add_route(address, record.host_ifname)
        except NotFound:
            continue  # the veth went away meanwhile: nothing to restore
        log.info("restored route(s) %s dev %s", ", ".join(missing), record.host_ifname)
        report.routes_added.extend(missing)
    return report
