"""BGP routing (`--routing bgp`) on the simulated cluster: every host's agent runs
BIRD 2 with a configuration generated from the datastore.

* a node-to-node mesh of the three hosts;
* a route reflector on a node with no Docker (`calico-cnm agent`), mesh off;
* an L3 fabric: a top-of-rack router (BIRD in the router namespace, a fixture of
  this test, in its own AS) that every host peers with, so a pool without
  encapsulation crosses segments;
* recovery: BIRD killed, the plugin restarted (graceful restart: no route flaps on
  the other hosts), a removed node's routes withdrawn everywhere.

h1 and h2 share segment A; h3 is on segment B. The router only forwards what it has
routes for: without the fabric's BIRD it knows no container addresses, so traffic to
h3's containers crosses only in the fabric test.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.cluster import (
    PREFIX,
    SEGMENT_A,
    BareNode,
    Cluster,
    Container,
    Host,
    Stack,
    run,
    wait_for,
)

ROUTING_ENV = "CALICO_CNM_ROUTING"
METRICS_ENV = "CALICO_CNM_METRICS_ADDRESS"
METRICS_ADDRESS = "127.0.0.1:9091"
TOR_AS = 65001
TOR_DIR = Path(f"/run/{PREFIX}tor")


def _restart_plugins(cluster: Cluster) -> None:
    threads = [threading.Thread(target=h.plugin_stop) for h in cluster.hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for host in cluster.hosts:
        host.plugin_start()


def _reset_bgp(cluster: Cluster) -> None:
    h1 = cluster.host("h1")
    h1.cli("bgp", "mesh", "on")
    h1.cli("bgp", "as", "64512")
    for peer in json.loads(h1.cli("bgp", "peer", "show", "-o", "json").stdout):
        flags = ["--node", peer["node"]] if peer["node"] else []
        h1.cli("bgp", "peer", "remove", peer["address"], *flags)
    for name in json.loads(h1.cli("bgp", "show", "-o", "json").stdout)["nodes"]:
        h1.cli("node", "set", name, "--as", "default", "--route-reflector-cluster-id", "none")


@pytest.fixture(scope="module")
def bgp(cluster: Cluster) -> Iterator[Cluster]:
    """Every host's plugin restarted with --routing bgp; static routing after."""
    cluster.plugin_env[ROUTING_ENV] = "bgp"
    cluster.plugin_env[METRICS_ENV] = METRICS_ADDRESS  # each host's own loopback
    _restart_plugins(cluster)
    try:
        yield cluster
    finally:
        _reset_bgp(cluster)
        cluster.plugin_env.pop(ROUTING_ENV, None)
        cluster.plugin_env.pop(METRICS_ENV, None)
        _restart_plugins(cluster)
        # Static routing retires BIRD and its routes.
        for host in cluster.hosts:
            assert wait_for(lambda h=host: not _bird_routes(h), timeout=15), _bird_routes(host)


def _bird_routes(host: Host | BareNode, family: int = 4) -> str:
    return host.sh("ip", f"-{family}", "route", "show", "proto", "bird").stdout


def _agent_routes(host: Host) -> str:
    return host.sh("ip", "route", "show", "proto", "202").stdout


def _status(host: Host | BareNode) -> dict:
    return json.loads(host.cli("node", "status", "-o", "json").stdout)


def _established(host: Host | BareNode, family: int = 4) -> list[dict]:
    view = _status(host)["bgp"] or {}
    return [s for s in view.get("sessions", [])
            if s["family"] == family and s["info"].startswith("Established")]


def _block(address: str, family: int = 4) -> str:
    return str(ipaddress.ip_network(f"{address}/{26 if family == 4 else 122}", strict=False))


def _reaches(client: Container, address: str) -> bool:
    return client.ping(address, timeout=1, check=False).returncode == 0


def _bird_pid(host: Host) -> int | None:
    try:
        return int(Path(host.path("/run/calico-cnm/bird.pid")).read_text().strip())
    except (OSError, ValueError):
        return None


