"""The composition root: builds the datastore and the services from the settings,
without Flask, for the app, the agent and the CLI alike."""

from __future__ import annotations

import functools
from collections.abc import Callable

from dataplane.netlink import Netlink
from datastore.base import Datastore
from driver.service import NetworkService
from ipam_driver.service import IpamService
from plugin.docker_names import DockerNames
from plugin.settings import Settings
from routing.mtu import veth_mtu


def host_netlink(settings: Settings) -> Callable[[], Netlink]:
    """Netlink in this process's namespace, with sysctls under the settings' /proc."""
    return functools.partial(Netlink, proc_dir=settings.proc_dir)


def open_datastore(settings: Settings) -> Datastore:
    """The configured backend: etcd when endpoints are set, else embedded SQLite."""
    if settings.uses_etcd:
        from datastore.etcd import EtcdDatastore

        return EtcdDatastore(
            list(settings.etcd_endpoints), ca_cert=settings.etcd_ca_cert,
            cert_file=settings.etcd_cert_file, key_file=settings.etcd_key_file,
            timeout=settings.etcd_timeout,
        )
    from datastore.sqlite import SqliteDatastore

    return SqliteDatastore(settings.sqlite_path)


def build_ipam(settings: Settings, store: Datastore, serving: bool = False) -> IpamService:
    """serving: for the driver's own processes, which keep their block views fresh in
    the background; a CLI or the agent allocates too seldom to need it."""
    return IpamService(
        store, settings.hostname,
        network_prefix_v4=settings.network_prefix_v4,
        network_prefix_v6=settings.network_prefix_v6,
        refresh_in_background=serving,
    )


def build_network_service(
    settings: Settings,
    store: Datastore,
    ipam: IpamService,
    netlink_factory: Callable[[], Netlink] | None = None,
    name_lookup: Callable[[str], str | None] | None = None,
) -> NetworkService:
    return NetworkService(
        store, ipam, settings.hostname, netlink_factory or host_netlink(settings),
        name_lookup or DockerNames(settings.docker_host).network_name,
        mtu_for=lambda subnets: veth_mtu(store, settings.hostname, subnets),
    )
