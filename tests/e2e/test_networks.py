"""Calico networks through the real Docker CLI: subnets, addresses, routing, clean-up."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import netaddr

from tests.e2e.conftest import (
    IMAGE,
    Stack,
    docker,
    host_links,
    host_routes,
    post_unix,
    run,
    unique,
    wait_for,
)

# Prints the client's source address as seen by the server (busybox httpd CGI).
WHOAMI_SERVER = (
    "mkdir -p /www/cgi-bin && "
    "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $REMOTE_ADDR\\n' "
    "> /www/cgi-bin/whoami && chmod +x /www/cgi-bin/whoami && httpd -f -p 80 -h /www"
)


def _whoami(stack: Stack, client: str, server: str) -> str | None:
    """The client's address as the server saw it, or None if unreachable."""
    request = f"printf 'GET /cgi-bin/whoami HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {server} 80"
    result = stack.exec(client, "sh", "-c", request, check=False)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines or not lines[0].startswith("HTTP/1"):
        return None
    return lines[-1].strip("[]").removeprefix("::ffff:")


def test_network_without_subnet_gets_its_own_subnet_and_gateway(stack: Stack) -> None:
    first = stack.network()
    second = stack.network()
    configs = []
    for name in (first, second):
        info = stack.inspect_network(name)
        assert info["Driver"] == "calico"
        assert info["IPAM"]["Driver"] == "calico-ipam"
        config = info["IPAM"]["Config"][0]
        subnet = netaddr.IPNetwork(config["Subnet"])
        assert subnet in netaddr.IPNetwork("192.168.0.0/16")
        assert subnet.prefixlen == 24
        assert netaddr.IPAddress(config["Gateway"]) in subnet
        configs.append(subnet)
    assert configs[0] != configs[1]


def test_containers_reach_each_other_by_address_and_name(stack: Stack) -> None:
    bridges_before = run("ip", "-o", "link", "show", "type", "bridge").stdout
    net = stack.network()
    subnet = netaddr.IPNetwork(stack.inspect_network(net)["IPAM"]["Config"][0]["Subnet"])
    a = stack.container(net)
    b = stack.container(net)
    address_a = stack.address(a, net)
    address_b = stack.address(b, net)
    assert netaddr.IPAddress(address_a) in subnet
    assert netaddr.IPAddress(address_b) in subnet
    assert address_a != address_b

    routes = stack.exec(a, "ip", "route").stdout
    assert "default via" in routes
    stack.exec(a, "ping", "-c", "1", "-W", "2", address_b)
    stack.exec(b, "ping", "-c", "1", "-W", "2", a)  # Docker's embedded DNS
    # Host side: a host route to each container via a cali veth; no bridge added.
    host = host_routes()
    for address in (address_a, address_b):
        line = next(line for line in host.splitlines() if line.startswith(address + " "))
        assert " dev cali" in line
    assert run("ip", "-o", "link", "show", "type", "bridge").stdout == bridges_before


def test_explicit_subnet_ip_range_gateway_aux_and_ip(stack: Stack) -> None:
    pool = "10.201.0.0/24"
    stack.plugin.cli("pool", "add", pool)
    try:
        net = stack.network("--subnet", pool, "--ip-range", "10.201.0.128/25",
                            "--gateway", "10.201.0.1", "--aux-address", "router=10.201.0.2")
        config = stack.inspect_network(net)["IPAM"]["Config"][0]
        assert config["Subnet"] == pool
        assert config["Gateway"] == "10.201.0.1"
        assert config["IPRange"] == "10.201.0.128/25"
        auto = stack.container(net)
        assert netaddr.IPAddress(stack.address(auto, net)) in netaddr.IPNetwork("10.201.0.128/25")
        fixed = stack.container(net, "--ip", "10.201.0.77")
        assert stack.address(fixed, net) == "10.201.0.77"
        stack.exec(auto, "ping", "-c", "1", "-W", "2", "10.201.0.77")

        # An address in use, and the aux address, are refused; nothing is left behind.
        taken = unique("cnmc")
        stack.containers.append(taken)
        result = docker("run", "-d", "--name", taken, "--net", net, "--ip", "10.201.0.77",
                        IMAGE, "sleep", "60", check=False)
        assert result.returncode != 0
        assert "10.201.0.77" in result.stderr and "in use" in result.stderr
        result = docker("run", "--rm", "--net", net, "--ip", "10.201.0.2", IMAGE, "true",
                        check=False)
        assert result.returncode != 0 and "in use" in result.stderr
    finally:
        stack.cleanup()
        stack.containers.clear()
        stack.networks.clear()
        stack.plugin.cli("pool", "remove", pool)


