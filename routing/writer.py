"""The route writer: makes the kernel hold exactly a :class:`RoutePlan`.

It owns the routes that carry :data:`ROUTE_PROTOCOL`, the VXLAN device with its
neighbour and FDB entries, and the addresses of the tunnel devices; it never touches
another route. Each item is written on its own, so one failure (a kernel without
IP-in-IP, a vanished uplink) is reported and the rest is still programmed.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Protocol

from dataplane.netlink import InterfaceAddress, Route
from datastore.errors import CalicoCnmError, KernelFeatureMissing
from routing.planner import VXLAN_DEVICE, RoutePlan

log = logging.getLogger(__name__)


class RoutingNetlink(Protocol):
    """The part of dataplane.netlink.Netlink the writer uses (the fake has it too)."""

    def list_routes(self) -> list[Route]: ...
    def replace_route(self, route: Route) -> None: ...
    def remove_route(self, route: Route) -> None: ...
    def ensure_vxlan(self, ifname: str, vni: int, port: int, local: str, mac: str,
                     parent: str | None = None, mtu: int | None = None) -> None: ...
    def ensure_ipip(self, ifname: str = "tunl0", mtu: int | None = None) -> None: ...
    def set_addresses(self, ifname: str, addresses: list[str]) -> None: ...
    def list_neighbours(self, ifname: str) -> dict[str, str]: ...
    def replace_neighbour(self, ifname: str, ip: str, mac: str) -> None: ...
    def delete_neighbour(self, ifname: str, ip: str) -> None: ...
    def list_fdb(self, ifname: str) -> dict[str, str]: ...
    def replace_fdb(self, ifname: str, mac: str, dst: str) -> None: ...
    def delete_fdb(self, ifname: str, mac: str, dst: str) -> None: ...
    def link_exists(self, ifname: str) -> bool: ...
    def delete_link(self, ifname: str) -> None: ...
    def list_addresses(self) -> list[InterfaceAddress]: ...


@dataclass
class WriteReport:
    added: list[Route] = field(default_factory=list)
    removed: list[Route] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tunnels: dict[str, str] = field(default_factory=dict)  # device -> "up" or the error

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def _normal(route: Route) -> Route:
    """The route with its addresses in one spelling, as the kernel reports them."""
    via = str(ipaddress.ip_address(route.via)) if route.via else None
    return Route(str(ipaddress.ip_network(route.dst)), via, route.dev, route.onlink,
                 route.blackhole)


def _matches(wanted: Route, actual: Route) -> bool:
    return (wanted.dst == actual.dst and wanted.via == actual.via
            and wanted.blackhole == actual.blackhole and wanted.onlink == actual.onlink
            and (wanted.dev is None or wanted.dev == actual.dev))


def write_plan(netlink: RoutingNetlink, plan: RoutePlan, uplink: str | None,
               uplink_mtu: int | None) -> WriteReport:
    report = WriteReport()
    broken_devices: set[str] = set()

    def attempt(what: str, action: object) -> bool:
        try:
            action()  # type: ignore[operator]
            return True
        except CalicoCnmError as exc:
            report.errors.append(f"{what}: {exc}")
            return False

    vxlan = plan.vxlan
    if vxlan is not None:
        mtu = uplink_mtu - vxlan.mtu_overhead if uplink_mtu else None
        ok = attempt(f"VXLAN device {vxlan.name}", lambda: netlink.ensure_vxlan(
            vxlan.name, vxlan.vni, vxlan.port, vxlan.local, vxlan.mac, parent=uplink or None,
            mtu=mtu))
        if ok:
            addresses = [f"{vxlan.address}/32"] if vxlan.address else []
            ok = attempt(f"address of {vxlan.name}",
                         lambda: netlink.set_addresses(vxlan.name, addresses))
        report.tunnels[vxlan.name] = "up" if ok else report.errors[-1]
        if ok:
            _converge_neighbours(netlink, plan, vxlan.name, report)
        else:
            broken_devices.add(vxlan.name)
    elif netlink.link_exists(VXLAN_DEVICE):
        attempt(f"removing {VXLAN_DEVICE}", lambda: netlink.delete_link(VXLAN_DEVICE))

    ipip = plan.ipip
    if ipip is not None:
        mtu = uplink_mtu - ipip.mtu_overhead if uplink_mtu else None
        try:
            netlink.ensure_ipip(ipip.name, mtu=mtu)
            addresses = [f"{ipip.address}/32"] if ipip.address else []
            netlink.set_addresses(ipip.name, addresses)
            report.tunnels[ipip.name] = "up"
        except KernelFeatureMissing as exc:
            report.tunnels[ipip.name] = str(exc)
            report.errors.append(f"IP-in-IP: {exc}")
            broken_devices.add(ipip.name)
        except CalicoCnmError as exc:
            report.tunnels[ipip.name] = str(exc)
            report.errors.append(f"IP-in-IP device {ipip.name}: {exc}")
            broken_devices.add(ipip.name)

    wanted = [_normal(r) for r in plan.routes if r.dev not in broken_devices]
    actual = [_normal(r) for r in netlink.list_routes()]
    for route in actual:
        if not any(_matches(w, route) for w in wanted):
            if attempt(f"removing route {route.dst}", lambda r=route: netlink.remove_route(r)):
                report.removed.append(route)
    for route in sorted(wanted):
        if not any(_matches(route, a) for a in actual):
            if attempt(f"route {route.dst}", lambda r=route: netlink.replace_route(r)):
                report.added.append(route)
    return report


def _converge_neighbours(netlink: RoutingNetlink, plan: RoutePlan, device: str,
                         report: WriteReport) -> None:
    try:
        neighbours = netlink.list_neighbours(device)
        wanted = {ip: mac for (dev, ip), mac in plan.neighbours.items() if dev == device}
        for ip in set(neighbours) - set(wanted):
            netlink.delete_neighbour(device, ip)
        for ip, mac in wanted.items():
            if neighbours.get(ip) != mac:
                netlink.replace_neighbour(device, ip, mac)
        fdb = netlink.list_fdb(device)
        wanted_fdb = {mac: dst for (dev, mac), dst in plan.fdb.items() if dev == device}
        for mac, dst in fdb.items():
            if wanted_fdb.get(mac) != dst:
                netlink.delete_fdb(device, mac, dst)
        for mac, dst in wanted_fdb.items():
            if fdb.get(mac) != dst:
                netlink.replace_fdb(device, mac, dst)
    except CalicoCnmError as exc:
        report.errors.append(f"neighbours of {device}: {exc}")