class RouteWatch:
    """Polls one host for a route while something else happens; records gaps."""

    def __init__(self, host: Host, prefix: str) -> None:
        self.host, self.prefix = host, prefix
        self.samples = 0
        self.missing: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["ip", "-n", self.host.netns, "route", "show", self.prefix],
                                 capture_output=True, text=True).stdout
            self.samples += 1
            if self.prefix not in out:
                self.missing.append(time.monotonic())
            self._stop.wait(0.05)

    def __enter__(self) -> RouteWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_mesh_of_three_every_host_learns_the_others_blocks_by_bgp(
        bgp: Cluster, stack: Stack) -> None:
    h1, h2, h3 = (bgp.host(n) for n in ("h1", "h2", "h3"))
    network = stack.network(h1, "--ipv6")
    for host in (h2, h3):
        stack.wait_network(host, network)
    a, b, c = (stack.container(h, network) for h in (h1, h2, h3))
    blocks = {h.name: _block(x.ipv4) for h, x in ((h1, a), (h2, b), (h3, c))}
    for host in (h1, h2, h3):
        others = [blocks[n] for n in blocks if n != host.name]
        assert wait_for(lambda h=host, o=others: all(p in _bird_routes(h) for p in o),
                        timeout=30), (host.name, _bird_routes(host), _status(host))
        # BIRD's routes, not the agent's: the agent programs only its blackholes here.
        assert not any(p in _agent_routes(host) for p in others), _agent_routes(host)
        assert f"blackhole {blocks[host.name]}" in _agent_routes(host)
    # IPv6 blocks travel too.
    assert wait_for(lambda: _block(b.ipv6, 6) in _bird_routes(h1, 6), timeout=20)
    assert f"{blocks['h2']} via {h2.address} dev eth0" in _bird_routes(h1)
    # h3 is on another segment: its next hop resolves through the router.
    assert f"{blocks['h3']} via {h1.gateway}" in _bird_routes(h1)
    assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    assert _reaches(b, a.ipv4)
    assert wait_for(lambda: _reaches(a, b.ipv6), timeout=10)
    for host in (h1, h2, h3):
        assert wait_for(lambda h=host: len(_established(h)) == 2, timeout=20), _status(host)
        sessions = _established(host)
        assert {s["peer_type"] for s in sessions} == {"node-to-node mesh"}
    # Prometheus sees the sessions by state (scraped inside h1's namespace).
    metrics = h1.sh("busybox", "wget", "-q", "-O", "-", f"http://{METRICS_ADDRESS}/metrics"
                    ).stdout
    assert 'calico_cnm_bgp_sessions{state="Established"} 4.0' in metrics, metrics[-2000:]
    # The table, as an operator reads it.
    text = h1.cli("node", "status").stdout
    assert "BIRD is running" in text and "IPv4 BGP status" in text
    assert f"{h2.address}" in text and "node-to-node mesh" in text and "Established" in text


