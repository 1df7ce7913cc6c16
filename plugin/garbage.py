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
from collections.abc import Callable, Hashable

from datastore.base import Datastore
from datastore.errors import CalicoCnmError
from driver.records import ENDPOINTS, NETWORKS, EndpointRecord, NetworkRecord
from driver.service import NetworkService
from ipam_driver.service import IpamService

log = logging.getLogger(__name__)

# (exists, endpoint IDs) of a Docker network, or None when Docker does not answer.
NetworkState = Callable[[str], "tuple[bool, frozenset[str]] | None"]


class Sightings:
    """Things suspected in one pass: one is confirmed when a later pass sees it again,
    in the same state (a revision, say), at least `grace` seconds after the first."""

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._first: dict[Hashable, tuple[Hashable, float]] = {}
        self._seen: set[Hashable] = set()

    def confirmed(self, key: Hashable, state: Hashable, now: float) -> bool:
        self._seen.add(key)
        first = self._first.get(key)
        if first is None or first[0] != state:
            self._first[key] = (state, now)
            return False
        return now - first[1] >= self._grace

    def end_pass(self) -> None:
        """Forgets what this pass did not see (it is no longer suspect)."""
        self._first = {k: v for k, v in self._first.items() if k in self._seen}
        self._seen = set()


class StaleCollector:
    def __init__(self, store: Datastore, networks: NetworkService, hostname: str,
                 network_state: NetworkState, grace: float) -> None:
        self._store = store
        self._networks = networks
        self._hostname = hostname
        self._network_state = network_state
        self._sightings = Sightings(grace)  # record key, at its revision

    def collect(self, now: float) -> list[str]:
        """One pass; returns the IDs of the endpoints and networks it removed."""
        removed: list[str] = []
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
            if self._sightings.confirmed(entry.key, entry.revision, now):
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
            if (self._sightings.confirmed(entry.key, entry.revision, now)
                    and self._networks.remove_stale_network(network.id)):
                log.warning("network %s is gone from Docker; removed its record",
                            network.id[:12])
                removed.append(network.id)
        self._sightings.end_pass()
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
        self._sightings = Sightings(grace)  # subnet, at its record's revision

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
        for revision, rec in self._ipam.reservations():
            if self._hostname not in rec.hosts or rec.cidr in owned or rec.cidr in used:
                continue
            if not self._sightings.confirmed(rec.cidr, revision, now):
                continue
            freed = self._ipam.release_pool(rec.cidr)
            log.warning("released subnet %s: reserved by this host but used by no network "
                        "here%s", rec.cidr,
                        f" (and {len(freed)} address(es) left in it)" if freed else "")
            released.append(rec.cidr)
        self._sightings.end_pass()
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
        self._sightings = Sightings(grace)  # (address, subnet), with its handle

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
        for address, subnet, handle in self._ipam.requested_here():
            if address in held or handle in endpoint_ids:
                continue
            if not self._sightings.confirmed((address, subnet), handle, now):
                continue
            try:
                self._ipam.release_address(subnet, address)
            except CalicoCnmError as exc:  # released or re-tied meanwhile
                log.debug("address %s stays: %s", address, exc)
                continue
            log.warning("released address %s of subnet %s: requested by this host, but "
                        "no container came for it", address, subnet)
            released.append(address)
        self._sightings.end_pass()
        return released
