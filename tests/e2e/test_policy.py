"""Profiles enforced on real containers: isolation between networks, rules that open
it, nat-outgoing, published ports, anti-spoofing and recovery of our iptables hooks."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import IMAGE, Stack, docker, run, unique, wait_for


def _ping(stack: Stack, container: str, address: str) -> bool:
    return stack.exec(container, "ping", "-c", "1", "-W", "1", address,
                      check=False).returncode == 0


def _tcp(stack: Stack, container: str, address: str, port: int) -> bool:
    """True when a TCP connection from the container to address:port is answered."""
    result = stack.exec(container, "sh", "-c", f"echo hi | nc -w 1 {address} {port}",
                        check=False, timeout=15)
    return result.returncode == 0 and "hi" in result.stdout


def _udp(stack: Stack, container: str, address: str) -> bool:
    result = stack.exec(container, "udp", "send", address, "7001", "hi", check=False,
                        timeout=15)
    return result.returncode == 0 and "hi" in result.stdout


def _server(stack: Stack, network: str, *args: str) -> str:
    # TCP echo on 7000 and 8000 to 8002, UDP echo on 7001.
    script = "for p in 7000 8000 8001 8002; do nc -ll -p $p -e cat & done; udp serve 7001"
    return stack.container(network, *args, command=("sh", "-c", script))


def test_default_profile_isolates_networks_until_a_rule_allows(stack: Stack) -> None:
    web = stack.network(name=unique("web"))
    db = stack.network(name=unique("db"))
    web_server = _server(stack, web)
    web_client = stack.container(web)
    db_client = stack.container(db)
    target = stack.address(web_server, web)

    profile = json.loads(stack.plugin.cli("profile", "show", web, "-o", "json").stdout)
    if isinstance(profile, list):
        profile = profile[0]
    assert profile["name"] == web and profile["tags"] == [web]
    assert profile["rules"]["inbound"] == [{"action": "allow", "src_tag": web}]
    assert profile["rules"]["outbound"] == [{"action": "allow"}]

    assert wait_for(lambda: _ping(stack, web_client, target), timeout=5)
    assert wait_for(lambda: _tcp(stack, web_client, target, 7000), timeout=5)
    assert _udp(stack, web_client, target)
    assert not _ping(stack, db_client, target)
    assert not _tcp(stack, db_client, target, 7000)
    assert not _udp(stack, db_client, target)

    # Open port 8000-8001 of web to db, and nothing else; measure how fast it lands.
    started = time.monotonic()
    stack.plugin.cli("profile", web, "rule", "add", "inbound", "allow", "tcp",
                     "from", "tag", db, "to", "ports", "8000:8001")
    assert wait_for(lambda: _tcp(stack, db_client, target, 8000), timeout=1.0, interval=0.05)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"rule took {elapsed:.2f} s to reach the kernel"
    assert _tcp(stack, db_client, target, 8001)
    assert not _tcp(stack, db_client, target, 8002)
    assert not _tcp(stack, db_client, target, 7000)
    assert not _ping(stack, db_client, target)

    # A deny inserted ahead of the allow wins.
    stack.plugin.cli("profile", web, "rule", "add", "inbound", "--at", "1", "deny", "tcp",
                     "to", "ports", "8001")
    assert wait_for(lambda: not _tcp(stack, db_client, target, 8001), timeout=2)
    assert _tcp(stack, db_client, target, 8000)
    assert _tcp(stack, web_client, target, 7000)


def test_profile_option_attaches_existing_profiles_and_profiles_outlive_networks(
        stack: Stack) -> None:
    cli = stack.plugin.cli
    shared = unique("shared")
    cli("profile", "add", shared)  # tagged with its name; allows from that tag
    assert cli("profile", shared, "tag", "show").stdout.split() == [shared]
    missing = unique("nosuch")
    result = docker("network", "create", "-d", "calico", "--ipam-driver", "calico-ipam",
                    "-o", f"profile={missing}", unique("cnm"), check=False)
    assert result.returncode != 0 and missing in result.stderr

    one = stack.network("-o", f"profile={shared}")
    two = stack.network("-o", f"profile={shared}")
    a = stack.container(one)
    b = stack.container(two)
    # Same profile (and so the same tag) on both networks: they reach each other.
    assert wait_for(lambda: _ping(stack, a, stack.address(b, two)), timeout=5)
    assert cli("profile", "show", one, check=False).returncode != 0  # no default made

    result = cli("profile", "remove", shared, check=False)
    assert result.returncode == 1 and "use" in result.stderr
    stack.cleanup()
    stack.containers.clear()
    stack.networks.clear()
    assert shared in cli("profile", "show").stdout
    cli("profile", "remove", shared)
    assert cli("profile", "show", shared, check=False).returncode != 0


def test_compose_down_up_keeps_user_rules(stack: Stack, tmp_path) -> None:  # noqa: ANN001
    project = unique("keep")
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(
        "version: '2.4'\n"
        "services:\n"
        f"  app:\n    image: {IMAGE}\n    command: [sleep, '600']\n"
        "networks:\n  default:\n    driver: calico\n    ipam:\n      driver: calico-ipam\n"
    )
    base = ["docker-compose", "-p", project, "-f", str(compose_file)]
    name = f"{project}_default"
    try:
        run(*base, "up", "-d", timeout=180)
        assert wait_for(lambda: stack.plugin.cli("profile", "show", name,
                                                 check=False).returncode == 0)
        stack.plugin.cli("profile", name, "rule", "add", "inbound", "allow", "udp",
                         "to", "ports", "53")
        run(*base, "down", timeout=180)
        run(*base, "up", "-d", timeout=180)
        rules = stack.plugin.cli("profile", name, "rule", "show").stdout
        assert "udp" in rules and "53" in rules
    finally:
        run(*base, "down", timeout=180, check=False)
        stack.plugin.cli("profile", "remove", name, check=False)


def test_container_cannot_spoof_or_reach_the_host(stack: Stack) -> None:
    net = stack.network()
    server = _server(stack, net)
    spoofer = stack.container(net, "--cap-add", "NET_ADMIN")
    target = stack.address(server, net)
    assert wait_for(lambda: _ping(stack, spoofer, target), timeout=5)
    fake = target.rsplit(".", 1)[0] + ".250"
    stack.exec(spoofer, "ip", "addr", "add", f"{fake}/32", "dev", "eth0")
    result = stack.exec(spoofer, "ping", "-c", "1", "-W", "1", "-I", fake, target, check=False)
    assert result.returncode != 0
    # Workload -> host is dropped by default (the gateway is a host address).
    gateway = stack.inspect_network(net)["IPAM"]["Config"][0]["Gateway"]
    assert not _ping(stack, spoofer, gateway)


@pytest.fixture
def outside() -> Iterator[dict[str, str]]:
    """An "outside" namespace routed to the host over a veth: 10.250.N.2 behind 10.250.N.1."""
    n = random.randint(1, 250)
    name, host_if, peer_if = f"cnmout{n}", f"cnmo{n}h", f"cnmo{n}p"
    host_ip, peer_ip = f"10.250.{n}.1", f"10.250.{n}.2"
    run("ip", "netns", "add", name)
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        run("ip", "link", "set", peer_if, "netns", name)
        run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        run("ip", "-n", name, "addr", "add", f"{peer_ip}/30", "dev", peer_if)
        run("ip", "-n", name, "link", "set", peer_if, "up")
        run("ip", "-n", name, "link", "set", "lo", "up")
        # Deliberately no route back to any pool: replies only return if masqueraded.
        yield {"netns": name, "host_ip": host_ip, "ip": peer_ip}
    finally:
        run("ip", "link", "del", host_if, check=False)
        run("ip", "netns", "del", name, check=False)


def _listen_in(netns: str, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    """A one-shot TCP server in a namespace that reports the peer address it saw."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('0.0.0.0', {port})); s.listen(1); s.settimeout(20)\n"
        "print('ready', flush=True)\n"
        "c,a=s.accept(); c.sendall(b'hi\\n'); print(a[0], flush=True)\n"
    )
    process = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-c", code],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    seen: list[str] = []
    threading.Thread(target=lambda: seen.extend(process.stdout.read().split()),  # type: ignore[union-attr]
                     daemon=True).start()
    return process, seen


