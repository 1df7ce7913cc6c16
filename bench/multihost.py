"""Cross-host networking on the simulated cluster: container-to-container TCP
throughput (host path, direct pool, VXLAN pool) and block-route propagation.

Usage (as root, from the repository root):
    .venv/bin/python bench/multihost.py [--rounds 4] [--seconds 5] [--samples 20]
                                        [--no-write]

Starts `tests.multihost.cluster.Cluster` (three hosts in network namespaces, each
with its own dockerd and `calico-cnm serve`, etcd in a router namespace) and always
stops it again. All traffic stays inside the cluster's namespaces.

1. Throughput, h1 -> h2 (same segment), iperf3 (`-J`, receiver's bits_per_second)
   run inside the network namespaces with nsenter, three paths interleaved in every
   round, median over the rounds:
   (a) host: h1's uplink address to h2's (the limit of the fabric);
   (b) direct: two containers of a calico network in a pool without encapsulation;
   (c) VXLAN: two containers of a network in a pool with `--vxlan-mode always`.
   Targets: direct/host >= 0.9, vxlan/host >= 0.7.
2. Propagation: from a block's creation in etcd to its route in the kernels of both
   other hosts. In a `--vxlan-mode cross-subnet` pool (so h2 gets a direct route and
   h3, on the other segment, a VXLAN one), networks with a /25 are made on h2 (its
   gateway claims the first /26 block); then, one sample at a time, a container on
   h1 claims the second /26. An etcd watch (opened inside the router's namespace) and
   rtnetlink route listeners (sockets opened inside h2's and h3's namespaces) stamp
   the events with time.monotonic() as they arrive, so docker run's own time is not
   in the figure. Target: p95 <= 1 s.

Writes the "Cross-host" section of BENCHMARKS.md (replaced on every run) unless
--no-write.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import http.client
import ipaddress
import json
import os
import platform
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.sections import BENCHMARKS, write_section  # noqa: E402
from tests.multihost.cluster import (  # noqa: E402
    Cluster,
    Container,
    Host,
    Stack,
    wait_for,
)

SECTION = "## Cross-host (issue 6)"

ROUTE_PROTOCOL = 202                 # the protocol number of our routes
DIRECT_POOL = "10.124.0.0/16"        # the cluster's default pool: no encapsulation
VXLAN_POOL = "10.125.0.0/16"         # --vxlan-mode always
VXLAN_SUBNET = "10.125.200.0/24"
CROSS_POOL = "10.126.0.0/16"         # --vxlan-mode cross-subnet, for propagation
IPERF_PORT = 5201
BLOCKS_PREFIX = "/calico-cnm/v1/ipam/blocks/"
ETCD_ADDRESS = ("127.0.0.1", 2379)   # inside the router's namespace

T = TypeVar("T")


# ------------------------------------------------------------- namespaces, sockets

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns_path: str, make: Callable[[], T]) -> T:
    """Runs make() in a short-lived thread that has entered the network namespace
    (setns changes only the calling thread); a socket made there stays in it."""
    outcome: dict[str, object] = {}

    def worker() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = make()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=worker, name="in-netns")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class RouteListener:
    """rtnetlink IPv4 route notifications of one namespace: the arrival time of the
    first RTM_NEWROUTE of each destination carrying our protocol number."""

    RTM_NEWROUTE = 24
    RTMGRP_IPV4_ROUTE = 0x40
    RTA_DST = 1

    def __init__(self, name: str, netns_path: str) -> None:
        self.name = name
        self.first_seen: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, self.RTMGRP_IPV4_ROUTE))
            return sock

        self._sock = in_netns(netns_path, make)
        self._thread = threading.Thread(target=self._run, name=f"routes-{name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.2)
            if not ready:
                continue
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                return
            stamp = time.monotonic()
            for dst in self._parse(data):
                with self._cond:
                    self.first_seen.setdefault(dst, stamp)
                    self._cond.notify_all()

    def _parse(self, data: bytes) -> list[str]:
        found = []
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if kind == self.RTM_NEWROUTE and length >= 28:
                family, dst_len, _src, _tos, _table, protocol = struct.unpack_from(
                    "=BBBBBB", data, offset + 16)
                if family == socket.AF_INET and protocol == ROUTE_PROTOCOL:
                    dst = "0.0.0.0"
                    attr = offset + 28
                    while attr + 4 <= offset + length:
                        alen, atype = struct.unpack_from("=HH", data, attr)
                        if alen < 4:
                            break
                        if atype == self.RTA_DST and alen >= 8:
                            dst = socket.inet_ntoa(data[attr + 4:attr + 8])
                        attr += (alen + 3) & ~3
                    found.append(f"{dst}/{dst_len}")
            offset += (length + 3) & ~3
        return found

    def wait(self, dst: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while dst not in self.first_seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.first_seen[dst]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


class _SocketHTTPConnection(http.client.HTTPConnection):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__("localhost", ETCD_ADDRESS[1], timeout=None)
        self._premade = sock

    def connect(self) -> None:
        self.sock = self._premade


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class EtcdBlockWatcher:
    """An etcd v3 watch (JSON gateway, a streamed HTTP response) on the IPAM blocks,
    connected from inside the router's namespace: the arrival time of each block key's
    creation event."""

    def __init__(self, router_netns_path: str) -> None:
        self.created: dict[str, float] = {}
        self._cond = threading.Condition()
        self.error: str | None = None
        self._closing = False

        def make() -> socket.socket:
            return socket.create_connection(ETCD_ADDRESS, timeout=10)

        sock = in_netns(router_netns_path, make)
        sock.settimeout(None)
        self._conn = _SocketHTTPConnection(sock)
        body = json.dumps({"create_request": {
            "key": _b64(BLOCKS_PREFIX), "range_end": _b64(_prefix_end(BLOCKS_PREFIX))}})
        self._conn.request("POST", "/v3/watch", body=body,
                           headers={"Content-Type": "application/json"})
        self._response = self._conn.getresponse()
        if self._response.status != 200:
            raise RuntimeError(f"etcd watch: HTTP {self._response.status}")
        first = json.loads(self._response.readline())  # the "created" confirmation
        if not first.get("result", {}).get("created"):
            raise RuntimeError(f"etcd watch not created: {first}")
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                line = self._response.readline()
                if not line:
                    return
                stamp = time.monotonic()
                if not line.strip():
                    continue
                message = json.loads(line)
                for event in message.get("result", {}).get("events", []):
                    kv = event.get("kv", {})
                    if event.get("type", "PUT") != "PUT":
                        continue
                    if kv.get("create_revision") != kv.get("mod_revision"):
                        continue  # an update, not the creation
                    key = base64.b64decode(kv["key"]).decode()
                    cidr = key[len(BLOCKS_PREFIX):]
                    address, _, prefix = cidr.rpartition("-")
                    with self._cond:
                        self.created.setdefault(f"{address}/{prefix}", stamp)
                        self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - reported by wait()'s caller
            if not self._closing:
                self.error = f"{type(exc).__name__}: {exc}"

    def wait(self, block: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while block not in self.created:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.created[block]

    def close(self) -> None:
        self._closing = True
        try:
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()
        self._thread.join(timeout=2)


# ------------------------------------------------------------------- throughput

@dataclass
class Path_:
    key: str
    label: str
    client_ns: str
    server_ns: str
    server_address: str
    samples: list[float] = field(default_factory=list)       # Gbit/s
    retransmits: list[int] = field(default_factory=list)
    vxlan_tx: list[int] = field(default_factory=list)         # h1's VXLAN tx packets
    cpu: list[tuple[float, float]] = field(default_factory=list)  # client, server %
    failure: str | None = None


def container_netns(container: Container) -> str:
    pid = container.host.docker("inspect", "-f", "{{.State.Pid}}",
                                container.name).stdout.strip()
    if not pid.isdigit() or pid == "0":
        raise RuntimeError(f"{container.name} on {container.host.name} has no pid: {pid!r}")
    return f"/proc/{pid}/ns/net"


def vxlan_tx_packets(host: Host) -> int:
    out = host.sh("ip", "-j", "-s", "link", "show", "vxlan.calico", check=False)
    if out.returncode != 0:
        return 0
    return int(json.loads(out.stdout)[0]["stats64"]["tx"]["packets"])


def start_server(netns: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["nsenter", f"--net={netns}", "--", "iperf3", "-s", "-p", str(IPERF_PORT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def iperf(path: Path_, seconds: int) -> dict:
    command = ["nsenter", f"--net={path.client_ns}", "--", "iperf3", "-c",
               path.server_address, "-p", str(IPERF_PORT), "-t", str(seconds), "-O", "1",
               "-J"]
    last = ""
    for _ in range(10):  # the server may still be starting
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=seconds + 30)
        try:
            report = json.loads(result.stdout)
        except ValueError:
            report = {"error": result.stdout + result.stderr}
        if result.returncode == 0 and "error" not in report:
            return report
        last = str(report.get("error", result.stderr)).strip()
        if "refused" not in last and "unable to connect" not in last:
            break
        time.sleep(0.3)
    raise RuntimeError(f"iperf3 {path.key}: {last}")


def measure_throughput(cluster: Cluster, stack: Stack, rounds: int, seconds: int
                       ) -> tuple[list[Path_], dict[str, str]]:
    h1, h2 = cluster.host("h1"), cluster.host("h2")
    notes: dict[str, str] = {}
    if VXLAN_POOL not in h1.cli("pool", "show").stdout:
        h1.cli("pool", "add", VXLAN_POOL, "--vxlan-mode", "always")
    direct_net = stack.network(h1)                        # the default pool
    vxlan_net = stack.network(h1, "--subnet", VXLAN_SUBNET)
    stack.wait_network(h2, direct_net)
    stack.wait_network(h2, vxlan_net)
    d1, d2 = stack.container(h1, direct_net), stack.container(h2, direct_net)
    v1, v2 = stack.container(h1, vxlan_net), stack.container(h2, vxlan_net)
    paths = [
        Path_("host", "host address to host address", h1.netns_path, h2.netns_path,
              h2.address),
        Path_("direct", "containers, direct pool", container_netns(d1),
              container_netns(d2), d2.ipv4),
        Path_("vxlan", "containers, VXLAN pool (always)", container_netns(v1),
              container_netns(v2), v2.ipv4),
    ]
    for path, (a, b) in zip(paths[1:], ((d1, d2), (v1, v2)), strict=True):
        began = time.monotonic()
        if not wait_for(lambda a=a, b=b: a.ping(b.ipv4, timeout=1, check=False).returncode
                        == 0, timeout=20, interval=0.2):
            path.failure = (
                f"{a.name} ({a.ipv4}, h1) cannot ping {b.name} ({b.ipv4}, h2) in 20 s; "
                f"h1 proto 202 routes:\n{h1.sh('ip', 'route', 'show', 'proto', '202').stdout}"
                f"h2 proto 202 routes:\n{h2.sh('ip', 'route', 'show', 'proto', '202').stdout}"
            )
        else:
            notes[f"{path.key}_ping_s"] = f"{time.monotonic() - began:.2f}"
        mtu = a.exec("cat", "/sys/class/net/eth0/mtu", check=False).stdout.strip()
        notes[f"{path.key}_mtu"] = mtu
    # /sys in the host's namespace shows the machine's devices: ask netlink instead.
    link = json.loads(h1.sh("ip", "-j", "link", "show", "eth0").stdout)[0]
    notes["host_mtu"] = str(link.get("mtu"))
    servers = [start_server(p.server_ns) for p in paths if p.failure is None]
    try:
        time.sleep(0.5)
        for round_no in range(rounds):
            order = paths[round_no % len(paths):] + paths[:round_no % len(paths)]
            for path in order:
                if path.failure is not None:
                    continue
                before = vxlan_tx_packets(h1)
                try:
                    report = iperf(path, seconds)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    path.failure = str(exc)
                    continue
                path.vxlan_tx.append(vxlan_tx_packets(h1) - before)
                end = report["end"]
                path.samples.append(end["sum_received"]["bits_per_second"] / 1e9)
                path.retransmits.append(int(end["sum_sent"].get("retransmits", 0)))
                cpu = end.get("cpu_utilization_percent", {})
                path.cpu.append((cpu.get("host_total", 0.0), cpu.get("remote_total", 0.0)))
                print(f"  round {round_no + 1} {path.key:6s} {path.samples[-1]:6.2f} Gbit/s"
                      f"  retransmits {path.retransmits[-1]}"
                      f"  cpu {path.cpu[-1][0]:.0f}/{path.cpu[-1][1]:.0f}%"
                      f"  vxlan tx packets on h1 {path.vxlan_tx[-1]}", flush=True)
    finally:
        for server in servers:
            stop_process(server)
    return paths, notes


# ------------------------------------------------------------------ propagation

@dataclass
class Sample:
    block: str
    delays: dict[str, float]    # host -> route arrival - etcd creation, seconds
    run_s: float                # docker run's own time, for comparison

    @property
    def last(self) -> float:
        return max(self.delays.values())


def measure_propagation(cluster: Cluster, stack: Stack, count: int
                        ) -> tuple[list[Sample], list[str]]:
    h1, h2, h3 = cluster.hosts
    problems: list[str] = []
    if CROSS_POOL not in h1.cli("pool", "show").stdout:
        h1.cli("pool", "add", CROSS_POOL, "--vxlan-mode", "cross-subnet")
    # Every host needs its VXLAN device (made for the VXLAN pool of the throughput
    # part, or now for this one) before h3 can route h1's blocks.
    if not wait_for(lambda: all(h.links("vxlan.calico") for h in cluster.hosts),
                    timeout=20, interval=0.2):
        problems.append("vxlan.calico missing after 20 s on: " + ", ".join(
            h.name for h in cluster.hosts if not h.links("vxlan.calico")))
    subnets = [f"10.126.{10 + i}.0/25" for i in range(count)]
    networks = [stack.network(h2, "--subnet", subnet) for subnet in subnets]
    for network in networks:
        stack.wait_network(h1, network, timeout=30)
    watcher = EtcdBlockWatcher(cluster.router_netns_path)
    listeners = {h.name: RouteListener(h.name, h.netns_path) for h in (h2, h3)}
    samples: list[Sample] = []
    try:
        time.sleep(0.5)  # let the networks' own events pass
        for subnet, network in zip(subnets, networks, strict=True):
            started = time.monotonic()
            container = stack.container(h1, network)
            run_s = time.monotonic() - started
            address = container.ipv4
            block = str(ipaddress.ip_network(f"{address}/26", strict=False))
            gateway_block = str(ipaddress.ip_network(subnet).subnets(new_prefix=26)
                                .__next__())
            if block == gateway_block:
                problems.append(f"{container.name} ({address}) took an address of h2's "
                                f"block {block} (borrowed, no claim): sample skipped")
                continue
            created = watcher.wait(block, timeout=10)
            if created is None:
                problems.append(f"no etcd creation event for block {block} "
                                f"(watch error: {watcher.error})")
                continue
            if created < started:
                problems.append(f"block {block} was created before its container "
                                "started: sample skipped")
                continue
            delays = {}
            for name, listener in listeners.items():
                arrived = listener.wait(block, timeout=10)
                if arrived is None:
                    host = cluster.host(name)
                    problems.append(
                        f"no route to {block} on {name} within 10 s of its creation; "
                        f"{name} proto 202 routes:\n"
                        f"{host.sh('ip', 'route', 'show', 'proto', '202').stdout}")
                else:
                    delays[name] = arrived - created
            if len(delays) == len(listeners):
                samples.append(Sample(block, delays, run_s))
                print(f"  {block}: " + ", ".join(
                    f"{n} {d * 1000:.0f} ms" for n, d in delays.items())
                    + f" (docker run {run_s:.2f} s)", flush=True)
            time.sleep(0.3)
    finally:
        watcher.close()
        for listener in listeners.values():
            listener.close()
    return samples, problems


# ----------------------------------------------------------------------- report

def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, int(-(-fraction * len(ordered) // 1)))
    return ordered[min(rank, len(ordered)) - 1]


def fmt_gbit(path: Path_) -> str:
    return f"{statistics.median(path.samples):.2f}" if path.samples else "failed"


def paired_ratios(path: Path_, host: Path_) -> list[float]:
    """Per round: this path's rate over the host path's in the same round (they run
    back to back), so drift of the machine's speed between rounds cancels."""
    if len(path.samples) != len(host.samples):
        return []
    return [p / h for p, h in zip(path.samples, host.samples, strict=True) if h > 0]


