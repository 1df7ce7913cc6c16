"""Helpers for functional tests: throwaway network namespaces and a Docker stand-in.

Every test gets its own namespaces named ``cnmt-<random>-<role>``: one "host" (where
the driver's Netlink object works) and one per workload (a container's sandbox). The
finalizer deletes them all, even when the test fails; deleting a namespace destroys
its interfaces and, with them, the veth peers in other namespaces. Traffic never
leaves these namespaces.

``Dataplane.add_endpoint`` does what the driver plus dockerd would do for
``docker run`` / ``docker network connect``: the driver creates the veth, configures
the host end and adds the host route (CreateEndpoint/Join); then ``docker_join``
replays, step by step, what dockerd 20.10's libnetwork does with the Join reply
(osl AddInterface -> static routes -> programGateway), including its two checks that
can fail a Join: the address must not conflict with an existing route, and the
gateway must resolve to a route *without* a next hop.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dataplane.netlink import Netlink

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


# -- shell helpers ---------------------------------------------------------------


def sh(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    """Run a command; failures raise with its stderr in the message."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "-n", ns, *args, check=check)


def ip_json(ns: str, *args: str) -> list[dict]:
    out = sh("ip", "-n", ns, "-j", *args).stdout.strip()
    return json.loads(out) if out else []


def in_ns(
    ns: str, *args: str, check: bool = True, timeout: float = 10
) -> subprocess.CompletedProcess:
    """Run a command inside a namespace (nsenter: no remount of /sys, unlike ip netns exec)."""
    return sh("nsenter", f"--net=/run/netns/{ns}", *args, check=check, timeout=timeout)


