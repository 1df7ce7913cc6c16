"""A stateful stand-in for dataplane.netlink.Netlink: holds links, routes, addresses,
neighbours and FDB entries like the kernel would, so unit tests assert on the
resulting state (never on call sequences).

tests/functional/test_netlink_contract.py runs one suite against both this fake and
the real kernel. Where the fake is knowingly simpler than the kernel, the method says
so. Its state, for tests to read (and, with care, to set up):

* ``kernel.links``: name -> :class:`FakeLink` (kind, MTU, MAC, up flag, addresses,
  VXLAN settings, neighbours, FDB, counters). A veth's container end is not a link of
  its own here: Docker moves it out of the host namespace at once.
* ``kernel.table``: the main routing table, (dst CIDR, metric) -> :class:`FakeRoute`
  (a :class:`Route` plus its protocol). As in the kernel, a route is keyed by its
  destination and metric, not by its protocol.
* ``kernel.routes``: a live view of the table's host routes that ``add_route`` makes
  (proto static, /32 or /128, through a device) as {bare address: ifname}; writing
  or clearing it changes the table.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field

from dataplane.netlink import ROUTE_PROTOCOL, InterfaceAddress, Route
from datastore.errors import (
    Conflict,
    InvalidRequest,
    KernelFeatureMissing,
    NotFound,
    Unavailable,
)

RTPROT_KERNEL = 2
RTPROT_STATIC = 4  # what add_route (like ``ip route add``) writes
DEFAULT_MTU = 1500
IPIP_DEFAULT_MTU = 1480
VXLAN_OVERHEAD = {4: 50, 6: 70}

_macs = itertools.count(1)


def _next_mac() -> str:
    """A locally administered unicast MAC, distinct for every fake link."""
    return "02:fa:" + ":".join(f"{b:02x}" for b in next(_macs).to_bytes(4, "big"))


def _zero_stats() -> dict[str, int]:
    return {"rx_packets": 0, "tx_packets": 0, "rx_bytes": 0, "tx_bytes": 0}


@dataclass
class FakeVxlan:
    vni: int
    port: int
    local: str
    parent: str | None = None
    learning: bool = False


@dataclass
class FakeLink:
    name: str
    peer: str | None = None
    mtu: int | None = DEFAULT_MTU
    up: bool = False
    # Interface form ("10.0.0.5/24"); a bare address (as configure_host_end stores the
    # gateways) means a full-length one (/32, /128).
    addresses: list[str] = field(default_factory=list)
    kind: str | None = "veth"
    mac: str = field(default_factory=_next_mac)
    vxlan: FakeVxlan | None = None
    neighbours: dict[str, str] = field(default_factory=dict)  # ip -> mac (permanent)
    fdb: dict[str, str] = field(default_factory=dict)  # mac -> remote VTEP ip
    stats: dict[str, int] = field(default_factory=_zero_stats)

    def interfaces(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        return [ipaddress.ip_interface(address) for address in self.addresses]


@dataclass(frozen=True)
class FakeRoute:
    route: Route
    protocol: int


class _HostRoutes(MutableMapping[str, str]):
    """``kernel.routes``: the proto-static host routes of the table, by bare address."""

    def __init__(self, kernel: FakeKernel) -> None:
        self._kernel = kernel

    def _entries(self) -> dict[str, tuple[tuple[str, int], str]]:
        found: dict[str, tuple[tuple[str, int], str]] = {}
        for key, entry in self._kernel.table.items():
            route, net = entry.route, ipaddress.ip_network(entry.route.dst)
            if (entry.protocol == RTPROT_STATIC and net.prefixlen == net.max_prefixlen
                    and route.dev and not route.via and not route.blackhole):
                found[str(net.network_address)] = (key, route.dev)
        return found

    def __getitem__(self, address: str) -> str:
        return self._entries()[address][1]

    def __setitem__(self, address: str, ifname: str) -> None:
        host = ipaddress.ip_address(address)
        dst = f"{host}/{host.max_prefixlen}"
        self._kernel.table[(dst, 0)] = FakeRoute(Route(dst, dev=ifname), RTPROT_STATIC)

    def __delitem__(self, address: str) -> None:
        key, _ = self._entries()[address]
        del self._kernel.table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __repr__(self) -> str:
        return repr({address: dev for address, (_, dev) in self._entries().items()})


class FakeKernel:
    """Shared kernel state; every FakeNetlink opened on it sees the same links.

    ``missing_kinds`` names link kinds this "kernel" has no driver for (e.g.
    ``{"ipip"}``, as on the VM kernel of DESIGN.md section 6): creating one raises
    KernelFeatureMissing like the real wrapper does.
    """

    def __init__(self, missing_kinds: Iterable[str] = ()) -> None:
        self.links: dict[str, FakeLink] = {}
        self.table: dict[tuple[str, int], FakeRoute] = {}
        self.forwarding = False
        self.missing_kinds = frozenset(missing_kinds)

    @property
    def routes(self) -> _HostRoutes:
        return _HostRoutes(self)

    def netlink(self) -> FakeNetlink:
        return FakeNetlink(self)

    # -- test helpers: state the plugin never creates itself ---------------------------

    def add_link(self, name: str, kind: str | None = "veth", mtu: int = DEFAULT_MTU,
                 mac: str | None = None, up: bool = True, addresses: Iterable[str] = ()
                 ) -> FakeLink:
        """An interface the host already has (an uplink): addresses in interface form."""
        link = FakeLink(name, mtu=mtu, up=up, kind=kind,
                        addresses=[str(ipaddress.ip_interface(a)) for a in addresses])
        if mac is not None:
            link.mac = mac.lower()
        self.links[name] = link
        return link

    def install_route(self, route: Route, protocol: int, metric: int = 0) -> None:
        """A route someone else wrote (``ip route add ... proto static``, BIRD)."""
        dst = str(ipaddress.ip_network(route.dst))
        key = (dst, metric)
        if key in self.table:
            raise Conflict(f"route {dst} metric {metric} exists")
        self.table[key] = FakeRoute(Route(dst, route.via, route.dev, route.onlink,
                                          route.blackhole), protocol)

    # -- kernel behaviour ------------------------------------------------------------

    def remove_link(self, name: str) -> None:
        """Unregister a link: its routes, neighbours and FDB go with it, and so do
        the VXLAN devices whose parent it is (the kernel deletes those too)."""
        if self.links.pop(name, None) is None:
            return
        for key in [k for k, e in self.table.items() if e.route.dev == name]:
            del self.table[key]
        for child in [n for n, link in self.links.items()
                      if link.vxlan is not None and link.vxlan.parent == name]:
            self.remove_link(child)

    def connected(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                  dev: str | None = None) -> tuple[str, str] | None:
        """(link, own address) of the up link whose subnet holds ``address`` (longest
        prefix first), as the kernel's connected routes would resolve it."""
        best: tuple[int, str, str] | None = None
        for link in self.links.values():
            if not link.up or (dev is not None and link.name != dev):
                continue
            for interface in link.interfaces():
                if (interface.version == address.version and address in interface.network
                        and (best is None or interface.network.prefixlen > best[0])):
                    best = (interface.network.prefixlen, link.name, str(interface.ip))
        return (best[1], best[2]) if best else None


