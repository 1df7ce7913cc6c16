"""dataplane.netlink against the real kernel: state it leaves, idempotency, listing,
error mapping, and the per-namespace sysctls. Kernel state is read back with
iproute2 and /proc, independently of the module under test."""

from __future__ import annotations

import os
import sys

import pytest

from dataplane.netlink import Netlink
from datastore.errors import Conflict, InvalidRequest, NotFound, Unavailable
from tests.functional.helpers import (
    NET1,
    Lab,
    in_ns,
    ip,
    ip_json,
    main_routes,
    read_sysctl,
    route_get,
)

pytestmark = pytest.mark.root

HOST_IF, TMP_IF = "cali0123456789a", "tmp0123456789a"


def addresses(ns: str, ifname: str) -> list[tuple[str, int, list[str]]]:
    """(address, prefixlen, flags) on ifname, IPv6 link-local left out."""
    found = []
    for info in ip_json(ns, "addr", "show", "dev", ifname)[0]["addr_info"]:
        if info.get("scope") == "link" and info["family"] == "inet6":
            continue
        flags = [f for f in ("nodad", "noprefixroute") if info.get(f)]
        found.append((info["local"], info["prefixlen"], flags))
    return sorted(found)


def add_non_veth(ns: str, ifname: str) -> None:
    for kind in ("bridge", "dummy"):
        if ip(ns, "link", "add", ifname, "type", kind, check=False).returncode == 0:
            return
    pytest.skip("no bridge or dummy link type in this kernel")


def test_create_veth_and_configure_host_end(nl: Netlink, host: str) -> None:
    nl.create_veth(HOST_IF, TMP_IF, mtu=1400)
    nl.configure_host_end(HOST_IF, ["10.201.0.1/24", "fd00:98::1/64"])

    links = {link["ifname"]: link for link in ip_json(host, "-d", "link", "show")}
    assert links[HOST_IF]["linkinfo"]["info_kind"] == "veth"
    assert links[HOST_IF]["link"] == TMP_IF  # the two are peers
    assert links[HOST_IF]["mtu"] == links[TMP_IF]["mtu"] == 1400
    assert "UP" in links[HOST_IF]["flags"]
    assert addresses(host, HOST_IF) == [
        ("10.201.0.1", 32, []),
        ("fd00:98::1", 128, ["nodad", "noprefixroute"]),
    ]
    # The gateway address is local (answered by the host) but adds no subnet route.
    assert not [r for r in main_routes(host, "-4") if r.get("dev") == HOST_IF]
    assert not [r for r in main_routes(host, "-6") if r["dst"].startswith("fd00")]

    expected = {
        f"net.ipv4.conf.{HOST_IF}.proxy_arp": "1",
        f"net.ipv4.conf.{HOST_IF}.rp_filter": "1",
        f"net.ipv4.conf.{HOST_IF}.forwarding": "1",
        f"net.ipv4.neigh.{HOST_IF}.proxy_delay": "0",
        f"net.ipv6.conf.{HOST_IF}.forwarding": "1",
        f"net.ipv6.conf.{HOST_IF}.accept_ra": "0",
        f"net.ipv6.conf.{HOST_IF}.accept_dad": "0",
        "net.ipv4.ip_forward": "1",
        "net.ipv6.conf.all.forwarding": "1",
    }
    assert {key: read_sysctl(host, key) for key in expected} == expected


def test_sysctls_are_written_inside_the_namespace_only(lab: Lab) -> None:
    outside = lab.netns("outside")
    inside = lab.netns("inside")
    before = read_sysctl(outside, "net.ipv6.conf.all.forwarding")
    with Netlink(netns=inside) as nl:
        nl.enable_forwarding()
    assert read_sysctl(inside, "net.ipv6.conf.all.forwarding") == "1"
    assert read_sysctl(outside, "net.ipv6.conf.all.forwarding") == before == "0"


def test_current_namespace_mode_writes_proc_sys_directly(lab: Lab) -> None:
    """Netlink() without netns works on the namespace the process is in (run here in
    a child process placed inside a throwaway namespace)."""
    ns = lab.netns("self")
    script = (
        "from dataplane.netlink import Netlink\n"
        "with Netlink() as nl:\n"
        "    nl.enable_forwarding()\n"
        f"    nl.create_veth('{HOST_IF}', '{TMP_IF}')\n"
        f"    nl.configure_host_end('{HOST_IF}', ['10.201.0.1', 'fd00:98::1'])\n"
        f"    nl.add_route('10.201.0.5', '{HOST_IF}')\n"
        "    print(sorted(nl.list_host_routes().items()), nl.global_rp_filter())\n"
    )
    out = in_ns(ns, sys.executable, "-c", script).stdout.strip()
    assert out == f"[('10.201.0.5', '{HOST_IF}')] 0"
    assert read_sysctl(ns, f"net.ipv4.conf.{HOST_IF}.proxy_arp") == "1"
    assert read_sysctl(ns, f"net.ipv6.conf.{HOST_IF}.accept_dad") == "0"
    assert read_sysctl(ns, "net.ipv6.conf.all.forwarding") == "1"