def test_nat_outgoing_masquerades_only_leaving_traffic(stack: Stack,
                                                       outside: dict[str, str]) -> None:
    cli = stack.plugin.cli
    cli("pool", "add", "10.211.0.0/24", "--nat-outgoing")
    cli("pool", "add", "10.212.0.0/24")
    try:
        natted = stack.network("--subnet", "10.211.0.0/24")
        plain = stack.network("--subnet", "10.212.0.0/24")
        a = stack.container(natted)
        b = stack.container(plain)
        process, seen = _listen_in(outside["netns"], 9000)
        assert wait_for(lambda: _tcp(stack, a, outside["ip"], 9000), timeout=5)
        process.wait(timeout=10)
        assert wait_for(lambda: seen == [outside["host_ip"]], timeout=2), seen
        # Without nat-outgoing the outside has no route back: no answer.
        process, seen = _listen_in(outside["netns"], 9001)
        assert not _tcp(stack, b, outside["ip"], 9001)
        process.kill()
        process.wait()
        # Between pools nothing is masqueraded: the peer sees the container's address.
        cli("profile", plain, "rule", "add", "inbound", "allow", "from", "cidr",
            "10.211.0.0/24")
        server = _server(stack, plain)
        address = stack.address(server, plain)
        assert wait_for(lambda: _tcp(stack, a, address, 7000), timeout=5)
    finally:
        stack.cleanup()
        stack.containers.clear()
        stack.networks.clear()
        for pool in ("10.211.0.0/24", "10.212.0.0/24"):
            cli("pool", "remove", pool, check=False)