def test_subnet_outside_every_pool_is_refused(stack: Stack) -> None:
    name = unique("cnm")
    result = docker("network", "create", "-d", "calico", "--ipam-driver", "calico-ipam",
                    "--subnet", "10.209.9.0/24", name, check=False)
    assert result.returncode != 0
    assert "calico-cnm pool add" in result.stderr
    assert docker("network", "inspect", name, check=False).returncode != 0


def test_unsupported_option_is_refused(stack: Stack) -> None:
    name = unique("cnm")
    result = docker("network", "create", "-d", "calico", "--ipam-driver", "calico-ipam",
                    "-o", "colour=blue", name, check=False)
    assert result.returncode != 0
    assert "colour" in result.stderr
    assert docker("network", "inspect", name, check=False).returncode != 0


def test_unknown_ipam_option_is_refused_and_reserves_nothing(stack: Stack) -> None:
    name = unique("cnm")
    # Pool usage counts reserved subnets too: it must not change.
    before = json.loads(stack.plugin.cli("pool", "show", "-o", "json").stdout)
    result = docker("network", "create", "-d", "calico", "--ipam-driver", "calico-ipam",
                    "--ipam-opt", "pooltype=a", name, check=False)
    assert result.returncode != 0
    assert "unsupported IPAM option 'pooltype'" in result.stderr, result.stderr
    assert docker("network", "inspect", name, check=False).returncode != 0
    assert json.loads(stack.plugin.cli("pool", "show", "-o", "json").stdout) == before


def test_connect_second_network_uses_its_own_interface_and_source(stack: Stack) -> None:
    net1 = stack.network()
    net2 = stack.network()
    server1 = stack.container(net1, command=("sh", "-c", WHOAMI_SERVER))
    server2 = stack.container(net2, command=("sh", "-c", WHOAMI_SERVER))
    client = stack.container(net1)
    docker("network", "connect", net2, client)

    client_net1 = stack.address(client, net1)
    client_net2 = stack.address(client, net2)
    assert netaddr.IPAddress(client_net2) in netaddr.IPNetwork(
        stack.inspect_network(net2)["IPAM"]["Config"][0]["Subnet"])
    for server, network, source in ((server1, net1, client_net1), (server2, net2, client_net2)):
        address = stack.address(server, network)
        route = stack.exec(client, "ip", "route", "get", address).stdout
        interface = "eth0" if network == net1 else "eth1"
        assert f"dev {interface}" in route and f"src {source}" in route
        assert wait_for(lambda a=address: _whoami(stack, client, a) is not None)
        assert _whoami(stack, client, address) == source

    docker("network", "disconnect", net2, client)
    assert client_net2 not in host_routes()
    stack.exec(client, "ping", "-c", "1", "-W", "2", stack.address(server1, net1))


def test_ipv6_containers_reach_each_other(stack: Stack) -> None:
    pool6 = "fd10:cc:1::/48"
    stack.plugin.cli("pool", "add", pool6)
    try:
        net = stack.network("--ipv6", "--subnet", "fd10:cc:1:1::/64")
        info = stack.inspect_network(net)
        subnets = {c["Subnet"] for c in info["IPAM"]["Config"]}
        assert "fd10:cc:1:1::/64" in subnets
        assert any(netaddr.IPNetwork(s).version == 4 for s in subnets)
        a = stack.container(net)
        b = stack.container(net)
        address_b = stack.address(b, net, family=6)
        assert netaddr.IPAddress(address_b) in netaddr.IPNetwork("fd10:cc:1:1::/64")
        assert stack.address(a, net)  # both families
        stack.exec(a, "ping", "-6", "-c", "1", "-W", "2", address_b)
        stack.exec(b, "ping", "-c", "1", "-W", "2", stack.address(a, net))
        assert address_b in host_routes(6)
    finally:
        stack.cleanup()
        stack.containers.clear()
        stack.networks.clear()
        stack.plugin.cli("pool", "remove", pool6)


def test_parallel_runs_never_share_an_address(stack: Stack) -> None:
    net = stack.network()
    names = [unique("cnmc") for _ in range(8)]
    stack.containers.extend(names)

    def start(name: str) -> subprocess.CompletedProcess[str]:
        return docker("run", "-d", "--name", name, "--net", net, IMAGE, "sleep", "600",
                      timeout=120)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(start, names))
    addresses = [stack.address(n, net) for n in names]
    assert len(set(addresses)) == len(addresses)


