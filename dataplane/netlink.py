"""Kernel side of an endpoint: veth pairs, host routes and per-interface sysctls.

This is the only module that imports pyroute2. Every kernel error is mapped to the
project's own errors (datastore.errors); deletes tolerate "already gone".

The routed dataplane it programs (see DESIGN.md section 3 and the functional tests):

* one veth per endpoint; the host end (``cali`` + 11 characters of the endpoint id)
  stays in the host namespace, Docker moves the other end into the container;
* the host end carries each network's gateway address as a /32 (IPv6: /128, nodad,
  noprefixroute), so the container's ARP/NDP for its gateway is answered by the host;
* ``proxy_arp=1`` and ``proxy_delay=0`` let the host answer ARP for the container's
  peers in the same subnet, which the host reaches through their own /32 routes;
* ``rp_filter=1`` (strict) drops IPv4 packets whose source is not routed back through
  the interface they arrived on (anti-spoofing). The kernel uses the maximum of
  ``conf/all/rp_filter`` and the interface's value, so ``all=2`` (loose) defeats it:
  see :meth:`Netlink.global_rp_filter`. IPv6 has no rp_filter at all;
* IPv6: forwarding on, ``accept_ra=0`` and ``accept_dad=0`` on the host end. Without
  ``accept_dad=0`` the host end's link-local address stays tentative for about a
  second after the container end comes up, and the kernel does not send Neighbour
  Solicitations from a tentative address: the first packets towards a new container
  wait ~1 s.

For the routing agent (DESIGN.md section 5) it also programs routes that carry
:data:`ROUTE_PROTOCOL` (and only ever removes those), the VXLAN and IP-in-IP tunnel
devices, permanent neighbour entries and the VXLAN device's FDB, and it reports
addresses, MTUs and counters for node-address autodetection and tests.

Sysctls are per network namespace. With ``netns=None`` they are written to /proc/sys
directly; otherwise a short-lived thread enters the namespace (setns affects only the
calling thread) and writes all of one call's values in one go.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, IFA_F_NOPREFIXROUTE

from datastore.errors import (
    CalicoCnmError,
    Conflict,
    InvalidRequest,
    KernelFeatureMissing,
    NotFound,
    Unavailable,
)

__all__ = ["InterfaceAddress", "Netlink", "Route", "ROUTE_PROTOCOL", "RTPROT_BIRD"]

# The route protocol number of every route the routing agent programs: it owns
# exactly the routes that carry it and never touches another.
ROUTE_PROTOCOL = 202


@dataclass(frozen=True, order=True)
class Route:
    """A route of the main table: to ``dst`` (a CIDR) via a next hop and/or device.

    A desired route with ``dev=None`` matches a kernel route through any device (the
    kernel picks the device of a next hop on a connected subnet).
    """

    dst: str
    via: str | None = None
    dev: str | None = None
    onlink: bool = False
    blackhole: bool = False


@dataclass(frozen=True)
class InterfaceAddress:
    """One address of one interface, as node-address autodetection needs it."""

    ifname: str
    address: str  # interface form: "10.0.0.5/24", "fd00::5/64"
    up: bool  # the interface is administratively up (IFF_UP)
    kind: str | None  # IFLA_INFO_KIND ("veth", "vxlan", "bridge"); None for lo / hardware


_T = TypeVar("_T")

IFNAMSIZ = 16  # the kernel's limit includes the trailing NUL: 15 usable characters
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NETNS_RUN_DIR = "/run/netns"

RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RTPROT_BIRD = 12  # routes BIRD installs (routing bgp)
RTN_UNICAST = 1
RTN_BLACKHOLE = 6
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete request: "any scope" (0 would match only universe)
RTNH_F_ONLINK = 4
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000
AF_BRIDGE = 7
NUD_PERMANENT = 0x80
NTF_SELF = 0x02

VXLAN_MAX_VNI = (1 << 24) - 1
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# route get / dump answers that mean "no way there" rather than a failure:
# unreachable (no route, or an unreachable route), blackhole (EINVAL), prohibit.
_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL, errno.EACCES})

MIN_MTU = 68
MAX_MTU = 65535
IPV6_MIN_MTU = 1280

_GONE = frozenset({errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL})

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def _check_ifname(ifname: str) -> str:
    if not isinstance(ifname, str) or not ifname:
        raise InvalidRequest(f"interface name must be a non-empty string, got {ifname!r}")
    if len(ifname) >= IFNAMSIZ:
        raise InvalidRequest(
            f"interface name {ifname!r} is {len(ifname)} characters; the kernel allows "
            f"at most {IFNAMSIZ - 1}"
        )
    if ifname in (".", "..") or not _IFNAME_RE.match(ifname):
        raise InvalidRequest(
            f"interface name {ifname!r} has characters other than letters, digits, "
            "'_', '.' and '-'"
        )
    return ifname


def _host_address(address: str) -> Address:
    """A bare address, or one written with its full-length prefix (/32, /128)."""
    try:
        net = ipaddress.ip_network(address, strict=True)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{address!r} is not an IP address") from exc
    if net.prefixlen != net.max_prefixlen:
        raise InvalidRequest(
            f"{address!r} is not a host address: a host route needs a bare address "
            f"or a /{net.max_prefixlen}"
        )
    return net.network_address


def _gateway_address(gateway: str) -> Address:
    """A gateway as Docker writes it ('10.0.0.1/24') or bare; the prefix is ignored."""
    try:
        return ipaddress.ip_interface(gateway).ip
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{gateway!r} is not a gateway address") from exc


def _ip_address(value: str, what: str) -> Address:
    try:
        return ipaddress.ip_address(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{what} {value!r} is not an IP address") from exc


def _route_network(dst: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A route destination: a CIDR without host bits (a bare address is a /32, /128)."""
    try:
        return ipaddress.ip_network(dst, strict=True)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"route destination {dst!r} is not a CIDR") from exc


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _check_mac(mac: str) -> str:
    """A unicast MAC in the kernel's spelling (lowercase, colon separated)."""
    value = mac.lower() if isinstance(mac, str) else ""
    if not _MAC_RE.match(value):
        raise InvalidRequest(f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return value


def _check_mtu(mtu: int | None) -> None:
    if mtu is not None and (
        isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU
    ):
        raise InvalidRequest(f"MTU {mtu!r} is outside {MIN_MTU}..{MAX_MTU}")


def _check_protocol(protocol: int) -> int:
    # 0 would mean "any protocol" in a delete request: never accept it.
    if isinstance(protocol, bool) or not isinstance(protocol, int) or not 0 < protocol < 256:
        raise InvalidRequest(f"route protocol {protocol!r} is outside 1..255")
    return protocol


def _route_key(route: Route) -> tuple[Any, ...]:
    # Route's own ordering would compare None with str; sort by family and network.
    net = ipaddress.ip_network(route.dst)
    return (net.version, net, route.via or "", route.dev or "", route.onlink, route.blackhole)


def _addr_local(msg: Any) -> str:
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
    # point-to-point link. IPv6 usually sends only IFA_ADDRESS.
    return str(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))


