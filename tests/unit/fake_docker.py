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

    def network_names(self) -> set[str] | None:
        return set(self.networks) if self.answering else None

    def create_network(self, spec: NetworkSpec, driver: str, ipam_driver: str) -> str:
        if spec.name in self.networks:
            raise Conflict(f"network with name {spec.name} already exists")
        network_id = uuid.uuid4().hex
        self.networks[spec.name] = (network_id, spec)
        return network_id

    def remove_network(self, network_id: str) -> None:
        self.networks = {n: v for n, v in self.networks.items() if v[0] != network_id}
