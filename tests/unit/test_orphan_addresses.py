"""Addresses requested with no endpoint after them (RequestAddress, then the plugin or
dockerd killed before CreateEndpoint) are released after two sightings `grace` apart;
never one an endpoint record or this host's Docker holds (an endpoint's, or a
network's auxiliary address), nor a gateway, nor another host's, nor while Docker does
not answer. Real SQLite, the app's own services, a stateful fake Docker."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin.garbage import OrphanAddressCollector
from tests.unit.test_cluster_networks import Host
from tests.unit.test_orphan_subnets import Cluster

GRACE = 30.0
SUBNET = "10.99.0.0/24"


class Setup(Cluster):
    """Two hosts on one store, h1 with network web; the address collector of h1."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.h1.network("n" * 64, "web", SUBNET)  # with its gateway
        self.collector = OrphanAddressCollector(
            self.ipam, self.h1.service, "h1",
            lambda: self.docker.ipam_addresses("calico-ipam"), GRACE)

    def request(self, host: Host, address: str = "") -> str:
        reply = host.call("IpamDriver.RequestAddress", {"PoolID": SUBNET, "Address": address})
        return reply["Address"].split("/")[0]

    def allocated(self) -> set[str]:
        return {a.address for a in self.ipam.list_allocations()}


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_an_address_no_endpoint_came_for_is_released_after_two_sightings(setup):
    lost = setup.request(setup.h1)
    assert setup.collector.collect(100.0) == []
    assert setup.collector.collect(100.0 + GRACE - 1) == []
    assert lost in setup.allocated()
    assert setup.collector.collect(100.0 + GRACE) == [lost]
    assert setup.allocated() == {"10.99.0.1"}  # the gateway stays


def test_addresses_that_endpoints_docker_or_other_hosts_hold_stay(setup):
    bound = setup.request(setup.h1)
    setup.h1.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": "n" * 64, "EndpointID": "e" * 64,
        "Interface": {"Address": f"{bound}/24"}, "Options": {}})
    aux = setup.request(setup.h1, "10.99.0.200")       # --aux-address: Docker holds it
    setup.docker.held_addresses.add(aux)
    starting = setup.request(setup.h1, "10.99.0.201")  # --ip: Docker holds its endpoint
    setup.docker.held_addresses.add(starting)
    setup.h2.call("IpamDriver.RequestPool", {"Pool": SUBNET, "V6": False})
    theirs = setup.request(setup.h2)                   # h2's own business
    released = [a for now in (0.0, GRACE, 2 * GRACE) for a in setup.collector.collect(now)]
    assert released == []
    assert {bound, aux, starting, theirs, "10.99.0.1"} <= setup.allocated()


def test_nothing_is_released_while_docker_does_not_answer(setup):
    lost = setup.request(setup.h1)
    setup.docker.answering = False
    assert [a for now in (0.0, GRACE, 2 * GRACE) for a in setup.collector.collect(now)] == []
    setup.docker.answering = True
    setup.collector.collect(3 * GRACE)
    assert setup.collector.collect(4 * GRACE) == [lost]


def test_an_address_tied_to_an_endpoint_between_sightings_stays(setup):
    address = setup.request(setup.h1)
    setup.collector.collect(0.0)
    setup.h1.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": "n" * 64, "EndpointID": "e" * 64,
        "Interface": {"Address": f"{address}/24"}, "Options": {}})
    assert setup.collector.collect(GRACE) == []
    assert address in setup.allocated()


def test_an_address_whose_endpoint_went_without_its_release_is_released(setup):
    address = setup.request(setup.h1)
    setup.h1.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": "n" * 64, "EndpointID": "e" * 64,
        "Interface": {"Address": f"{address}/24"}, "Options": {}})
    # DeleteEndpoint, then the plugin killed before dockerd's ReleaseAddress.
    setup.h1.call("NetworkDriver.DeleteEndpoint", {"NetworkID": "n" * 64,
                                                   "EndpointID": "e" * 64})
    assert address in setup.allocated()
    setup.collector.collect(0.0)
    assert setup.collector.collect(GRACE) == [address]
    assert setup.allocated() == {"10.99.0.1"}