def _map_error(exc: BaseException, action: str) -> CalicoCnmError:
    """Turn a kernel error into the project's error, naming what was attempted."""
    code = getattr(exc, "code", None) if isinstance(exc, NetlinkError) else None
    if code is None and isinstance(exc, OSError):
        code = exc.errno
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
    message = f"{action}: {reason}"
    if code == errno.EEXIST or code == errno.ENOTEMPTY:
        return Conflict(message)
    if code in _GONE:
        return NotFound(message)
    if code in (errno.EINVAL, errno.ERANGE, errno.EAFNOSUPPORT):
        return InvalidRequest(message)
    return Unavailable(message)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _write_proc_sys(proc_sys: str, items: Iterable[tuple[str, str]]) -> None:
    for key, value in items:
        with open(f"{proc_sys}/{key}", "w") as handle:
            handle.write(value)


def _read_proc_sys(proc_sys: str, key: str) -> str:
    with open(f"{proc_sys}/{key}") as handle:
        return handle.read().strip()


class Netlink:
    """Netlink and sysctl operations in one network namespace.

    ``netns`` names a namespace under /run/netns (as ``ip netns`` creates them);
    ``None`` means the namespace this process runs in. ``proc_dir`` is where the host's
    procfs is mounted (a managed plugin's own /proc/sys is read-only). Use it as a
    context manager or call :meth:`close`. Calls are serialised by a lock, so one
    instance may be shared by threads.
    """

    def __init__(self, netns: str | None = None, proc_dir: str = "/proc") -> None:
        self._netns = netns
        self._proc_sys = os.path.join(proc_dir, "sys")
        self._nsfd: int | None = None
        self._lock = threading.RLock()
        self._ipr: Any = None
        if netns is not None:
            if not isinstance(netns, str) or not _NETNS_RE.match(netns):
                raise InvalidRequest(f"bad network namespace name {netns!r}")
            path = os.path.join(NETNS_RUN_DIR, netns)
            try:
                self._nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise _map_error(exc, f"opening network namespace {path}") from exc
        try:
            # flags=0: never create a missing namespace (pyroute2 defaults to O_CREAT).
            self._ipr = IPRoute(netns=netns, flags=0) if netns is not None else IPRoute()
        except (NetlinkError, OSError) as exc:
            self._close_nsfd()
            raise _map_error(exc, f"opening a netlink socket in {self._where()}") from exc

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Netlink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the netlink socket and the namespace handle; safe to call twice."""
        with self._lock:
            ipr, self._ipr = self._ipr, None
            try:
                if ipr is not None:
                    ipr.close()
            finally:
                self._close_nsfd()

    def _close_nsfd(self) -> None:
        if self._nsfd is not None:
            os.close(self._nsfd)
            self._nsfd = None

    def _where(self) -> str:
        return "this namespace" if self._netns is None else f"namespace {self._netns}"

    def _rtnl(self) -> Any:
        if self._ipr is None:
            raise Unavailable("the netlink handle is closed")
        return self._ipr

    # -- links ---------------------------------------------------------------------

    def _index(self, ifname: str) -> int | None:
        found = self._rtnl().link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    def _require_index(self, ifname: str) -> int:
        index = self._index(ifname)
        if index is None:
            raise NotFound(f"interface {ifname} does not exist in {self._where()}")
        return index

    def link_exists(self, ifname: str) -> bool:
        """Whether an interface of that name exists in this namespace."""
        _check_ifname(ifname)
        with self._lock:
            try:
                return self._index(ifname) is not None
            except NetlinkError as exc:
                raise _map_error(exc, f"looking up {ifname}") from exc

    def list_links(self, prefix: str = "cali") -> list[str]:
        """Names of the interfaces whose name starts with ``prefix``, sorted."""
        with self._lock:
            try:
                names = [link.get_attr("IFLA_IFNAME") for link in self._rtnl().get_links()]
            except NetlinkError as exc:
                raise _map_error(exc, "listing interfaces") from exc
        return sorted(name for name in names if name and name.startswith(prefix))

    def create_veth(self, host_ifname: str, container_ifname: str, mtu: int | None = None) -> None:
        """Create a veth pair; a stale leftover host end of that name is deleted first.

        A leftover container end of that name (a veth whose host end is gone) is
        deleted too; any other interface with that name is a Conflict.
        """
        _check_ifname(host_ifname)
        _check_ifname(container_ifname)
        if host_ifname == container_ifname:
            raise InvalidRequest("the two ends of a veth need different names")
        if mtu is not None and (
            isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU
        ):
            raise InvalidRequest(f"MTU {mtu!r} is outside {MIN_MTU}..{MAX_MTU}")
        spec: dict[str, Any] = {
            "ifname": host_ifname,
            "kind": "veth",
            "peer": {"ifname": container_ifname},
        }
        if mtu is not None:
            spec["mtu"] = mtu
            spec["peer"]["mtu"] = mtu
        with self._lock:
            try:
                self._delete_link_locked(host_ifname)
                self._delete_stale_veth(container_ifname)
                self._rtnl().link("add", **spec)
            except NetlinkError as exc:
                raise _map_error(
                    exc, f"creating veth {host_ifname}/{container_ifname} in {self._where()}"
                ) from exc

    def _delete_stale_veth(self, ifname: str) -> None:
        index = self._index(ifname)
        if index is None:
            return
        links = self._rtnl().get_links(index)
        kind = None
        if links:
            info = links[0].get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "veth":
            raise Conflict(f"interface {ifname} already exists in {self._where()} ({kind})")
        self._delete_link_locked(ifname)

    def delete_link(self, ifname: str) -> None:
        """Delete an interface (and with a veth, its peer); a missing one is fine.

        The kernel removes every route through the interface with it.
        """
        _check_ifname(ifname)
        with self._lock:
            self._delete_link_locked(ifname)

    def _delete_link_locked(self, ifname: str) -> None:
        try:
            index = self._index(ifname)
            if index is None:
                return
            self._rtnl().link("del", index=index)
        except NetlinkError as exc:
            if exc.code in _GONE:
                return
            raise _map_error(exc, f"deleting {ifname} in {self._where()}") from exc

    # -- the host end --------------------------------------------------------------

    def configure_host_end(self, host_ifname: str, gateways: list[str]) -> None:
        """Make ``host_ifname`` a routed host end answering for ``gateways``.

        Sets the sysctls (IPv4: proxy_arp=1, neigh proxy_delay=0, rp_filter=1,
        forwarding=1; IPv6: disable_ipv6=0 when an IPv6 gateway is given, forwarding=1,
        accept_ra=0, accept_dad=0), brings the link up and converges its addresses to
        exactly the gateways (IPv4 /32, IPv6 /128 nodad noprefixroute; IPv6 link-local
        addresses are left alone). Gateways may carry a prefix ("10.0.0.1/24", as
        Docker writes them); only the address is used. Idempotent.
        """
        _check_ifname(host_ifname)
        wanted = list(dict.fromkeys(_gateway_address(gateway) for gateway in gateways))
        want_v6 = any(gateway.version == 6 for gateway in wanted)
        with self._lock:
            try:
                index = self._require_index(host_ifname)
                self._set_host_end_sysctls(host_ifname, want_v6)
                ipr = self._rtnl()
                link = ipr.get_links(index)[0]
                if not link["flags"] & IFF_UP:
                    ipr.link("set", index=index, state="up")
                self._converge_addresses(index, wanted)
            except CalicoCnmError:
                raise
            except (NetlinkError, OSError) as exc:
                raise _map_error(
                    exc, f"configuring host end {host_ifname} in {self._where()}"
                ) from exc

    def _set_host_end_sysctls(self, ifname: str, want_v6: bool) -> None:
        v4 = [
            (f"net/ipv4/conf/{ifname}/forwarding", "1"),
            (f"net/ipv4/conf/{ifname}/rp_filter", "1"),
            (f"net/ipv4/conf/{ifname}/proxy_arp", "1"),
            (f"net/ipv4/neigh/{ifname}/proxy_delay", "0"),
        ]
        v6_first = [(f"net/ipv6/conf/{ifname}/disable_ipv6", "0")] if want_v6 else []
        v6 = [
            (f"net/ipv6/conf/{ifname}/accept_ra", "0"),
            (f"net/ipv6/conf/{ifname}/accept_dad", "0"),
            (f"net/ipv6/conf/{ifname}/forwarding", "1"),
        ]

        def write() -> None:
            _write_proc_sys(self._proc_sys, v4)
            # The IPv6 conf directory appears with the link, but only if IPv6 is
            # enabled in the kernel and the link's MTU is at least 1280.
            if os.path.isdir(f"{self._proc_sys}/net/ipv6/conf/{ifname}"):
                _write_proc_sys(self._proc_sys, v6_first + v6)
            elif want_v6:
                raise Unavailable(
                    f"IPv6 is not available on {ifname} (IPv6 disabled in the kernel, "
                    f"or the MTU is below {IPV6_MIN_MTU})"
                )

        try:
            self._in_netns(write)
        except FileNotFoundError as exc:
            raise NotFound(f"interface {ifname} vanished while setting its sysctls") from exc

    def _converge_addresses(self, index: int, wanted: list[Address]) -> None:
        # Host ends: each gateway as a full-length address; IPv6 without DAD and
        # without a prefix route (the host answers for the gateway, it routes nothing).
        self._converge_interfaces(
            index,
            [ipaddress.ip_interface((address, address.max_prefixlen)) for address in wanted],
            IFA_F_NODAD | IFA_F_NOPREFIXROUTE,
        )

    def _converge_interfaces(self, index: int, wanted: list[Interface], v6_flags: int) -> None:
        """Make the link's addresses exactly ``wanted`` (IPv6 link-local left alone).

        An address present with another prefix length is deleted and added again.
        """
        ipr = self._rtnl()
        present: dict[Address, int] = {}
        for msg in ipr.get_addr(index=index):
            address = ipaddress.ip_address(_addr_local(msg))
            if address.version == 6 and address.is_link_local:
                continue
            present[address] = int(msg["prefixlen"])
        want = {interface.ip: interface.network.prefixlen for interface in wanted}
        for address, prefixlen in present.items():
            if want.get(address) != prefixlen:
                try:
                    ipr.addr("del", index=index, address=str(address), prefixlen=prefixlen)
                except NetlinkError as exc:
                    if exc.code not in _GONE:
                        raise
        for address, prefixlen in want.items():
            if present.get(address) == prefixlen:
                continue
            spec: dict[str, Any] = {
                "index": index,
                "address": str(address),
                "prefixlen": prefixlen,
            }
            if address.version == 6 and v6_flags:
                spec["flags"] = v6_flags
            try:
                ipr.addr("add", **spec)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise

    # -- routes --------------------------------------------------------------------

    def add_route(self, address: str, ifname: str) -> None:
        """Route one address (bare, /32 or /128) through ``ifname``; replace semantics."""
        host = _host_address(address)
        _check_ifname(ifname)
        with self._lock:
            index = self._require_index(ifname)
            spec: dict[str, Any] = {
                "dst": str(host),
                "dst_len": host.max_prefixlen,
                "oif": index,
                "table": RT_TABLE_MAIN,
                "proto": "static",
                "type": "unicast",
            }
            if host.version == 4:
                spec["scope"] = RT_SCOPE_LINK
            try:
                self._rtnl().route("replace", **spec)
            except NetlinkError as exc:
                raise _map_error(exc, f"routing {host} via {ifname} in {self._where()}") from exc

    def delete_route(self, address: str, ifname: str | None = None) -> None:
        """Delete the host route to ``address`` (optionally only via ``ifname``).

        A missing route, or a missing interface, is fine: the route is gone.
        """
        host = _host_address(address)
        if ifname is not None:
            _check_ifname(ifname)
        with self._lock:
            spec: dict[str, Any] = {
                "dst": str(host),
                "dst_len": host.max_prefixlen,
                "table": RT_TABLE_MAIN,
                "family": socket.AF_INET if host.version == 4 else socket.AF_INET6,
            }
            if host.version == 4:
                spec["scope"] = RT_SCOPE_NOWHERE
            try:
                if ifname is not None:
                    index = self._index(ifname)
                    if index is None:
                        return
                    spec["oif"] = index
                self._rtnl().route("del", **spec)
            except NetlinkError as exc:
                if exc.code in _GONE:
                    return
                raise _map_error(exc, f"deleting the route to {host} in {self._where()}") from exc

    def list_host_routes(self, prefix: str = "cali") -> dict[str, str]:
        """Host routes (/32, /128) of the main table through interfaces named ``prefix*``.

        Returns {address: ifname} with bare addresses ("10.0.0.5", "fd00::5").
        Routes the kernel made itself (proto kernel) are left out.
        """
        with self._lock:
            try:
                ipr = self._rtnl()
                names = {
                    int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                }
                routes: dict[str, str] = {}
                for family, full in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
                    for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                        if (
                            msg["dst_len"] != full
                            or msg["type"] != RTN_UNICAST
                            or msg["proto"] == RTPROT_KERNEL
                            or (msg.get_attr("RTA_TABLE") or msg["table"]) != RT_TABLE_MAIN
                        ):
                            continue
                        name = names.get(msg.get_attr("RTA_OIF") or -1)
                        dst = msg.get_attr("RTA_DST")
                        if name and dst and name.startswith(prefix):
                            routes[str(ipaddress.ip_address(dst))] = name
                return routes
            except NetlinkError as exc:
                raise _map_error(exc, f"listing routes in {self._where()}") from exc

    # -- agent routes (protocol ROUTE_PROTOCOL) --------------------------------------

    def list_routes(self, protocol: int = ROUTE_PROTOCOL) -> list[Route]:
        """Every main-table route (IPv4 and IPv6) that carries ``protocol``, sorted.

        ``dst`` is always a CIDR; ``dev`` is the name of the route's output interface
        (None for a blackhole: the kernel reports IPv6 blackholes through ``lo``).
        A multipath route, or an unreachable/prohibit one, comes back with neither
        ``via`` nor ``dev``: :meth:`remove_route` of that value still deletes it.
        """
        _check_protocol(protocol)
        with self._lock:
            try:
                ipr = self._rtnl()
                names = {
                    int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                }
                routes: list[Route] = []
                for family, zero in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                    for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                        if (
                            msg["proto"] != protocol
                            or (msg.get_attr("RTA_TABLE") or msg["table"]) != RT_TABLE_MAIN
                        ):
                            continue
                        dst = f"{msg.get_attr('RTA_DST') or zero}/{msg['dst_len']}"
                        dst = str(ipaddress.ip_network(dst, strict=False))
                        if msg["type"] == RTN_BLACKHOLE:
                            routes.append(Route(dst, blackhole=True))
                            continue
                        if msg["type"] != RTN_UNICAST or msg.get_attr("RTA_MULTIPATH"):
                            routes.append(Route(dst))
                            continue
                        gateway = msg.get_attr("RTA_GATEWAY")
                        routes.append(
                            Route(
                                dst,
                                via=str(ipaddress.ip_address(gateway)) if gateway else None,
                                dev=names.get(msg.get_attr("RTA_OIF") or -1),
                                # IPv4 and IPv6 both report a single next hop's
                                # RTNH_F_ONLINK in the header's flags.
                                onlink=bool(msg["flags"] & RTNH_F_ONLINK),
                            )
                        )
                return sorted(routes, key=_route_key)
            except NetlinkError as exc:
                raise _map_error(exc, f"listing routes in {self._where()}") from exc

    def _route_base(self, route: Route, protocol: int) -> tuple[dict[str, Any], int]:
        if not isinstance(route, Route):
            raise InvalidRequest(f"{route!r} is not a Route")
        _check_protocol(protocol)
        net = _route_network(route.dst)
        spec: dict[str, Any] = {
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "table": RT_TABLE_MAIN,
            "proto": protocol,
            "family": _family(net.version),
        }
        return spec, net.version

    def _route_via(self, route: Route, version: int) -> str | None:
        if route.via is None:
            return None
        via = _ip_address(route.via, "next hop")
        if via.version != version:
            raise InvalidRequest(f"next hop {via} is not of the family of {route.dst}")
        return str(via)

    def replace_route(self, route: Route, protocol: int = ROUTE_PROTOCOL) -> None:
        """Install ``route`` in the main table with ``protocol`` (replace semantics).

        Forms: ``dst via X`` (the kernel picks the device of X's connected subnet),
        ``dst via X dev D onlink`` (X need not be on a connected subnet),
        ``dst dev D`` and ``blackhole dst``. Like ``ip route replace``, this replaces a
        route to the same dst and metric whatever its protocol. NotFound for a
        missing device; Unavailable when the next hop is unreachable or the device
        is down (ENETUNREACH, ENETDOWN).
        """
        spec, version = self._route_base(route, protocol)
        via = self._route_via(route, version)
        if route.dev is not None:
            _check_ifname(route.dev)
        if route.blackhole:
            if via or route.dev or route.onlink:
                raise InvalidRequest(f"blackhole route {route.dst} takes no next hop or device")
            spec["type"] = "blackhole"
            spec["scope"] = RT_SCOPE_UNIVERSE
        elif via is None and route.dev is None:
            raise InvalidRequest(f"route {route.dst} needs a next hop, a device or blackhole")
        elif route.onlink and (via is None or route.dev is None):
            # The kernel refuses onlink without a device ("Nexthop device required").
            raise InvalidRequest(f"onlink route {route.dst} needs both a next hop and a device")
        else:
            spec["type"] = "unicast"
            # As ip(8) does: a device route of IPv4 is scope link, a gateway route global.
            spec["scope"] = RT_SCOPE_LINK if via is None and version == 4 else RT_SCOPE_UNIVERSE
            if via is not None:
                spec["gateway"] = via
            if route.onlink:
                spec["flags"] = RTNH_F_ONLINK
        with self._lock:
            try:
                if route.dev is not None:
                    spec["oif"] = self._require_index(route.dev)
                self._rtnl().route("replace", **spec)
            except NetlinkError as exc:
                raise _map_error(exc, f"installing route {route.dst} in {self._where()}") from exc

    def remove_route(self, route: Route, protocol: int = ROUTE_PROTOCOL) -> None:
        """Delete ``route`` if the kernel holds it with ``protocol``; gone is fine.

        The request always names the protocol (and the next hop, device and type
        when given), and the kernel deletes only a route matching all of them, so a
        route to the same dst from anyone else (proto static, BIRD) is never touched.
        """
        spec, version = self._route_base(route, protocol)
        via = self._route_via(route, version)
        if route.dev is not None:
            _check_ifname(route.dev)
        if version == 4:
            spec["scope"] = RT_SCOPE_NOWHERE
        if route.blackhole:
            spec["type"] = "blackhole"
        elif via is not None or route.dev is not None:
            spec["type"] = "unicast"
        if via is not None:
            spec["gateway"] = via
        with self._lock:
            try:
                if route.dev is not None:
                    index = self._index(route.dev)
                    if index is None:
                        return  # its device is gone, and the route with it
                    spec["oif"] = index
                self._rtnl().route("del", **spec)
            except NetlinkError as exc:
                if exc.code in _GONE:
                    return
                raise _map_error(exc, f"removing route {route.dst} in {self._where()}") from exc

    # -- tunnel devices ------------------------------------------------------------

    def _link_msg(self, index: int) -> Any:
        links = self._rtnl().get_links(index)
        if not links:
            raise NotFound(f"interface {index} vanished in {self._where()}")
        return links[0]

    def _create_link(self, kind: str, action: str, **spec: Any) -> None:
        try:
            self._rtnl().link("add", kind=kind, **spec)
        except NetlinkError as exc:
            # The kernel answers EOPNOTSUPP for a link kind it has no driver for
            # (iproute2 prints that as "Unknown device type").
            if exc.code == errno.EOPNOTSUPP:
                raise KernelFeatureMissing(
                    f"this kernel has no {kind} tunnel support ({action} in "
                    f"{self._where()}: {os.strerror(exc.code)})"
                ) from exc
            raise

    def _set_link(self, index: int, msg: Any, mtu: int | None, mac: str | None) -> None:
        """Fix MTU and MAC in place if they differ, then bring the link up."""
        changes: dict[str, Any] = {}
        if mtu is not None and msg.get_attr("IFLA_MTU") != mtu:
            changes["mtu"] = mtu
        if mac is not None and str(msg.get_attr("IFLA_ADDRESS") or "").lower() != mac:
            changes["address"] = mac
        ipr = self._rtnl()
        if changes:
            ipr.link("set", index=index, **changes)
        if not msg["flags"] & IFF_UP:
            ipr.link("set", index=index, state="up")

    def ensure_vxlan(
        self,
        ifname: str,
        vni: int,
        port: int,
        local: str,
        mac: str,
        parent: str | None = None,
        mtu: int | None = None,
    ) -> None:
        """Make ``ifname`` a VXLAN device with these settings, up. Idempotent.

        Learning is off (the agent writes every FDB and neighbour entry). MTU, MAC
        and learning are fixed in place; a device of that name with another VNI,
        port, local address or parent (or not a VXLAN at all) is deleted and created
        again, which drops its routes, neighbours and FDB entries. Without ``mtu``
        the kernel's default applies (parent's MTU minus 50, or 70 over IPv6).
        NotFound when ``parent`` is missing.
        """
        _check_ifname(ifname)
        if parent is not None:
            _check_ifname(parent)
        if isinstance(vni, bool) or not isinstance(vni, int) or not 0 < vni <= VXLAN_MAX_VNI:
            raise InvalidRequest(f"VNI {vni!r} is outside 1..{VXLAN_MAX_VNI}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidRequest(f"UDP port {port!r} is outside 1..65535")
        local_ip = _ip_address(local, "VXLAN local address")
        mac = _check_mac(mac)
        _check_mtu(mtu)
        action = f"creating VXLAN device {ifname}"
        with self._lock:
            try:
                parent_index = self._require_index(parent) if parent is not None else 0
                index = self._index(ifname)
                if index is not None:
                    msg = self._link_msg(index)
                    info = msg.get_attr("IFLA_LINKINFO")
                    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                    data = info.get_attr("IFLA_INFO_DATA") if kind == "vxlan" else None
                    if data is None or (
                        data.get_attr("IFLA_VXLAN_ID"),
                        data.get_attr("IFLA_VXLAN_PORT"),
                        data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6"),
                        data.get_attr("IFLA_VXLAN_LINK") or 0,
                    ) != (vni, port, str(local_ip), parent_index):
                        # VNI and port cannot be changed on a live device: recreate.
                        self._delete_link_locked(ifname)
                        index = None
                    elif data.get_attr("IFLA_VXLAN_LEARNING"):
                        self._rtnl().link("set", index=index, kind="vxlan", vxlan_learning=0)
                if index is None:
                    spec: dict[str, Any] = {
                        "ifname": ifname,
                        "vxlan_id": vni,
                        "vxlan_port": port,
                        "vxlan_learning": 0,
                        "address": mac,
                    }
                    spec["vxlan_local" if local_ip.version == 4 else "vxlan_local6"] = str(
                        local_ip
                    )
                    if parent_index:
                        spec["vxlan_link"] = parent_index
                    if mtu is not None:
                        spec["mtu"] = mtu
                    self._create_link("vxlan", action, **spec)
                    index = self._require_index(ifname)
                self._set_link(index, self._link_msg(index), mtu, mac)
            except NetlinkError as exc:
                raise _map_error(exc, f"{action} in {self._where()}") from exc

    def ensure_ipip(self, ifname: str = "tunl0", mtu: int | None = None) -> None:
        """Make sure the IP-in-IP device exists and is up (MTU fixed in place).

        ``tunl0`` is the ipip module's fallback device (it receives every IP-in-IP
        packet that no configured tunnel matches), so it usually exists already;
        otherwise it is created. A kernel without ipip raises KernelFeatureMissing;
        another kind of device with that name is a Conflict.
        """
        _check_ifname(ifname)
        _check_mtu(mtu)
        with self._lock:
            try:
                index = self._index(ifname)
                if index is None:
                    spec: dict[str, Any] = {"ifname": ifname}
                    if mtu is not None:
                        spec["mtu"] = mtu
                    self._create_link("ipip", f"creating {ifname}", **spec)
                    index = self._require_index(ifname)
                msg = self._link_msg(index)
                info = msg.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if kind != "ipip":
                    raise Conflict(
                        f"interface {ifname} in {self._where()} is a {kind}, not an ipip tunnel"
                    )
                self._set_link(index, msg, mtu, None)
            except NetlinkError as exc:
                raise _map_error(exc, f"setting up {ifname} in {self._where()}") from exc

    # -- addresses -----------------------------------------------------------------

    def set_addresses(self, ifname: str, addresses: list[str]) -> None:
        """Make the interface's addresses exactly ``addresses`` (interface form).

        "10.244.0.1/32" or "fd00::1/64"; a bare address is full length. IPv6
        link-local addresses are left alone; IPv6 addresses are added without DAD
        (nodad: a tunnel address is not shared with anyone). Idempotent.
        """
        _check_ifname(ifname)
        wanted: dict[Address, Interface] = {}
        for value in addresses:
            try:
                interface = ipaddress.ip_interface(value)
            except (TypeError, ValueError) as exc:
                raise InvalidRequest(f"{value!r} is not an interface address") from exc
            if wanted.get(interface.ip, interface) != interface:
                raise InvalidRequest(f"{interface.ip} is given twice with different prefixes")
            wanted[interface.ip] = interface
        with self._lock:
            try:
                index = self._require_index(ifname)
                self._converge_interfaces(index, list(wanted.values()), IFA_F_NODAD)
            except NetlinkError as exc:
                raise _map_error(
                    exc, f"setting the addresses of {ifname} in {self._where()}"
                ) from exc

    def list_addresses(self) -> list[InterfaceAddress]:
        """Every address of every interface (IPv6 link-local left out), by interface
        index, for node-address autodetection."""
        with self._lock:
            try:
                ipr = self._rtnl()
                links: dict[int, tuple[str, bool, str | None]] = {}
                for link in ipr.get_links():
                    info = link.get_attr("IFLA_LINKINFO")
                    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                    links[int(link["index"])] = (
                        link.get_attr("IFLA_IFNAME"),
                        bool(link["flags"] & IFF_UP),
                        kind,
                    )
                found: list[tuple[int, InterfaceAddress]] = []
                for msg in ipr.get_addr():
                    address = ipaddress.ip_address(_addr_local(msg))
                    link_info = links.get(int(msg["index"]))
                    if link_info is None or (address.version == 6 and address.is_link_local):
                        continue
                    name, up, kind = link_info
                    found.append(
                        (
                            int(msg["index"]),
                            InterfaceAddress(name, f"{address}/{msg['prefixlen']}", up, kind),
                        )
                    )
                return [entry for _, entry in sorted(found, key=lambda item: item[0])]
            except NetlinkError as exc:
                raise _map_error(exc, f"listing addresses in {self._where()}") from exc

    # -- neighbours and FDB ----------------------------------------------------------

    def list_neighbours(self, ifname: str) -> dict[str, str]:
        """Permanent neighbour entries (IPv4 and IPv6) on ``ifname``: {ip: mac}."""
        _check_ifname(ifname)
        with self._lock:
            try:
                index = self._require_index(ifname)
                found: dict[str, str] = {}
                for family in (socket.AF_INET, socket.AF_INET6):
                    for msg in self._rtnl().get_neighbours(family=family, ifindex=index):
                        dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
                        if (
                            msg["ifindex"] == index
                            and msg["state"] & NUD_PERMANENT
                            and dst
                            and mac
                        ):
                            found[str(ipaddress.ip_address(dst))] = str(mac).lower()
                return found
            except NetlinkError as exc:
                raise _map_error(
                    exc, f"listing the neighbours of {ifname} in {self._where()}"
                ) from exc

    def replace_neighbour(self, ifname: str, ip: str, mac: str) -> None:
        """A permanent neighbour entry ip -> mac on ``ifname`` (replaces any other)."""
        _check_ifname(ifname)
        address = _ip_address(ip, "neighbour")
        mac = _check_mac(mac)
        with self._lock:
            try:
                self._rtnl().neigh(
                    "replace",
                    ifindex=self._require_index(ifname),
                    dst=str(address),
                    lladdr=mac,
                    state=NUD_PERMANENT,
                    family=_family(address.version),
                )
            except NetlinkError as exc:
                raise _map_error(
                    exc, f"adding neighbour {address} on {ifname} in {self._where()}"
                ) from exc

    def delete_neighbour(self, ifname: str, ip: str) -> None:
        """Delete the neighbour entry for ``ip`` on ``ifname``; gone is fine."""
        _check_ifname(ifname)
        address = _ip_address(ip, "neighbour")
        with self._lock:
            try:
                index = self._index(ifname)
                if index is None:
                    return
                self._rtnl().neigh(
                    "del", ifindex=index, dst=str(address), family=_family(address.version)
                )
            except NetlinkError as exc:
                if exc.code in _GONE:
                    return
                raise _map_error(
                    exc, f"deleting neighbour {address} on {ifname} in {self._where()}"
                ) from exc

    def list_fdb(self, ifname: str) -> dict[str, str]:
        """FDB entries of a VXLAN device that send to a remote VTEP: {mac: dst ip}.

        Entries without a destination (the multicast MACs the kernel adds to every
        device's own FDB) are left out.
        """
        _check_ifname(ifname)
        with self._lock:
            try:
                index = self._require_index(ifname)
                found: dict[str, str] = {}
                for msg in self._rtnl().fdb("dump", ifindex=index):
                    dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
                    if msg["ifindex"] == index and dst and mac:
                        found[str(mac).lower()] = str(ipaddress.ip_address(dst))
                return found
            except NetlinkError as exc:
                raise _map_error(exc, f"listing the FDB of {ifname} in {self._where()}") from exc

    def replace_fdb(self, ifname: str, mac: str, dst: str) -> None:
        """A permanent FDB entry mac -> dst on the VXLAN device (replaces its dst)."""
        _check_ifname(ifname)
        mac = _check_mac(mac)
        address = _ip_address(dst, "FDB destination")
        with self._lock:
            try:
                # pyroute2's fdb() fills in state and NTF_SELF only for add/append/del:
                # without NTF_SELF a replace goes to a (missing) bridge master and
                # fails with EOPNOTSUPP. Spell both out.
                self._rtnl().fdb(
                    "replace",
                    ifindex=self._require_index(ifname),
                    lladdr=mac,
                    dst=str(address),
                    state=NUD_PERMANENT,
                    flags=NTF_SELF,
                )
            except NetlinkError as exc:
                raise _map_error(
                    exc, f"adding FDB entry {mac} on {ifname} in {self._where()}"
                ) from exc

    def delete_fdb(self, ifname: str, mac: str, dst: str) -> None:
        """Delete the FDB entry mac -> dst; gone (or pointing elsewhere) is fine."""
        _check_ifname(ifname)
        mac = _check_mac(mac)
        address = _ip_address(dst, "FDB destination")
        with self._lock:
            try:
                index = self._index(ifname)
                if index is None:
                    return
                self._rtnl().fdb(
                    "del",
                    ifindex=index,
                    lladdr=mac,
                    dst=str(address),
                    state=NUD_PERMANENT,
                    flags=NTF_SELF,
                )
            except NetlinkError as exc:
                if exc.code in _GONE:
                    return
                raise _map_error(
                    exc, f"deleting FDB entry {mac} on {ifname} in {self._where()}"
                ) from exc

    # -- link facts ----------------------------------------------------------------

    def link_mtu(self, ifname: str) -> int:
        """The interface's MTU; NotFound if it does not exist."""
        _check_ifname(ifname)
        with self._lock:
            try:
                return int(self._link_msg(self._require_index(ifname)).get_attr("IFLA_MTU"))
            except NetlinkError as exc:
                raise _map_error(exc, f"reading the MTU of {ifname}") from exc

    def link_stats(self, ifname: str) -> dict[str, int]:
        """The interface's counters (rx_packets, tx_packets, rx_bytes, tx_bytes, ...)."""
        _check_ifname(ifname)
        with self._lock:
            try:
                msg = self._link_msg(self._require_index(ifname))
            except NetlinkError as exc:
                raise _map_error(exc, f"reading the counters of {ifname}") from exc
        stats = msg.get_attr("IFLA_STATS64") or msg.get_attr("IFLA_STATS") or {}
        return {key: int(value) for key, value in dict(stats).items() if isinstance(value, int)}

    def source_address(self, destination: str) -> str | None:
        """The source address the kernel would pick to reach ``destination``
        (``ip route get``), or None when there is no route (or a blackhole)."""
        address = _ip_address(destination, "destination")
        with self._lock:
            try:
                answers = self._rtnl().route(
                    "get", dst=str(address), family=_family(address.version)
                )
            except NetlinkError as exc:
                if exc.code in _NO_ROUTE:
                    return None
                raise _map_error(exc, f"looking up the route to {address}") from exc
        for msg in answers:
            source = msg.get_attr("RTA_PREFSRC")
            if source:
                return str(ipaddress.ip_address(source))
        return None

    # -- global settings -----------------------------------------------------------

    def enable_forwarding(self) -> None:
        """net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1 in this namespace.

        Caution on a real host: with IPv6 forwarding on, interfaces with accept_ra=1
        stop accepting Router Advertisements (a SLAAC-configured uplink then needs
        accept_ra=2).
        """

        def write() -> None:
            _write_proc_sys(self._proc_sys, [("net/ipv4/ip_forward", "1")])
            if os.path.isdir(f"{self._proc_sys}/net/ipv6/conf/all"):
                _write_proc_sys(self._proc_sys, [("net/ipv6/conf/all/forwarding", "1")])

        with self._lock:
            try:
                self._in_netns(write)
            except OSError as exc:
                raise _map_error(exc, f"enabling forwarding in {self._where()}") from exc

    def global_rp_filter(self) -> int:
        """net.ipv4.conf.all.rp_filter in this namespace.

        The kernel applies max(all, interface), so 2 (loose) here silently turns the
        host ends' strict check into a loose one and lets workloads spoof any routed
        source address. Callers should refuse to run (or warn loudly) when this is 2.
        """
        with self._lock:
            try:
                return int(self._in_netns(lambda: _read_proc_sys(
                    self._proc_sys, "net/ipv4/conf/all/rp_filter")))
            except OSError as exc:
                raise _map_error(exc, f"reading rp_filter in {self._where()}") from exc

    # -- namespace plumbing --------------------------------------------------------

    def _in_netns(self, func: Callable[[], _T]) -> _T:
        """Run ``func`` with this object's network namespace as the current one.

        /proc/sys/net resolves against the calling thread's namespace, and setns()
        changes only the calling thread: a throwaway thread enters the namespace, runs
        ``func`` (a whole batch of reads/writes) and ends.
        """
        if self._nsfd is None:
            return func()
        nsfd = self._nsfd
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                libc = _libc()
                if libc.setns(nsfd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns into {self._netns}: {os.strerror(code)}")
                outcome["value"] = func()
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self._netns}", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
