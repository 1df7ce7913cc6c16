"""A stateful stand-in for the agent's Docker API (plugin.docker_names.DockerNetworks):
networks by name, created and removed like dockerd would (a name is unique)."""

from __future__ import annotations

import uuid

from datastore.errors import Conflict
from driver.cluster import NetworkSpec


class FakeDockerNetworks:
    def __init__(self, names: tuple[str, ...] = ("bridge", "host", "none")) -> None:
        self.networks: dict[str, tuple[str, NetworkSpec | None]] = {
            name: (uuid.uuid4().hex, None) for name in names}
        self.answering = True
        # name -> (IPAM driver, subnets) of networks made by create_network or add().
        self.ipam: dict[str, tuple[str, set[str]]] = {}
        self.held_addresses: set[str] = set()

    def network_names(self) -> set[str] | None:
        return set(self.networks) if self.answering else None

    def create_network(self, spec: NetworkSpec, driver: str, ipam_driver: str) -> str:
        if spec.name in self.networks:
            raise Conflict(f"network with name {spec.name} already exists")
        network_id = uuid.uuid4().hex
        self.networks[spec.name] = (network_id, spec)
        self.ipam[spec.name] = (ipam_driver, {s.cidr for s in (spec.ipv4, spec.ipv6) if s})
        return network_id

    def add(self, name: str, ipam_driver: str, subnets: set[str]) -> str:
        """A network made on this Docker by someone else (any driver)."""
        network_id = uuid.uuid4().hex
        self.networks[name] = (network_id, None)
        self.ipam[name] = (ipam_driver, set(subnets))
        return network_id

    def ipam_addresses(self, ipam_driver: str) -> set[str] | None:
        """Endpoint and aux addresses this Docker holds (set by the test)."""
        return set(self.held_addresses) if self.answering else None

    def ipam_subnets(self, ipam_driver: str) -> set[str] | None:
        if not self.answering:
            return None
        return {cidr for name, (driver, cidrs) in self.ipam.items()
                if driver == ipam_driver and name in self.networks for cidr in cidrs}

    def remove_network(self, network_id: str) -> None:
        self.networks = {n: v for n, v in self.networks.items() if v[0] != network_id}
