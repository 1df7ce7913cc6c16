"""This host's policy inputs, kept in a :class:`~profiles.compiler.PolicyModel` and
updated from the datastore's watch events (the agent's path).

The compiler (profiles.compiler) is pure; this module only turns datastore records
into its inputs:

- ``endpoints/<host>/<id>``: an endpoint; this host's get dispatched through the
  endpoint sets (with the ports they publish), every other host's only fill tag sets.
  Its profiles are its network's ``profiles`` (they change when the network's name is
  resolved); an endpoint whose network record is gone keeps what it was created with.
- ``networks/<id>``: a network; a change of its profiles re-sets its endpoints.
- ``profiles/<name>``: a profile; one that cannot be read fails its endpoints closed.
- ``pools``: the one pools document.

:meth:`HostPolicy.load` reads all of it (the periodic resync: a fresh model, so a
missed event cannot last); :meth:`HostPolicy.apply_events` applies a watch batch in
memory, without reading the datastore, in O(what changed).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable
from typing import Any

from datastore.base import Datastore, Event
from driver.records import ENDPOINTS, NETWORKS, EndpointRecord, NetworkRecord
from ipam_driver.pools import PoolSet
from ipam_driver.service import POOLS_KEY
from plugin.settings import Settings
from profiles.compiler import (
    CompiledPolicy,
    Endpoint,
    PolicyModel,
    PolicySettings,
    Pool,
    PortMapping,
)
from profiles.model import Profile
from profiles.store import PROFILES
from routing.nodes import NODES, NodeRecord

log = logging.getLogger(__name__)

# Keys whose changes can change policy; IPAM blocks change on every allocation and
# never do.
POLICY_PREFIXES = (ENDPOINTS, NETWORKS, PROFILES, POOLS_KEY, NODES)


def policy_settings(settings: Settings) -> PolicySettings:
    return PolicySettings(workload_to_host=settings.workload_to_host)


def endpoint_port_mappings(record: EndpointRecord) -> list[PortMapping]:
    """The ports an endpoint publishes, per address family it has (only the host
    address's family when the port is published on one address)."""
    mappings = []
    for port in record.ports:
        try:
            family = ipaddress.ip_address(port.host_ip).version if port.host_ip else None
        except ValueError:
            family = None  # the compiler reports it
        for address in (record.ipv4, record.ipv6):
            if address and (family is None
                            or ipaddress.ip_interface(address).version == family):
                mappings.append(PortMapping(
                    container_ip=address.split("/")[0], protocol=port.protocol,
                    host_port=port.host_port, container_port=port.container_port,
                    host_ip=port.host_ip or None,
                ))
    return mappings


def parse_pools(data: Any) -> list[Pool]:
    return [Pool(pool.cidr, pool.nat_outgoing) for pool in PoolSet.from_dict(data).pools]


class HostPolicy:
    """The policy inputs of one host (``hostname``), as a model kept up to date."""

    def __init__(self, hostname: str, settings: PolicySettings | None = None) -> None:
        self.hostname = hostname
        self._settings = settings or PolicySettings()
        self.loaded = False
        self._reset()

    def _reset(self) -> None:
        self.model = PolicyModel(self._settings)
        # network id -> its profiles (() when its record cannot be read: fail closed)
        self._networks: dict[str, tuple[str, ...]] = {}
        # endpoint model id ("<host>/<id>") -> (record, local)
        self._endpoints: dict[str, tuple[EndpointRecord, bool]] = {}
        self._by_network: dict[str, set[str]] = {}
        self._encapsulation = (False, False)  # (vxlan, ipip) used by any pool
        self._node_addresses: dict[str, str] = {}  # other nodes' IPv4 addresses

    def _set_tunnels(self) -> None:
        self.model.set_tunnels(*self._encapsulation, self._node_addresses.values())

    # -- whole reads and events --------------------------------------------------------------

    def load(self, store: Datastore) -> HostPolicy:
        """Rebuild everything from a full read of the datastore."""
        profiles = store.list(PROFILES)
        nodes = store.list(NODES)
        pools = store.get(POOLS_KEY)
        networks = store.list(NETWORKS)
        endpoints = store.list(ENDPOINTS)
        self._reset()
        self.loaded = True
        # Profiles and networks first, so each endpoint is set once, complete.
        for entry in (*profiles, *nodes, *([pools] if pools is not None else []), *networks,
                      *endpoints):
            self._put(entry.key, entry.value)
        return self

    def apply_events(self, events: Iterable[Event]) -> bool:
        """Apply a batch of watch events; True if any of them concerns policy."""
        changed = False
        for event in events:
            if not event.key.startswith(POLICY_PREFIXES):
                continue
            changed = True
            if event.kind == "delete" or event.value is None:
                self._delete(event.key)
            else:
                self._put(event.key, event.value)
        return changed

    def policy(self) -> CompiledPolicy:
        return self.model.policy()

    # -- records -----------------------------------------------------------------------------

    def _put(self, key: str, value: str) -> None:
        try:
            data = json.loads(value)
        except ValueError as exc:
            data = exc
        if key.startswith(ENDPOINTS):
            self._put_endpoint(key, data)
        elif key.startswith(NETWORKS):
            self._put_network(key[len(NETWORKS):], data)
        elif key.startswith(PROFILES):
            self._put_profile(key[len(PROFILES):], data)
        elif key.startswith(NODES):
            self._put_node(key[len(NODES):], data)
        elif key == POOLS_KEY:
            try:
                if isinstance(data, Exception):
                    raise data
                pools = parse_pools(data)
                modes = PoolSet.from_dict(data).pools
                self._encapsulation = (any(p.vxlan for p in modes), any(p.ipip for p in modes))
            except Exception as exc:  # noqa: BLE001 - a bad document: no pools
                log.warning("policy: pools document unreadable, treated as empty: %s", exc)
                pools = []
                self._encapsulation = (False, False)
            self.model.set_pools(pools)
            self._set_tunnels()

    def _delete(self, key: str) -> None:
        if key.startswith(ENDPOINTS):
            model_id = key[len(ENDPOINTS):]
            found = self._endpoints.pop(model_id, None)
            if found is not None:
                self._forget_network_member(found[0].network_id, model_id)
            self.model.remove_endpoint(model_id)
        elif key.startswith(NETWORKS):
            network_id = key[len(NETWORKS):]
            if self._networks.pop(network_id, None) is not None:
                self._refresh_network(network_id)
        elif key.startswith(PROFILES):
            self.model.remove_profile(key[len(PROFILES):])
        elif key.startswith(NODES):
            self._node_addresses.pop(key[len(NODES):], None)
            self._set_tunnels()
        elif key == POOLS_KEY:
            self.model.set_pools(())
            self._encapsulation = (False, False)
            self._set_tunnels()

    def _put_node(self, name: str, data: Any) -> None:
        if name == self.hostname:
            return
        try:
            if isinstance(data, Exception):
                raise data
            record = NodeRecord.from_dict(data)
        except Exception as exc:  # noqa: BLE001 - unreadable: not a known node
            log.warning("policy: node record %s unreadable: %s", name, exc)
            self._node_addresses.pop(name, None)
        else:
            if record.ipv4:
                self._node_addresses[name] = record.ipv4.split("/")[0]
            else:
                self._node_addresses.pop(name, None)
        self._set_tunnels()

    def _forget_network_member(self, network_id: str, model_id: str) -> None:
        holders = self._by_network.get(network_id)
        if holders is not None:
            holders.discard(model_id)
            if not holders:
                del self._by_network[network_id]

    def _put_endpoint(self, key: str, data: Any) -> None:
        model_id = key[len(ENDPOINTS):]
        host = model_id.split("/", 1)[0]
        try:
            if isinstance(data, Exception):
                raise data
            record = EndpointRecord.from_dict(data)
        except Exception as exc:  # noqa: BLE001 - unreadable: forget it (fail closed)
            log.warning("policy: endpoint record %s unreadable, ignored: %s", key, exc)
            self._delete(key)
            return
        previous = self._endpoints.get(model_id)
        if previous is not None and previous[0].network_id != record.network_id:
            self._forget_network_member(previous[0].network_id, model_id)
        self._endpoints[model_id] = (record, host == self.hostname)
        self._by_network.setdefault(record.network_id, set()).add(model_id)
        self._set_endpoint(model_id)

    def _set_endpoint(self, model_id: str) -> None:
        record, local = self._endpoints[model_id]
        profiles = self._networks.get(record.network_id)
        endpoint = Endpoint(
            id=model_id,
            iface=record.host_ifname,
            ipv4=(record.ipv4,) if record.ipv4 else (),
            ipv6=(record.ipv6,) if record.ipv6 else (),
            profiles=tuple(record.profiles) if profiles is None else profiles,
        )
        self.model.set_endpoint(
            endpoint, local=local,
            port_mappings=endpoint_port_mappings(record) if local else (),
        )

    def _put_network(self, network_id: str, data: Any) -> None:
        try:
            if isinstance(data, Exception):
                raise data
            profiles = tuple(NetworkRecord.from_dict(data).profiles)
        except Exception as exc:  # noqa: BLE001 - unreadable: its endpoints fail closed
            log.warning("policy: network record %s unreadable; its endpoints fail closed: %s",
                        network_id, exc)
            profiles = ()
        if self._networks.get(network_id) != profiles:
            self._networks[network_id] = profiles
            self._refresh_network(network_id)

    def _refresh_network(self, network_id: str) -> None:
        for model_id in sorted(self._by_network.get(network_id, ())):
            self._set_endpoint(model_id)

    def _put_profile(self, name: str, data: Any) -> None:
        try:
            if isinstance(data, Exception):
                raise data
            profile, notes = Profile.from_stored(data)
        except Exception as exc:  # noqa: BLE001 - unreadable: its endpoints fail closed
            self.model.set_invalid_profile(name, str(exc))
            return
        for note in notes:
            log.warning("profile %s (written by a newer version?): %s", name, note)
        self.model.set_profile(profile, name=name)


def compile_host_policy(store: Datastore, settings: Settings) -> CompiledPolicy:
    """This host's policy from a full read of the datastore."""
    return HostPolicy(settings.hostname, policy_settings(settings)).load(store).policy()
