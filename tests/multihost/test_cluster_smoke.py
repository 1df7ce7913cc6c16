"""The simulated cluster itself: hosts, plugins, image, fabric, and one calico network."""

from __future__ import annotations

import json
import os
import urllib.request

from tests.multihost.cluster import IMAGE, Cluster, Stack, post_unix, wait_for


def test_three_hosts_each_with_its_own_dockerd(cluster: Cluster) -> None:
    assert [h.name for h in cluster.hosts] == ["h1", "h2", "h3"]
    assert cluster.host("h3").segment != cluster.host("h1").segment
    ids = set()
    for host in cluster.hosts:
        assert host.docker_ping(), host.name
        ids.add(host.docker("info", "--format", "{{.ID}}").stdout.strip())
        assert f"inet {host.cidr} " in host.sh("ip", "-4", "-o", "addr", "show", "eth0").stdout
        assert host.links() == ["lo", "eth0"]
    assert len(ids) == 3  # three daemons, not one seen three times


def test_each_plugin_answers_on_its_own_sockets(cluster: Cluster) -> None:
    inodes = set()
    for host in cluster.hosts:
        for path in host.plugin_sockets:
            status, body = post_unix(path, "/Plugin.Activate")
            assert status == 200, (host.name, path)
            assert body["Implements"], (host.name, path)
            stat = os.stat(path)
            inodes.add((stat.st_dev, stat.st_ino))  # each host has its own tmpfs
        assert host.plugin_running()
    assert len(inodes) == 2 * len(cluster.hosts)
    # The hosts share one datastore: the CLI on any host sees the default pools.
    pools = cluster.host("h3").cli("pool", "show").stdout
    for cidr in cluster.default_pools.split(","):
        assert cidr in pools, pools


def test_each_dockerd_has_the_test_image(cluster: Cluster) -> None:
    for host in cluster.hosts:
        assert host.docker("image", "inspect", IMAGE, check=False).returncode == 0, host.name


def test_etcd_is_reachable_from_the_test_process(cluster: Cluster) -> None:
    with urllib.request.urlopen(f"{cluster.etcd_local_endpoint}/health", timeout=5) as reply:
        assert json.loads(reply.read())["health"] == "true"


def test_hosts_on_different_segments_reach_each_other_through_the_router(
        cluster: Cluster) -> None:
    h1, h2, h3 = cluster.hosts
    assert h1.segment == h2.segment != h3.segment
    h1.ping(h3.address)
    h3.ping(h1.address)
    h1.ping(h3.address6)
    h1.ping(h2.address)  # same segment, straight over the bridge
    trace = h1.sh("ip", "route", "get", h3.address).stdout
    assert f"via {h1.gateway}" in trace


def test_a_calico_network_on_one_host(cluster: Cluster) -> None:
    h1 = cluster.host("h1")
    made = Stack(cluster)
    try:
        network = made.network(h1)
        first = made.container(h1, network)
        second = made.container(h1, network)
        assert first.ipv4 and second.ipv4 and first.ipv4 != second.ipv4
        first.ping(second.ipv4)
        second.ping(first.ipv4)
        assert len(h1.links("cali")) == 2
    finally:
        made.cleanup()
    for host in cluster.hosts:
        assert host.containers() == [], host.name
        assert network not in host.networks(), host.name
    assert wait_for(lambda: h1.links("cali") == [], timeout=10)


def test_a_host_can_be_cut_off_the_fabric(cluster: Cluster) -> None:
    h1, h3 = cluster.host("h1"), cluster.host("h3")
    h3.set_uplink(False)
    try:
        assert h1.ping(h3.address, timeout=1, check=False).returncode != 0
    finally:
        h3.set_uplink(True)
    assert wait_for(lambda: h1.ping(h3.address, timeout=1, check=False).returncode == 0,
                    timeout=10)