def read_sysctl(ns: str, key: str) -> str:
    """A sysctl as seen from inside ``ns`` (read independently of dataplane.netlink)."""
    return in_ns(ns, "cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()


def netstat_counter(ns: str, name: str) -> int:
    """A counter from /proc/net/netstat (e.g. TcpExt IPReversePathFilter) inside ``ns``."""
    lines = in_ns(ns, "cat", "/proc/net/netstat").stdout.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        keys, vals = header.split()[1:], values.split()[1:]
        if name in keys:
            return int(vals[keys.index(name)])
    raise KeyError(name)


def _ping_argv(dst: str, count: int, wait: int, src: str | None) -> list[str]:
    v6 = ipaddress.ip_address(dst).version == 6
    if shutil.which("busybox"):
        argv = ["busybox", "ping6" if v6 else "ping"]
    else:
        argv = ["ping", "-6" if v6 else "-4"]
    argv += ["-c", str(count), "-W", str(wait)]
    if src:
        argv += ["-I", src]
    return [*argv, dst]


def ping(ns: str, dst: str, src: str | None = None, count: int = 1, wait: int = 2) -> bool:
    """Whether ``dst`` answers a ping sent from inside ``ns``."""
    proc = in_ns(ns, *_ping_argv(dst, count, wait, src), check=False, timeout=wait * count + 5)
    return proc.returncode == 0


def send_ping(ns: str, dst: str, src: str, linger: float = 0.3) -> None:
    """Fire one echo request (answer or not) and give it ``linger`` seconds to travel."""
    argv = _ping_argv(dst, 1, 1, src)
    in_ns(ns, "timeout", str(linger), *argv, check=False)


def route_get(ns: str, dst: str) -> dict:
    return ip_json(ns, "route", "get", dst)[0]


def main_routes(ns: str, family: str = "-4") -> list[dict]:
    return ip_json(ns, family, "route", "show", "table", "main")


def neighbours(ns: str) -> list[dict]:
    return ip_json(ns, "neigh", "show")


def link_mac(ns: str, ifname: str) -> str:
    return ip_json(ns, "link", "show", ifname)[0]["address"]


# -- packet capture --------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: int  # IPv4 protocol / IPv6 next header
    outgoing: bool  # sent by the capturing namespace (vs received from the wire)


class Capture:
    """Capture IP packets on one interface of a namespace (AF_PACKET, no tcpdump).

    A thread enters the namespace (setns affects only that thread), opens a packet
    socket bound to the interface and records every IPv4/IPv6 packet until the
    ``with`` block ends.
    """

    def __init__(self, ns: str, ifname: str) -> None:
        self.ns = ns
        self.ifname = ifname
        self.packets: list[Packet] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Capture:
        self._thread.start()
        if not self._ready.wait(5):
            raise AssertionError("capture did not start")
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)  # let the last packets of the exchange arrive
        self._stop.set()
        self._thread.join(5)
        if self._error:
            raise self._error

    def _run(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        with sock:
            sock.bind((self.ifname, 0))
            sock.settimeout(0.02)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    frame, addr = sock.recvfrom(65535)
                except TimeoutError:
                    continue
                packet = self._parse(frame, addr[2] == PACKET_OUTGOING)
                if packet:
                    self.packets.append(packet)

    @staticmethod
    def _parse(frame: bytes, outgoing: bool) -> Packet | None:
        ethertype = int.from_bytes(frame[12:14], "big")
        ip_hdr = frame[14:]
        if ethertype == 0x0800 and len(ip_hdr) >= 20:
            return Packet(
                str(ipaddress.IPv4Address(ip_hdr[12:16])),
                str(ipaddress.IPv4Address(ip_hdr[16:20])),
                ip_hdr[9],
                outgoing,
            )
        if ethertype == 0x86DD and len(ip_hdr) >= 40:
            return Packet(
                str(ipaddress.IPv6Address(ip_hdr[8:24])),
                str(ipaddress.IPv6Address(ip_hdr[24:40])),
                ip_hdr[6],
                outgoing,
            )
        return None

    def echo_requests(self, src: str | None = None, dst: str | None = None) -> list[Packet]:
        """ICMP / ICMPv6 packets (echo requests and replies) matching src/dst."""
        return [
            p
            for p in self.packets
            if p.proto in (1, 58)
            and (src is None or p.src == src)
            and (dst is None or p.dst == dst)
        ]


# -- namespaces ------------------------------------------------------------------


class Lab:
    """Creates uniquely named namespaces and deletes all of them at the end."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.namespaces: list[str] = []

    def netns(self, role: str) -> str:
        name = f"cnmt-{self.tag}-{role}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        ip(name, "link", "set", "lo", "up")
        return name

    def cleanup(self) -> None:
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)
        self.namespaces.clear()


# -- the Docker stand-in ---------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """A Docker network as the driver sees it: real subnets and gateways."""

    subnet4: str
    gateway4: str
    subnet6: str | None = None
    gateway6: str | None = None

    @property
    def prefix4(self) -> int:
        return ipaddress.ip_network(self.subnet4).prefixlen

    @property
    def prefix6(self) -> int:
        assert self.subnet6
        return ipaddress.ip_network(self.subnet6).prefixlen

    def gateways(self) -> list[str]:
        return [g for g in (self.gateway4, self.gateway6) if g]

    def join_static_routes(self) -> list[dict]:
        """The StaticRoutes the driver's Join must return for this network.

        IPv4 needs none: proxy ARP answers for peers in the connected subnet. IPv6 has
        no wildcard proxy NDP, so peers are reached through the two halves of the
        subnet via the gateway (more specific than the connected /64). The gateway
        itself needs a *connected* /128 (RouteType 1): without it the half containing
        the gateway makes the kernel reject the other half (EHOSTUNREACH: the next hop
        resolves through a next hop) and makes dockerd's programGateway fail ("direct
        route for the gateway could not be found"). dockerd installs connected routes
        with the interface, before any next-hop route, so the list order is free.
        """
        if not self.subnet6:
            return []
        assert self.gateway6
        net = ipaddress.ip_network(self.subnet6)
        low, high = net.subnets(prefixlen_diff=1)
        return [
            {"Destination": f"{self.gateway6}/128", "RouteType": 1},
            {"Destination": str(low), "RouteType": 0, "NextHop": self.gateway6},
            {"Destination": str(high), "RouteType": 0, "NextHop": self.gateway6},
        ]


@dataclass
class Endpoint:
    workload: str
    host_ifname: str
    container_ifname: str  # inside the workload, e.g. eth0
    ip4: str
    ip6: str | None
    network: Network


def _check_route_conflict(ns: str, address: str) -> None:
    """dockerd's checkRouteConflict: refuse an address overlapping a main-table route."""
    iface = ipaddress.ip_interface(address)
    family = "-6" if iface.version == 6 else "-4"
    for route in main_routes(ns, family):
        if route["dst"] == "default":
            continue
        dst = ipaddress.ip_network(route["dst"], strict=False)
        if iface.ip in dst or dst.network_address in iface.network:
            raise AssertionError(f"dockerd would refuse {address}: conflicts with {route}")


def docker_join(
    host: str,
    workload: str,
    src_name: str,
    dst_name: str,
    address4: str,
    address6: str | None,
    static_routes: list[dict],
    gateway4: str | None,
    gateway6: str | None,
) -> None:
    """Configure the container end the way dockerd 20.10 (libnetwork osl) does."""
    ip(host, "link", "set", src_name, "netns", workload)
    ip(workload, "link", "set", src_name, "down")
    ip(workload, "link", "set", src_name, "name", dst_name)
    _check_route_conflict(workload, address4)
    ip(workload, "addr", "add", address4, "dev", dst_name)
    if address6:
        _check_route_conflict(workload, address6)
        ip(workload, "-6", "addr", "add", address6, "dev", dst_name, "nodad")
    ip(workload, "link", "set", dst_name, "up")
    # Connected routes (RouteType 1) are interface routes, added once the link is up.
    for route in static_routes:
        if route["RouteType"] == 1:
            ip(workload, "route", "add", route["Destination"], "dev", dst_name, "scope", "link")
    # Next-hop routes (RouteType 0): dockerd looks the next hop up and uses its device.
    for route in static_routes:
        if route["RouteType"] == 0:
            dev = route_get(workload, route["NextHop"])["dev"]
            ip(workload, "route", "add", route["Destination"], "via", route["NextHop"], "dev", dev)
    # programGateway: the gateway must resolve to a route without a next hop.
    for gateway in (gateway4, gateway6):
        if gateway:
            found = route_get(workload, gateway)
            assert "gateway" not in found, f"dockerd: no direct route for gateway {gateway}"
            ip(workload, "route", "add", "default", "via", gateway, "dev", found["dev"])


class Dataplane:
    """A host namespace driven through dataplane.netlink, plus workloads."""

    def __init__(self, lab: Lab, nl: Netlink, host: str) -> None:
        self.lab = lab
        self.nl = nl
        self.host = host
        self.workloads: dict[str, str] = {}

    def workload(self, name: str) -> str:
        if name not in self.workloads:
            self.workloads[name] = self.lab.netns(name)
        return self.workloads[name]

    def add_endpoint(
        self,
        workload: str,
        network: Network,
        ip4: str,
        ip6: str | None = None,
        container_ifname: str = "eth0",
        default_gateway: bool = True,
        before_join: Callable[[str], object] | None = None,
    ) -> Endpoint:
        """CreateEndpoint + Join (driver side), then dockerd's side of the Join.

        ``before_join(host_ifname)`` runs between the two, to tamper with the host end.
        """
        ns = self.workload(workload)
        endpoint_id = secrets.token_hex(16)
        host_ifname, tmp_ifname = "cali" + endpoint_id[:11], "tmp" + endpoint_id[:11]
        self.nl.create_veth(host_ifname, tmp_ifname)
        self.nl.configure_host_end(host_ifname, network.gateways())
        self.nl.add_route(ip4, host_ifname)
        if ip6:
            self.nl.add_route(ip6, host_ifname)
        if before_join:
            before_join(host_ifname)
        docker_join(
            self.host,
            ns,
            tmp_ifname,
            container_ifname,
            f"{ip4}/{network.prefix4}",
            f"{ip6}/{network.prefix6}" if ip6 else None,
            network.join_static_routes(),
            network.gateway4 if default_gateway else None,
            network.gateway6 if default_gateway and ip6 else None,
        )
        return Endpoint(ns, host_ifname, container_ifname, ip4, ip6, network)


NET1 = Network("10.201.0.0/24", "10.201.0.1", "fd00:98::/64", "fd00:98::1")
NET2 = Network("10.202.0.0/24", "10.202.0.1", "fd00:99::/64", "fd00:99::1")


# -- traffic probes: sockets opened inside namespaces --------------------------------


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


def run_in_netns(ns: str, func: Callable[[], object]) -> object:
    """Run ``func`` in a fresh thread that entered ``ns``; return its result."""
    result: list[object] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            enter_netns(ns)
            result.append(func())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(30)
    if error:
        raise error[0]
    return result[0] if result else None


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(dst: str, timeout: float, src: str | None = None) -> bool:
    """One echo request from the calling thread's namespace; whether the reply came."""
    v6 = ipaddress.ip_address(dst).version == 6
    ident = secrets.randbits(16)
    payload = secrets.token_bytes(16)
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        header = bytes([128, 0, 0, 0]) + ident.to_bytes(2, "big") + (1).to_bytes(2, "big")
        packet = header + payload  # the kernel fills in the ICMPv6 checksum
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        header = bytes([8, 0, 0, 0]) + ident.to_bytes(2, "big") + (1).to_bytes(2, "big")
        checksum = _icmp_checksum(header + payload)
        packet = header[:2] + checksum.to_bytes(2, "big") + header[4:] + payload
    with sock:
        if src:
            sock.bind((src, 0))
        sock.sendto(packet, (dst, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, addr = sock.recvfrom(2048)
            except TimeoutError:
                return False
            icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
            reply_type = 129 if v6 else 0
            if (len(icmp) >= 8 and icmp[0] == reply_type
                    and int.from_bytes(icmp[4:6], "big") == ident
                    and ipaddress.ip_address(addr[0]) == ipaddress.ip_address(dst)):
                return True
    return False


def tcp_reaches(dst: str, port: int, timeout: float, src: str | None = None) -> bool:
    """Whether a TCP SYN gets an answer: connected, or refused (RST), both mean through."""
    with socket.socket(_family(dst), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if src:
            sock.bind((src, 0))
        try:
            sock.connect((dst, port))
        except ConnectionRefusedError:
            return True
        except OSError:  # timeout, unreachable
            return False
        return True


def udp_reaches(dst: str, port: int, timeout: float) -> bool:
    """Whether a datagram comes back from an echo server (or a port unreachable)."""
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((dst, port))
        token = secrets.token_bytes(8)
        sock.send(token)
        try:
            return sock.recv(64) == token
        except ConnectionRefusedError:
            return True
        except OSError:
            return False


@dataclass(frozen=True)
class Probe:
    """One attempt to reach ``dst`` from namespace ``src``: proto icmp, tcp or udp."""

    src: str
    dst: str
    proto: str
    port: int = 0
    bind: str | None = None

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        via = f" from {self.bind}" if self.bind else ""
        return f"{self.proto} {self.src} -> {self.dst}{port}{via}"

    def run(self, timeout: float) -> bool:
        if self.proto == "icmp":
            return icmp_echo(self.dst, timeout, self.bind)
        if self.proto == "tcp":
            return tcp_reaches(self.dst, self.port, timeout, self.bind)
        if self.proto == "udp":
            return udp_reaches(self.dst, self.port, timeout)
        raise ValueError(self.proto)


def probe_all(probes: list[Probe], timeout: float = 0.5) -> dict[Probe, bool]:
    """Run every probe at once, each in its own thread inside its namespace."""
    results: dict[Probe, bool] = {}
    errors: list[str] = []

    def target(probe: Probe) -> None:
        try:
            enter_netns(probe.src)
            results[probe] = probe.run(timeout)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{probe}: {exc!r}")

    threads = [threading.Thread(target=target, args=(p,), daemon=True) for p in probes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    if errors:
        raise AssertionError("probes failed to run: " + "; ".join(errors))
    return results


def expect(matrix: dict[Probe, bool], timeout: float = 0.5) -> None:
    """Assert an allowed/denied matrix; the message lists every probe that disagreed."""
    results = probe_all(list(matrix), timeout)
    wrong = [
        f"{probe}: expected {'through' if want else 'dropped'}, got "
        f"{'through' if results[probe] else 'dropped'}"
        for probe, want in matrix.items() if results[probe] != want
    ]
    assert not wrong, "\n".join(wrong)


class Servers:
    """TCP listeners (recording their peers' addresses) and UDP echo servers inside
    namespaces, served by daemon threads until ``close``."""

    def __init__(self) -> None:
        self.peers: dict[tuple[str, int, int], list[str]] = {}
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()

    def _open(self, ns: str, kind: int, family: int, port: int) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket(family, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            if kind == socket.SOCK_STREAM:
                sock.listen(64)
            sock.settimeout(0.1)
            return sock

        sock = run_in_netns(ns, make)
        assert isinstance(sock, socket.socket)
        self._sockets.append(sock)
        return sock

    def tcp(self, ns: str, port: int, version: int = 4) -> list[str]:
        """Listen on ``port``; returns the list the peers' addresses are appended to."""
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        sock = self._open(ns, socket.SOCK_STREAM, family, port)
        peers = self.peers.setdefault((ns, port, version), [])

        def serve() -> None:
            while not self._stop.is_set():
                try:
                    conn, addr = sock.accept()
                except (TimeoutError, OSError):
                    continue
                peers.append(addr[0])
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return peers

    def udp(self, ns: str, port: int, version: int = 4) -> None:
        """Echo every datagram on ``port`` back to its sender."""
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        sock = self._open(ns, socket.SOCK_DGRAM, family, port)

        def serve() -> None:
            while not self._stop.is_set():
                try:
                    data, addr = sock.recvfrom(2048)
                    sock.sendto(data, addr)
                except (TimeoutError, OSError):
                    continue

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        time.sleep(0.15)
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


def add_outside(
    lab: Lab, host: str, host_address: str = "203.0.113.1", outside_address: str = "203.0.113.2",
    prefix: int = 24, routes: tuple[str, ...] = (),
) -> str:
    """An "outside" namespace on a veth from ``host``, with ``routes`` via the host."""
    outside = lab.netns("outside")
    ip(host, "link", "add", "cnmext0", "type", "veth", "peer", "name", "eth0", "netns", outside)
    ip(host, "addr", "add", f"{host_address}/{prefix}", "dev", "cnmext0")
    ip(host, "link", "set", "cnmext0", "up")
    ip(outside, "addr", "add", f"{outside_address}/{prefix}", "dev", "eth0")
    ip(outside, "link", "set", "eth0", "up")
    for route in routes:
        ip(outside, "route", "add", route, "via", host_address)
    return outside
