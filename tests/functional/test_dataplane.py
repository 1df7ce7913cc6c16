"""The routed dataplane against the real kernel: connectivity, isolation of networks,
anti-spoofing. Each test builds a host namespace (driven through dataplane.netlink) and
workload namespaces configured the way dockerd configures a container."""

from __future__ import annotations

import time

import pytest

from tests.functional.helpers import (
    NET1,
    NET2,
    Capture,
    Dataplane,
    in_ns,
    ip,
    link_mac,
    main_routes,
    neighbours,
    netstat_counter,
    ping,
    route_get,
    send_ping,
)

pytestmark = pytest.mark.root


def test_two_workloads_on_one_network_reach_each_other_v4_and_v6(dataplane: Dataplane) -> None:
    a = dataplane.add_endpoint("a", NET1, "10.201.0.5", "fd00:98::5")
    b = dataplane.add_endpoint("b", NET1, "10.201.0.6", "fd00:98::6")

    assert ping(a.workload, b.ip4)
    assert ping(b.workload, a.ip4)
    assert ping(a.workload, b.ip6)
    assert ping(b.workload, a.ip6)
    # The gateway answers too: it is a local address of each host end.
    assert ping(a.workload, NET1.gateway4)
    assert ping(a.workload, NET1.gateway6)

    # No bridge: the container reached its peer through the host (TTL decremented),
    # and the host's neighbour entry for the peer lives on the peer's own host end.
    neigh = {n["dst"]: n["dev"] for n in neighbours(dataplane.host)}
    assert neigh[b.ip4] == b.host_ifname
    assert neigh[a.ip4] == a.host_ifname
    # The container resolved its peer's address to the host end's MAC (proxy ARP).
    host_mac = link_mac(dataplane.host, a.host_ifname)
    container_neigh = {n["dst"]: n.get("lladdr") for n in neighbours(a.workload)}
    assert container_neigh[b.ip4] == host_mac
    assert container_neigh[NET1.gateway4] == host_mac


def test_first_ipv6_packet_to_a_new_endpoint_is_not_delayed(dataplane: Dataplane) -> None:
    """accept_dad=0 on the host end: without it the host end's link-local address is
    tentative for ~1 s after the container end comes up, the kernel sends no Neighbour
    Solicitation from a tentative address, and the first packets wait a second."""
    a = dataplane.add_endpoint("a", NET1, "10.201.0.5", "fd00:98::5")
    b = dataplane.add_endpoint("b", NET1, "10.201.0.6", "fd00:98::6")
    started = time.monotonic()
    assert ping(a.workload, b.ip6, wait=3)
    assert time.monotonic() - started < 0.6

    # Control: the same with the kernel's default accept_dad=1 on the host end.
    def default_dad(host_ifname: str) -> None:
        in_ns(dataplane.host, "sysctl", "-qw", f"net.ipv6.conf.{host_ifname}.accept_dad=1")

    c = dataplane.add_endpoint("c", NET1, "10.201.0.7", "fd00:98::7", before_join=default_dad)
    started = time.monotonic()
    ping(a.workload, c.ip6, wait=4)
    assert time.monotonic() - started > 0.8


def test_workload_in_two_networks_uses_each_network_interface_and_source(
    dataplane: Dataplane,
) -> None:
    # docker run --network net1 ... ; docker network connect net2 ...
    w1 = dataplane.add_endpoint("w", NET1, "10.201.0.5", "fd00:98::5", "eth0")
    w2 = dataplane.add_endpoint(
        "w", NET2, "10.202.0.5", "fd00:99::5", "eth1", default_gateway=False
    )
    p1 = dataplane.add_endpoint("p1", NET1, "10.201.0.6", "fd00:98::6")
    p2 = dataplane.add_endpoint("p2", NET2, "10.202.0.6", "fd00:99::6")
    w = w1.workload

    # The routing decision inside the workload: each subnet by its own interface,
    # with that interface's address as source.
    for dst, dev, src in (
        (p1.ip4, "eth0", w1.ip4),
        (p2.ip4, "eth1", w2.ip4),
        (p1.ip6, "eth0", w1.ip6),
        (p2.ip6, "eth1", w2.ip6),
    ):
        decision = route_get(w, dst)
        assert (decision["dev"], decision["prefsrc"]) == (dev, src), decision

    # What actually crosses the wire, seen on the host ends of both of w's interfaces.
    with Capture(dataplane.host, w1.host_ifname) as on_net1:
        with Capture(dataplane.host, w2.host_ifname) as on_net2:
            assert ping(w, p1.ip4)
            assert ping(w, p2.ip4)
            assert ping(w, p1.ip6)
            assert ping(w, p2.ip6)
            assert ping(p2.workload, w2.ip4)
            assert ping(p1.workload, w1.ip6)

    for src, dst in ((w1.ip4, p1.ip4), (w1.ip6, p1.ip6)):
        assert on_net1.echo_requests(src, dst), on_net1.packets
        assert not on_net2.echo_requests(dst=dst), on_net2.packets
    for src, dst in ((w2.ip4, p2.ip4), (w2.ip6, p2.ip6)):
        assert on_net2.echo_requests(src, dst), on_net2.packets
        assert not on_net1.echo_requests(dst=dst), on_net1.packets
    # Nothing leaves an interface with the other network's source address.
    assert not [p for p in on_net1.packets if not p.outgoing and p.src in (w2.ip4, w2.ip6)]
    assert not [p for p in on_net2.packets if not p.outgoing and p.src in (w1.ip4, w1.ip6)]


