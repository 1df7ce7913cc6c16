"""The agent's route reconciliation against a stateful fake kernel and real SQLite."""

from __future__ import annotations

from pathlib import Path

from datastore.base import dumps
from datastore.sqlite import SqliteDatastore
from driver.reconcile import reconcile_routes
from driver.records import EndpointRecord, NetworkRecord, Subnet, endpoint_key, network_key
from tests.unit.fakes import FakeKernel


def _setup(tmp_path: Path) -> tuple[SqliteDatastore, FakeKernel, EndpointRecord]:
    store = SqliteDatastore(str(tmp_path / "state.db"))
    network = NetworkRecord(id="net1", ipv4=Subnet("10.1.0.0/24", "10.1.0.1"), ipv6=None)
    store.create(network_key("net1"), dumps(network.to_dict()))
    endpoint = EndpointRecord(id="a" * 64, network_id="net1", hostname="h1",
                              ipv4="10.1.0.5/24", ipv6=None, state="joined")
    store.create(endpoint_key("h1", endpoint.id), dumps(endpoint.to_dict()))
    kernel = FakeKernel()
    with kernel.netlink() as netlink:
        netlink.create_veth(endpoint.host_ifname, endpoint.container_ifname)
        netlink.configure_host_end(endpoint.host_ifname, ["10.1.0.1"])
        netlink.add_route("10.1.0.5", endpoint.host_ifname)
    return store, kernel, endpoint


def test_converged_host_is_left_alone(tmp_path: Path) -> None:
    store, kernel, endpoint = _setup(tmp_path)
    report = reconcile_routes(store, "h1", kernel.netlink())
    assert not report.changed
    assert kernel.routes == {"10.1.0.5": endpoint.host_ifname}


def test_missing_route_is_restored(tmp_path: Path) -> None:
    store, kernel, endpoint = _setup(tmp_path)
    kernel.routes.clear()
    kernel.links[endpoint.host_ifname].addresses.clear()
    report = reconcile_routes(store, "h1", kernel.netlink())
    assert report.routes_added == ["10.1.0.5"]
    assert kernel.routes == {"10.1.0.5": endpoint.host_ifname}
    assert kernel.links[endpoint.host_ifname].addresses == ["10.1.0.1"]


def test_stale_links_and_routes_are_removed(tmp_path: Path) -> None:
    store, kernel, endpoint = _setup(tmp_path)
    with kernel.netlink() as netlink:
        netlink.create_veth("calistale00001", "tmpstale00001")
        netlink.add_route("10.1.0.99", "calistale00001")
        netlink.add_route("10.1.0.98", endpoint.host_ifname)  # not the endpoint's address
        netlink.create_veth("eth9", "eth9peer")  # not ours: never touched
    report = reconcile_routes(store, "h1", kernel.netlink())
    assert report.links_removed == ["calistale00001"]
    assert report.routes_removed == ["10.1.0.98"]
    assert kernel.routes == {"10.1.0.5": endpoint.host_ifname}
    assert set(kernel.links) == {endpoint.host_ifname, "eth9"}


def test_other_hosts_endpoints_are_not_ours(tmp_path: Path) -> None:
    store, kernel, endpoint = _setup(tmp_path)
    report = reconcile_routes(store, "h2", kernel.netlink())
    assert report.links_removed == [endpoint.host_ifname]
    assert kernel.links == {}


def test_left_endpoint_routes_are_not_restored_and_its_link_goes(tmp_path: Path) -> None:
    store, kernel, endpoint = _setup(tmp_path)
    endpoint.state = "left"
    entry = store.get(endpoint_key("h1", endpoint.id))
    store.update(endpoint_key("h1", endpoint.id), dumps(endpoint.to_dict()), entry.revision)
    kernel.routes.clear()  # Leave removed the routes; the veth is still being deleted
    report = reconcile_routes(store, "h1", kernel.netlink())
    assert report.routes_added == [] and report.links_removed == [endpoint.host_ifname]
    assert kernel.links == {} and kernel.routes == {}


def test_endpoint_mid_join_is_left_alone(tmp_path: Path) -> None:
    store, kernel, endpoint = _setup(tmp_path)
    endpoint.state = "created"  # Join made the veth and route, not yet marked joined
    entry = store.get(endpoint_key("h1", endpoint.id))
    store.update(endpoint_key("h1", endpoint.id), dumps(endpoint.to_dict()), entry.revision)
    report = reconcile_routes(store, "h1", kernel.netlink())
    assert not report.changed
    assert kernel.routes == {"10.1.0.5": endpoint.host_ifname}
    kernel.routes.clear()
    assert not reconcile_routes(store, "h1", kernel.netlink()).changed
