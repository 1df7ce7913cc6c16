"""The plugin stopped (cleanly or with SIGKILL) and started again."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.e2e.conftest import (
    CLI,
    Plugin,
    Stack,
    docker,
    host_links,
    host_routes,
    post_unix,
    run,
    wait_for,
)


def test_sigint_stops_cleanly_and_restart_resumes(tmp_path: Path) -> None:
    """A second instance on its own sockets and file: Ctrl-C, then the same state again."""
    env = {
        "CALICO_CNM_PLUGIN_DIR": str(tmp_path / "plugins"),
        "CALICO_CNM_SQLITE_PATH": str(tmp_path / "state.db"),
        "CALICO_CNM_DEFAULT_POOLS": "10.207.0.0/16",
        # One agent per host: the main plugin's agent already owns this host's veths.
        "CALICO_CNM_RUN_AGENT": "false",
    }
    server = Plugin(env, tmp_path / "plugin.log")
    server.start()
    for socket_path in server.sockets:
        status, body = post_unix(socket_path, "/Plugin.Activate", b"")
        assert status == 200
        assert body == {"Implements": ["NetworkDriver", "IpamDriver", "authz"]}
    status, reply = post_unix(server.sockets[1], "/IpamDriver.RequestPool",
                              b'{"AddressSpace": "CalicoLocal", "Pool": "", "V6": false}')
    assert status == 200, reply
    pool_id = reply["PoolID"]

    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGINT)
    assert server.process.wait(timeout=20) == 0
    assert not any(os.path.exists(s) for s in server.sockets)
    server.process = None

    server.start()
    try:
        # The reservation survived: the same subnet is not handed out twice.
        status, again = post_unix(server.sockets[1], "/IpamDriver.RequestPool",
                                  b'{"AddressSpace": "CalicoLocal", "Pool": "", "V6": false}')
        assert status == 200 and again["Pool"] != reply["Pool"]
        for pid in (pool_id, again["PoolID"]):
            status, _ = post_unix(server.sockets[1], "/IpamDriver.ReleasePool",
                                  f'{{"PoolID": "{pid}"}}'.encode())
            assert status == 200
    finally:
        server.stop()


def test_sigkill_keeps_containers_and_agent_repairs_the_host(stack: Stack) -> None:
    plugin = stack.plugin
    net = stack.network()
    a = stack.container(net)
    b = stack.container(net)
    address_a = stack.address(a, net)
    address_b = stack.address(b, net)

    plugin.kill(signal.SIGKILL)
    try:
        # While the plugin is down: a route disappears and a stale veth appears.
        run("ip", "route", "del", f"{address_b}/32")
        run("ip", "link", "add", "calistale0001", "type", "veth", "peer", "name", "tmpstale0001")
        stack.exec(a, "ping", "-c", "1", "-W", "2", address_a)
    finally:
        plugin.start()

    assert wait_for(lambda: address_b in host_routes(), timeout=15)
    assert wait_for(lambda: "calistale0001" not in host_links(), timeout=15)
    stack.exec(a, "ping", "-c", "1", "-W", "2", address_b)
    c = stack.container(net)
    address_c = stack.address(c, net)
    assert address_c not in (address_a, address_b)
    stack.exec(c, "ping", "-c", "1", "-W", "2", address_a)


def test_cli_reports_bad_settings() -> None:
    result = subprocess.run(
        [CLI, "pool", "show", "--etcd-endpoints", "not a url"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "not a url" in result.stderr
    assert docker("info", check=False).returncode == 0


def _restart_dockerd() -> None:
    pids = run("pidof", "dockerd").stdout.split()
    assert len(pids) == 1, "expected one dockerd"
    run("kill", "-TERM", pids[0])
    assert wait_for(lambda: run("pidof", "dockerd", check=False).returncode != 0, timeout=60)
    run("sh", str(Path(__file__).resolve().parents[2] / "scripts/start-dockerd.sh"),
        timeout=90)


def test_docker_restart_keeps_policy_ahead_of_dockers_rules(stack: Stack) -> None:
    """dockerd rewrites FORWARD when it starts; the agent puts our hook back on top."""
    net = stack.network()
    a = stack.container(net, "--restart", "always")
    b = stack.container(net, "--restart", "always")
    _restart_dockerd()
    assert wait_for(lambda: docker("inspect", "-f", "{{.State.Running}}", a, b,
                                   check=False).stdout.split() == ["true", "true"],
                    timeout=60)
    # The e2e plugin resyncs every 2 s.
    assert wait_for(lambda: run("iptables", "-S", "FORWARD").stdout.splitlines()[1]
                    == "-A FORWARD -j cali-FORWARD", timeout=10)
    target = stack.address(b, net)
    assert wait_for(lambda: stack.exec(a, "ping", "-c", "1", "-W", "1", target,
                                       check=False).returncode == 0, timeout=10)


def test_agent_cleans_up_an_endpoint_docker_forgot(stack: Stack) -> None:
    """What a container removed while the plugin was down leaves: record, veth, address."""
    import socket as socket_module
    import uuid

    from datastore.base import dumps
    from datastore.sqlite import SqliteDatastore
    from driver.records import EndpointRecord, endpoint_key
    from ipam_driver.service import IpamService
    from tests.e2e.conftest import STATE_DIR

    net = stack.network()
    a = stack.container(net)
    info = stack.inspect_network(net)
    store = SqliteDatastore(str(STATE_DIR / "state.db"))
    hostname = socket_module.gethostname()
    forgotten = uuid.uuid4().hex * 2
    address = IpamService(store, hostname).request_address(
        info["IPAM"]["Config"][0]["Subnet"], None, {})
    IpamService(store, hostname).assign_handle(address, forgotten)
    record = EndpointRecord(id=forgotten, network_id=info["Id"], hostname=hostname,
                            ipv4=address, ipv6=None, state="joined")
    store.create(endpoint_key(hostname, forgotten), dumps(record.to_dict()))
    run("ip", "link", "add", record.host_ifname, "type", "veth", "peer", "name",
        record.container_ifname)

    # Grace and resync are 2 s each in the e2e plugin.
    assert wait_for(lambda: store.get(endpoint_key(hostname, forgotten)) is None, timeout=20)
    assert wait_for(lambda: record.host_ifname not in host_links(), timeout=5)
    handles = [x.handle for x in IpamService(store, hostname).list_allocations()]
    assert forgotten not in handles
    # The real container's endpoint is untouched.
    assert len([e for e in stack.plugin.cli("endpoint", "show").stdout.splitlines()
                if info["Id"][:12] in e]) == 1
    stack.exec(a, "true")


def test_the_socket_answers_at_once_while_the_datastore_does_not(tmp_path: Path) -> None:
    """dockerd gives an enabling managed plugin about 12 s to answer on its socket: the
    plugin binds it before waiting on a datastore (here an etcd that accepts
    connections and never answers), and serves both drivers on one socket when their
    names are equal."""
    import socket as sockets
    import time

    silent = sockets.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the backlog; nothing is ever read
    env = {
        "CALICO_CNM_PLUGIN_DIR": str(tmp_path / "plugins"),
        "ETCD_ENDPOINTS": f"http://127.0.0.1:{silent.getsockname()[1]}",
        "CALICO_CNM_NETWORK_DRIVER_NAME": "calico-slow",
        "CALICO_CNM_IPAM_DRIVER_NAME": "calico-slow",
        "CALICO_CNM_RUN_AGENT": "false",  # the main plugin's agent owns this host
    }
    server = Plugin(env, tmp_path / "plugin.log")
    began = time.monotonic()
    try:
        server.start()
        answered = time.monotonic() - began
        assert os.listdir(tmp_path / "plugins") == ["calico-slow.sock"]
        status, body = post_unix(server.sockets[0], "/NetworkDriver.GetCapabilities", b"")
        assert status == 200 and body["Scope"] == "local"
        status, body = post_unix(server.sockets[0], "/IpamDriver.GetCapabilities", b"")
        assert status == 200 and "RequiresMACAddress" in body
        assert answered < 12, f"the socket answered after {answered:.1f} s"
        log = server.log_path.read_text()
        # The default pools were left to the agent, whether etcd failed or timed out.
        assert "slow to answer" in log or "default pools not created at start" in log, log
    finally:
        server.stop()
        silent.close()
