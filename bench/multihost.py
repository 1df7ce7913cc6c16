"""Cross-host figures on the simulated three-host cluster (tests/multihost/cluster.py).

1. Throughput: TCP between containers on h1 and h2 (iperf3 run in the containers'
   network namespaces with nsenter), in a direct pool and in a VXLAN pool, against the
   hosts' own address-to-address path (the limit). Rounds are interleaved; medians.
   Targets: direct >= 0.9 x host, VXLAN >= 0.7 x host.
2. Propagation: from a block record appearing in etcd to its route on every other host
   (polled through netlink in their namespaces), p50 and p95. Target: p95 <= 1 s.

Usage (root): .venv/bin/python bench/multihost.py [--rounds 3] [--seconds 4] [--samples 20]
Writes the "Cross-host" section of BENCHMARKS.md. Traffic stays inside the cluster's
namespaces.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataplane.netlink import Netlink  # noqa: E402
from tests.multihost.cluster import Cluster, Container, Stack  # noqa: E402

BLOCKS = "/calico-cnm/v1/ipam/blocks/"
VXLAN_POOL = "10.125.0.0/16"
SECTION = "## Cross-host (issue 6)"


def iperf(server_ns: str, client_ns: str, address: str, seconds: int) -> float:
    """Gbit/s from client_ns to address (a server in server_ns)."""
    server = subprocess.Popen(["nsenter", f"--net={server_ns}", "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(
            ["nsenter", f"--net={client_ns}", "iperf3", "-c", address, "-t", str(seconds),
             "-J"], capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


def container_ns(container: Container) -> str:
    pid = container.host.docker("inspect", "-f", "{{.State.Pid}}", container.name).stdout
    return f"/proc/{pid.strip()}/ns/net"


def reachable(container: Container, address: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while container.ping(address, timeout=1, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"{container.name} cannot reach {address}")


def throughput(cluster: Cluster, stack: Stack, rounds: int, seconds: int) -> dict[str, float]:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    direct = stack.network(h1)
    vxlan = stack.network(h1, "--subnet", "10.125.200.0/24")
    for network in (direct, vxlan):
        stack.wait_network(h2, network)
    pairs = {}
    for label, network in (("direct", direct), ("vxlan", vxlan)):
        a, b = stack.container(h1, network), stack.container(h2, network)
        reachable(a, b.ipv4 or "")
        pairs[label] = (container_ns(b), container_ns(a), b.ipv4 or "")
    paths = {"host": (h2.netns_path, h1.netns_path, h2.address), **pairs}
    results: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (server_ns, client_ns, address) in paths.items():
            results[name].append(iperf(server_ns, client_ns, address, seconds))
    return {name: statistics.median(values) for name, values in results.items()}


class BlockWatch(threading.Thread):
    """Notes when each block key first appears in etcd (tight poll of its gateway)."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint.rstrip("/")
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        key = base64.b64encode(BLOCKS.encode()).decode()
        end = base64.b64encode((BLOCKS[:-1] + "0").encode()).decode()
        body = json.dumps({"key": key, "range_end": end, "keys_only": True}).encode()
        while not self.stop.is_set():
            request = urllib.request.Request(f"{self.endpoint}/v3/kv/range", data=body)
            with urllib.request.urlopen(request, timeout=5) as reply:
                kvs = json.loads(reply.read()).get("kvs", [])
            moment = time.monotonic()
            for kv in kvs:
                name = base64.b64decode(kv["key"]).decode()[len(BLOCKS):]
                self.seen.setdefault(name.replace("-", "/"), moment)
            time.sleep(0.002)


def route_seen(netns: str, dst: str, deadline: float) -> float | None:
    with Netlink(netns=netns) as netlink:
        while time.monotonic() < deadline:
            if any(route.dst == dst for route in netlink.list_routes()):
                return time.monotonic()
            time.sleep(0.002)
    return None


def watch_route(seen: dict[str, float | None], name: str, netns: str, dst: str,
                deadline: float) -> None:
    seen[name] = route_seen(netns, dst, deadline)


def propagation(cluster: Cluster, stack: Stack, samples: int) -> list[float]:
    h1 = cluster.host("h1")
    others = [h for h in cluster.hosts if h is not h1]
    watch = BlockWatch(cluster.etcd_local_endpoint)
    watch.start()
    delays = []
    try:
        for index in range(samples):
            block = f"10.125.{100 + index}.0/26"
            seen: dict[str, float | None] = {}
            deadline = time.monotonic() + 20
            threads = [threading.Thread(target=watch_route, args=(seen, h.name, h.netns,
                                                                  block, deadline))
                       for h in others]
            for thread in threads:
                thread.start()
            # The network's gateway claims its only block on h1.
            name = stack.network(h1, "--subnet", block)
            for thread in threads:
                thread.join()
            created = watch.seen.get(block)
            if created is None or any(v is None for v in seen.values()):
                raise SystemExit(f"block {block}: created {created}, routes {seen}")
            delays.append(max(v for v in seen.values() if v is not None) - created)
            h1.docker("network", "rm", name, check=False)
    finally:
        watch.stop.set()
    return delays


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def record(rates: dict[str, float], delays: list[float], args: argparse.Namespace) -> str:
    host = rates["host"]
    p50, p95 = percentile(delays, 0.5), percentile(delays, 0.95)
    text = f"""{SECTION}

`.venv/bin/python bench/multihost.py` on the simulated cluster (three hosts in network
namespaces with their own dockerd 20.10 and plugin, one etcd in a router namespace, veths
over a bridge: no real NIC, so the "host" path is the kernel's veth/bridge speed).
{datetime.date.today()}, 2 cores, {args.rounds} interleaved rounds of iperf3 -t
{args.seconds} per path (medians), {len(delays)} propagation samples.

| path (h1 -> h2) | Gbit/s | ratio to host | target |
|---|---|---|---|
| host address to host address | {host:.2f} | 1.00 | |
| containers, direct pool | {rates['direct']:.2f} | {rates['direct'] / host:.2f} | >= 0.9 |
| containers, VXLAN pool | {rates['vxlan']:.2f} | {rates['vxlan'] / host:.2f} | >= 0.7 |

Propagation, from a block record's creation in etcd to its route on both other hosts:
p50 **{p50 * 1000:.0f} ms**, p95 **{p95 * 1000:.0f} ms** (target p95 <= 1 s; the agents
watch etcd, so this is one watch event, a plan and a netlink write; polling adds up to
~2 ms on each side).
"""
    path = REPO / "BENCHMARKS.md"
    current = path.read_text()
    if SECTION in current:
        before, _, rest = current.partition(SECTION)
        after = rest.split("\n## ", 1)
        current = before + text + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    cluster = Cluster()
    cluster.start()
    try:
        cluster.host("h1").cli("pool", "add", VXLAN_POOL, "--vxlan-mode", "always")
        stack = Stack(cluster)
        try:
            rates = throughput(cluster, stack, args.rounds, args.seconds)
        finally:
            stack.cleanup()
        stack = Stack(cluster)
        try:
            delays = propagation(cluster, stack, args.samples)
        finally:
            stack.cleanup()
    finally:
        problems = cluster.stop()
        if problems:
            print("left behind:", problems, file=sys.stderr)
    print(record(rates, delays, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
