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
    NotFound,
    Unavailable,
)

__all__ = ["Netlink", "Route", "ROUTE_PROTOCOL"]

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

_T = TypeVar("_T")

IFNAMSIZ = 16  # the kernel's limit includes the trailing NUL: 15 usable characters
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NETNS_RUN_DIR = "/run/netns"

RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RTN_UNICAST = 1
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete request: "any scope" (0 would match only universe)
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000

MIN_MTU = 68
MAX_MTU = 65535
IPV6_MIN_MTU = 1280

_GONE = frozenset({errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL})

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def _write_proc_sys(items: Iterable[tuple[str, str]]) -> None:
    for key, value in items:
        with open(f"/proc/sys/{key}", "w") as handle:
            handle.write(value)


def _read_proc_sys(key: str) -> str:
    with open(f"/proc/sys/{key}") as handle:
        return handle.read().strip()


class Netlink:
    """Netlink and sysctl operations in one network namespace.

    ``netns`` names a namespace under /run/netns (as ``ip netns`` creates them);
    ``None`` means the namespace this process runs in. Use it as a context manager or
    call :meth:`close`. Calls are serialised by a lock, so one instance may be shared
    by threads.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
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
            _write_proc_sys(v4)
            # The IPv6 conf directory appears with the link, but only if IPv6 is
            # enabled in the kernel and the link's MTU is at least 1280.
            if os.path.isdir(f"/proc/sys/net/ipv6/conf/{ifname}"):
                _write_proc_sys(v6_first + v6)
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
        ipr = self._rtnl()
        present: dict[Address, int] = {}
        for msg in ipr.get_addr(index=index):
            address = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if address.version == 6 and address.is_link_local:
                continue
            present[address] = int(msg["prefixlen"])
        for address, prefixlen in present.items():
            if address not in wanted or prefixlen != address.max_prefixlen:
                try:
                    ipr.addr("del", index=index, address=str(address), prefixlen=prefixlen)
                except NetlinkError as exc:
                    if exc.code not in _GONE:
                        raise
        for address in wanted:
            if present.get(address) == address.max_prefixlen:
                continue
            spec: dict[str, Any] = {
                "index": index,
                "address": str(address),
                "prefixlen": address.max_prefixlen,
            }
            if address.version == 6:
                spec["flags"] = IFA_F_NODAD | IFA_F_NOPREFIXROUTE
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

    # -- global settings -----------------------------------------------------------

    def enable_forwarding(self) -> None:
        """net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1 in this namespace.

        Caution on a real host: with IPv6 forwarding on, interfaces with accept_ra=1
        stop accepting Router Advertisements (a SLAAC-configured uplink then needs
        accept_ra=2).
        """

        def write() -> None:
            _write_proc_sys([("net/ipv4/ip_forward", "1")])
            if os.path.isdir("/proc/sys/net/ipv6/conf/all"):
                _write_proc_sys([("net/ipv6/conf/all/forwarding", "1")])

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
                return int(self._in_netns(lambda: _read_proc_sys("net/ipv4/conf/all/rp_filter")))
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
