"""The libnetwork remote protocol as dockerd speaks it, against the real app with
a real SQLite datastore and a stateful fake kernel."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import netaddr
import pytest
from flask.testing import FlaskClient

from datastore.base import ROOT
from datastore.errors import InvalidRequest
from datastore.sqlite import SqliteDatastore
from plugin.app import create_app
from plugin.settings import Settings
from tests.unit.fakes import FakeKernel

FIXTURES = Path(__file__).parent / "fixtures" / "dockerd-20.10-calls.jsonl"
NETWORK_ID = "n" * 64
ENDPOINT_ID = "e" * 64


class Plugin:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteDatastore(str(tmp_path / "state.db"))
        self.kernel = FakeKernel()
        # Docker's names for networks, as the Docker API would answer.
        self.docker_names: dict[str, str] = {}
        settings = Settings(hostname="host1", sqlite_path=str(tmp_path / "state.db"))
        self.app = create_app(settings, store=self.store, netlink_factory=self.kernel.netlink,
                              name_lookup=self.docker_names.get)
        self.client: FlaskClient = self.app.test_client()
        self.ipam = self.app.extensions["calico_cnm.ipam"]

    def call(self, method: str, body: Any = None, raw: bytes | None = None,
             status: int = 200) -> dict[str, Any]:
        # dockerd sends no Content-Type header.
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        response = self.client.post(f"/{method}", data=data)
        reply = response.get_json(force=True)
        assert response.status_code == status, (method, response.status_code, reply)
        return reply

    def state(self) -> list[tuple[str, str]]:
        return [(e.key, e.value) for e in self.store.list(ROOT)]


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    made = Plugin(tmp_path)
    made.ipam.add_pool("10.96.0.0/12")
    made.ipam.add_pool("fd00:98::/48")
    return made


def _network(plugin: Plugin, subnet: str = "10.98.0.0/24", v6: str | None = None
             ) -> dict[str, str]:
    pools: dict[str, str] = {}
    ipv4 = plugin.call("IpamDriver.RequestPool",
                       {"AddressSpace": "CalicoLocal", "Pool": subnet, "V6": False})
    gateway = plugin.call("IpamDriver.RequestAddress", {
        "PoolID": ipv4["PoolID"], "Address": "",
        "Options": {"RequestAddressType": "com.docker.network.gateway"}})["Address"]
    pools["v4"] = ipv4["PoolID"]
    body: dict[str, Any] = {
        "NetworkID": NETWORK_ID,
        "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "CalicoLocal", "Pool": ipv4["Pool"], "Gateway": gateway}],
        "IPv6Data": [],
    }
    if v6:
        ipv6 = plugin.call("IpamDriver.RequestPool",
                           {"AddressSpace": "CalicoLocal", "Pool": v6, "V6": True})
        gateway6 = plugin.call("IpamDriver.RequestAddress", {
            "PoolID": ipv6["PoolID"], "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"}})["Address"]
        body["IPv6Data"] = [{"Pool": ipv6["Pool"], "Gateway": gateway6}]
        pools["v6"] = ipv6["PoolID"]
    plugin.call("NetworkDriver.CreateNetwork", body)
    return pools


def test_activate_and_capabilities_answer_empty_bodies(plugin: Plugin) -> None:
    assert plugin.call("Plugin.Activate") == {
        "Implements": ["NetworkDriver", "IpamDriver", "authz"]}
    assert plugin.call("NetworkDriver.GetCapabilities")["Scope"] == "local"
    assert plugin.call("IpamDriver.GetCapabilities") == {
        "RequiresMACAddress": False, "RequiresRequestReplay": False}
    spaces = plugin.call("IpamDriver.GetDefaultAddressSpaces")
    assert spaces["LocalDefaultAddressSpace"] and spaces["GlobalDefaultAddressSpace"]


def test_unknown_method_is_404_with_both_error_keys(plugin: Plugin) -> None:
    reply = plugin.call("NetworkDriver.Frobnicate", {}, status=404)
    assert reply["Err"] and reply["Err"] == reply["Error"]
    plugin.call("NetworkDriver.ProgramExternalConnectivityX", {}, status=404)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_malformed_bodies_are_refused_and_change_nothing(plugin: Plugin, raw: bytes) -> None:
    before = plugin.state()
    for method in ("IpamDriver.RequestPool", "NetworkDriver.CreateNetwork"):
        reply = plugin.call(method, raw=raw, status=400)
        assert "JSON" in reply["Error"] and reply["Err"] == reply["Error"]
    assert plugin.state() == before


def test_missing_fields_and_unknown_ids_are_clear_errors(plugin: Plugin) -> None:
    before = plugin.state()
    reply = plugin.call("NetworkDriver.CreateNetwork", {"Options": {}}, status=400)
    assert "NetworkID" in reply["Err"]
    reply = plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": "missing", "EndpointID": ENDPOINT_ID,
        "Interface": {"Address": "10.98.0.5/24"}}, status=404)
    assert "missing" in reply["Err"]
    reply = plugin.call("NetworkDriver.Join", {"NetworkID": "missing", "EndpointID": "x"},
                        status=404)
    reply = plugin.call("IpamDriver.RequestAddress", {"PoolID": "10.0.0.0/8"}, status=404)
    assert reply["Error"]
    reply = plugin.call("IpamDriver.RequestPool", {"Pool": "10.98.0.0/33"}, status=400)
    assert "10.98.0.0/33" in reply["Error"]
    reply = plugin.call("IpamDriver.RequestPool", {"Pool": "172.30.0.0/24"}, status=400)
    assert "calico-cnm pool add" in reply["Error"]
    assert plugin.state() == before


def test_unsupported_network_option_is_refused(plugin: Plugin) -> None:
    before = plugin.state()
    reply = plugin.call("NetworkDriver.CreateNetwork", {
        "NetworkID": NETWORK_ID,
        "Options": {"com.docker.network.generic": {"colour": "blue"}},
        "IPv4Data": [{"Pool": "10.98.0.0/24", "Gateway": "10.98.0.1/24"}]}, status=400)
    assert "colour" in reply["Err"] and "mtu" in reply["Err"]
    assert plugin.state() == before


def test_network_needs_a_real_subnet(plugin: Plugin) -> None:
    reply = plugin.call("NetworkDriver.CreateNetwork", {
        "NetworkID": NETWORK_ID, "Options": {},
        "IPv4Data": [{"Pool": "0.0.0.0/0", "Gateway": ""}]}, status=400)
    assert "calico-ipam" in reply["Err"]


def test_endpoint_lifecycle_programs_and_cleans_the_kernel(plugin: Plugin) -> None:
    pools = _network(plugin, "10.98.0.0/24", "fd00:98:0:1::/64")
    address = plugin.call("IpamDriver.RequestAddress",
                          {"PoolID": pools["v4"], "Address": "", "Options": None})["Address"]
    address6 = plugin.call("IpamDriver.RequestAddress",
                           {"PoolID": pools["v6"], "Address": ""})["Address"]
    assert address.endswith("/24") and address6.endswith("/64")
    reply = plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID,
        "Interface": {"Address": address, "AddressIPv6": address6, "MacAddress": ""},
        "Options": {}})
    assert reply == {"Interface": {}}  # returning an address would abort the endpoint
    handles = {a.address: a.handle for a in plugin.ipam.list_allocations()}
    assert handles[address.split("/")[0]] == ENDPOINT_ID

    join = plugin.call("NetworkDriver.Join", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID,
        "SandboxKey": "/var/run/docker/netns/x", "Options": {}})
    host_if = "cali" + ENDPOINT_ID[:11]
    assert join["InterfaceName"] == {"SrcName": "tmp" + ENDPOINT_ID[:11], "DstPrefix": "eth"}
    assert join["Gateway"] == "10.98.0.1"
    assert join["GatewayIPv6"] == "fd00:98:0:1::1"
    assert join["StaticRoutes"] == [
        {"Destination": "fd00:98:0:1::1/128", "RouteType": 1},
        {"Destination": "fd00:98:0:1::/65", "RouteType": 0, "NextHop": "fd00:98:0:1::1"},
        {"Destination": "fd00:98:0:1:8000::/65", "RouteType": 0, "NextHop": "fd00:98:0:1::1"},
    ]
    link = plugin.kernel.links[host_if]
    assert link.up and set(link.addresses) == {"10.98.0.1", "fd00:98:0:1::1"}
    assert plugin.kernel.routes == {address.split("/")[0]: host_if,
                                    address6.split("/")[0]: host_if}
    info = plugin.call("NetworkDriver.EndpointOperInfo",
                       {"NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID})
    assert info["Value"]["Joined"] is True

    plugin.call("NetworkDriver.Leave", {"NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID})
    assert plugin.kernel.links == {} and plugin.kernel.routes == {}
    plugin.call("NetworkDriver.DeleteEndpoint",
                {"NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID})
    plugin.call("IpamDriver.ReleaseAddress", {"PoolID": pools["v4"], "Address": address[:-3]})
    plugin.call("NetworkDriver.EndpointOperInfo",
                {"NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID}, status=404)


def test_port_mappings_are_recorded_on_the_endpoint(plugin: Plugin) -> None:
    pools = _network(plugin)
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]
    portmap = [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 18080,
                "HostPortEnd": 18080}]
    plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Interface": {"Address": address},
        "Options": {"com.docker.network.portmap": portmap}})
    plugin.call("NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID,
        "Options": {"com.docker.network.portmap": portmap}})
    record = plugin.store.get(f"{ROOT}endpoints/host1/{ENDPOINT_ID}").data
    assert record["ports"] == [
        {"protocol": "tcp", "container_port": 80, "host_port": 18080, "host_ip": ""}]
    plugin.call("NetworkDriver.RevokeExternalConnectivity",
                {"NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID})
    assert plugin.store.get(f"{ROOT}endpoints/host1/{ENDPOINT_ID}").data["ports"] == []


def test_no_ports_to_program_or_revoke_writes_nothing(plugin: Plugin) -> None:
    # Every agent watches every write: a call that changes nothing must not write.
    pools = _network(plugin)
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]
    plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Interface": {"Address": address}})
    key = f"{ROOT}endpoints/host1/{ENDPOINT_ID}"
    revision = plugin.store.get(key).revision
    plugin.call("NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Options": {}})
    plugin.call("NetworkDriver.RevokeExternalConnectivity",
                {"NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID})
    assert plugin.store.get(key).revision == revision


def test_exhausted_subnet_answers_error_and_keeps_serving(plugin: Plugin) -> None:
    pools = _network(plugin, "10.98.7.0/29")  # 6 usable, one taken by the gateway
    got = {plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]
           for _ in range(5)}
    assert len(got) == 5
    reply = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]}, status=507)
    assert "10.98.7.0/29" in reply["Error"]
    assert plugin.call("Plugin.Activate")["Implements"]


def _replay_value(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, str):
        if value in mapping:
            return mapping[value]
        address, _, prefix = value.partition("/")
        if address in mapping:
            return mapping[address] + (f"/{prefix}" if prefix else "")
        return value
    if isinstance(value, dict):
        return {k: _replay_value(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_replay_value(v, mapping) for v in value]
    return value


def _chosen_addresses(method: str, request: dict[str, Any]) -> list[str]:
    """Addresses in a request that the IPAM chose (gateways, endpoint addresses)."""
    if method == "NetworkDriver.CreateNetwork":
        items = request.get("IPv4Data", []) + request.get("IPv6Data", [])
        return [i["Gateway"].split("/")[0] for i in items if i.get("Gateway")]
    if method == "NetworkDriver.CreateEndpoint":
        interface = request.get("Interface", {})
        return [interface[k].split("/")[0] for k in ("Address", "AddressIPv6")
                if interface.get(k)]
    return []


def test_recorded_dockerd_session_replays_and_leaves_nothing(plugin: Plugin) -> None:
    """Every request dockerd 20.10 sent for create/run/connect/stop/start/rm."""
    calls = [json.loads(line) for line in FIXTURES.read_text().splitlines()]
    from profiles.model import Profile
    from profiles.store import ProfileStore

    ProfileStore(plugin.store).create(Profile.network_default("web"))  # -o profile=web
    # Recorded value -> ours: pool IDs, and the addresses the recording plugin chose.
    mapping: dict[str, str] = {}
    explicit: set[str] = set()
    pending: list[str] = []  # our answers to RequestAddress calls without an address
    for call in calls:
        method, request = call["call"], call["request"]
        if method == "IpamDriver.RequestAddress" and request.get("Address"):
            explicit.add(request["Address"])
        for recorded in _chosen_addresses(method, request):
            if recorded in mapping or recorded in explicit:
                continue
            version = netaddr.IPAddress(recorded).version
            ours = next(a for a in pending if netaddr.IPAddress(a).version == version)
            pending.remove(ours)
            mapping[recorded] = ours
        if method == "IpamDriver.RequestPool" and request.get("Options"):
            # The recording used --ipam-opt, which is now refused, changing nothing.
            before = plugin.state()
            refused = plugin.call(method, _replay_value(request, mapping), status=400)
            assert "unsupported IPAM option 'pooltype'" in refused["Error"]
            assert plugin.state() == before
            request = {**request, "Options": {}}
        reply = plugin.call(method, _replay_value(request, mapping))
        if method == "IpamDriver.RequestPool":
            mapping[request["Pool"]] = reply["PoolID"]
        if method == "IpamDriver.RequestAddress" and not request.get("Address"):
            pending.append(reply["Address"].split("/")[0])
        if method == "NetworkDriver.Join":
            assert reply["InterfaceName"]["DstPrefix"] == "eth"
            assert plugin.kernel.links
    assert plugin.kernel.links == {} and plugin.kernel.routes == {}
    assert plugin.ipam.list_allocations() == []
    leftovers = [key for key, _ in plugin.state()
                 if "/networks/" in key or "/endpoints/" in key]
    assert leftovers == []


def test_network_name_gives_the_default_profile_at_first_endpoint(plugin: Plugin) -> None:
    pools = _network(plugin)
    network = plugin.store.get(f"{ROOT}networks/{NETWORK_ID}").data
    assert network["name"] == "" and network["profiles"] == []
    plugin.docker_names[NETWORK_ID] = "web"
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]
    plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Interface": {"Address": address}})
    network = plugin.store.get(f"{ROOT}networks/{NETWORK_ID}").data
    assert network["name"] == "web" and network["profiles"] == ["web"]
    profile = plugin.store.get(f"{ROOT}profiles/web").data
    assert profile["tags"] == ["web"]
    assert profile["rules"]["inbound"] == [{"action": "allow", "src_tag": "web"}]
    assert profile["rules"]["outbound"] == [{"action": "allow"}]


def test_existing_profile_of_that_name_is_reused(plugin: Plugin) -> None:
    from profiles.model import Profile, Rule
    from profiles.store import ProfileStore

    ProfileStore(plugin.store).create(
        Profile("web", ["web"], [Rule("allow", protocol="tcp", dst_ports=[80])], []))
    plugin.docker_names[NETWORK_ID] = "web"
    _network(plugin)
    service = plugin.app.extensions["calico_cnm.network"]
    assert service.resolve_network(NETWORK_ID).profiles == ["web"]
    profile = plugin.store.get(f"{ROOT}profiles/web").data
    assert profile["rules"]["inbound"] == [
        {"action": "allow", "protocol": "tcp", "dst_ports": [80]}]


def test_profile_option_needs_existing_profiles(plugin: Plugin) -> None:
    before = plugin.state()
    reply = plugin.call("NetworkDriver.CreateNetwork", {
        "NetworkID": NETWORK_ID,
        "Options": {"com.docker.network.generic": {"profile": "nosuch"}},
        "IPv4Data": [{"Pool": "10.98.0.0/24", "Gateway": "10.98.0.1/24"}]}, status=400)
    assert "nosuch" in reply["Err"] and "calico-cnm profile add" in reply["Err"]
    assert plugin.state() == before


def test_unreachable_etcd_answers_503_and_the_server_stays_up(tmp_path: Path) -> None:
    from datastore.etcd import EtcdDatastore

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    settings = Settings(hostname="host1", etcd_endpoints=(f"http://127.0.0.1:{port}",))
    store = EtcdDatastore(list(settings.etcd_endpoints), timeout=1.0)
    app = create_app(settings, store=store, netlink_factory=FakeKernel().netlink,
                     name_lookup={}.get)
    client = app.test_client()
    response = client.post("/IpamDriver.RequestPool", data=b'{"Pool": "", "V6": false}')
    assert response.status_code == 503
    reply = response.get_json(force=True)
    assert "unavailable" in reply["Error"] and str(port) in reply["Error"]
    assert client.post("/Plugin.Activate").status_code == 200


def test_network_name_that_cannot_name_a_profile_fails_clearly(plugin: Plugin) -> None:
    pools = _network(plugin)
    plugin.docker_names[NETWORK_ID] = "my net"  # a valid Docker network name
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]
    before = plugin.state()
    reply = plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Interface": {"Address": address}},
        status=400)
    assert "my net" in reply["Err"] and "-o profile=" in reply["Err"]
    assert plugin.state() == before


def test_host_port_range_publishes_only_the_one_container_port(plugin: Plugin) -> None:
    """`-p 18080-18082:80` asks for container port 80 on one free host port of the
    range (Docker's meaning); it must never publish container ports 81 and 82."""
    pools = _network(plugin)
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]
    portmap = [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 18080,
                "HostPortEnd": 18082}]
    plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Interface": {"Address": address},
        "Options": {"com.docker.network.portmap": portmap}})
    plugin.call("NetworkDriver.ProgramExternalConnectivity", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID,
        "Options": {"com.docker.network.portmap": portmap}})
    record = plugin.store.get(f"{ROOT}endpoints/host1/{ENDPOINT_ID}").data
    assert record["ports"] == [
        {"protocol": "tcp", "container_port": 80, "host_port": 18080, "host_ip": ""}]


