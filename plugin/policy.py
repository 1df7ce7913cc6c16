"""Reads everything policy depends on from the datastore and compiles it.

The compiler (profiles.compiler) is pure; this module only gathers its inputs:
this host's endpoints (they get chains), every other host's endpoints (their
addresses fill tag sets), profiles, pools and published ports.
"""

from __future__ import annotations

from dataclasses import dataclass

from datastore.base import Datastore
from driver.records import ENDPOINTS, NETWORKS, EndpointRecord, NetworkRecord
from ipam_driver.service import IpamService
from plugin.settings import Settings
from profiles.compiler import (
    CompiledPolicy,
    Endpoint,
    PolicySettings,
    Pool,
    PortMapping,
    compile_policy,
)
from profiles.store import ProfileStore


@dataclass
class PolicyInputs:
    local: list[Endpoint]
    remote: list[Endpoint]
    port_mappings: list[PortMapping]
    pools: list[Pool]


def _effective_profiles(record: EndpointRecord, network: NetworkRecord | None) -> list[str]:
    # The network's profiles are the truth (they change when its name is resolved);
    # an endpoint of a network that is gone keeps what it was created with.
    if network is not None:
        return list(network.profiles)
    return list(record.profiles)


def gather(store: Datastore, hostname: str) -> PolicyInputs:
    networks = {e.data["id"]: NetworkRecord.from_dict(e.data) for e in store.list(NETWORKS)}
    local: list[Endpoint] = []
    remote: list[Endpoint] = []
    mappings: list[PortMapping] = []
    for entry in store.list(ENDPOINTS):
        record = EndpointRecord.from_dict(entry.data)
        endpoint = Endpoint(
            id=record.id,
            iface=record.host_ifname,
            ipv4=(record.ipv4,) if record.ipv4 else (),
            ipv6=(record.ipv6,) if record.ipv6 else (),
            profiles=tuple(_effective_profiles(record, networks.get(record.network_id))),
        )
        if record.hostname != hostname:
            remote.append(endpoint)
            continue
        local.append(endpoint)
        for port in record.ports:
            for address in (record.ipv4, record.ipv6):
                if address:
                    mappings.append(PortMapping(
                        container_ip=address.split("/")[0], protocol=port.protocol,
                        host_port=port.host_port, container_port=port.container_port,
                        host_ip=port.host_ip or None,
                    ))
    pools = [Pool(p.cidr, p.nat_outgoing) for p in IpamService(store, hostname).get_pools()]
    return PolicyInputs(local, remote, mappings, pools)


def compile_host_policy(store: Datastore, settings: Settings) -> CompiledPolicy:
    inputs = gather(store, settings.hostname)
    profiles = {p.name: p for p in ProfileStore(store).list()}
    return compile_policy(
        inputs.local, profiles, inputs.pools, inputs.port_mappings,
        PolicySettings(workload_to_host=settings.workload_to_host), inputs.remote,
    )