def test_removing_everything_leaves_nothing_behind(stack: Stack) -> None:
    links_before = set(host_links())
    net1 = stack.network()
    net2 = stack.network()
    a = stack.container(net1)
    b = stack.container(net1)
    docker("network", "connect", net2, b)
    addresses = [stack.address(a, net1), stack.address(b, net1), stack.address(b, net2)]
    subnets = [stack.inspect_network(n)["IPAM"]["Config"][0]["Subnet"] for n in (net1, net2)]
    ids = [stack.inspect_network(n)["Id"] for n in (net1, net2)]
    assert len(set(host_links()) - links_before) == 3

    docker("rm", "-f", a, b)
    docker("network", "rm", net1, net2)
    stack.containers.clear()
    stack.networks.clear()

    # Leave deletes the veth in the background (see NetworkService.leave).
    assert wait_for(lambda: set(host_links()) == links_before, timeout=5)
    routes = host_routes()
    assert not [a for a in addresses if a in routes]
    allocations = json.loads(stack.plugin.cli("ipam", "show", "-o", "json").stdout)
    left = [x for x in allocations
            if any(netaddr.IPAddress(x["address"]) in netaddr.IPNetwork(s) for s in subnets)]
    assert left == []
    endpoints = json.loads(stack.plugin.cli("endpoint", "show", "-o", "json").stdout)
    assert [e for e in endpoints if e["network_id"] in ids] == []
    networks = json.loads(stack.plugin.cli("network", "show", "-o", "json").stdout)
    assert [n for n in networks if n["id"] in ids] == []


def test_carved_subnet_that_overlaps_a_host_route_is_replaced(stack: Stack) -> None:
    """dockerd refuses a pool that overlaps a host route and asks again."""
    stack.plugin.cli("pool", "add", "10.215.0.0/23")
    run("ip", "link", "add", "cnmroute0", "type", "veth", "peer", "name", "cnmroute1")
    try:
        run("ip", "addr", "add", "10.215.0.1/24", "dev", "cnmroute0")
        run("ip", "link", "set", "cnmroute0", "up")
        net = stack.network()
        assert stack.inspect_network(net)["IPAM"]["Config"][0]["Subnet"] == "10.215.1.0/24"
        stack.cleanup()
        stack.networks.clear()
        subnets = json.loads(stack.plugin.cli("pool", "show", "-o", "json").stdout)
        usage = next(p for p in subnets if p["pool"]["cidr"] == "10.215.0.0/23")
        assert usage["allocated"] == 0 and usage["subnets"] in (0, [])
    finally:
        run("ip", "link", "del", "cnmroute0", check=False)
        stack.plugin.cli("pool", "remove", "10.215.0.0/23")


def test_a_subnet_reserved_without_a_network_is_released_and_ones_in_use_stay(
        stack: Stack) -> None:
    """What a dockerd crash between RequestPool and CreateNetwork leaves, made by hand
    on the IPAM socket; a bridge network on calico-ipam has no record of ours, but
    Docker uses its subnet."""
    status, reply = post_unix(stack.plugin.sockets[1], "/IpamDriver.RequestPool",
                              b'{"AddressSpace": "CalicoLocal", "Pool": "", "V6": false}')
    assert status == 200, reply
    orphan = reply["Pool"]
    bridged = unique("cnmb")
    docker("network", "create", "-d", "bridge", "--ipam-driver", "calico-ipam", bridged)
    try:
        used = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}",
                      bridged).stdout.strip()

        def reservations() -> dict[str, dict]:
            out = stack.plugin.cli("ipam", "show", "--subnets", "-o", "json").stdout
            return {r["subnet"]: r for r in json.loads(out)}

        assert reservations()[orphan]["state"] == "no network record"
        assert wait_for(lambda: orphan not in reservations(), timeout=30)
        assert used in reservations()
    finally:
        docker("network", "rm", bridged)


def test_an_address_no_container_came_for_is_released_and_held_ones_stay(
        stack: Stack) -> None:
    """RequestAddress with no CreateEndpoint after it (made by hand on the IPAM socket,
    as a kill between the two leaves it); a container's and an aux address stay."""
    pool = "10.214.0.0/24"
    stack.plugin.cli("pool", "add", pool)
    try:
        net = stack.network("--subnet", pool, "--aux-address", "router=10.214.0.250")
        running = stack.container(net)
        status, reply = post_unix(stack.plugin.sockets[1], "/IpamDriver.RequestAddress",
                                  json.dumps({"PoolID": pool, "Address": ""}).encode())
        assert status == 200, reply
        lost = reply["Address"].split("/")[0]

        def allocated() -> set[str]:
            return {a["address"] for a in
                    json.loads(stack.plugin.cli("ipam", "show", "-o", "json").stdout)}

        assert lost in allocated()
        assert wait_for(lambda: lost not in allocated(), timeout=30)
        assert {stack.address(running, net), "10.214.0.250", "10.214.0.1"} <= allocated()
    finally:
        stack.cleanup()
        stack.containers.clear()
        stack.networks.clear()
        stack.plugin.cli("pool", "remove", pool)