def test_ipv4_spoofed_source_is_dropped_by_rp_filter(dataplane: Dataplane) -> None:
    a = dataplane.add_endpoint("a", NET1, "10.201.0.5")
    b = dataplane.add_endpoint("b", NET1, "10.201.0.6")
    c = dataplane.add_endpoint("c", NET1, "10.201.0.7")
    # A legitimate exchange first: a's ARP entry for b is then in place, so what the
    # spoofed packets meet below is the host's IP-level reverse-path check.
    assert ping(a.workload, b.ip4)
    ip(a.workload, "addr", "add", "10.201.0.99/24", "dev", "eth0")
    dropped_before = netstat_counter(dataplane.host, "IPReversePathFilter")

    with Capture(dataplane.host, b.host_ifname) as towards_b:
        # An address nobody owns, and the address of another workload (c).
        send_ping(a.workload, b.ip4, src="10.201.0.99")
        send_ping(a.workload, b.ip4, src=c.ip4)
        assert not ping(a.workload, b.ip4, src="10.201.0.99", wait=1)

    assert not towards_b.echo_requests(dst=b.ip4), towards_b.packets
    assert netstat_counter(dataplane.host, "IPReversePathFilter") >= dropped_before + 2
    assert ping(a.workload, b.ip4)  # its own address still works


def test_loose_global_rp_filter_defeats_the_strict_host_end(
    dataplane: Dataplane,
) -> None:
    """The kernel applies max(conf/all/rp_filter, conf/<if>/rp_filter): with all=2
    (loose) a workload can spoof any address the host routes, e.g. another workload's."""
    a = dataplane.add_endpoint("a", NET1, "10.201.0.5")
    b = dataplane.add_endpoint("b", NET1, "10.201.0.6")
    c = dataplane.add_endpoint("c", NET1, "10.201.0.7")
    assert ping(a.workload, b.ip4)
    assert dataplane.nl.global_rp_filter() == 0
    in_ns(dataplane.host, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2")
    assert dataplane.nl.global_rp_filter() == 2
    ip(a.workload, "addr", "add", f"{c.ip4}/32", "dev", "eth0")

    with Capture(dataplane.host, b.host_ifname) as towards_b:
        send_ping(a.workload, b.ip4, src=c.ip4)
    assert towards_b.echo_requests(src=c.ip4, dst=b.ip4), "loose mode let the spoof through"


def test_ipv6_has_no_rp_filter_but_ip6tables_rpfilter_drops_spoofing(
    dataplane: Dataplane,
) -> None:
    """There is no IPv6 rp_filter sysctl: a spoofed IPv6 source is forwarded. The
    netfilter rpfilter match (raw PREROUTING) is what closes it."""
    a = dataplane.add_endpoint("a", NET1, "10.201.0.5", "fd00:98::5")
    b = dataplane.add_endpoint("b", NET1, "10.201.0.6", "fd00:98::6")
    assert ping(a.workload, b.ip6)
    ip(a.workload, "-6", "addr", "add", "fd00:98::99/64", "dev", "eth0", "nodad")

    with Capture(dataplane.host, b.host_ifname) as unfiltered:
        send_ping(a.workload, b.ip6, src="fd00:98::99")
    assert unfiltered.echo_requests("fd00:98::99", b.ip6), "IPv6 spoof was not forwarded?"

    rule = ["-t", "raw", "-A", "PREROUTING", "-i", "cali+", "-m", "rpfilter", "--invert"]
    if in_ns(dataplane.host, "ip6tables", *rule, "-j", "DROP", check=False).returncode:
        pytest.skip("ip6tables rpfilter match unavailable")
    with Capture(dataplane.host, b.host_ifname) as filtered:
        send_ping(a.workload, b.ip6, src="fd00:98::99")
    assert not filtered.echo_requests("fd00:98::99", b.ip6), filtered.packets
    # Legitimate traffic passes the rule. (-I: with two addresses in one /64 the
    # kernel would pick the newer one, fd00:98::99, as the source.)
    assert ping(a.workload, b.ip6, src=a.ip6)


def test_delete_link_removes_the_veth_and_its_routes(dataplane: Dataplane) -> None:
    a = dataplane.add_endpoint("a", NET1, "10.201.0.5", "fd00:98::5")
    b = dataplane.add_endpoint("b", NET1, "10.201.0.6", "fd00:98::6")
    assert ping(a.workload, b.ip4)
    host = dataplane.host
    v4 = {r["dst"]: r for r in main_routes(host, "-4")}
    v6 = {r["dst"]: r for r in main_routes(host, "-6")}
    assert v4[b.ip4]["dev"] == b.host_ifname and v4[b.ip4]["scope"] == "link"
    assert v6[b.ip6]["dev"] == b.host_ifname

    dataplane.nl.delete_link(b.host_ifname)

    assert not dataplane.nl.link_exists(b.host_ifname)
    assert ip(host, "link", "show", b.host_ifname, check=False).returncode != 0
    assert b.ip4 not in {r["dst"] for r in main_routes(host, "-4")}
    assert b.ip6 not in {r["dst"] for r in main_routes(host, "-6")}
    # The peer went with it: the container lost its interface.
    assert ip(b.workload, "link", "show", "eth0", check=False).returncode != 0
    assert b.ip4 not in dataplane.nl.list_host_routes()
    assert not ping(a.workload, b.ip4, wait=1)
    # Deleting again, and deleting its routes, is fine.
    dataplane.nl.delete_link(b.host_ifname)
    dataplane.nl.delete_route(b.ip4)
    dataplane.nl.delete_route(b.ip6, b.host_ifname)

