"""A stateful stand-in for dataplane.netlink.Netlink: holds links and routes like the
kernel would, so unit tests can assert on the resulting state."""

from __future__ import annotations

from dataclasses import dataclass, field

import netaddr


@dataclass
class FakeLink:
    name: str
    peer: str
    mtu: int | None = None
    up: bool = False
    addresses: list[str] = field(default_factory=list)


class FakeKernel:
    """Shared kernel state; every FakeNetlink opened on it sees the same links."""

    def __init__(self) -> None:
        self.links: dict[str, FakeLink] = {}
        self.routes: dict[str, str] = {}
        self.forwarding = False

    def netlink(self) -> FakeNetlink:
        return FakeNetlink(self)


class FakeNetlink:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    def __enter__(self) -> FakeNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def create_veth(self, host_ifname: str, container_ifname: str, mtu: int | None = None
                    ) -> None:
        if len(host_ifname) > 15 or len(container_ifname) > 15:
            raise ValueError("interface name too long")
        self.delete_link(host_ifname)
        self.kernel.links[host_ifname] = FakeLink(host_ifname, container_ifname, mtu)

    def configure_host_end(self, host_ifname: str, gateways: list[str]) -> None:
        link = self.kernel.links[host_ifname]
        link.up = True
        link.addresses = sorted(set(link.addresses) | set(gateways))

    def add_route(self, address: str, ifname: str) -> None:
        if ifname not in self.kernel.links:
            raise KeyError(f"no link {ifname}")
        self.kernel.routes[str(netaddr.IPAddress(address))] = ifname

    def delete_route(self, address: str) -> None:
        self.kernel.routes.pop(str(netaddr.IPAddress(address)), None)

    def delete_link(self, ifname: str) -> None:
        if self.kernel.links.pop(ifname, None) is not None:
            # The kernel drops the routes through a deleted link.
            for address in [a for a, dev in self.kernel.routes.items() if dev == ifname]:
                del self.kernel.routes[address]

    def link_exists(self, ifname: str) -> bool:
        return ifname in self.kernel.links

    def list_links(self, prefix: str = "cali") -> list[str]:
        return sorted(n for n in self.kernel.links if n.startswith(prefix))

    def list_host_routes(self, prefix: str = "cali") -> dict[str, str]:
        return {a: dev for a, dev in self.kernel.routes.items() if dev.startswith(prefix)}

    def enable_forwarding(self) -> None:
        self.kernel.forwarding = True

    def global_rp_filter(self) -> int:
        return 1