def _ip(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{what} {value!r} is not an IP address") from exc


def _network(dst: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(dst, strict=True)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"route destination {dst!r} is not a CIDR") from exc


def _mac(mac: str) -> str:
    value = mac.lower() if isinstance(mac, str) else ""
    parts = value.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p)
                                  for p in parts):
        raise InvalidRequest(f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return value


def _ifname(ifname: str) -> str:
    if not isinstance(ifname, str) or not ifname or len(ifname) > 15:
        raise InvalidRequest(f"bad interface name {ifname!r}")
    return ifname


def _route_key(route: Route) -> tuple:
    net = ipaddress.ip_network(route.dst)
    return (net.version, net, route.via or "", route.dev or "", route.onlink, route.blackhole)


def _link_local(address: str) -> bool:
    interface = ipaddress.ip_interface(address)
    return interface.version == 6 and interface.is_link_local


def _full_length(address: str) -> str:
    """A stored address in interface form (a bare one is full length)."""
    return str(ipaddress.ip_interface(address))


class FakeNetlink:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    def __enter__(self) -> FakeNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def _link(self, ifname: str) -> FakeLink:
        link = self.kernel.links.get(_ifname(ifname))
        if link is None:
            raise NotFound(f"interface {ifname} does not exist")
        return link

    # -- endpoints (the driver's operations) -------------------------------------------

    def create_veth(self, host_ifname: str, container_ifname: str, mtu: int | None = None
                    ) -> None:
        if len(host_ifname) > 15 or len(container_ifname) > 15:
            raise ValueError("interface name too long")
        self.delete_link(host_ifname)
        self.kernel.links[host_ifname] = FakeLink(
            host_ifname, container_ifname, mtu if mtu is not None else DEFAULT_MTU)

    def configure_host_end(self, host_ifname: str, gateways: list[str]) -> None:
        """Up, and exactly the gateways as (bare, full-length) addresses, like the
        real one; IPv6 link-local addresses stay."""
        link = self._link(host_ifname)
        link.up = True
        wanted = list(dict.fromkeys(str(ipaddress.ip_interface(g).ip) for g in gateways))
        kept = [a for a in link.addresses if _link_local(a)]
        link.addresses = kept + wanted

    def add_route(self, address: str, ifname: str) -> None:
        """A proto-static host route (replace semantics). Unlike the kernel, a link
        that is down is accepted (tests add routes to unconfigured veths)."""
        self._link(ifname)
        self.kernel.routes[str(ipaddress.ip_address(address))] = ifname

    def delete_route(self, address: str, ifname: str | None = None) -> None:
        """The kernel deletes the first route to that host address, whatever its
        protocol (optionally only through ``ifname``); gone is fine."""
        host = ipaddress.ip_address(address)
        dst = f"{host}/{host.max_prefixlen}"
        for key in sorted(k for k, e in self.kernel.table.items()
                          if k[0] == dst and (ifname is None or e.route.dev == ifname)):
            del self.kernel.table[key]
            return

    def delete_link(self, ifname: str) -> None:
        self.kernel.remove_link(ifname)

    def link_exists(self, ifname: str) -> bool:
        return ifname in self.kernel.links

    def list_links(self, prefix: str = "cali") -> list[str]:
        return sorted(n for n in self.kernel.links if n.startswith(prefix))

    def list_host_routes(self, prefix: str = "cali") -> dict[str, str]:
        found: dict[str, str] = {}
        for entry in self.kernel.table.values():
            route, net = entry.route, ipaddress.ip_network(entry.route.dst)
            if (net.prefixlen == net.max_prefixlen and not route.blackhole
                    and entry.protocol != RTPROT_KERNEL
                    and route.dev and route.dev.startswith(prefix)):
                found[str(net.network_address)] = route.dev
        return found

    def enable_forwarding(self) -> None:
        self.kernel.forwarding = True

    def global_rp_filter(self) -> int:
        return 1

    # -- agent routes ------------------------------------------------------------

    def list_routes(self, protocol: int = ROUTE_PROTOCOL) -> list[Route]:
        return sorted((e.route for e in self.kernel.table.values() if e.protocol == protocol),
                      key=_route_key)

    def _checked_route(self, route: Route) -> tuple[ipaddress.IPv4Network
                                                    | ipaddress.IPv6Network, str | None]:
        net = _network(route.dst)
        via = None
        if route.via is not None:
            address = _ip(route.via, "next hop")
            if address.version != net.version:
                raise InvalidRequest(f"next hop {address} is not of the family of {route.dst}")
            via = str(address)
        if route.dev is not None:
            _ifname(route.dev)
        return net, via

    def replace_route(self, route: Route, protocol: int = ROUTE_PROTOCOL) -> None:
        """Replace the route to (dst, metric 0), whatever its protocol, like the kernel.

        ``via`` without ``dev`` is resolved to the up link whose connected subnet holds
        the next hop. Simpler than the kernel: when no link's address covers it, the
        route is stored with ``dev=None`` (the kernel would refuse: ENETUNREACH), and a
        ``via`` with ``dev`` but without onlink is not checked against the device's
        subnets. A device that is down is refused, as in the kernel (ENETDOWN).
        """
        net, via = self._checked_route(route)
        dev = route.dev
        if route.blackhole:
            if via or dev or route.onlink:
                raise InvalidRequest(f"blackhole route {route.dst} takes no next hop or device")
        elif via is None and dev is None:
            raise InvalidRequest(f"route {route.dst} needs a next hop, a device or blackhole")
        elif route.onlink and (via is None or dev is None):
            raise InvalidRequest(f"onlink route {route.dst} needs both a next hop and a device")
        if dev is not None and not self._link(dev).up:
            raise Unavailable(f"installing route {route.dst}: device {dev} is down")
        if via is not None and dev is None:
            found = self.kernel.connected(ipaddress.ip_address(via))
            dev = found[0] if found else None
        stored = Route(str(net), via, dev, bool(route.onlink), bool(route.blackhole))
        self.kernel.table[(str(net), 0)] = FakeRoute(stored, protocol)

    def remove_route(self, route: Route, protocol: int = ROUTE_PROTOCOL) -> None:
        """Delete the first route to dst with ``protocol`` that matches the given
        next hop, device and type; gone is fine. Never another protocol's route."""
        net, via = self._checked_route(route)
        for key in sorted(k for k in self.kernel.table if k[0] == str(net)):
            entry = self.kernel.table[key]
            held = entry.route
            # Like the kernel's delete: the type is matched only when it is implied
            # (blackhole, or a next hop / device given); a bare Route(dst) takes any.
            if route.blackhole:
                type_ok = held.blackhole
            else:
                type_ok = not held.blackhole or (via is None and route.dev is None)
            if (entry.protocol == protocol and type_ok
                    and (via is None or held.via == via)
                    and (route.dev is None or held.dev == route.dev)):
                del self.kernel.table[key]
                return

    # -- tunnel devices ------------------------------------------------------------

    def _missing(self, kind: str, ifname: str) -> None:
        if kind in self.kernel.missing_kinds:
            raise KernelFeatureMissing(
                f"this kernel has no {kind} tunnel support (creating {ifname}: "
                "Operation not supported)")

    def ensure_vxlan(self, ifname: str, vni: int, port: int, local: str, mac: str,
                     parent: str | None = None, mtu: int | None = None) -> None:
        """As the real one: recreate on another VNI/port/local/parent (dropping its
        routes, neighbours and FDB), fix MTU/MAC/learning in place, bring it up."""
        _ifname(ifname)
        if isinstance(vni, bool) or not isinstance(vni, int) or not 0 < vni < 1 << 24:
            raise InvalidRequest(f"VNI {vni!r} is outside 1..{(1 << 24) - 1}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidRequest(f"UDP port {port!r} is outside 1..65535")
        local_ip = _ip(local, "VXLAN local address")
        mac = _mac(mac)
        parent_link = self._link(parent) if parent is not None else None
        wanted = FakeVxlan(vni, port, str(local_ip), parent, learning=False)
        link = self.kernel.links.get(ifname)
        if link is not None and (link.kind != "vxlan" or link.vxlan is None or (
                link.vxlan.vni, link.vxlan.port, link.vxlan.local, link.vxlan.parent)
                != (vni, port, str(local_ip), parent)):
            self.kernel.remove_link(ifname)
            link = None
        if link is None:
            self._missing("vxlan", ifname)
            default = (parent_link.mtu or DEFAULT_MTU) - VXLAN_OVERHEAD[local_ip.version] \
                if parent_link is not None else DEFAULT_MTU
            link = FakeLink(ifname, mtu=mtu if mtu is not None else default, kind="vxlan",
                            mac=mac, vxlan=wanted)
            self.kernel.links[ifname] = link
        link.vxlan = wanted
        link.mac = mac
        if mtu is not None:
            link.mtu = mtu
        link.up = True

    def ensure_ipip(self, ifname: str = "tunl0", mtu: int | None = None) -> None:
        link = self.kernel.links.get(_ifname(ifname))
        if link is None:
            self._missing("ipip", ifname)
            link = FakeLink(ifname, mtu=IPIP_DEFAULT_MTU, kind="ipip", mac="00:00:00:00:00:00")
            self.kernel.links[ifname] = link
        if link.kind != "ipip":
            raise Conflict(f"interface {ifname} is a {link.kind}, not an ipip tunnel")
        if mtu is not None:
            link.mtu = mtu
        link.up = True

    # -- addresses -----------------------------------------------------------------

    def set_addresses(self, ifname: str, addresses: list[str]) -> None:
        link = self._link(ifname)
        wanted: dict[str, str] = {}
        for value in addresses:
            try:
                interface = ipaddress.ip_interface(value)
            except (TypeError, ValueError) as exc:
                raise InvalidRequest(f"{value!r} is not an interface address") from exc
            if wanted.get(str(interface.ip), str(interface)) != str(interface):
                raise InvalidRequest(f"{interface.ip} is given twice with different prefixes")
            wanted[str(interface.ip)] = str(interface)
        kept = [a for a in link.addresses if _link_local(a)]
        link.addresses = kept + list(wanted.values())

    def list_addresses(self) -> list[InterfaceAddress]:
        return [
            InterfaceAddress(link.name, _full_length(address), link.up, link.kind)
            for link in self.kernel.links.values()
            for address in link.addresses
            if not _link_local(address)
        ]

    # -- neighbours and FDB ----------------------------------------------------------

    def list_neighbours(self, ifname: str) -> dict[str, str]:
        return dict(self._link(ifname).neighbours)

    def replace_neighbour(self, ifname: str, ip: str, mac: str) -> None:
        address, mac = _ip(ip, "neighbour"), _mac(mac)
        self._link(ifname).neighbours[str(address)] = mac

    def delete_neighbour(self, ifname: str, ip: str) -> None:
        link = self.kernel.links.get(_ifname(ifname))
        if link is not None:
            link.neighbours.pop(str(_ip(ip, "neighbour")), None)

    def list_fdb(self, ifname: str) -> dict[str, str]:
        return dict(self._link(ifname).fdb)

    def replace_fdb(self, ifname: str, mac: str, dst: str) -> None:
        mac, address = _mac(mac), _ip(dst, "FDB destination")
        self._link(ifname).fdb[mac] = str(address)

    def delete_fdb(self, ifname: str, mac: str, dst: str) -> None:
        """Deletes mac -> dst only: an entry for that MAC to another dst stays."""
        link = self.kernel.links.get(_ifname(ifname))
        mac, address = _mac(mac), str(_ip(dst, "FDB destination"))
        if link is not None and link.fdb.get(mac) == address:
            del link.fdb[mac]

    # -- link facts ----------------------------------------------------------------

    def link_mtu(self, ifname: str) -> int:
        return self._link(ifname).mtu or DEFAULT_MTU

    def link_stats(self, ifname: str) -> dict[str, int]:
        return dict(self._link(ifname).stats)

    def source_address(self, destination: str) -> str | None:
        """Simpler than the kernel: an own address answers itself; then the longest
        of connected subnets and routes wins; a route's source is the address on the
        subnet of its next hop (or the first address of its device's family)."""
        dest = _ip(destination, "destination")
        for link in self.kernel.links.values():
            for interface in link.interfaces():
                if interface.ip == dest:
                    return str(dest)
        connected = self.kernel.connected(dest)
        best: tuple[int, Route] | None = None
        for entry in self.kernel.table.values():
            net = ipaddress.ip_network(entry.route.dst)
            if net.version == dest.version and dest in net and (
                    best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, entry.route)
        if connected is not None:
            prefix = max(i.network.prefixlen for i in self.kernel.links[connected[0]].interfaces()
                         if i.version == dest.version and dest in i.network)
            if best is None or prefix >= best[0]:
                return connected[1]
        if best is None or best[1].blackhole:
            return None
        route = best[1]
        if route.via is not None:
            found = self.kernel.connected(ipaddress.ip_address(route.via), route.dev)
            if found is not None:
                return found[1]
        link = self.kernel.links.get(route.dev or "")
        if link is not None:
            for interface in link.interfaces():
                if interface.version == dest.version and not interface.ip.is_link_local:
                    return str(interface.ip)
        return None
