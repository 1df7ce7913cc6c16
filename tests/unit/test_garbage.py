"""Records Docker forgot (containers removed while the plugin was down) are cleaned
up, but never one Docker is still creating, and never while Docker does not answer."""

from __future__ import annotations

from pathlib import Path

from datastore.base import dumps
from datastore.sqlite import SqliteDatastore
from driver.records import EndpointRecord, NetworkRecord, Subnet, endpoint_key, network_key
from driver.service import NetworkService
from ipam_driver.service import IpamService
from plugin.garbage import StaleCollector
from tests.unit.fakes import FakeKernel

GRACE = 30.0


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteDatastore(str(tmp_path / "state.db"))
        self.kernel = FakeKernel()
        self.ipam = IpamService(self.store, "h1")
        self.ipam.add_pool("10.1.0.0/16")
        self.service = NetworkService(self.store, self.ipam, "h1", self.kernel.netlink,
                                      lambda _id: None)
        # The Docker API: network ID -> (exists, endpoint IDs); None = not answering.
        self.docker: dict[str, tuple[bool, frozenset[str]]] | None = {}
        self.collector = StaleCollector(self.store, self.service, "h1", self.state, GRACE)

    def state(self, network_id: str) -> tuple[bool, frozenset[str]] | None:
        if self.docker is None:
            return None
        return self.docker.get(network_id, (False, frozenset()))

    def network(self, network_id: str, hostname: str = "h1") -> str:
        pool_id, cidr, _ = self.ipam.request_pool(None, None, {}, False)
        record = NetworkRecord(id=network_id, ipv4=Subnet(cidr, None, pool_id), ipv6=None,
                               hostname=hostname)
        self.store.create(network_key(network_id), dumps(record.to_dict()))
        return pool_id

    def endpoint(self, network_id: str, endpoint_id: str, pool_id: str) -> EndpointRecord:
        address = self.ipam.request_address(pool_id, None, {})
        self.ipam.assign_handle(address, endpoint_id)
        record = EndpointRecord(id=endpoint_id, network_id=network_id, hostname="h1",
                                ipv4=address, ipv6=None, state="joined")
        self.store.create(endpoint_key("h1", endpoint_id), dumps(record.to_dict()))
        with self.kernel.netlink() as netlink:
            netlink.create_veth(record.host_ifname, record.container_ifname)
            netlink.add_route(address.split("/")[0], record.host_ifname)
        return record


def test_endpoint_docker_forgot_is_removed_after_two_sightings(tmp_path: Path) -> None:
    world = World(tmp_path)
    pool_id = world.network("n1")
    kept = world.endpoint("n1", "a" * 64, pool_id)
    gone = world.endpoint("n1", "b" * 64, pool_id)
    assert world.docker is not None
    world.docker["n1"] = (True, frozenset({kept.id}))

    assert world.collector.collect(now=100.0) == []  # first sighting: only suspected
    assert world.collector.collect(now=100.0 + GRACE / 2) == []  # not long enough
    assert world.collector.collect(now=100.0 + GRACE) == [gone.id]
    assert world.store.get(endpoint_key("h1", gone.id)) is None
    assert gone.host_ifname not in world.kernel.links
    assert [a.handle for a in world.ipam.list_allocations()] == [kept.id]
    assert world.store.get(endpoint_key("h1", kept.id)) is not None
    assert kept.host_ifname in world.kernel.links


def test_a_changed_record_starts_its_grace_again(tmp_path: Path) -> None:
    world = World(tmp_path)
    pool_id = world.network("n1")
    record = world.endpoint("n1", "a" * 64, pool_id)
    assert world.docker is not None
    world.docker["n1"] = (True, frozenset())
    world.collector.collect(now=0.0)
    entry = world.store.get(endpoint_key("h1", record.id))
    assert entry is not None
    world.store.update(entry.key, entry.value, entry.revision)  # e.g. Join marked it
    assert world.collector.collect(now=GRACE) == []
    assert world.collector.collect(now=2 * GRACE) == [record.id]


def test_nothing_is_removed_while_docker_does_not_answer(tmp_path: Path) -> None:
    world = World(tmp_path)
    pool_id = world.network("n1")
    world.endpoint("n1", "a" * 64, pool_id)
    world.docker = None
    for now in (0.0, GRACE, 10 * GRACE):
        assert world.collector.collect(now=now) == []
    assert len(world.service.list_endpoints()) == 1


def test_network_docker_removed_goes_once_its_endpoints_are_gone(tmp_path: Path) -> None:
    world = World(tmp_path)
    pool_id = world.network("n1")
    world.network("other-host-net", hostname="h2")
    record = world.endpoint("n1", "a" * 64, pool_id)
    # Docker removed the network (and its container) while the plugin was down.
    assert world.collector.collect(now=0.0) == []
    assert world.collector.collect(now=GRACE) == [record.id, "n1"]  # endpoint first
    assert world.store.get(network_key("n1")) is None
    assert world.collector.collect(now=2 * GRACE) == []
    # A network another host's dockerd made is never this host's to judge.
    assert world.store.get(network_key("other-host-net")) is not None