def test_create_endpoint_that_fails_leaves_no_endpoint_record(
    plugin: Plugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker does not call DeleteEndpoint after a failed CreateEndpoint: a record left
    behind would block `docker network rm` and keep its profile "in use" forever."""
    from datastore.errors import Unavailable

    pools = _network(plugin)
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]

    def unavailable(address: str, handle: str) -> None:
        raise Unavailable("IPAM datastore unavailable: etcd went away")

    monkeypatch.setattr(plugin.ipam, "assign_handle", unavailable)
    plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Interface": {"Address": address}},
        status=503)
    assert plugin.store.get(f"{ROOT}endpoints/host1/{ENDPOINT_ID}") is None
    monkeypatch.undo()
    plugin.call("IpamDriver.ReleaseAddress", {"PoolID": pools["v4"], "Address": address[:-3]})
    plugin.call("NetworkDriver.DeleteNetwork", {"NetworkID": NETWORK_ID})


def test_stale_endpoint_is_removed_with_its_veth_routes_and_addresses(plugin: Plugin) -> None:
    pools = _network(plugin)
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]
    plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Interface": {"Address": address}})
    plugin.call("NetworkDriver.Join", {"NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID})
    service = plugin.app.extensions["calico_cnm.network"]
    # Docker removed the container while the plugin was down: nothing was called.
    with pytest.raises(InvalidRequest):
        service.remove_stale_endpoint("e")
    record, released = service.remove_stale_endpoint(ENDPOINT_ID[:12])
    assert record.id == ENDPOINT_ID and released == [address.split("/")[0]]
    assert plugin.kernel.links == {} and plugin.kernel.routes == {}
    assert plugin.store.get(f"{ROOT}endpoints/host1/{ENDPOINT_ID}") is None
    assert [a.kind for a in plugin.ipam.list_allocations()] == ["gateway"]
    plugin.call("NetworkDriver.DeleteNetwork", {"NetworkID": NETWORK_ID})


@pytest.mark.parametrize("mapping", [
    {"Proto": "tcp", "Port": 80, "HostPort": 8080},
    {"Proto": 6, "Port": "eighty", "HostPort": 8080},
    {"Proto": 6, "Port": 80, "HostPort": 70000},
])
def test_malformed_port_mappings_are_refused_and_change_nothing(
        plugin: Plugin, mapping: dict[str, Any]) -> None:
    pools = _network(plugin)
    address = plugin.call("IpamDriver.RequestAddress", {"PoolID": pools["v4"]})["Address"]
    before = plugin.state()
    reply = plugin.call("NetworkDriver.CreateEndpoint", {
        "NetworkID": NETWORK_ID, "EndpointID": ENDPOINT_ID, "Interface": {"Address": address},
        "Options": {"com.docker.network.portmap": [mapping]}}, status=400)
    assert "port mapping" in reply["Err"]
    assert plugin.state() == before
