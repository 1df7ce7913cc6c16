"""One contract for dataplane.netlink.Netlink and the stateful fake (tests/unit/fakes.py).

Every test runs twice: against the real wrapper in a throwaway network namespace and
against a FakeNetlink on a fresh FakeKernel. Both start with the same "uplink": up0
(a veth here, since this kernel has no dummy devices; a plain link in the fake),
up, with 192.0.2.1/24 and fd00:1::1/64. Assertions read the state back through the
interface; the last tests check, for the real one only, that iproute2 sees the same.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from dataplane.netlink import ROUTE_PROTOCOL, InterfaceAddress, Netlink, Route
from datastore.errors import (
    Conflict,
    InvalidRequest,
    KernelFeatureMissing,
    NotFound,
    Unavailable,
)
from tests.functional.helpers import Lab, icmp_echo, ip, ip_json, run_in_netns, sh
from tests.unit.fakes import FakeKernel

pytestmark = pytest.mark.root

UPLINK = "up0"
UPLINK4, UPLINK6 = "192.0.2.1/24", "fd00:1::1/64"
PEER4, PEER6 = "192.0.2.2", "fd00:1::2"
VXLAN = "vxlan.test"
MAC_A, MAC_B = "66:0a:0b:0c:0d:0e", "66:1a:1b:1c:1d:1e"
RTPROT_STATIC = 4
HOST_IF, TMP_IF = "cali0123456789a", "tmp0123456789a"


@functools.cache
def kernel_has_ipip() -> bool:
    """Whether this kernel can make an ipip device (probed in a throwaway namespace)."""
    ns = f"cnmt-{secrets.token_hex(3)}-probe"
    sh("ip", "netns", "add", ns)
    try:
        return ip(ns, "link", "add", "cnmprobe", "type", "ipip", check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


@dataclass
class Target:
    kind: str  # "kernel" or "fake"
    nl: Any  # Netlink or FakeNetlink: the same interface
    # Install a route of another protocol (dst via next hop dev up0, optional metric).
    add_foreign_route: Callable[[str, str, int | None], None]


def _kernel_target(lab: Lab) -> Iterator[Target]:
    ns = lab.netns("nl")
    ip(ns, "link", "add", UPLINK, "type", "veth", "peer", "name", "up0p")
    ip(ns, "addr", "add", UPLINK4, "dev", UPLINK)
    ip(ns, "addr", "add", UPLINK6, "dev", UPLINK, "nodad")
    ip(ns, "link", "set", UPLINK, "up")
    ip(ns, "link", "set", "up0p", "up")

    def foreign(dst: str, via: str, metric: int | None) -> None:
        extra = ["metric", str(metric)] if metric is not None else []
        ip(ns, "route", "add", dst, "via", via, "dev", UPLINK, "proto", "static", *extra)

    with Netlink(netns=ns) as nl:
        yield Target("kernel", nl, foreign)


def _fake_target() -> Iterator[Target]:
    kernel = FakeKernel(missing_kinds=set() if kernel_has_ipip() else {"ipip"})
    kernel.add_link(UPLINK, kind="veth", addresses=[UPLINK4, UPLINK6])

    def foreign(dst: str, via: str, metric: int | None) -> None:
        kernel.install_route(Route(dst, via=via, dev=UPLINK), RTPROT_STATIC, metric or 0)

    with kernel.netlink() as nl:
        yield Target("fake", nl, foreign)


@pytest.fixture(params=["kernel", "fake"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "kernel":
        yield from _kernel_target(request.getfixturevalue("lab"))
    else:
        yield from _fake_target()


def addresses_of(nl: Any, ifname: str) -> set[str]:
    return {a.address for a in nl.list_addresses() if a.ifname == ifname}


def ensure_test_vxlan(nl: Any, vni: int = 4096, mtu: int | None = 1450) -> None:
    nl.ensure_vxlan(VXLAN, vni, 4789, "192.0.2.1", MAC_A, parent=UPLINK, mtu=mtu)


# -- routes ----------------------------------------------------------------------------


def test_ipv4_routes_round_trip(target: Target) -> None:
    nl = target.nl
    wanted = [
        Route("10.0.1.64/26", via=PEER4),  # the kernel resolves the device
        Route("10.0.2.0/26", via="10.9.9.9", dev=UPLINK, onlink=True),
        Route("10.0.3.0/26", blackhole=True),
        Route("10.0.4.0/26", dev=UPLINK),
        Route("10.0.5.7/32", via=PEER4, dev=UPLINK),
    ]
    for route in wanted:
        nl.replace_route(route)
    expected = [
        Route("10.0.1.64/26", via=PEER4, dev=UPLINK),
        Route("10.0.2.0/26", via="10.9.9.9", dev=UPLINK, onlink=True),
        Route("10.0.3.0/26", blackhole=True),
        Route("10.0.4.0/26", dev=UPLINK),
        Route("10.0.5.7/32", via=PEER4, dev=UPLINK),
    ]
    assert nl.list_routes() == expected
    for route in wanted:  # replace is idempotent
        nl.replace_route(route)
    assert nl.list_routes() == expected
    assert nl.list_routes(protocol=RTPROT_STATIC) == []  # only ours carry 202
    for route in nl.list_routes():
        nl.remove_route(route)
    assert nl.list_routes() == []


def test_ipv6_routes_round_trip(target: Target) -> None:
    nl = target.nl
    nl.replace_route(Route("fd00:2::/122", via=PEER6))
    nl.replace_route(Route("fd00:3::/122", via="fd00:1::99", dev=UPLINK, onlink=True))
    nl.replace_route(Route("fd00:4::/122", blackhole=True))  # the kernel shows "dev lo"
    nl.replace_route(Route("10.0.1.0/26", blackhole=True))
    assert nl.list_routes() == [
        Route("10.0.1.0/26", blackhole=True),  # IPv4 first
        Route("fd00:2::/122", via=PEER6, dev=UPLINK),
        Route("fd00:3::/122", via="fd00:1::99", dev=UPLINK, onlink=True),
        Route("fd00:4::/122", blackhole=True),
    ]
    nl.remove_route(Route("fd00:2::/122", via=PEER6))  # without its device: still found
    nl.remove_route(Route("fd00:3::/122", via="fd00:1::99", dev=UPLINK, onlink=True))
    nl.remove_route(Route("fd00:4::/122", blackhole=True))
    assert nl.list_routes() == [Route("10.0.1.0/26", blackhole=True)]


def test_replace_moves_a_route_to_another_next_hop(target: Target) -> None:
    nl = target.nl
    nl.replace_route(Route("10.0.1.64/26", via=PEER4))
    nl.replace_route(Route("10.0.1.64/26", via="10.9.9.9", dev=UPLINK, onlink=True))
    assert nl.list_routes() == [Route("10.0.1.64/26", via="10.9.9.9", dev=UPLINK, onlink=True)]
    nl.replace_route(Route("10.0.1.64/26", blackhole=True))
    assert nl.list_routes() == [Route("10.0.1.64/26", blackhole=True)]


@pytest.mark.parametrize(
    ("dst", "foreign_via", "ours_via"),
    [("10.0.9.0/26", "192.0.2.9", PEER4), ("fd00:9::/122", "fd00:1::9", PEER6)],
)
def test_remove_route_never_deletes_another_protocols_route(
    target: Target, dst: str, foreign_via: str, ours_via: str
) -> None:
    nl = target.nl
    # Only the other protocol's route exists: removing ours (by every spelling) spares it.
    target.add_foreign_route(dst, foreign_via, None)
    foreign = [Route(dst, via=foreign_via, dev=UPLINK)]
    for spelling in (Route(dst), Route(dst, via=foreign_via), Route(dst, dev=UPLINK),
                     Route(dst, via=foreign_via, dev=UPLINK), Route(dst, blackhole=True)):
        nl.remove_route(spelling)
    assert nl.list_routes(protocol=RTPROT_STATIC) == foreign
    assert nl.list_routes() == []

    # Both exist (the other one at another metric): only ours goes.
    other = "10.0.10.0/26" if ":" not in dst else "fd00:10::/122"
    target.add_foreign_route(other, foreign_via, 100)
    nl.replace_route(Route(other, via=ours_via))
    assert nl.list_routes() == [Route(other, via=ours_via, dev=UPLINK)]
    nl.remove_route(Route(other))
    assert nl.list_routes() == []
    assert nl.list_routes(protocol=RTPROT_STATIC) == [
        *foreign, Route(other, via=foreign_via, dev=UPLINK)]


def test_removing_what_is_not_there_is_fine(target: Target) -> None:
    nl = target.nl
    nl.remove_route(Route("10.0.1.64/26", via=PEER4))
    nl.remove_route(Route("10.0.1.64/26", dev="nosuchdev0"))
    nl.remove_route(Route("fd00:2::/122", blackhole=True))
    nl.replace_route(Route("10.0.1.64/26", via=PEER4))
    nl.remove_route(Route("10.0.1.64/26", via="192.0.2.77"))  # another next hop: not ours
    assert nl.list_routes() == [Route("10.0.1.64/26", via=PEER4, dev=UPLINK)]


def test_deleting_a_link_drops_its_routes(target: Target) -> None:
    nl = target.nl
    nl.create_veth(HOST_IF, TMP_IF)
    nl.configure_host_end(HOST_IF, [])  # brings it up
    nl.replace_route(Route("10.0.7.0/26", dev=HOST_IF))
    nl.replace_route(Route("10.0.8.0/26", via="10.0.7.1", dev=HOST_IF, onlink=True))
    nl.replace_route(Route("10.0.1.64/26", via=PEER4))
    assert len(nl.list_routes()) == 3
    nl.delete_link(HOST_IF)
    assert nl.list_routes() == [Route("10.0.1.64/26", via=PEER4, dev=UPLINK)]


def test_a_route_through_a_down_device_is_refused(target: Target) -> None:
    nl = target.nl
    nl.create_veth(HOST_IF, TMP_IF)  # created down
    with pytest.raises(Unavailable):
        nl.replace_route(Route("10.0.7.0/26", dev=HOST_IF))
    assert nl.list_routes() == []


@pytest.mark.parametrize(
    ("route", "error"),
    [
        (Route("10.0.1.65/26", via=PEER4), InvalidRequest),  # host bits set
        (Route("10.0.1.0/33", via=PEER4), InvalidRequest),
        (Route("not-a-cidr", via=PEER4), InvalidRequest),
        (Route("10.0.1.0/26", via="not-an-ip"), InvalidRequest),
        (Route("10.0.1.0/26", via=PEER6), InvalidRequest),  # other family
        (Route("10.0.1.0/26"), InvalidRequest),  # nothing to route through
        (Route("10.0.1.0/26", via=PEER4, blackhole=True), InvalidRequest),
        (Route("10.0.1.0/26", via=PEER4, onlink=True), InvalidRequest),  # onlink needs dev
        (Route("10.0.1.0/26", dev="nosuchdev0"), NotFound),
        (Route("10.0.1.0/26", via=PEER4, dev="nosuchdev0", onlink=True), NotFound),
    ],
)
def test_bad_routes_are_refused(target: Target, route: Route, error: type) -> None:
    with pytest.raises(error):
        target.nl.replace_route(route)
    assert target.nl.list_routes() == []


# -- VXLAN -----------------------------------------------------------------------------


def test_vxlan_is_created_up_and_ensuring_it_again_changes_nothing(target: Target) -> None:
    nl = target.nl
    ensure_test_vxlan(nl)
    assert nl.link_exists(VXLAN)
    assert nl.link_mtu(VXLAN) == 1450
    nl.set_addresses(VXLAN, ["10.244.0.1/32"])
    assert InterfaceAddress(VXLAN, "10.244.0.1/32", True, "vxlan") in nl.list_addresses()
    nl.replace_neighbour(VXLAN, "10.244.1.1", MAC_B)
    nl.replace_fdb(VXLAN, MAC_B, "192.0.2.3")
    nl.replace_route(Route("10.0.1.64/26", via="10.244.1.1", dev=VXLAN, onlink=True))

    ensure_test_vxlan(nl)  # the same settings: nothing is recreated
    ensure_test_vxlan(nl, mtu=1400)  # an MTU is fixed in place
    assert nl.link_mtu(VXLAN) == 1400
    assert nl.list_neighbours(VXLAN) == {"10.244.1.1": MAC_B}
    assert nl.list_fdb(VXLAN) == {MAC_B: "192.0.2.3"}
    assert nl.list_routes() == [Route("10.0.1.64/26", via="10.244.1.1", dev=VXLAN, onlink=True)]
    assert addresses_of(nl, VXLAN) == {"10.244.0.1/32"}


def test_vxlan_with_another_vni_is_recreated(target: Target) -> None:
    nl = target.nl
    ensure_test_vxlan(nl)
    nl.replace_neighbour(VXLAN, "10.244.1.1", MAC_B)
    nl.replace_fdb(VXLAN, MAC_B, "192.0.2.3")
    nl.replace_route(Route("10.0.1.64/26", via="10.244.1.1", dev=VXLAN, onlink=True))
    ensure_test_vxlan(nl, vni=4097)
    assert nl.link_exists(VXLAN) and nl.link_mtu(VXLAN) == 1450
    # A new device: its entries and routes went with the old one.
    assert nl.list_neighbours(VXLAN) == {}
    assert nl.list_fdb(VXLAN) == {}
    assert nl.list_routes() == []


def test_vxlan_replaces_a_device_of_another_kind(target: Target) -> None:
    nl = target.nl
    nl.create_veth(VXLAN, "vxpeer")
    ensure_test_vxlan(nl)
    nl.set_addresses(VXLAN, ["10.244.0.1/32"])
    assert InterfaceAddress(VXLAN, "10.244.0.1/32", True, "vxlan") in nl.list_addresses()


def test_vxlan_goes_with_its_parent(target: Target) -> None:
    nl = target.nl
    ensure_test_vxlan(nl, mtu=None)
    assert nl.link_mtu(VXLAN) == 1500 - 50  # the kernel's default over an IPv4 parent
    nl.delete_link(UPLINK)
    assert not nl.link_exists(VXLAN)


def test_vxlan_needs_its_parent(target: Target) -> None:
    with pytest.raises(NotFound):
        target.nl.ensure_vxlan(VXLAN, 4096, 4789, "192.0.2.1", MAC_A, parent="nosuchdev0")
    with pytest.raises(InvalidRequest):
        target.nl.ensure_vxlan(VXLAN, 1 << 24, 4789, "192.0.2.1", MAC_A, parent=UPLINK)
    with pytest.raises(InvalidRequest):
        target.nl.ensure_vxlan(VXLAN, 4096, 4789, "192.0.2.1", "not-a-mac", parent=UPLINK)
    assert not target.nl.link_exists(VXLAN)


# -- IP-in-IP --------------------------------------------------------------------------


def test_ipip(target: Target) -> None:
    nl = target.nl
    if not kernel_has_ipip():
        # The contract on a kernel without ipip (this VM): a clear, typed error.
        with pytest.raises(KernelFeatureMissing, match="ipip") as caught:
            nl.ensure_ipip("tunl0", mtu=1480)
        assert "this kernel has no ipip tunnel support" in str(caught.value)
        assert isinstance(caught.value, Unavailable)
        assert not nl.link_exists("tunl0")
        return
    nl.ensure_ipip("tunl0", mtu=1480)
    nl.ensure_ipip("tunl0", mtu=1480)  # idempotent
    assert nl.link_exists("tunl0") and nl.link_mtu("tunl0") == 1480
    nl.set_addresses("tunl0", ["10.244.0.1/32"])
    assert InterfaceAddress("tunl0", "10.244.0.1/32", True, "ipip") in nl.list_addresses()


def test_ipip_name_taken_by_another_kind_is_a_conflict(target: Target) -> None:
    nl = target.nl
    if kernel_has_ipip():
        pytest.skip("with ipip loaded, tunl0 always exists as the fallback device")
    nl.create_veth("tunl0", "tunl0peer")
    with pytest.raises(Conflict):
        nl.ensure_ipip("tunl0")


def test_fake_with_ipip_has_tunl0_up() -> None:
    # The other half of the fake's contract, which this kernel cannot show.
    nl = FakeKernel().netlink()
    nl.ensure_ipip("tunl0", mtu=1480)
    nl.set_addresses("tunl0", ["10.244.0.1/32"])
    assert InterfaceAddress("tunl0", "10.244.0.1/32", True, "ipip") in nl.list_addresses()
    with pytest.raises(KernelFeatureMissing, match="ipip"):
        FakeKernel(missing_kinds={"ipip"}).netlink().ensure_ipip()


# -- neighbours and FDB ------------------------------------------------------------------


def test_neighbours_round_trip(target: Target) -> None:
    nl = target.nl
    ensure_test_vxlan(nl)
    assert nl.list_neighbours(VXLAN) == {}
    nl.replace_neighbour(VXLAN, "10.244.1.1", MAC_A.upper())
    nl.replace_neighbour(VXLAN, "10.244.2.1", MAC_B)
    nl.replace_neighbour(VXLAN, "fd00:244::1", MAC_B)
    assert nl.list_neighbours(VXLAN) == {
        "10.244.1.1": MAC_A, "10.244.2.1": MAC_B, "fd00:244::1": MAC_B
    }
    nl.replace_neighbour(VXLAN, "10.244.1.1", MAC_B)  # replace: a new MAC
    nl.delete_neighbour(VXLAN, "10.244.2.1")
    nl.delete_neighbour(VXLAN, "10.244.2.1")  # gone is fine
    nl.delete_neighbour(VXLAN, "fd00:244::1")
    nl.delete_neighbour("nosuchdev0", "10.244.2.1")
    assert nl.list_neighbours(VXLAN) == {"10.244.1.1": MAC_B}
    with pytest.raises(NotFound):
        nl.list_neighbours("nosuchdev0")
    with pytest.raises(InvalidRequest):
        nl.replace_neighbour(VXLAN, "10.244.1.1", "zz:zz")


def test_fdb_round_trip(target: Target) -> None:
    nl = target.nl
    ensure_test_vxlan(nl)
    assert nl.list_fdb(VXLAN) == {}  # the device's own multicast entries have no dst
    nl.replace_fdb(VXLAN, MAC_A, "192.0.2.3")
    nl.replace_fdb(VXLAN, MAC_B.upper(), "192.0.2.4")
    assert nl.list_fdb(VXLAN) == {MAC_A: "192.0.2.3", MAC_B: "192.0.2.4"}
    nl.replace_fdb(VXLAN, MAC_A, "192.0.2.5")  # replace moves the MAC to another VTEP
    nl.delete_fdb(VXLAN, MAC_B, "192.0.2.99")  # another dst: left alone
    assert nl.list_fdb(VXLAN) == {MAC_A: "192.0.2.5", MAC_B: "192.0.2.4"}
    nl.delete_fdb(VXLAN, MAC_B, "192.0.2.4")
    nl.delete_fdb(VXLAN, MAC_B, "192.0.2.4")  # gone is fine
    nl.delete_fdb("nosuchdev0", MAC_B, "192.0.2.4")
    assert nl.list_fdb(VXLAN) == {MAC_A: "192.0.2.5"}
    with pytest.raises(NotFound):
        nl.list_fdb("nosuchdev0")


# -- addresses and link facts ------------------------------------------------------------


def test_set_addresses_converges(target: Target) -> None:
    nl = target.nl
    nl.create_veth(HOST_IF, TMP_IF)
    nl.set_addresses(HOST_IF, ["10.5.0.1/24", "fd00:5::1/64"])
    assert addresses_of(nl, HOST_IF) == {"10.5.0.1/24", "fd00:5::1/64"}
    nl.set_addresses(HOST_IF, ["10.5.0.1/16", "10.6.0.1", "fd00:5::1/64"])  # bare: /32
    assert addresses_of(nl, HOST_IF) == {"10.5.0.1/16", "10.6.0.1/32", "fd00:5::1/64"}
    nl.set_addresses(HOST_IF, ["10.5.0.1/16", "10.6.0.1/32", "fd00:5::1/64"])  # idempotent
    assert addresses_of(nl, HOST_IF) == {"10.5.0.1/16", "10.6.0.1/32", "fd00:5::1/64"}
    nl.set_addresses(HOST_IF, [])
    assert addresses_of(nl, HOST_IF) == set()
    with pytest.raises(InvalidRequest):
        nl.set_addresses(HOST_IF, ["10.5.0.1/24", "10.5.0.1/16"])
    with pytest.raises(InvalidRequest):
        nl.set_addresses(HOST_IF, ["not-an-address"])
    with pytest.raises(NotFound):
        nl.set_addresses("nosuchdev0", ["10.5.0.1/24"])


def test_list_addresses(target: Target) -> None:
    nl = target.nl
    nl.create_veth(HOST_IF, TMP_IF)
    nl.set_addresses(HOST_IF, ["10.5.0.1/24"])
    found = [a for a in nl.list_addresses() if a.ifname in (UPLINK, HOST_IF)]
    assert sorted(found, key=lambda a: (a.ifname, a.address)) == [
        InterfaceAddress(HOST_IF, "10.5.0.1/24", False, "veth"),  # not up yet
        InterfaceAddress(UPLINK, UPLINK4, True, "veth"),
        InterfaceAddress(UPLINK, UPLINK6, True, "veth"),  # link-local left out
    ]


def test_link_mtu_and_stats(target: Target) -> None:
    nl = target.nl
    assert nl.link_mtu(UPLINK) == 1500
    nl.create_veth(HOST_IF, TMP_IF, mtu=1400)
    assert nl.link_mtu(HOST_IF) == 1400
    with pytest.raises(NotFound):
        nl.link_mtu("nosuchdev0")
    stats = nl.link_stats(UPLINK)
    for key in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes"):
        assert isinstance(stats[key], int) and stats[key] >= 0
    with pytest.raises(NotFound):
        nl.link_stats("nosuchdev0")


def test_source_address(target: Target) -> None:
    nl = target.nl
    assert nl.source_address("192.0.2.9") == "192.0.2.1"  # connected
    assert nl.source_address("192.0.2.1") == "192.0.2.1"  # our own
    assert nl.source_address("fd00:1::9") == "fd00:1::1"
    nl.replace_route(Route("10.0.1.64/26", via=PEER4))
    assert nl.source_address("10.0.1.70") == "192.0.2.1"  # through a next hop
    nl.replace_route(Route("10.0.3.0/26", blackhole=True))
    assert nl.source_address("10.0.3.5") is None
    assert nl.source_address("198.51.100.1") is None  # no route (no default here)
    assert nl.source_address("2001:db8::1") is None
    with pytest.raises(InvalidRequest):
        nl.source_address("not-an-ip")


# -- the real kernel, read independently (iproute2) -----------------------------------


@pytest.fixture
def kernel_ns(lab: Lab) -> Iterator[tuple[str, Netlink]]:
    target = _kernel_target(lab)
    nl = next(target).nl
    yield lab.namespaces[-1], nl
    target.close()


def test_iproute2_sees_what_the_wrapper_wrote(kernel_ns: tuple[str, Netlink]) -> None:
    ns, nl = kernel_ns
    ensure_test_vxlan(nl)
    nl.replace_neighbour(VXLAN, "10.244.1.1", MAC_B)
    nl.replace_fdb(VXLAN, MAC_B, "192.0.2.3")
    nl.replace_route(Route("10.0.1.64/26", via="10.244.1.1", dev=VXLAN, onlink=True))
    nl.replace_route(Route("10.0.3.0/26", blackhole=True))

    link = ip_json(ns, "-d", "link", "show", VXLAN)[0]
    data = link["linkinfo"]["info_data"]
    assert link["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["port"], data["local"], data["learning"]) == (
        4096, 4789, "192.0.2.1", False)
    assert data["link"] == UPLINK and link["address"] == MAC_A and link["mtu"] == 1450
    assert "UP" in link["flags"]

    fdb = json.loads(sh("bridge", "-n", ns, "-j", "fdb", "show", "dev", VXLAN).stdout)
    assert [(e["mac"], e["dst"], e["state"]) for e in fdb if e.get("dst")] == [
        (MAC_B, "192.0.2.3", "permanent")]
    neigh = ip_json(ns, "neigh", "show", "dev", VXLAN)
    assert [(n["dst"], n["lladdr"], n["state"]) for n in neigh] == [
        ("10.244.1.1", MAC_B, ["PERMANENT"])]

    routes = {r["dst"]: r for r in ip_json(ns, "route", "show", "proto", str(ROUTE_PROTOCOL))}
    assert routes["10.0.1.64/26"]["gateway"] == "10.244.1.1"
    assert routes["10.0.1.64/26"]["dev"] == VXLAN
    assert "onlink" in routes["10.0.1.64/26"]["flags"]
    assert routes["10.0.3.0/26"]["type"] == "blackhole"


def test_vxlan_entries_carry_traffic_between_two_hosts(lab: Lab) -> None:
    """What the routing agent writes per remote node (device, tunnel address,
    neighbour, FDB, onlink block route) really forwards: proven by the counters."""
    h1, h2 = lab.netns("h1"), lab.netns("h2")
    ip(h1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", h2)
    hosts = {
        h1: ("192.0.2.1", "10.244.0.1", "10.244.0.0/26", MAC_A),
        h2: ("192.0.2.2", "10.244.1.1", "10.244.1.0/26", MAC_B),
    }
    for ns, (address, *_rest) in hosts.items():
        ip(ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip(ns, "link", "set", "eth0", "up")
    with Netlink(netns=h1) as n1, Netlink(netns=h2) as n2:
        for nl, me, peer in ((n1, hosts[h1], hosts[h2]), (n2, hosts[h2], hosts[h1])):
            nl.ensure_vxlan(VXLAN, 4096, 4789, me[0], me[3], parent="eth0")
            nl.set_addresses(VXLAN, [f"{me[1]}/32"])
            nl.replace_neighbour(VXLAN, peer[1], peer[3])
            nl.replace_fdb(VXLAN, peer[3], peer[0])
            nl.replace_route(Route(peer[2], via=peer[1], dev=VXLAN, onlink=True))
        assert n1.source_address("10.244.1.5") == "10.244.0.1"
        before = n1.link_stats(VXLAN)["tx_packets"], n2.link_stats(VXLAN)["rx_packets"]
        assert run_in_netns(h1, lambda: icmp_echo("10.244.1.1", timeout=2))
        after = n1.link_stats(VXLAN)["tx_packets"], n2.link_stats(VXLAN)["rx_packets"]
        assert after[0] > before[0] and after[1] > before[1]
