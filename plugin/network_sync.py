"""The network sync: every calico network of the cluster in this host's Docker.

It creates, through this host's Docker API, the cluster's networks (by name) that its
Docker lacks, with the same settings (driver.cluster plans it); removes those removed
on another host; and replaces a network created here without --subnet under a name
the cluster already has. The Docker API takes hundreds of ms (and dockerd calls this
host's plugin meanwhile), so in the running agent it has a thread of its own and
routes and policy never wait for it.
"""

from __future__ import annotations

import logging
import threading

from datastore.base import Datastore
from driver.cluster import NetworkSpec, SubnetSpec, sync_actions
from driver.records import NETWORKS, NetworkRecord
from driver.service import NetworkService
from ipam_driver.service import CARVED_OPTION, IpamService
from plugin.docker_names import DockerNetworks
from plugin.settings import Settings

log = logging.getLogger(__name__)


class NetworkSync:
    def __init__(self, settings: Settings, store: Datastore, ipam: IpamService,
                 networks: NetworkService, docker: DockerNetworks,
                 stop: threading.Event) -> None:
        self._settings = settings
        self._store = store
        self._ipam = ipam
        self._networks = networks
        self._docker = docker
        self._stop = stop
        self._requested = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> None:
        """Creates in this host's Docker the cluster's networks it lacks, and removes
        those removed on another host (only with --sync-networks)."""
        if not self._settings.sync_networks:
            return
        names = self._docker.network_names()
        if names is None:
            return  # Docker does not answer: next time
        records = []
        for entry in self._store.list(NETWORKS):
            try:
                records.append(NetworkRecord.from_dict(entry.data))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        actions = sync_actions(self._settings.hostname, records, names)
        self._replace_carved_conflicts(records)
        for record in actions.remove:
            log.info("network %r was removed on another host; removing it here",
                     record.name)
            try:
                self._docker.remove_network(record.id)
            except Exception as exc:
                log.warning("removing network %r failed (containers here?): %s",
                            record.name, exc)
        for record in actions.create:
            spec = self._network_spec(record)
            log.info("creating cluster network %r here (from host %s)", spec.name,
                     record.hostname)
            try:
                self._docker.create_network(spec, *self._settings.docker_drivers)
            except Exception as exc:
                log.warning("creating network %r failed: %s", spec.name, exc)

    def request(self) -> None:
        """Sync soon: in the sync thread once started, else right here."""
        if self._thread is None:
            self.sync()
        else:
            self._requested.set()

    def start(self) -> None:
        if self._settings.sync_networks and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="network-sync",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._requested.wait(1.0):
                continue
            self._requested.clear()
            try:
                self.sync()
            except Exception:
                log.exception("network sync failed; retried at the next change or resync")

    def _replace_carved_conflicts(self, records: list[NetworkRecord]) -> None:
        """A network created here without --subnet under a name the cluster already
        has got a subnet of its own: while no container uses it, it is removed, and
        the sync creates it again with the cluster's subnet (it joins the network)."""
        used = {e.network_id for e in self._networks.list_endpoints(self._settings.hostname)}
        for record in records:
            if (record.hostname != self._settings.hostname or not record.conflict
                    or record.id in used or not self._carved(record)):
                continue
            log.info("network %r here has a subnet of its own; replacing it by the "
                     "cluster's network of that name", record.name)
            try:
                self._docker.remove_network(record.id)
            except Exception as exc:
                log.warning("replacing network %r failed: %s", record.name, exc)

    def _carved(self, record: NetworkRecord) -> bool:
        for subnet in (record.ipv4, record.ipv6):
            if subnet is None:
                continue
            try:
                info = self._ipam.get_subnet(subnet.pool_id or subnet.cidr)
            except Exception:
                return False
            if info.options.get(CARVED_OPTION) != "true":
                return False
        return True

    def _network_spec(self, record: NetworkRecord) -> NetworkSpec:
        subnets = []
        for subnet in (record.ipv4, record.ipv6):
            if subnet is None:
                subnets.append(None)
                continue
            try:
                ip_range = self._ipam.get_subnet(subnet.pool_id or subnet.cidr).sub_pool
            except Exception:
                ip_range = None
            subnets.append(SubnetSpec(subnet.cidr, subnet.gateway, ip_range))
        return NetworkSpec(record.name, subnets[0], subnets[1], dict(record.options),
                           record.internal)