def _fetch(address: str, port: int, netns: str | None = None) -> bool:
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{address}', {port}), timeout=2)\n"
        "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); d=s.recv(100)\n"
        "sys.exit(0 if d.startswith(b'HTTP/1') else 1)\n"
    )
    command = ["python3", "-c", code]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    return subprocess.run(command, capture_output=True, timeout=20).returncode == 0


def test_published_port_reaches_the_container_until_it_stops(
        stack: Stack, outside: dict[str, str]) -> None:
    net = stack.network()
    port = random.randint(20000, 30000)
    web = stack.container(net, "-p", f"{port}:80",
                          command=("sh", "-c", "mkdir -p /www && echo ok > /www/index.html "
                                   "&& httpd -f -p 80 -h /www"))
    host = outside["host_ip"]
    assert wait_for(lambda: _fetch(host, port), timeout=5)  # from the host itself
    assert _fetch(host, port, outside["netns"])  # from outside, routed to the host
    docker("stop", "-t", "1", web)
    assert wait_for(lambda: not _fetch(host, port, outside["netns"]), timeout=3)
    assert not _fetch(host, port)
    with socket.socket() as probe:  # the host port is free again
        probe.bind(("0.0.0.0", port))


def test_agent_restores_hooks_and_chains(stack: Stack) -> None:
    net = stack.network()
    a = stack.container(net)
    b = stack.container(net)
    target = stack.address(b, net)
    assert wait_for(lambda: _ping(stack, a, target), timeout=5)
    run("iptables", "-D", "FORWARD", "-j", "cali-FORWARD")
    assert not _ping(stack, a, target)  # Docker's FORWARD policy drops it now
    # The e2e plugin resyncs every 2 s.
    assert wait_for(lambda: run("iptables", "-C", "FORWARD", "-j", "cali-FORWARD",
                                check=False).returncode == 0, timeout=5)
    assert run("iptables", "-S", "FORWARD").stdout.splitlines()[1] == "-A FORWARD -j cali-FORWARD"
    assert _ping(stack, a, target)
    run("iptables", "-F", "cali-FORWARD")
    assert wait_for(lambda: _ping(stack, a, target), timeout=5)