def test_configure_host_end_is_idempotent_and_converges(nl: Netlink, host: str) -> None:
    nl.create_veth(HOST_IF, TMP_IF)
    for _ in range(3):
        nl.configure_host_end(HOST_IF, ["10.201.0.1", "fd00:98::1"])
    assert addresses(host, HOST_IF) == [
        ("10.201.0.1", 32, []),
        ("fd00:98::1", 128, ["nodad", "noprefixroute"]),
    ]
    # Back to the wanted state after drift: link down (IPv6 addresses go with it),
    # a stray address, a sysctl reset.
    ip(host, "link", "set", HOST_IF, "down")
    ip(host, "addr", "add", "192.0.2.9/24", "dev", HOST_IF)
    in_ns(host, "sysctl", "-qw", f"net.ipv4.conf.{HOST_IF}.proxy_arp=0")
    nl.configure_host_end(HOST_IF, ["10.201.0.1", "fd00:98::1"])
    assert addresses(host, HOST_IF) == [
        ("10.201.0.1", 32, []),
        ("fd00:98::1", 128, ["nodad", "noprefixroute"]),
    ]
    assert read_sysctl(host, f"net.ipv4.conf.{HOST_IF}.proxy_arp") == "1"
    # A changed gateway list replaces the old gateway.
    nl.configure_host_end(HOST_IF, ["10.201.0.254"])
    assert addresses(host, HOST_IF) == [("10.201.0.254", 32, [])]


def test_add_route_replaces_and_is_idempotent(nl: Netlink, host: str) -> None:
    nl.create_veth(HOST_IF, TMP_IF)
    nl.create_veth("cali_other", "tmp_other")
    nl.configure_host_end(HOST_IF, NET1.gateways())
    nl.configure_host_end("cali_other", NET1.gateways())
    for _ in range(2):
        nl.add_route("10.201.0.5", HOST_IF)
        nl.add_route("fd00:98::5/128", HOST_IF)
    v4 = [r for r in main_routes(host, "-4") if r["dst"] == "10.201.0.5"]
    v6 = [r for r in main_routes(host, "-6") if r["dst"] == "fd00:98::5"]
    assert [(r["dev"], r["scope"]) for r in v4] == [(HOST_IF, "link")]
    assert [r["dev"] for r in v6] == [HOST_IF]

    nl.add_route("10.201.0.5/32", "cali_other")  # moves, does not duplicate
    nl.add_route("fd00:98::5", "cali_other")
    assert route_get(host, "10.201.0.5")["dev"] == "cali_other"
    assert route_get(host, "fd00:98::5")["dev"] == "cali_other"
    assert len([r for r in main_routes(host, "-4") if r["dst"] == "10.201.0.5"]) == 1
    assert len([r for r in main_routes(host, "-6") if r["dst"] == "fd00:98::5"]) == 1

    nl.delete_route("10.201.0.5", HOST_IF)  # not via that interface: nothing happens
    assert route_get(host, "10.201.0.5")["dev"] == "cali_other"
    nl.delete_route("10.201.0.5")
    nl.delete_route("fd00:98::5")
    nl.delete_route("10.201.0.5")  # already gone
    nl.delete_route("10.201.0.5", "cali_nosuch")
    assert "10.201.0.5" not in {r["dst"] for r in main_routes(host, "-4")}
    assert "fd00:98::5" not in {r["dst"] for r in main_routes(host, "-6")}


def test_list_links_and_host_routes(nl: Netlink, host: str) -> None:
    nl.create_veth(HOST_IF, TMP_IF)
    nl.create_veth("caliabcdef", "tmpabcdef")
    ip(host, "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy0p")
    ip(host, "link", "set", "dummy0", "up")
    nl.configure_host_end(HOST_IF, NET1.gateways())
    nl.configure_host_end("caliabcdef", NET1.gateways())
    nl.add_route("10.201.0.5", HOST_IF)
    nl.add_route("fd00:98::5", HOST_IF)
    nl.add_route("10.201.0.6", "caliabcdef")
    # Not host routes of ours: another device, a subnet route, a kernel route.
    ip(host, "route", "add", "10.9.9.9/32", "dev", "dummy0")
    ip(host, "route", "add", "10.201.7.0/24", "dev", HOST_IF)
    ip(host, "-6", "addr", "add", "fd00:55::1/128", "dev", HOST_IF)  # kernel /128 route

    assert nl.list_links() == [HOST_IF, "caliabcdef"]
    assert nl.list_links("tmp") == ["tmp0123456789a", "tmpabcdef"]
    assert nl.list_links("nomatch") == []
    assert nl.list_host_routes() == {
        "10.201.0.5": HOST_IF,
        "fd00:98::5": HOST_IF,
        "10.201.0.6": "caliabcdef",
    }
    assert nl.list_host_routes("dummy") == {"10.9.9.9": "dummy0"}
    assert nl.link_exists(HOST_IF) and not nl.link_exists("cali_nosuch")


