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
import requests.exceptions

log = logging.getLogger(__name__)

DOCKER_SOCKET = "unix:///var/run/docker.sock"
# dockerd 20.10 speaks API 1.41; a fixed version avoids a negotiation round trip.
API_VERSION = "1.41"


# network_state()'s answer for a network Docker does not have.
NETWORK_GONE: tuple[bool, frozenset[str]] = (False, frozenset())


class DockerNames:
    def __init__(self, base_url: str = DOCKER_SOCKET, timeout: float = 1.0) -> None:
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