def _para(text: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width=88, break_on_hyphens=False)


def render(paths: list[Path_], notes: dict[str, str], samples: list[Sample],
           problems: list[str], args: argparse.Namespace, versions: dict[str, str]) -> str:
    by_key = {p.key: p for p in paths}
    host = by_key["host"]
    targets = {"host": "", "direct": ">= 0.9", "vxlan": ">= 0.7"}
    lines = [SECTION, ""]
    lines += _para(
        "`sudo .venv/bin/python bench/multihost.py` (about three minutes; `--no-write` only "
        "prints) starts the simulated cluster of tests/multihost (three hosts in network "
        "namespaces, each with its own dockerd and plugin, etcd in a router namespace, "
        "veths over bridges: no real NIC, so the host path is the kernel's veth and bridge "
        "speed on this CPU), measures, rewrites this section and stops the cluster.")
    lines.append("")
    lines += _para(
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel "
        f"{platform.release()}, dockerd {versions.get('dockerd', '?')}, "
        f"{versions.get('iperf3', 'iperf3')}; {args.rounds} interleaved rounds of "
        f"`iperf3 -t {args.seconds} -O 1` per path, h1 -> h2 (same segment), medians:")
    lines += [
        "",
        "| path (h1 -> h2) | Gbit/s | ratio to host, median (range) of rounds | target "
        "| rounds, Gbit/s "
        "| retransmits | CPU % client / server | MTU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        paired = paired_ratios(path, host)
        if path.key == "host" and path.samples:
            ratio_text = "1.00"
        elif paired:
            ratio_text = (f"**{statistics.median(paired):.2f}** "
                          f"({min(paired):.2f}-{max(paired):.2f})")
        else:
            ratio_text = "-"
        rounds_text = ", ".join(f"{s:.2f}" for s in path.samples) or "failed"
        retrans = f"{statistics.median(path.retransmits):.0f}" if path.retransmits else ""
        cpu = (f"{statistics.median(c for c, _ in path.cpu):.0f} / "
               f"{statistics.median(s for _, s in path.cpu):.0f}") if path.cpu else ""
        mtu = notes.get(f"{path.key}_mtu", "")
        lines.append(f"| {path.label} | {fmt_gbit(path)} | {ratio_text} | "
                     f"{targets[path.key]} | {rounds_text} | {retrans} | {cpu} | {mtu} |")
    lines.append("")
    if samples:
        lasts = [s.last for s in samples]
        per_host = {name: [s.delays[name] for s in samples] for name in samples[0].delays}
        runs = [s.run_s for s in samples]
        lines += _para(
            f"Propagation, {len(samples)} samples: from a block record's creation in etcd "
            f"to its route on both other hosts, p50 **{percentile(lasts, 0.5) * 1000:.0f} "
            f"ms**, p95 **{percentile(lasts, 0.95) * 1000:.0f} ms** (target p95 <= 1 s; "
            f"max {max(lasts) * 1000:.0f} ms). Per host, p50 / p95: " + "; ".join(
                f"{name} {percentile(v, 0.5) * 1000:.0f} / "
                f"{percentile(v, 0.95) * 1000:.0f} ms" for name, v in per_host.items())
            + " (h2, on the same segment, gets a direct route; h3 a VXLAN one). For "
            f"comparison, `docker run -d` itself took {statistics.median(runs):.2f} s "
            "(median).")
    else:
        lines += _para("Propagation: no sample succeeded (see the problems below).")
    lines.append("")
    lines += _para(
        "Method: (1) iperf3 runs inside the namespaces with nsenter (the containers' "
        "through their pid); in each round the three paths run one after another, the "
        "order rotated every round; the figure is the receiver's bits_per_second after a "
        "1 s omitted warm-up; a path's ratio is the median over rounds of its rate over "
        "the host path's rate in the same round. There is no NIC: client, server and "
        "every hop (veths, bridge, forwarding, netfilter, encapsulation) run on the same "
        "2 cores, and other sessions share the machine, so single rounds swing by "
        "10-20% and absolute "
        "figures differ between runs; the ratios taken side by side are the result. h1's "
        "`vxlan.calico` tx counter is checked to grow on the VXLAN path only. (2) In a "
        "cross-subnet pool, networks with a /25 are made on h2 (its gateway claims the "
        "first /26); then, one at a time, a container on h1 claims the second /26. An "
        "etcd watch (JSON gateway, opened inside the router's namespace) and rtnetlink "
        "route listeners (sockets opened inside h2's and h3's namespaces) stamp the "
        "block's creation and each route's arrival with one monotonic clock as the events"
        " arrive, without polling, so docker run's own time is not in the figure.")
    if problems:
        lines += ["", "Problems seen in this run:", ""]
        lines += [f"- {p.splitlines()[0]}" for p in problems]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 10 or not 1 <= args.seconds <= 30 \
            or not 1 <= args.samples <= 100:
        parser.error("rounds 1-10, seconds 1-30, samples 1-100")
    if os.geteuid() != 0:
        parser.error("run as root")

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)

    cluster = Cluster()
    began = time.monotonic()
    stop_problems: list[str] = []
    versions = {"iperf3": subprocess.run(["iperf3", "--version"], capture_output=True,
                                         text=True).stdout.split(" (")[0].strip()}
    try:
        cluster.start()
        print(f"cluster up in {time.monotonic() - began:.1f} s", flush=True)
        versions["dockerd"] = cluster.host("h1").docker(
            "version", "-f", "{{.Server.Version}}").stdout.strip()
        stack = Stack(cluster)
        try:
            print("throughput (iperf3, h1 -> h2):", flush=True)
            paths, notes = measure_throughput(cluster, stack, args.rounds, args.seconds)
        finally:
            stack.cleanup()
        stack = Stack(cluster)
        try:
            print("propagation (block claim on h1 -> routes on h2 and h3):", flush=True)
            samples, problems = measure_propagation(cluster, stack, args.samples)
        finally:
            stack.cleanup(timeout=60)
    finally:
        stop_problems = cluster.stop()

    for path in paths:
        if path.failure:
            problems.insert(0, f"path {path.key} failed: {path.failure}")
    wrong_vxlan = [p.key for p in paths if p.key != "vxlan" and any(
        n > 100 for n in p.vxlan_tx)]
    if wrong_vxlan:
        problems.append(f"h1's vxlan.calico sent packets during {wrong_vxlan}")
    vxlan = {p.key: p for p in paths}["vxlan"]
    if vxlan.samples and not all(n > 1000 for n in vxlan.vxlan_tx):
        problems.append(f"the VXLAN path did not go through vxlan.calico ({vxlan.vxlan_tx})")
    leftovers = list(stop_problems)  # Cluster.stop checks namespaces and processes

    text = render(paths, notes, samples, problems, args, versions)
    print()
    print(text)
    by_key = {p.key: p for p in paths}
    if by_key["host"].samples:
        for key, target in (("direct", 0.9), ("vxlan", 0.7)):
            paired = paired_ratios(by_key[key], by_key["host"])
            if paired:
                ratio = statistics.median(paired)
                print(f"{key}/host = {ratio:.2f} (target >= {target}: "
                      f"{'met' if ratio >= target else 'NOT met'})")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"total {time.monotonic() - began:.0f} s")
    if leftovers:
        print("LEFTOVERS: " + "; ".join(leftovers))
    else:
        print("the cluster left nothing behind (namespaces, processes, mounts, links)")
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote the section {SECTION!r} of {BENCHMARKS}")
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