def test_create_veth_replaces_a_stale_leftover(nl: Netlink, host: str) -> None:
    nl.create_veth(HOST_IF, TMP_IF)
    old_index = ip_json(host, "link", "show", HOST_IF)[0]["ifindex"]
    nl.create_veth(HOST_IF, TMP_IF)  # e.g. after a crash between create and join
    assert ip_json(host, "link", "show", HOST_IF)[0]["ifindex"] != old_index
    # A leftover container end whose host end is gone is replaced as well.
    ip(host, "link", "add", "calistale", "type", "veth", "peer", "name", "tmpstale")
    ip(host, "link", "set", "calistale", "name", "calirenamed")
    nl.create_veth("calistale", "tmpstale")
    assert ip_json(host, "link", "show", "calistale")[0]["link"] == "tmpstale"
    assert not nl.link_exists("calirenamed")
    # A non-veth interface with the container end's name is not ours to delete.
    add_non_veth(host, "tmpdummy")
    with pytest.raises(Conflict):
        nl.create_veth("calidummy", "tmpdummy")
    assert nl.link_exists("tmpdummy")


def test_errors_map_to_project_errors(nl: Netlink, lab: Lab) -> None:
    for bad in ("cali0123456789ab", "", "cali/x", "cali x", "cali:0", ".."):
        with pytest.raises(InvalidRequest):
            nl.create_veth(bad, "tmpok")
        with pytest.raises(InvalidRequest):
            nl.delete_link(bad)
    with pytest.raises(InvalidRequest):
        nl.create_veth("caliok", "caliok")
    with pytest.raises(InvalidRequest):
        nl.create_veth("caliok", "tmpok", mtu=10)
    with pytest.raises(InvalidRequest):
        nl.add_route("10.201.0.0/24", "caliok")  # a subnet is not a host route
    with pytest.raises(InvalidRequest):
        nl.add_route("not-an-ip", "caliok")
    with pytest.raises(InvalidRequest):
        nl.configure_host_end("caliok", ["10.201.0.300"])
    with pytest.raises(NotFound):
        nl.configure_host_end("cali_nosuch", ["10.201.0.1"])
    with pytest.raises(NotFound):
        nl.add_route("10.201.0.5", "cali_nosuch")
    nl.delete_link("cali_nosuch")  # tolerated
    nl.create_veth("calidown", "tmpdown")
    with pytest.raises(Unavailable, match="Network is down"):
        nl.add_route("10.201.0.5", "calidown")  # configure_host_end brings it up first
    with pytest.raises(NotFound):
        Netlink(netns=f"cnmt-{lab.tag}-missing")
    with pytest.raises(InvalidRequest):
        Netlink(netns="../etc")
    assert not os.path.exists(f"/run/netns/cnmt-{lab.tag}-missing")  # never created


def test_ipv6_needs_mtu_1280(nl: Netlink) -> None:
    nl.create_veth(HOST_IF, TMP_IF, mtu=1200)
    nl.configure_host_end(HOST_IF, ["10.201.0.1"])  # IPv4 only: fine
    with pytest.raises(Exception, match="IPv6 is not available"):
        nl.configure_host_end(HOST_IF, ["10.201.0.1", "fd00:98::1"])


def test_ipv6_half_routes_need_a_connected_gateway_route(lab: Lab) -> None:
    """Kernel fact behind the Join reply: with only the two /65 halves via the gateway,
    the half containing the gateway makes the kernel refuse the other half, and the
    gateway then resolves through a next hop (dockerd: "direct route for the gateway
    could not be found"). A connected /128 for the gateway fixes both, in any order."""
    wl = lab.netns("wl")
    ip(wl, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    ip(wl, "link", "set", "peer0", "up")
    ip(wl, "link", "set", "eth0", "up")
    ip(wl, "-6", "addr", "add", "fd00:98::5/64", "dev", "eth0", "nodad")
    ip(wl, "-6", "route", "add", "fd00:98::/65", "via", "fd00:98::1", "dev", "eth0")
    refused = ip(
        wl, "-6", "route", "add", "fd00:98:0:0:8000::/65", "via", "fd00:98::1", "dev", "eth0",
        check=False,
    )
    assert refused.returncode != 0 and "No route to host" in refused.stderr
    assert "gateway" in route_get(wl, "fd00:98::1")  # what programGateway rejects

    ip(wl, "-6", "route", "add", "fd00:98::1/128", "dev", "eth0", "scope", "link")
    ip(wl, "-6", "route", "add", "fd00:98:0:0:8000::/65", "via", "fd00:98::1", "dev", "eth0")
    assert "gateway" not in route_get(wl, "fd00:98::1")
    assert route_get(wl, "fd00:98::8000:0:0:6")["gateway"] == "fd00:98::1"
    assert route_get(wl, "fd00:98::6")["gateway"] == "fd00:98::1"