def test_route_reflector_without_docker_serves_three_clients(
        bgp: Cluster, stack: Stack) -> None:
    h1, h2, h3 = (bgp.host(n) for n in ("h1", "h2", "h3"))
    rr = BareNode(bgp, "rr1", SEGMENT_A, 21)
    rr.create()
    try:
        h1.cli("node", "set", "rr1", "--route-reflector-cluster-id", "244.0.0.1")
        h1.cli("bgp", "mesh", "off")
        rr.agent_start("--routing", "bgp")
        network = stack.network(h1)
        for host in (h2, h3):
            stack.wait_network(host, network)
        a, b, c = (stack.container(h, network) for h in (h1, h2, h3))
        for host in (h1, h2, h3):
            assert wait_for(lambda h=host: [s["neighbor"] for s in _established(h)]
                            == [rr.address], timeout=30), _status(host)
        assert wait_for(lambda: len(_established(rr)) == 3, timeout=20), _status(rr)
        assert {s["peer_type"] for s in _established(rr)} == {"route reflector client"}
        assert {s["peer_type"] for s in _established(h1)} == {"route reflector"}
        # Exactly one session per family: no mesh session is left configured.
        sessions = _status(h1)["bgp"]["sessions"]
        assert len([s for s in sessions if s["family"] == 4]) == 1, sessions
        # Every client still routes to every other client's blocks.
        blocks = {h.name: _block(x.ipv4) for h, x in ((h1, a), (h2, b), (h3, c))}
        for host in (h1, h2, h3):
            others = [blocks[n] for n in blocks if n != host.name]
            assert wait_for(lambda h=host, o=others: all(p in _bird_routes(h) for p in o),
                            timeout=20), (host.name, _bird_routes(host))
        # Reflected routes keep the originator's next hop.
        assert f"{blocks['h2']} via {h2.address}" in _bird_routes(h1)
        assert wait_for(lambda: _reaches(a, b.ipv4), timeout=10)
    finally:
        rr.agent_stop()
        h1.cli("bgp", "mesh", "on")
        h1.cli("node", "remove", "rr1", "--force", check=False)
        h1.cli("node", "set", "rr1", "--route-reflector-cluster-id", "none", check=False)
        rr.destroy()


def _tor_config(cluster: Cluster, ases: dict[str, int]) -> str:
    lines = ["router id 10.123.1.1;", "protocol device {}",
             "protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }"]
    for host in cluster.hosts:
        lines.append(
            f"protocol bgp {host.name} {{ local {host.gateway} as {TOR_AS}; "
            f"neighbor {host.address} as {ases[host.name]}; graceful restart on; "
            "ipv4 { import all; export all; }; }")
    return "\n".join(lines) + "\n"


