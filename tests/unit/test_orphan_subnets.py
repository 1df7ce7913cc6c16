"""Subnet reservations that no network owns (RequestPool without its CreateNetwork) are
given up by the host that made them, after being seen orphaned twice `grace` apart;
never while a network record or any network of this host's Docker using our IPAM has
the subnet, nor while Docker does not answer. Real SQLite, two hosts' apps on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from datastore.sqlite import SqliteDatastore
from plugin.garbage import OrphanSubnetCollector
from tests.unit.fake_docker import FakeDockerNetworks
from tests.unit.test_cluster_networks import Host

GRACE = 30.0


class Cluster:
    def __init__(self, tmp_path: Path) -> None:
        path = str(tmp_path / "state.db")
        store = SqliteDatastore(path)
        self.h1, self.h2 = Host("h1", store, path), Host("h2", store, path)
        self.ipam = self.h1.app.extensions["calico_cnm.ipam"]
        self.ipam.add_pool("10.96.0.0/12")
        self.docker = FakeDockerNetworks()
        self.collector = OrphanSubnetCollector(
            self.ipam, self.h1.service, "h1",
            lambda: self.docker.ipam_subnets("calico-ipam"), GRACE)

    def reserved(self) -> dict[str, list[str]]:
        return {rec.cidr: list(rec.hosts) for _, rec in self.ipam.reservations()}

    def request_pool(self, host: Host, subnet: str) -> None:
        host.call("IpamDriver.RequestPool", {"Pool": subnet, "V6": False})


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path)


def test_a_reservation_no_network_owns_is_released_after_two_sightings(cluster):
    cluster.request_pool(cluster.h1, "10.99.0.0/24")  # dockerd died before CreateNetwork
    cluster.h1.call("IpamDriver.RequestAddress", {
        "PoolID": "10.99.0.0/24", "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert cluster.collector.collect(now=100.0) == []
    assert cluster.collector.collect(now=100.0 + GRACE - 1) == []
    assert "10.99.0.0/24" in cluster.reserved()
    assert cluster.collector.collect(now=100.0 + GRACE) == ["10.99.0.0/24"]
    assert cluster.reserved() == {}
    assert cluster.ipam.list_allocations() == []  # its gateway address went with it


def test_owned_or_used_reservations_stay(cluster):
    cluster.h1.network("n" * 64, "web", "10.99.1.0/24")  # a calico network record
    # Another network driver using our IPAM: only Docker knows it.
    cluster.request_pool(cluster.h1, "10.99.2.0/24")
    cluster.docker.add("macvlan-net", "calico-ipam", {"10.99.2.0/24"})
    # A network of another IPAM driver with the same subnet protects nothing.
    cluster.request_pool(cluster.h1, "10.99.3.0/24")
    cluster.docker.add("other", "default", {"10.99.3.0/24"})
    released = [cidr for now in (0.0, GRACE, 2 * GRACE)
                for cidr in cluster.collector.collect(now)]
    assert released == ["10.99.3.0/24"]
    assert set(cluster.reserved()) == {"10.99.1.0/24", "10.99.2.0/24"}


def test_nothing_is_released_while_docker_does_not_answer(cluster):
    cluster.request_pool(cluster.h1, "10.99.4.0/24")
    cluster.docker.answering = False
    for now in (0.0, GRACE, 2 * GRACE):
        assert cluster.collector.collect(now) == []
    assert "10.99.4.0/24" in cluster.reserved()
    cluster.docker.answering = True
    assert cluster.collector.collect(3 * GRACE) == []  # a first sighting again
    assert cluster.collector.collect(4 * GRACE) == ["10.99.4.0/24"]


def test_a_change_between_sightings_starts_over(cluster):
    cluster.request_pool(cluster.h1, "10.99.5.0/24")
    assert cluster.collector.collect(0.0) == []
    cluster.request_pool(cluster.h2, "10.99.5.0/24")  # h2 claims it too: a new revision
    assert cluster.collector.collect(GRACE) == []
    assert cluster.collector.collect(2 * GRACE) == ["10.99.5.0/24"]
    assert cluster.reserved() == {"10.99.5.0/24": ["h2"]}


def test_a_host_gives_up_only_its_own_claim_on_a_shared_subnet(cluster):
    cluster.h2.network("b" * 64, "web", "10.99.6.0/24")  # h2's network owns it
    cluster.request_pool(cluster.h1, "10.99.6.0/24")  # h1 joined, never created its own
    assert cluster.reserved()["10.99.6.0/24"] == ["h1", "h2"]
    cluster.collector.collect(0.0)
    assert cluster.collector.collect(GRACE) == ["10.99.6.0/24"]
    assert cluster.reserved() == {"10.99.6.0/24": ["h2"]}


def test_ipam_show_subnets_lists_every_reservation_with_its_networks(cluster, tmp_path):
    from plugin.cli import subnet_reservations
    from plugin.settings import Settings

    cluster.h1.network("n" * 64, "web", "10.99.7.0/24")
    cluster.request_pool(cluster.h2, "10.99.8.0/24")
    settings = Settings(hostname="h1", sqlite_path=str(tmp_path / "state.db"))
    rows = {r["subnet"]: r for r in subnet_reservations(settings, cluster.h1.service._store)}
    assert rows["10.99.7.0/24"]["networks"] == ["web@h1"]
    assert rows["10.99.7.0/24"]["state"] == "in use"
    assert rows["10.99.8.0/24"]["hosts"] == ["h2"]
    assert rows["10.99.8.0/24"]["state"] == "no network record"
    assert all(isinstance(r["age_seconds"], int) and r["age_seconds"] >= 0
               for r in rows.values())
