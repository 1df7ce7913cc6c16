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

from driver.netlink import Netlink

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
    """A sysctl as seen from inside ``ns`` (read independently of driver.netlink)."""
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
    """A host namespace driven through driver.netlink, plus workloads."""

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
