"""The agent's routing and network sync across two hosts: two agents on one SQLite
store, each with its own stateful fake kernel and fake Docker API."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.netlink import ROUTE_PROTOCOL, Route
from datastore.base import ROOT
from datastore.errors import Conflict
from datastore.sqlite import SqliteDatastore
from driver.records import NetworkRecord, Subnet, network_key
from ipam_driver.service import IpamService
from plugin.agent import Agent
from plugin.settings import Settings
from profiles.iptables import ApplyReport, PolicyWriter
from routing.nodes import NodeRegistry
from routing.planner import VXLAN_DEVICE, vtep_mac
from tests.unit.fake_docker import FakeDockerNetworks
from tests.unit.fakes import FakeKernel


class NoPolicy(PolicyWriter):
    def apply(self, policy: object) -> ApplyReport:  # type: ignore[override]
        return ApplyReport()

    def resync(self, policy: object) -> ApplyReport:  # type: ignore[override]
        return ApplyReport(full=True)


class Host:
    def __init__(self, name: str, address: str, store: SqliteDatastore) -> None:
        self.kernel = FakeKernel()
        self.kernel.add_link("eth0", addresses=[address], mtu=1500)
        self.docker = FakeDockerNetworks()
        self.agent = Agent(Settings(hostname=name), store, writer=NoPolicy(),
                           docker_networks=self.docker, network_state=lambda _id: None,
                           netlink_factory=self.kernel.netlink, name_lookup=lambda _id: None)
        self.ipam = IpamService(store, name)

    def routes(self) -> set[Route]:
        return set(self.kernel.netlink().list_routes(ROUTE_PROTOCOL))


def _watch(store: SqliteDatastore, since: int, *hosts: Host) -> int:
    events = store.watch(ROOT, since, 0.1)
    for host in hosts:
        host.agent.handle(events)
    return events[-1].revision if events else since


def test_a_block_claimed_on_one_host_is_routed_on_the_other(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h1 = Host("h1", "10.123.1.11/24", store)
    h2 = Host("h2", "10.123.1.12/24", store)
    h1.ipam.add_pool("10.240.0.0/16")
    since = store.current_revision()
    h1.agent.resync()
    h2.agent.resync()  # h1 learns of h2 from the watch, as the running agent would
    nodes = {n.name: n for n in NodeRegistry(store).list()}
    assert nodes["h2"].ipv4 == "10.123.1.12/24" and nodes["h2"].interface == "eth0"
    assert nodes["h2"].mtu == 1500

    pool_id, _, _ = h2.ipam.request_pool("10.240.7.0/24", None, None, False)
    h2.ipam.request_address(pool_id, None, None)  # claims 10.240.7.0/26 for h2
    _watch(store, since, h1, h2)
    assert Route("10.240.7.0/26", via="10.123.1.12", dev="eth0") in h1.routes()
    assert Route("10.240.7.0/26", blackhole=True) in h2.routes()
    status = NodeRegistry(store).statuses()["h1"]
    assert status.heartbeat > 0 and not status.errors


def test_vxlan_pool_programs_the_device_neighbours_and_fdb(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h1 = Host("h1", "10.123.1.11/24", store)
    h2 = Host("h2", "10.123.2.12/24", store)
    h1.ipam.add_pool("10.240.0.0/16", vxlan_mode="always")
    for host in (h1, h2):
        host.agent.resync()
    for host in (h1, h2):
        host.agent.resync()  # each now knows the other's tunnel address
    h2_node = NodeRegistry(store).get("h2")
    assert h2_node.vxlan_ipv4, "a tunnel address from the VXLAN pool"
    link = h1.kernel.links[VXLAN_DEVICE]
    assert link.mtu == 1450 and link.vxlan is not None and link.vxlan.vni == 4096
    netlink = h1.kernel.netlink()
    assert netlink.list_neighbours(VXLAN_DEVICE)[h2_node.vxlan_ipv4] == vtep_mac("h2")
    assert netlink.list_fdb(VXLAN_DEVICE)[vtep_mac("h2")] == "10.123.2.12"


def test_a_network_created_on_one_host_is_created_on_the_other(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h1 = Host("h1", "10.123.1.11/24", store)
    h2 = Host("h2", "10.123.1.12/24", store)
    record = NetworkRecord(id="a" * 64, ipv4=Subnet("10.240.1.0/24", "10.240.1.1"),
                           ipv6=None, name="web", hostname="h1", profiles=["web"])
    store.put_json(network_key(record.id), record.to_dict())
    h2.agent.request_network_sync()
    _id, spec = h2.docker.networks["web"]
    assert spec is not None and spec.ipv4 is not None
    assert (spec.ipv4.cidr, spec.ipv4.gateway) == ("10.240.1.0/24", "10.240.1.1")
    assert "web" not in h1.docker.networks or h1.docker.networks["web"][1] is None


def test_a_kernel_without_ipip_reports_it_and_programs_everything_else(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h1 = Host("h1", "10.123.1.11/24", store)
    h1.kernel.missing_kinds = frozenset({"ipip"})
    h2 = Host("h2", "10.123.2.12/24", store)
    h1.ipam.add_pool("10.240.0.0/16", ipip_mode="always")
    h1.ipam.add_pool("10.250.0.0/16", vxlan_mode="always")
    for host in (h1, h2, h1, h2):
        host.agent.resync()
    pool_id, _, _ = h2.ipam.request_pool("10.250.7.0/24", None, None, False)
    h2.ipam.request_address(pool_id, None, None)
    h1.agent.resync()
    status = NodeRegistry(store).statuses()["h1"]
    assert any("ipip" in error for error in status.errors), status.errors
    assert "ipip" in status.tunnels["tunl0"]
    assert status.tunnels["vxlan.calico"] == "up"
    h2_tunnel = NodeRegistry(store).get("h2").vxlan_ipv4
    assert Route("10.250.7.0/26", via=h2_tunnel, dev=VXLAN_DEVICE, onlink=True) in h1.routes()
    assert not any(r.dev == "tunl0" for r in h1.routes())


def test_ipip_routes_where_the_kernel_has_it(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h1 = Host("h1", "10.123.1.11/24", store)
    h2 = Host("h2", "10.123.2.12/24", store)
    h1.ipam.add_pool("10.240.0.0/16", ipip_mode="cross-subnet")
    for host in (h1, h2, h1):
        host.agent.resync()
    pool_id, _, _ = h2.ipam.request_pool("10.240.7.0/24", None, None, False)
    h2.ipam.request_address(pool_id, None, None)
    h1.agent.resync()
    assert Route("10.240.7.0/26", via="10.123.2.12", dev="tunl0", onlink=True) in h1.routes()
    link = h1.kernel.links["tunl0"]
    assert link.up and link.mtu == 1480
    assert NodeRegistry(store).get("h1").ipip_ipv4 in [a.split("/")[0] for a in link.addresses]


def test_routes_of_other_protocols_are_never_touched(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h1 = Host("h1", "10.123.1.11/24", store)
    h1.kernel.install_route(Route("10.240.7.0/26", via="10.123.1.99"), protocol=4)
    h1.kernel.install_route(Route("10.99.0.0/16", via="10.123.1.1"), protocol=3)
    h1.kernel.install_route(Route("10.98.0.0/16", via="10.123.1.1"), ROUTE_PROTOCOL)  # stale
    h1.ipam.add_pool("10.240.0.0/16")
    h1.agent.resync()
    others = {(entry.route.dst, entry.protocol) for entry in h1.kernel.table.values()
              if entry.protocol != ROUTE_PROTOCOL}
    assert others == {("10.240.7.0/26", 4), ("10.99.0.0/16", 3)}
    assert Route("10.98.0.0/16", via="10.123.1.1", dev="eth0") not in h1.routes()


def test_without_network_sync_nothing_is_created(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    host = Host("h2", "10.123.1.12/24", store)
    host.agent = Agent(Settings(hostname="h2", sync_networks=False), store,
                       writer=NoPolicy(), docker_networks=host.docker,
                       network_state=lambda _id: None, netlink_factory=host.kernel.netlink,
                       name_lookup=lambda _id: None)
    record = NetworkRecord(id="a" * 64, ipv4=Subnet("10.240.1.0/24", "10.240.1.1"),
                           ipv6=None, name="web", hostname="h1", profiles=["web"])
    store.put_json(network_key(record.id), record.to_dict())
    host.agent.resync()
    assert "web" not in host.docker.networks


def test_a_pool_holding_only_tunnel_addresses_can_be_removed(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h1 = Host("h1", "10.123.1.11/24", store)
    h1.ipam.add_pool("10.240.0.0/16", vxlan_mode="always")
    h1.agent.resync()
    tunnel = NodeRegistry(store).get("h1").vxlan_ipv4
    assert tunnel and tunnel in [a.address for a in h1.ipam.list_allocations()]
    h1.ipam.remove_pool("10.240.0.0/16")
    assert h1.ipam.list_allocations() == [] and h1.ipam.list_subnets() == []
    # A pool in use by a network is still refused, and nothing is released.
    h1.ipam.add_pool("10.250.0.0/16", vxlan_mode="always")
    h1.agent.resync()
    h1.ipam.request_pool("10.250.9.0/24", None, None, False)
    before = h1.ipam.list_allocations()
    with pytest.raises(Conflict):
        h1.ipam.remove_pool("10.250.0.0/16")
    assert h1.ipam.list_allocations() == before


def test_a_carved_network_of_a_cluster_name_is_replaced_by_the_clusters(tmp_path: Path):
    store = SqliteDatastore(str(tmp_path / "state.db"))
    h2 = Host("h2", "10.123.1.12/24", store)
    h2.ipam.add_pool("10.240.0.0/16")
    cluster = NetworkRecord(id="a" * 64, ipv4=Subnet("10.240.1.0/24", "10.240.1.1"),
                            ipv6=None, name="web", hostname="h1", profiles=["web"])
    store.put_json(network_key(cluster.id), cluster.to_dict())
    carved, _, _ = h2.ipam.request_pool(None, None, None, False)  # no --subnet
    explicit, _, _ = h2.ipam.request_pool("10.240.9.0/24", None, None, False)
    for network_id, pool_id in (("b" * 64, carved), ("c" * 64, explicit)):
        record = NetworkRecord(id=network_id, ipv4=Subnet(pool_id, None, pool_id), ipv6=None,
                               name="web", hostname="h2", conflict="another subnet")
        store.put_json(network_key(network_id), record.to_dict())
        h2.docker.networks[f"web-{network_id[0]}"] = (network_id, None)
    h2.agent.request_network_sync()
    ids = {network_id for network_id, _spec in h2.docker.networks.values()}
    assert "b" * 64 not in ids  # carved: removed (the sync then creates the cluster's)
    assert "c" * 64 in ids  # an explicit other --subnet stays refused, not replaced
