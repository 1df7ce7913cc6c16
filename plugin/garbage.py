"""Finds endpoint and network records, and subnet reservations, that Docker has
forgotten, and removes them.

When the plugin is down, dockerd still removes containers and networks (after its
calls to the plugin time out), so their records, veths and addresses would stay.
The agent asks the Docker API which endpoints each network still has. A record is
removed only when it was seen stale twice, at least `grace` seconds apart, with no
change in between: an endpoint that Docker is still creating is never taken. When
Docker does not answer, nothing is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from datastore.base import Datastore
from datastore.errors import CalicoCnmError
from driver.records import ENDPOINTS, NETWORKS, EndpointRecord, NetworkRecord
from driver.service import NetworkService
from ipam_driver.service import IpamService

log = logging.getLogger(__name__)

# (exists, endpoint IDs) of a Docker network, or None when Docker does not answer.
NetworkState = Callable[[str], "tuple[bool, frozenset[str]] | None"]


class StaleCollector:
    def __init__(self, store: Datastore, networks: NetworkService, hostname: str,
                 network_state: NetworkState, grace: float) -> None:
        self._store = store
        self._networks = networks
        self._hostname = hostname
        self._network_state = network_state
        self._grace = grace
        # key -> (revision, when first seen stale)
        self._suspects: dict[str, tuple[int, float]] = {}

    def _confirmed(self, key: str, revision: int, now: float, stale: set[str]) -> bool:
        stale.add(key)
        seen = self._suspects.get(key)
        if seen is None or seen[0] != revision:
            self._suspects[key] = (revision, now)
            return False
        return now - seen[1] >= self._grace

    def collect(self, now: float) -> list[str]:
        """One pass; returns the IDs of the endpoints and networks it removed."""
        removed: list[str] = []
        stale: set[str] = set()
        states: dict[str, tuple[bool, frozenset[str]] | None] = {}

        def state(network_id: str) -> tuple[bool, frozenset[str]] | None:
            if network_id not in states:
                states[network_id] = self._network_state(network_id)
            return states[network_id]

        for entry in self._store.list(f"{ENDPOINTS}{self._hostname}/"):
            try:
                record = EndpointRecord.from_dict(entry.data)
            except (KeyError, TypeError, ValueError):
                continue  # unreadable: never judged stale
            known = state(record.network_id)
            if known is None or record.id in known[1]:
                continue
            if self._confirmed(entry.key, entry.revision, now, stale):
                log.warning("endpoint %s is gone from Docker; cleaning it up", record.id[:12])
                self._networks.remove_stale_endpoint(record.id)
                removed.append(record.id)
        for entry in self._store.list(NETWORKS):
            try:
                network = NetworkRecord.from_dict(entry.data)
            except (KeyError, TypeError, ValueError):
                continue
            if network.hostname != self._hostname:
                continue  # another host's dockerd owns it
            known = state(network.id)
            if known is None or known[0]:
                continue
            if (self._confirmed(entry.key, entry.revision, now, stale)
                    and self._networks.remove_stale_network(network.id)):
                log.warning("network %s is gone from Docker; removed its record",
                            network.id[:12])
                removed.append(network.id)
        self._suspects = {k: v for k, v in self._suspects.items() if k in stale}
        return removed


class OrphanSubnetCollector:
    """Releases this host's claim on subnet reservations that nothing owns: no network
    record of this host has the subnet, and no network of this host's Docker uses it
    through our IPAM driver (networks of other drivers included). RequestPool without
    its CreateNetwork (dockerd crashed between them, or refused the network) leaves
    these. Each host speaks only for its own Docker; the last claim's release frees
    the subnet and its addresses. Seen orphaned twice, `grace` seconds apart with no
    change, as above; nothing is released while Docker does not answer."""

    def __init__(self, ipam: IpamService, networks: NetworkService, hostname: str,
                 docker_subnets: Callable[[], set[str] | None], grace: float) -> None:
        self._ipam = ipam
        self._networks = networks
        self._hostname = hostname
        self._docker_subnets = docker_subnets
        self._grace = grace
        self._suspects: dict[str, tuple[int, float]] = {}

    def collect(self, now: float) -> list[str]:
        """One pass; returns the subnets this host gave up."""
        used = self._docker_subnets()
        if used is None:
            return []
        try:
            networks = self._networks.list_networks()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # An unreadable network record might own any subnet: judge none.
            log.debug("subnet reservations not checked: a network record is unreadable "
                      "(%s)", exc)
            return []
        owned = {cidr for n in networks
                 if n.hostname in ("", self._hostname) for cidr in n.subnets if cidr}
        released: list[str] = []
        suspects: dict[str, tuple[int, float]] = {}
        for revision, rec in self._ipam.reservations():
            if self._hostname not in rec.hosts or rec.cidr in owned or rec.cidr in used:
                continue
            seen = self._suspects.get(rec.cidr)
            if seen is None or seen[0] != revision:
                suspects[rec.cidr] = (revision, now)
                continue
            if now - seen[1] < self._grace:
                suspects[rec.cidr] = seen
                continue
            freed = self._ipam.release_pool(rec.cidr)
            log.warning("released subnet %s: reserved by this host but used by no network "
                        "here%s", rec.cidr,
                        f" (and {len(freed)} address(es) left in it)" if freed else "")
            released.append(rec.cidr)
        self._suspects = suspects
        return released


class OrphanAddressCollector:
    """Releases addresses this host requested that no endpoint holds: RequestAddress
    whose CreateEndpoint never came, or DeleteEndpoint whose ReleaseAddress never came
    (the plugin or dockerd killed between them). An address is released when its
    handle names no endpoint record of this host (or it has none), no endpoint record
    of this host has it, and this host's Docker holds it neither as an endpoint's nor
    as a network's auxiliary address; seen so twice, `grace` apart, with the same
    handle. Never while Docker does not answer."""

    def __init__(self, ipam: IpamService, networks: NetworkService, hostname: str,
                 docker_addresses: Callable[[], set[str] | None], grace: float) -> None:
        self._ipam = ipam
        self._networks = networks
        self._hostname = hostname
        self._docker_addresses = docker_addresses
        self._grace = grace
        self._suspects: dict[tuple[str, str, str | None], float] = {}

    def collect(self, now: float) -> list[str]:
        """One pass; returns the addresses released."""
        held = self._docker_addresses()
        if held is None:
            return []
        try:
            endpoints = self._networks.list_endpoints(self._hostname)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # An unreadable endpoint record might hold any address: judge none.
            log.debug("addresses not checked: an endpoint record is unreadable (%s)", exc)
            return []
        held |= {address for e in endpoints for address in e.addresses}
        endpoint_ids = {e.id for e in endpoints}
        released: list[str] = []
        suspects: dict[tuple[str, str, str | None], float] = {}
        for address, subnet, handle in self._ipam.requested_here():
            if address in held or handle in endpoint_ids:
                continue
            key = (address, subnet, handle)
            first = self._suspects.get(key)
            if first is None or now - first < self._grace:
                suspects[key] = now if first is None else first
                continue
            try:
                self._ipam.release_address(subnet, address)
            except CalicoCnmError as exc:  # released or re-tied meanwhile
                log.debug("address %s stays: %s", address, exc)
                continue
            log.warning("released address %s of subnet %s: requested by this host, but "
                        "no container came for it", address, subnet)
            released.append(address)
        self._suspects = suspects
        return released
