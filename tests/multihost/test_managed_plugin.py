"""The managed plugin (calico/cnm:latest, assembled by scripts/build-plugin.sh) in place
of `calico-cnm serve` on h1 and h2 of the simulated cluster (h3 keeps the legacy
plugin): what a user does with the legacy plugin, across hosts, through dockerd and
plugin restarts, a refused disable and an offline upgrade.

The root filesystem is built once per machine and cached (scripts/build-plugin.sh);
each host gets its own `docker plugin create` from the assembled directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.cluster import (
    CLI,
    MANAGED_PLUGIN,
    REPO,
    Cluster,
    Container,
    Host,
    Stack,
    _environment,
    run,
    unique,
    wait_for,
)

SERVER = ("sh", "-c", "nc -ll -p 7000 -e cat & trap 'exit 0' TERM; sleep 600 & wait")


def _reaches(client: Container, address: str) -> bool:
    return client.ping(address, timeout=1, check=False).returncode == 0


def _managed_network(stack: Stack, host: Host, *args: str) -> str:
    return stack.network(host, *args, driver=MANAGED_PLUGIN, ipam_driver=MANAGED_PLUGIN)


def _plugin(host: Host) -> dict:
    return host.inspect(MANAGED_PLUGIN, kind="plugin")[0]


def _endpoints(host: Host) -> list[dict]:
    return [e for e in json.loads(host.cli("endpoint", "show", "-o", "json").stdout)
            if e["hostname"] == host.name]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("managed") / "plugin"
    result = run("sh", str(REPO / "scripts" / "build-plugin.sh"), "--dir", str(out),
                 check=False, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"scripts/build-plugin.sh --dir failed:\n{result.stdout}\n"
                    f"{result.stderr}", pytrace=False)
    return out


@pytest.fixture(scope="module")
def managed(cluster: Cluster, plugin_dir: Path) -> Iterator[list[Host]]:
    """h1 and h2 with the managed plugin instead of `serve` (same node names and etcd,
    so the switch itself is an upgrade that must keep the cluster's state)."""
    hosts = [cluster.host("h1"), cluster.host("h2")]
    try:
        for host in hosts:
            host.plugin_stop()
            host.managed_create(plugin_dir)
        yield hosts
    finally:
        for host in hosts:
            host.remove_workloads()
            host.managed_remove()
            host.plugin_start()


def test_the_build_is_one_socket_serving_both_drivers_with_host_state_mounts(
        managed: list[Host], plugin_dir: Path) -> None:
    h1 = managed[0]
    config = json.loads((plugin_dir / "config.json").read_text())
    assert config["interface"]["types"] == [
        "docker.networkdriver/1.0", "docker.ipamdriver/1.0", "docker.authz/1.0"]
    env = {e["name"]: e.get("value") for e in config["env"]}
    assert env["CALICO_CNM_PLUGIN_REFERENCE"] == MANAGED_PLUGIN
    plugin = _plugin(h1)
    assert plugin["Enabled"] is True
    # One socket for both drivers, in the directory dockerd made for the plugin.
    sockets = [n for n in os.listdir(h1.path(f"/run/docker/plugins/{plugin['Id']}"))
               if n.endswith(".sock")]
    assert sockets == ["calico.sock"]
    mounts = {m["Name"]: m["Source"] for m in plugin["Settings"]["Mounts"]}
    assert mounts["state"] == str(h1.managed_state_dir)
    assert mounts["docker-socket"] == str(h1.docker_socket)
    # BIRD's files and the metrics live on the state mount, so the host sees them.
    assert (h1.managed_state_dir / "run").is_dir()
    # Its processes are the agent and the server, in the host's network namespace.
    assert len(h1.managed_pids()) >= 3


def test_networks_policy_ports_and_connect_work_as_with_the_legacy_plugin(
        managed: list[Host], stack: Stack) -> None:
    h1, h2 = managed
    web = _managed_network(stack, h1)
    db = _managed_network(stack, h1, "--subnet", "10.124.60.0/24")
    info = h1.inspect(db, kind="network")[0]
    assert info["Driver"] == MANAGED_PLUGIN and info["IPAM"]["Driver"] == MANAGED_PLUGIN
    assert info["IPAM"]["Config"][0]["Subnet"] == "10.124.60.0/24"
    a = stack.container(h1, web)
    b = stack.container(h1, web)
    d = stack.container(h1, db, command=SERVER)
    assert ipaddress.ip_address(d.ipv4) in ipaddress.ip_network("10.124.60.0/24")
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    # Isolation between networks, until a rule opens it (the agent runs in the plugin).
    assert not _reaches(a, d.ipv4)
    h1.cli("profile", db, "rule", "add", "inbound", "allow", "from", "tag", web)
    assert wait_for(lambda: _reaches(a, d.ipv4), timeout=5)
    # network connect: b joins db too and gets an address there.
    h1.docker("network", "connect", db, b.name)
    assert ipaddress.ip_address(b.address(db)) in ipaddress.ip_network("10.124.60.0/24")
    # -p: reachable from another host's namespace at this host's address.
    port = 18080
    server = stack.container(h1, web, "-p", f"{port}:7000", command=SERVER)
    assert server.ipv4

    def echoed() -> bool:
        out = h2.sh("sh", "-c", f"echo hi | busybox nc -w 2 {h1.address} {port}",
                    check=False)
        return out.returncode == 0 and "hi" in out.stdout

    assert wait_for(echoed, timeout=10)


def test_compose_stack_on_the_managed_plugin(managed: list[Host], cluster: Cluster,
                                             tmp_path: Path) -> None:
    h1 = managed[0]
    project = unique("cnmhp")
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        "version: '2.4'\n"
        "services:\n"
        f"  front:\n    image: {cluster.image}\n    command: sleep 600\n"
        "    networks: [app]\n"
        f"  back:\n    image: {cluster.image}\n    command: sleep 600\n"
        "    networks: [app]\n"
        "networks:\n"
        f"  app:\n    driver: {MANAGED_PLUGIN}\n"
        f"    ipam:\n      driver: {MANAGED_PLUGIN}\n"
        "      config:\n        - subnet: 10.124.61.0/24\n"
    )
    env = _environment({"DOCKER_HOST": h1.docker_host})

    def compose_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run("docker-compose", "-p", project, "-f", str(compose), *args,
                   env=env, timeout=180)

    compose_cli("up", "-d")
    try:
        front = f"{project}_front_1"
        # The embedded DNS resolves the other service by name on a calico network.
        ping = h1.docker("exec", front, "ping", "-c", "1", "-W", "2", "back", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        subnet = h1.inspect(f"{project}_app", kind="network")[0]["IPAM"]["Config"][0]
        assert subnet["Subnet"] == "10.124.61.0/24"
    finally:
        compose_cli("down")
    assert not h1.has_network(f"{project}_app")


def test_containers_on_two_managed_hosts_and_a_legacy_one_reach_each_other(
        managed: list[Host], cluster: Cluster, stack: Stack) -> None:
    h1, h2 = managed
    h3 = cluster.host("h3")
    # h3 is on the other segment: a cross-subnet VXLAN pool reaches it.
    if "10.126.0.0/16" not in h1.cli("pool", "show").stdout:
        h1.cli("pool", "add", "10.126.0.0/16", "--vxlan-mode", "cross-subnet")
    network = _managed_network(stack, h1, "--subnet", "10.126.230.0/24")
    stack.wait_network(h2, network)
    stack.wait_network(h3, network)
    # h2's agent made it with the managed plugin's name; h3's with the legacy name.
    assert h2.inspect(network, kind="network")[0]["Driver"] == MANAGED_PLUGIN
    assert h3.inspect(network, kind="network")[0]["Driver"] == "calico"
    a = stack.container(h1, network)
    b = stack.container(h2, network)
    c = stack.container(h3, network)
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    assert _reaches(b, a.ipv4)
    assert wait_for(lambda: _reaches(c, a.ipv4) and _reaches(c, b.ipv4), timeout=10)


def test_disable_is_refused_while_a_network_uses_the_plugin(
        managed: list[Host], stack: Stack) -> None:
    h1 = managed[0]
    network = _managed_network(stack, h1)
    stack.container(h1, network)
    refused = h1.docker("plugin", "disable", MANAGED_PLUGIN, check=False)
    assert refused.returncode != 0
    assert "in use" in refused.stderr, refused.stderr
    assert _plugin(h1)["Enabled"] is True


def test_a_killed_plugin_is_restarted_by_docker_and_its_containers_keep_working(
        managed: list[Host], stack: Stack) -> None:
    h1, h2 = managed
    network = _managed_network(stack, h1)
    stack.wait_network(h2, network)
    a = stack.container(h1, network)
    b = stack.container(h2, network)
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    master = h1.managed_master_pid()
    assert master is not None
    os.kill(master, signal.SIGKILL)
    assert wait_for(lambda: h1.managed_master_pid() not in (None, master), timeout=30), \
        "dockerd did not restart the managed plugin"
    assert _reaches(a, b.ipv4)  # the kernel state stayed
    c = stack.container(h1, network)
    assert wait_for(lambda: _reaches(c, b.ipv4) and _reaches(b, c.ipv4), timeout=10)
    assert len({a.ipv4, b.ipv4, c.ipv4}) == 3


def test_dockerd_restart_brings_back_the_plugin_and_restarted_containers(
        managed: list[Host], stack: Stack) -> None:
    h1, h2 = managed
    network = _managed_network(stack, h1)
    stack.wait_network(h2, network)
    a = stack.container(h1, network, "--restart", "always")
    b = stack.container(h2, network)
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    h1.dockerd_stop()  # stops a, then the plugin
    # This time with the plugin as authorization plugin too: dockerd's own in-use
    # count, which refuses a disable, does not survive its restart.
    h1.dockerd_flags = [f"--authorization-plugin={MANAGED_PLUGIN}"]
    try:
        h1.dockerd_start(timeout=60)
        assert _plugin(h1)["Enabled"] is True
        assert wait_for(lambda: h1.inspect(a.name)[0]["State"]["Running"], timeout=30)
        assert wait_for(lambda: _reaches(a, b.ipv4), timeout=20)
        assert _reaches(b, a.ipv4)
        # Nothing leaked: one endpoint record and one host-side veth, for a alone.
        assert wait_for(lambda: len(_endpoints(h1)) == 1, timeout=15), _endpoints(h1)
        assert len(h1.links("cali")) == 1, h1.links("cali")
        refused = h1.docker("plugin", "disable", MANAGED_PLUGIN, check=False)
        assert refused.returncode != 0
        assert f"plugin {MANAGED_PLUGIN} is in use by 1 calico network(s) on this host " \
               f"({network})" in refused.stderr, refused.stderr
        assert _plugin(h1)["Enabled"] is True
    finally:
        h1.dockerd_stop()
        h1.dockerd_flags = []
        h1.dockerd_start(timeout=60)


def test_the_offline_upgrade_keeps_settings_networks_addresses_and_policy(
        managed: list[Host], stack: Stack) -> None:
    h1, h2 = managed
    web = _managed_network(stack, h1)
    db = _managed_network(stack, h1)
    stack.wait_network(h2, web)
    a = stack.container(h1, web)
    d = stack.container(h1, db)
    h1.cli("profile", db, "rule", "add", "inbound", "allow", "from", "tag", web)
    assert wait_for(lambda: _reaches(a, d.ipv4), timeout=5)
    before = _plugin(h1)
    # The build script replaces an existing plugin: disable -f, rm -f, create, set, enable.
    result = run("sh", str(REPO / "scripts" / "build-plugin.sh"), timeout=900,
                 env=_environment({"DOCKER_HOST": h1.docker_host}))
    assert "replacing calico/cnm:latest (enabled: true)" in result.stdout, result.stdout
    after = _plugin(h1)
    assert after["Id"] != before["Id"] and after["Enabled"] is True
    assert sorted(after["Settings"]["Env"]) == sorted(before["Settings"]["Env"])
    assert after["Settings"]["Mounts"] == before["Settings"]["Mounts"]
    # The network still resolves to the plugin; new addresses do not repeat old ones;
    # the rule still holds.
    b = stack.container(h1, web)
    c = stack.container(h2, web)
    assert len({a.ipv4, b.ipv4, c.ipv4, d.ipv4}) == 4
    assert wait_for(lambda: _reaches(b, a.ipv4) and _reaches(c, b.ipv4), timeout=10)
    assert _reaches(b, d.ipv4)


def _reconfigure(host: Host, *settings: str) -> None:
    host.docker("plugin", "disable", "-f", MANAGED_PLUGIN, timeout=60)
    host.docker("plugin", "set", MANAGED_PLUGIN, *settings)
    host.docker("plugin", "enable", MANAGED_PLUGIN, timeout=60)


def _status(host: Host) -> dict:
    run_dir = str(host.managed_state_dir / "run")  # BIRD's socket, on the state mount
    return json.loads(host.cli("node", "status", "-o", "json", "--run-dir", run_dir).stdout)


def _bird_routes(host: Host) -> str:
    return host.sh("ip", "route", "show", "proto", "bird").stdout


def test_bird_runs_inside_the_plugin_with_bgp_routing(
        managed: list[Host], stack: Stack) -> None:
    h1, h2 = managed
    for host in managed:
        _reconfigure(host, "CALICO_CNM_ROUTING=bgp")
    try:
        network = _managed_network(stack, h1)
        stack.wait_network(h2, network)
        a = stack.container(h1, network)
        b = stack.container(h2, network)
        block = str(ipaddress.ip_network(f"{b.ipv4}/26", strict=False))

        def established() -> bool:
            sessions = (_status(h1)["bgp"] or {}).get("sessions", [])
            return any(s["neighbor"] == h2.address and s["info"].startswith("Established")
                       for s in sessions)

        assert wait_for(established, timeout=30), _status(h1)
        # Live from BIRD's socket in the plugin, through the state mount.
        view = _status(h1)["bgp"]
        assert view["bird_running"] is True and view["source"] == "socket"
        # h2's block reaches h1 by BGP (BIRD's routes), not by the agent's static ones.
        # At most GRACEFUL_RESTART_WAIT (10 s) after BIRD's start, though h3 has no BIRD.
        assert wait_for(lambda: f"{block} via {h2.address}" in _bird_routes(h1), timeout=30)
        assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    finally:
        for host in managed:
            _reconfigure(host, "CALICO_CNM_ROUTING=static")
    # Static routing again: the agent retires BIRD's routes.
    for host in managed:
        assert wait_for(lambda h=host: not _bird_routes(h), timeout=15), _bird_routes(host)


def test_on_the_embedded_datastore_an_upgrade_keeps_what_the_state_mount_holds(
        managed: list[Host], stack: Stack) -> None:
    """Without etcd, state.db is on the host's state mount: a re-created plugin finds
    every network, address and profile there."""
    h1 = managed[0]
    state_db = h1.managed_state_dir / "state.db"
    local = _environment({"CALICO_CNM_SQLITE_PATH": str(state_db)})

    def show(kind: str) -> list[dict]:
        return json.loads(run(CLI, kind, "show", "-o", "json", env=local).stdout)

    h1.remove_workloads()
    _reconfigure(h1, "ETCD_ENDPOINTS=")
    try:
        web = _managed_network(stack, h1)
        db = _managed_network(stack, h1)
        a = stack.container(h1, web)
        d = stack.container(h1, db)
        run(CLI, "profile", db, "rule", "add", "inbound", "allow", "from", "tag", web,
            env=local)
        assert wait_for(lambda: _reaches(a, d.ipv4), timeout=5)
        before = {kind: show(kind) for kind in ("network", "ipam", "profile")}
        assert {n["name"] for n in before["network"]} == {web, db}
        run("sh", str(REPO / "scripts" / "build-plugin.sh"), timeout=900,
            env=_environment({"DOCKER_HOST": h1.docker_host}))
        assert {kind: show(kind) for kind in before} == before
        b = stack.container(h1, web)
        assert b.ipv4 not in {a.ipv4, d.ipv4}
        assert wait_for(lambda: _reaches(b, a.ipv4) and _reaches(b, d.ipv4), timeout=10)
    finally:
        stack.cleanup()
        _reconfigure(h1, f"ETCD_ENDPOINTS={h1.etcd_endpoint}")
