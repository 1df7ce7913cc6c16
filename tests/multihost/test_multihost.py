"""One calico network across three simulated hosts on one etcd: routes to other hosts'
blocks (direct, VXLAN always and cross-subnet), network sync, policy across hosts,
IPAM across hosts (no duplicates, borrowing), node status and removal, a plugin
killed and restarted. h1 and h2 share segment A; h3 is on segment B behind a router.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import threading
import time

from tests.multihost.cluster import Cluster, Container, Host, Stack, unique, wait_for

SERVER = ("sh", "-c", "nc -ll -p 7000 -e cat & trap 'exit 0' TERM; sleep 600 & wait")


def _reaches(client: Container, address: str) -> bool:
    return client.ping(address, timeout=1, check=False).returncode == 0


def _tcp(client: Container, address: str, port: int = 7000) -> bool:
    result = client.exec("sh", "-c", f"echo hi | nc -w 1 {address} {port}", check=False)
    return result.returncode == 0 and "hi" in result.stdout


def _routes(host: Host) -> str:
    return host.sh("ip", "route", "show", "proto", "202").stdout


def _vxlan_packets(host: Host) -> int:
    out = host.sh("ip", "-j", "-s", "link", "show", "vxlan.calico", check=False)
    if out.returncode != 0:
        return 0
    stats = json.loads(out.stdout)[0]["stats64"]
    return int(stats["tx"]["packets"])


def _pool(cluster: Cluster, cidr: str, *flags: str) -> None:
    h1 = cluster.host("h1")
    if cidr not in h1.cli("pool", "show").stdout:
        h1.cli("pool", "add", cidr, *flags)


def test_containers_on_two_hosts_reach_each_other_directly_in_both_families(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    network = stack.network(h1, "--ipv6")
    stack.wait_network(h2, network)
    a = stack.container(h1, network)
    b = stack.container(h2, network)
    assert a.ipv4 and b.ipv4 and a.ipv6 and b.ipv6
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10), _routes(h1)
    assert _reaches(b, a.ipv4)
    assert wait_for(lambda: _reaches(a, b.ipv6), timeout=10)
    # A plain route to h2's block via h2's address, with our protocol number.
    block = str(ipaddress.ip_network(f"{b.ipv4}/26", strict=False))
    assert f"{block} via {h2.address} dev eth0" in _routes(h1)
    inspect = json.loads(h2.docker("network", "inspect", network).stdout)[0]
    assert inspect["IPAM"]["Config"][0]["Subnet"] == json.loads(
        h1.docker("network", "inspect", network).stdout)[0]["IPAM"]["Config"][0]["Subnet"]


def test_a_direct_pool_cannot_reach_another_segment_and_node_status_says_so(
        cluster: Cluster, stack: Stack) -> None:
    h1, h3 = cluster.host("h1"), cluster.host("h3")
    network = stack.network(h1)
    stack.wait_network(h3, network)
    a = stack.container(h1, network)
    c = stack.container(h3, network)
    assert c.ipv4
    peers: dict[str, dict] = {}

    def reported() -> bool:
        current = json.loads(h1.cli("node", "status", "-o", "json").stdout)
        peers.update({p["name"]: p for p in current["status"]["peers"]})
        return any("another subnet" in u for u in peers.get("h3", {}).get("unreachable", []))

    assert wait_for(reported, timeout=10), peers
    assert not _reaches(a, c.ipv4)


def test_vxlan_always_and_cross_subnet_encapsulate_only_where_they_should(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2, h3 = cluster.hosts
    _pool(cluster, "10.125.0.0/16", "--vxlan-mode", "always")
    _pool(cluster, "10.126.0.0/16", "--vxlan-mode", "cross-subnet")
    always = stack.network(h1, "--subnet", f"10.125.{int(time.time()) % 200}.0/24")
    cross = stack.network(h1, "--subnet", f"10.126.{int(time.time()) % 200}.0/24")
    for host in (h2, h3):
        stack.wait_network(host, always)
        stack.wait_network(host, cross)
    a1, a2, a3 = (stack.container(h, always) for h in (h1, h2, h3))
    x1, x2, x3 = (stack.container(h, cross) for h in (h1, h2, h3))
    for target in (a2, a3):
        assert wait_for(lambda t=target: _reaches(a1, t.ipv4), timeout=15), _routes(h1)
    # always: even the near host is reached through the tunnel.
    before = _vxlan_packets(h1)
    assert _reaches(a1, a2.ipv4)
    assert _vxlan_packets(h1) > before
    mtu = a1.exec("cat", "/sys/class/net/eth0/mtu").stdout.strip()
    assert mtu == "1450"
    # cross-subnet: the near host directly, the far one encapsulated.
    assert wait_for(lambda: _reaches(x1, x3.ipv4), timeout=15), _routes(h1)
    assert wait_for(lambda: _reaches(x1, x2.ipv4), timeout=15)
    before = _vxlan_packets(h1)
    for _ in range(3):
        assert _reaches(x1, x2.ipv4)
    assert _vxlan_packets(h1) == before, "traffic to the near host must not be encapsulated"
    assert _reaches(x1, x3.ipv4)
    assert _vxlan_packets(h1) > before
    assert a3.ipv4 and _reaches(a3, a1.ipv4)
    status = json.loads(h1.cli("node", "status", "-o", "json").stdout)["status"]
    assert status["tunnels"]["vxlan.calico"] == "up"
    # VXLAN is accepted only from the known nodes.
    rules = h1.sh("iptables-save", "-t", "filter").stdout
    assert "--dport 4789 -m set ! --match-set cali4-nodes src -j DROP" in rules
    members = h1.sh("ipset", "list", "cali4-nodes").stdout
    assert h2.address in members and h3.address in members


def test_networks_are_isolated_across_hosts_until_a_rule_opens_them(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    web = stack.network(h1, name=unique("web"))
    db = stack.network(h1, name=unique("db"))
    stack.wait_network(h2, db)
    server = stack.container(h1, web, command=SERVER)
    client = stack.container(h2, db)
    friend = stack.container(h2, web) if wait_for(lambda: h2.has_network(web)) else None
    assert friend is not None and wait_for(lambda: _tcp(friend, server.ipv4), timeout=10)
    assert not _tcp(client, server.ipv4)
    assert not _reaches(client, server.ipv4)
    h2.cli("profile", web, "rule", "add", "inbound", "allow", "tcp", "from", "tag", db,
           "to", "ports", "7000")
    started = time.monotonic()
    assert wait_for(lambda: _tcp(client, server.ipv4), timeout=5, interval=0.05)
    assert time.monotonic() - started < 1.5  # the issue asks for 1 s; nc adds its own
    assert not _reaches(client, server.ipv4)  # only what the rule allows


def test_network_sync_create_rm_while_used_and_rm_everywhere(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2, h3 = cluster.hosts
    network = stack.network(h1, "--ip-range", "10.124.250.128/25", "--subnet",
                            "10.124.250.0/24")
    for host in (h2, h3):
        stack.wait_network(host, network)
        config = json.loads(host.docker("network", "inspect", network).stdout)[0]
        assert config["IPAM"]["Config"][0]["Subnet"] == "10.124.250.0/24"
        assert config["IPAM"]["Config"][0]["IPRange"] == "10.124.250.128/25"
        assert config["IPAM"]["Config"][0]["Gateway"] == "10.124.250.1"
    user = stack.container(h2, network)
    assert ipaddress.ip_address(user.ipv4) in ipaddress.ip_network("10.124.250.128/25")
    # rm while h2 uses it: dockerd does not honour a remote driver's refusal, so only
    # h1 leaves; h2 keeps the network and its container, and sync brings it back on h1.
    h1.docker("network", "rm", network)
    assert h2.has_network(network) and h3.has_network(network)
    stack.wait_network(h1, network)
    other = stack.container(h1, network)
    assert wait_for(lambda: _reaches(other, user.ipv4), timeout=10)
    for container in (user, other):
        container.host.docker("rm", "-f", container.name)
        stack.containers.remove(container)
    h1.docker("network", "rm", network)
    for host in cluster.hosts:
        assert wait_for(lambda h=host: not h.has_network(network), timeout=15), host.name
    assert wait_for(lambda: "10.124.250.0/24" not in h1.cli("ipam", "show").stdout
                    and "10.124.250.0/24" not in json.dumps(
                        json.loads(h1.cli("pool", "show", "-o", "json").stdout)),
                    timeout=10)


def test_with_the_authorization_plugin_rm_is_refused_while_another_host_uses_it(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2, h3 = cluster.hosts
    network = stack.network(h1)
    for host in (h2, h3):
        stack.wait_network(host, network)
    user = stack.container(h2, network)
    # dockerd reads --authorization-plugin at start; the plugin must already answer.
    h1.dockerd_stop()
    h1.dockerd_flags = ["--authorization-plugin=calico"]
    try:
        h1.dockerd_start()
        refused = h1.docker("network", "rm", network, check=False)
        assert refused.returncode != 0
        assert "authorization denied by plugin calico" in refused.stderr, refused.stderr
        assert f"calico network '{network}' is in use by 1 container endpoint(s) " \
               "on host(s) h2" in refused.stderr, refused.stderr
        assert all(host.has_network(network) for host in cluster.hosts)
        assert h1.docker("network", "ls").returncode == 0  # other requests pass
        h2.docker("rm", "-f", user.name)
        stack.containers.remove(user)
        h1.docker("network", "rm", network)
        for host in cluster.hosts:
            assert wait_for(lambda h=host: not h.has_network(network), timeout=15), host.name
    finally:
        h1.dockerd_stop()
        h1.dockerd_flags = []
        h1.dockerd_start()


def test_concurrent_runs_on_every_host_never_share_an_address(
        cluster: Cluster, stack: Stack) -> None:
    network = stack.network(cluster.host("h1"))
    for host in cluster.hosts[1:]:
        stack.wait_network(host, network)
    made: list[Container] = []
    errors: list[BaseException] = []

    def run(host: Host) -> None:
        try:
            for _ in range(4):
                made.append(stack.container(host, network))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(host,)) for host in cluster.hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    addresses = [c.ipv4 for c in made]
    assert len(addresses) == 12 and len(set(addresses)) == 12, addresses


def test_a_full_block_makes_a_host_borrow_and_everyone_routes_to_the_borrower(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    # A /26 is one block: h1 claims it with the gateway; h2 can only borrow.
    network = stack.network(h1, "--subnet", "10.124.253.0/26")
    stack.wait_network(h2, network)
    a = stack.container(h1, network)
    b = stack.container(h2, network)
    assert b.ipv4 and ipaddress.ip_address(b.ipv4) in ipaddress.ip_network("10.124.253.0/26")
    assert wait_for(lambda: f"{b.ipv4} via {h2.address}" in _routes(h1), timeout=10), \
        _routes(h1)
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    assert _reaches(b, a.ipv4)


def test_a_killed_plugin_keeps_its_containers_working_and_resumes(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    network = stack.network(h1)
    stack.wait_network(h2, network)
    a = stack.container(h1, network)
    b = stack.container(h2, network)
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    h2.plugin_kill(signal.SIGKILL)
    try:
        assert _reaches(a, b.ipv4)  # the kernel state stays
        assert _reaches(b, a.ipv4)
        # A new container elsewhere is not in h2's tag sets until h2's agent is back.
        c = stack.container(h1, network)
        assert _reaches(c, a.ipv4)
    finally:
        h2.plugin_start()
    assert wait_for(lambda: _reaches(c, b.ipv4), timeout=10)
    d = stack.container(h2, network)
    assert wait_for(lambda: _reaches(a, d.ipv4), timeout=10)


def test_node_remove_releases_everything_and_other_hosts_drop_its_routes(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    network = stack.network(h1)
    stack.wait_network(h2, network)
    a = stack.container(h1, network)
    b = stack.container(h2, network)
    block = str(ipaddress.ip_network(f"{b.ipv4}/26", strict=False))
    h1_block = str(ipaddress.ip_network(f"{a.ipv4}/26", strict=False))
    assert wait_for(lambda: block in _routes(h1), timeout=10)
    refused = h1.cli("node", "remove", "h2", check=False)
    assert refused.returncode == 1 and "alive" in refused.stderr
    # h2 goes away for good (its plugin stopped); an operator removes the node.
    h2.plugin_stop()
    try:
        h1.cli("node", "remove", "h2", "--force")
        assert wait_for(lambda: block not in _routes(h1), timeout=10), _routes(h1)
        nodes = [n["name"] for n in json.loads(h1.cli("node", "show", "-o", "json").stdout)]
        assert "h2" not in nodes
        allocations = json.loads(h1.cli("ipam", "show", "-o", "json").stdout)
        assert b.ipv4 not in [a["address"] for a in allocations]
        assert not [a for a in allocations if a["host"] == "h2"], allocations
    finally:
        # The host comes back as a new node (with none of our routes left): its
        # leftovers are removed through Docker.
        h2.sh("ip", "route", "flush", "proto", "202")
        assert h1_block not in _routes(h2)
        h2.plugin_start()
        h2.docker("rm", "-f", b.name, check=False, timeout=120)
    assert wait_for(lambda: "h2" in h1.cli("node", "show").stdout, timeout=15)
    # Back as a new node, h2 routes to every existing block after its first resync.
    assert wait_for(lambda: f"{h1_block} via {h1.address}" in _routes(h2), timeout=10)


def test_network_connect_joins_a_network_whose_members_are_on_other_hosts(
        cluster: Cluster, stack: Stack) -> None:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    first = stack.network(h1)
    second = stack.network(h1)
    stack.wait_network(h2, second)
    a = stack.container(h1, first)
    b = stack.container(h2, second)
    assert not _reaches(a, b.ipv4)
    h1.docker("network", "connect", second, a.name)
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    joined = a.address(second)
    assert joined and wait_for(lambda: _reaches(b, joined), timeout=10)
