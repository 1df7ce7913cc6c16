"""What the Docker API knows about networks: their names (remote drivers are only
told network IDs) and which endpoints they have (to find records Docker forgot).

Lookups use a short timeout and answer None on any failure: while dockerd restarts
it calls plugins before its API answers, so a handler must never wait on it.
Resolved names are kept in the datastore by the caller, so each network is looked
up only until it is found once.
"""

from __future__ import annotations

import logging
from typing import Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from driver.cluster import NetworkSpec

log = logging.getLogger(__name__)

# dockerd 20.10 speaks API 1.41; a fixed version avoids a negotiation round trip.
API_VERSION = "1.41"


# network_state()'s answer for a network Docker does not have.
NETWORK_GONE: tuple[bool, frozenset[str]] = (False, frozenset())


class DockerNames:
    def __init__(self, base_url: str, timeout: float = 1.0) -> None:
        self._base_url = base_url
        self._timeout = timeout

    def _inspect(self, network_id: str) -> dict[str, Any]:
        client = docker.APIClient(base_url=self._base_url, version=API_VERSION,
                                  timeout=self._timeout)
        try:
            return dict(client.inspect_network(network_id))
        finally:
            client.close()

    def network_name(self, network_id: str) -> str | None:
        try:
            return str(self._inspect(network_id)["Name"])
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                OSError, KeyError) as exc:
            log.debug("looking up the name of network %s failed: %s", network_id, exc)
            return None

    def network_state(self, network_id: str) -> tuple[bool, frozenset[str]] | None:
        """(exists, IDs of its endpoints), or None when Docker does not answer."""
        try:
            containers = self._inspect(network_id).get("Containers") or {}
        except docker.errors.NotFound:
            return NETWORK_GONE
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                OSError) as exc:
            log.debug("inspecting network %s failed: %s", network_id, exc)
            return None
        return True, frozenset(str(c.get("EndpointID", "")) for c in containers.values())


class DockerNetworks(DockerNames):
    """The agent's side of the Docker API: list, create and remove networks (the
    network sync). Longer timeout: dockerd calls this host's plugin meanwhile."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        super().__init__(base_url, timeout)

    def _client(self) -> docker.APIClient:
        return docker.APIClient(base_url=self._base_url, version=API_VERSION,
                                timeout=self._timeout)

    def _networks(self) -> list[dict[str, Any]] | None:
        """Every network of this Docker (as GET /networks lists them), or None when
        Docker does not answer."""
        try:
            client = self._client()
            try:
                return list(client.networks())
            finally:
                client.close()
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                OSError) as exc:
            log.debug("listing networks failed: %s", exc)
            return None

    def network_names(self) -> set[str] | None:
        """Every network name this Docker has, or None when it does not answer."""
        networks = self._networks()
        return None if networks is None else {str(n["Name"]) for n in networks}

    def ipam_subnets(self, ipam_driver: str) -> set[str] | None:
        """The subnets of every network of this Docker whose IPAM driver is
        ipam_driver (of any network driver), or None when Docker does not answer."""
        networks = self._networks()
        if networks is None:
            return None
        subnets = set()
        for network in networks:
            ipam = network.get("IPAM") or {}
            if ipam.get("Driver") != ipam_driver:
                continue
            subnets.update(str(c["Subnet"]) for c in ipam.get("Config") or []
                           if c.get("Subnet"))
        return subnets

    def ipam_addresses(self, ipam_driver: str) -> set[str] | None:
        """The addresses this Docker holds from ipam_driver: its networks' endpoints
        and auxiliary addresses (any network driver), or None when it does not answer."""
        networks = self._networks()
        if networks is None:
            return None
        held: set[str] = set()
        client = self._client()
        try:
            for listed in networks:
                if (listed.get("IPAM") or {}).get("Driver") != ipam_driver:
                    continue
                try:
                    network = client.inspect_network(listed["Id"])
                except docker.errors.NotFound:
                    continue  # removed meanwhile
                for config in (network.get("IPAM") or {}).get("Config") or []:
                    held.update(str(a) for a in (config.get("AuxiliaryAddresses") or {})
                                .values())
                for endpoint in (network.get("Containers") or {}).values():
                    for key in ("IPv4Address", "IPv6Address"):
                        if endpoint.get(key):
                            held.add(str(endpoint[key]).split("/")[0])
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                OSError) as exc:
            log.debug("inspecting networks failed: %s", exc)
            return None
        finally:
            client.close()
        return held

    def create_network(self, spec: NetworkSpec, driver: str, ipam_driver: str) -> str:
        pools = []
        for subnet in (spec.ipv4, spec.ipv6):
            if subnet is not None:
                pools.append(docker.types.IPAMPool(
                    subnet=subnet.cidr, iprange=subnet.ip_range, gateway=subnet.gateway))
        client = self._client()
        try:
            reply = client.create_network(
                spec.name, driver=driver, options=spec.options or None,
                ipam=docker.types.IPAMConfig(driver=ipam_driver, pool_configs=pools),
                internal=spec.internal, enable_ipv6=spec.ipv6 is not None,
                check_duplicate=True,
            )
            return str(reply["Id"])
        finally:
            client.close()

    def remove_network(self, network_id: str) -> None:
        client = self._client()
        try:
            client.remove_network(network_id)
        except docker.errors.NotFound:
            return
        finally:
            client.close()
