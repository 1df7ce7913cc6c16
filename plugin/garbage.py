"""Finds endpoint and network records that Docker has forgotten, and removes them.

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
from driver.records import ENDPOINTS, NETWORKS, EndpointRecord, NetworkRecord
from driver.service import NetworkService

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