def test_l3_fabric_hosts_peer_with_a_top_of_rack_router_and_cross_segments_unencapsulated(
        bgp: Cluster, stack: Stack) -> None:
    h1, h2, h3 = (bgp.host(n) for n in ("h1", "h2", "h3"))
    ases = {"h1": 64601, "h2": 64602, "h3": 64603}  # an AS per host, as on a fabric
    TOR_DIR.mkdir(parents=True, exist_ok=True)
    (TOR_DIR / "bird.conf").write_text(_tor_config(bgp, ases))
    socket_path = str(TOR_DIR / "bird.ctl")
    tor = subprocess.Popen(
        ["nsenter", f"--net={bgp.router_netns_path}", "--", "bird", "-f", "-c",
         str(TOR_DIR / "bird.conf"), "-s", socket_path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        h1.cli("bgp", "mesh", "off")
        for host in (h1, h2, h3):
            h1.cli("node", "set", host.name, "--as", str(ases[host.name]))
            h1.cli("bgp", "peer", "add", host.gateway, "--as", str(TOR_AS),
                   "--node", host.name)
        pool = next(u["pool"] for u in json.loads(h1.cli("pool", "show", "-o", "json").stdout)
                    if u["pool"]["cidr"] == "10.124.0.0/16")
        assert (pool["vxlan_mode"], pool["ipip_mode"]) == ("never", "never")
        network = stack.network(h1)
        stack.wait_network(h3, network)
        a = stack.container(h1, network)
        c = stack.container(h3, network)
        for host in (h1, h2, h3):
            assert wait_for(lambda h=host: [s["neighbor"] for s in _established(h)]
                            == [h.gateway], timeout=30), _status(host)
            assert {s["peer_type"] for s in _established(host)} == {"node specific"}
        block_a, block_c = _block(a.ipv4), _block(c.ipv4)
        # Each host reaches the other segment's block through its router, unencapsulated.
        assert wait_for(lambda: f"{block_c} via {h1.gateway} dev eth0"
                        in _bird_routes(h1), timeout=20), _bird_routes(h1)
        assert wait_for(lambda: f"{block_a} via {h3.gateway} dev eth0"
                        in _bird_routes(h3), timeout=20), _bird_routes(h3)
        router = bgp.router_sh("ip", "route", "show", "proto", "bird").stdout
        assert block_a in router and block_c in router, router
        assert wait_for(lambda: _reaches(a, c.ipv4), timeout=10)
        assert _reaches(c, a.ipv4)
    finally:
        tor.terminate()
        tor.wait(timeout=10)
        for host in (h1, h2, h3):
            h1.cli("bgp", "peer", "remove", host.gateway, "--node", host.name, check=False)
            h1.cli("node", "set", host.name, "--as", "default", check=False)
        h1.cli("bgp", "mesh", "on")
        bgp.router_sh("ip", "route", "flush", "proto", "bird", check=False)
        run("rm", "-rf", str(TOR_DIR))


def test_bird_killed_or_plugin_restarted_keeps_routes_everywhere_without_a_flap(
        bgp: Cluster, stack: Stack) -> None:
    h1, h2 = bgp.host("h1"), bgp.host("h2")
    network = stack.network(h1)
    stack.wait_network(h2, network)
    a = stack.container(h1, network)
    b = stack.container(h2, network)
    block_a, block_b = _block(a.ipv4), _block(b.ipv4)
    assert wait_for(lambda: block_a in _bird_routes(h2) and block_b in _bird_routes(h1),
                    timeout=30)
    assert wait_for(lambda: any(s["neighbor"] == h2.address for s in _established(h1)),
                    timeout=20)
    before = _bird_pid(h1)
    assert before is not None
    with RouteWatch(h2, block_a) as on_h2, RouteWatch(h1, block_b) as on_h1:
        os.kill(before, signal.SIGKILL)
        assert wait_for(lambda: _bird_pid(h1) not in (None, before)
                        and any(s["neighbor"] == h2.address for s in _established(h1)),
                        timeout=30), _status(h1)
        time.sleep(1)
    assert on_h2.samples > 10 and not on_h2.missing, "h2 lost h1's block while BIRD restarted"
    assert not on_h1.missing, "h1's own kernel lost h2's block while its BIRD restarted"
    assert _status(h1)["bgp"]["restarts"] >= 1
    assert _reaches(a, b.ipv4)

    with RouteWatch(h2, block_a) as on_h2:
        h1.plugin_stop()
        h1.plugin_start()
        assert wait_for(lambda: any(s["neighbor"] == h2.address for s in _established(h1)),
                        timeout=30), _status(h1)
        time.sleep(1)
    assert on_h2.samples > 10 and not on_h2.missing, "h2 lost h1's block over a plugin restart"
    assert _reaches(a, b.ipv4)


def test_a_removed_node_has_its_sessions_and_routes_withdrawn_everywhere(
        bgp: Cluster, stack: Stack) -> None:
    h1, h2, h3 = (bgp.host(n) for n in ("h1", "h2", "h3"))
    network = stack.network(h1)
    stack.wait_network(h3, network)
    c = stack.container(h3, network)
    block_c = _block(c.ipv4)
    for host in (h1, h2):
        assert wait_for(lambda h=host: block_c in _bird_routes(h), timeout=30)
    # h3 goes away (its BIRD stops with graceful restart, so the others keep its
    # routes for now); an operator removes the node.
    h3.plugin_stop()
    try:
        assert block_c in _bird_routes(h1)
        h1.cli("node", "remove", "h3", "--force")
        for host in (h1, h2):
            assert wait_for(lambda h=host: block_c not in _bird_routes(h), timeout=10), \
                _bird_routes(host)
            assert wait_for(lambda h=host: h3.address not in
                            [s["neighbor"] for s in _status(h)["bgp"]["sessions"]],
                            timeout=10)
    finally:
        h3.sh("ip", "route", "flush", "proto", "bird")
        h3.plugin_start()
        h3.docker("rm", "-f", c.name, check=False, timeout=120)
    assert wait_for(lambda: any(s["neighbor"] == h3.address for s in _established(h1)),
                    timeout=30), _status(h1)
