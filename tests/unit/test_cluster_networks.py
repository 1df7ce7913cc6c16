"""One calico network across hosts: every host's Docker network of one name is one
cluster network. Two apps with their own hostnames share one datastore, as two hosts
share etcd."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from datastore.base import ROOT
from datastore.sqlite import SqliteDatastore
from driver.cluster import sync_actions
from driver.records import NetworkRecord, Subnet, network_key
from plugin.app import create_app
from plugin.settings import Settings
from tests.unit.fakes import FakeKernel

GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


class Host:
    """One host's plugin: its own app, kernel and Docker names, a shared store."""

    def __init__(self, name: str, store: SqliteDatastore, path: str) -> None:
        self.name = name
        self.kernel = FakeKernel()
        self.docker_names: dict[str, str] = {}
        self.app = create_app(Settings(hostname=name, sqlite_path=path), store=store,
                              netlink_factory=self.kernel.netlink,
                              name_lookup=self.docker_names.get)
        self.client: FlaskClient = self.app.test_client()
        self.service = self.app.extensions["calico_cnm.network"]

    def call(self, method: str, body: Any, status: int = 200) -> dict[str, Any]:
        response = self.client.post(f"/{method}", data=json.dumps(body).encode())
        reply = response.get_json(force=True)
        assert response.status_code == status, (method, response.status_code, reply)
        return reply

    def network(self, network_id: str, name: str, subnet: str) -> None:
        """What `docker network create --subnet SUBNET NAME` sends, then the name
        lookup the agent does."""
        pool = self.call("IpamDriver.RequestPool", {"Pool": subnet, "V6": False})
        gateway = self.call("IpamDriver.RequestAddress", {
            "PoolID": pool["PoolID"], "Address": "", "Options": GATEWAY})["Address"]
        self.call("NetworkDriver.CreateNetwork", {
            "NetworkID": network_id, "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"Pool": pool["Pool"], "Gateway": gateway}], "IPv6Data": []})
        self.docker_names[network_id] = name
        self.service.resolve_pending_networks()

    def endpoint(self, network_id: str, endpoint_id: str, pool: str,
                 status: int = 200) -> dict[str, Any]:
        address = self.call("IpamDriver.RequestAddress", {"PoolID": pool})["Address"]
        return self.call("NetworkDriver.CreateEndpoint", {
            "NetworkID": network_id, "EndpointID": endpoint_id,
            "Interface": {"Address": address}, "Options": {}}, status=status)


@pytest.fixture
def hosts(tmp_path: Path) -> tuple[Host, Host, SqliteDatastore]:
    path = str(tmp_path / "state.db")
    store = SqliteDatastore(path)
    h1, h2 = Host("h1", store, path), Host("h2", store, path)
    h1.app.extensions["calico_cnm.ipam"].add_pool("10.96.0.0/12")
    return h1, h2, store


def _record(store: SqliteDatastore, network_id: str) -> NetworkRecord:
    entry = store.get(network_key(network_id))
    assert entry is not None
    return NetworkRecord.from_dict(entry.data)


def test_same_name_and_subnet_on_two_hosts_is_one_network(hosts):
    h1, h2, store = hosts
    h1.network("a" * 64, "web", "10.98.0.0/24")
    h2.network("b" * 64, "web", "10.98.0.0/24")
    one, two = _record(store, "a" * 64), _record(store, "b" * 64)
    assert (one.conflict, two.conflict) == ("", "")
    assert one.profiles == two.profiles == ["web"]
    assert two.ipv4 is not None and two.ipv4.gateway == one.ipv4.gateway  # type: ignore
    h2.endpoint("b" * 64, "e" * 64, "10.98.0.0/24")


def test_a_different_subnet_for_an_existing_name_is_refused_naming_it(hosts):
    h1, h2, store = hosts
    h1.network("a" * 64, "web", "10.98.0.0/24")
    h2.network("b" * 64, "web", "10.99.0.0/24")
    conflict = _record(store, "b" * 64).conflict
    assert "10.98.0.0/24" in conflict and "h1" in conflict
    reply = h2.endpoint("b" * 64, "e" * 64, "10.99.0.0/24", status=409)
    assert "10.98.0.0/24" in reply["Err"]
    assert not store.list(ROOT + "endpoints/")


def test_rm_while_another_host_uses_the_network_removes_it_only_here(hosts):
    h1, h2, store = hosts
    h1.network("a" * 64, "web", "10.98.0.0/24")
    h2.network("b" * 64, "web", "10.98.0.0/24")
    h2.endpoint("b" * 64, "e" * 64, "10.98.0.0/24")
    # dockerd ignores a DeleteNetwork error: h1 leaves, h2 keeps its network as it was.
    h1.call("NetworkDriver.DeleteNetwork", {"NetworkID": "a" * 64})
    assert store.get(network_key("a" * 64)) is None
    kept = _record(store, "b" * 64)
    assert not kept.removing and kept.name == "web"


def test_rm_on_one_host_marks_the_others_for_removal(hosts):
    h1, h2, store = hosts
    h1.network("a" * 64, "web", "10.98.0.0/24")
    h2.network("b" * 64, "web", "10.98.0.0/24")
    h1.call("NetworkDriver.DeleteNetwork", {"NetworkID": "a" * 64})
    assert store.get(network_key("a" * 64)) is None
    assert _record(store, "b" * 64).removing
    # The other host's agent removes its Docker network: that rm is not refused.
    h2.call("NetworkDriver.DeleteNetwork", {"NetworkID": "b" * 64})
    assert not store.list(ROOT + "networks/")


def _net(network_id: str, host: str, name: str, **extra: Any) -> NetworkRecord:
    return NetworkRecord(id=network_id, ipv4=Subnet("10.98.0.0/24", "10.98.0.1"), ipv6=None,
                         name=name, hostname=host, **extra)


def test_sync_creates_what_this_host_lacks_and_removes_what_was_removed():
    records = [
        _net("1", "h1", "web"), _net("2", "h2", "web"),
        _net("3", "h1", "db"),
        _net("4", "h1", "odd", conflict="different subnet"),
        _net("5", "h1", "gone", removing=True),
        _net("6", "h3", "old", removing=True),
        _net("7", "h1", ""),  # not resolved yet
        _net("8", "h1", "taken"),
    ]
    actions = sync_actions("h3", records, docker_names={"bridge", "taken"})
    assert sorted(r.name for r in actions.create) == ["db", "web"]
    assert [r.id for r in actions.remove] == ["6"]
    assert sorted(r.name for r in sync_actions("h2", records, {"web"}).create) == [
        "db", "taken"]
