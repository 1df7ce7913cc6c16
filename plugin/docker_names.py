"""Network names from the Docker API (remote drivers are only told network IDs).

Lookups use a short timeout and answer None on any failure: while dockerd restarts
it calls plugins before its API answers, so a handler must never wait on it.
Resolved names are kept in the datastore by the caller, so each network is looked
up only until it is found once.
"""

from __future__ import annotations

import logging

import docker
import docker.errors
import requests.exceptions

log = logging.getLogger(__name__)

DOCKER_SOCKET = "unix:///var/run/docker.sock"
# dockerd 20.10 speaks API 1.41; a fixed version avoids a negotiation round trip.
API_VERSION = "1.41"


class DockerNames:
    def __init__(self, base_url: str = DOCKER_SOCKET, timeout: float = 1.0) -> None:
        self._base_url = base_url
        self._timeout = timeout

    def network_name(self, network_id: str) -> str | None:
        try:
            client = docker.APIClient(base_url=self._base_url, version=API_VERSION,
                                      timeout=self._timeout)
            try:
                return str(client.inspect_network(network_id)["Name"])
            finally:
                client.close()
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                OSError, KeyError) as exc:
            log.debug("looking up the name of network %s failed: %s", network_id, exc)
            return None
