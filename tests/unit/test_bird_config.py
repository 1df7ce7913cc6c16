"""The BIRD 2 configuration generator: topology, filters, determinism, and BIRD's own
parser (``bird -p``) on every topology rendered here."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from routing.bgp_sync import bgp_nodes
from routing.bird import BgpNode, BgpPeer, BgpSettings, identifier, render_bird_config
from routing.nodes import NodeRecord
from routing.planner import BlockInfo, PoolInfo

H1 = BgpNode("h1", "10.123.1.11/24", "fd00:123:1::11/64")
H2 = BgpNode("h2", "10.123.1.12/24", "fd00:123:1::12/64")
H3 = BgpNode("h3", "10.123.2.13/24")  # IPv4 only
NODES = [H1, H2, H3]
POOLS = [
    PoolInfo("10.240.0.0/16"),
    PoolInfo("10.250.0.0/16", vxlan_mode="always"),
    PoolInfo("fd00:240::/48"),
]
BLOCKS = [
    BlockInfo("10.240.0.0/26", "h1"),
    BlockInfo("10.240.0.64/26", "h2", {"10.240.0.70": "h1", "10.240.0.71": "h3"}),
    BlockInfo("10.240.0.128/26", "h3"),
    BlockInfo("10.250.0.0/26", "h1"),  # VXLAN pool: the agent's business
    BlockInfo("fd00:240::/122", "h1"),
]


def protocols(text: str) -> dict[str, str]:
    """BGP protocol name -> its body."""
    return dict(re.findall(r"^protocol bgp (\S+) \{[^\n]*\n(.*?)^\}", text, re.M | re.S))


def filter_body(text: str, name: str) -> str:
    match = re.search(rf"^filter {name} \{{\n(.*?)^\}}", text, re.M | re.S)
    assert match, name
    return match.group(1)


def bird_parse(text: str, tmp_path) -> None:
    """BIRD's own parser must accept the text; missing BIRD is a failure, not a skip."""
    bird = shutil.which("bird") or next(
        (p for p in ("/usr/sbin/bird", "/sbin/bird") if shutil.which(p)), None)
    if bird is None:
        pytest.fail("bird is not installed: install Debian's bird2 package "
                    "(apt-get install -y bird2) to validate generated configurations")
    path = tmp_path / "bird.conf"
    path.write_text(text)
    result = subprocess.run([bird, "-p", "-c", str(path)], capture_output=True, text=True,
                            timeout=30)
    if result.returncode != 0:
        numbered = "\n".join(f"{i:4} {line}" for i, line in enumerate(text.splitlines(), 1))
        pytest.fail(f"bird -p rejected the configuration: {result.stderr.strip()}\n{numbered}")


def render(me: BgpNode, nodes=NODES, peers=(), pools=POOLS, blocks=BLOCKS,
           settings: BgpSettings | None = None, router_id: str | None = None) -> str:
    return render_bird_config(me, list(nodes), list(peers), list(pools), list(blocks),
                              settings or BgpSettings(), router_id)


def test_mesh_of_three_has_two_sessions_each_one_connecting_side(tmp_path):
    texts = {n.name: render(n) for n in NODES}
    for text in texts.values():
        bird_parse(text, tmp_path)
    v4 = {name: {p: b for p, b in protocols(t).items() if "_fd00_" not in p}
          for name, t in texts.items()}
    assert set(v4["h1"]) == {"Mesh_10_123_1_12", "Mesh_10_123_2_13"}
    assert set(v4["h2"]) == {"Mesh_10_123_1_11", "Mesh_10_123_2_13"}
    assert set(v4["h3"]) == {"Mesh_10_123_1_11", "Mesh_10_123_1_12"}
    # Passive towards the higher address: of each pair exactly one side is passive.
    assert "passive on" in v4["h1"]["Mesh_10_123_1_12"]
    assert "passive on" not in v4["h2"]["Mesh_10_123_1_11"]
    assert "passive on" in v4["h2"]["Mesh_10_123_2_13"]
    assert "passive on" not in v4["h3"]["Mesh_10_123_1_12"]
    body = v4["h1"]["Mesh_10_123_2_13"]
    for option in ("local 10.123.1.11 as 64512;", "neighbor 10.123.2.13 as 64512;",
                   "multihop;", "graceful restart on;", "connect delay time 2;",
                   "connect retry time 5;", "import filter calico_import4;",
                   "export filter calico_export_nodes4;", "gateway recursive;",
                   "add paths on;"):
        assert option in body, option
    assert "rr client" not in body
    assert "router id 10.123.1.11;" in texts["h1"]


def test_mesh_numeric_address_order_decides_passive(tmp_path):
    # "10.0.0.9" > "10.0.0.10" as strings, not as addresses.
    a, b = BgpNode("a", "10.0.0.9/24"), BgpNode("b", "10.0.0.10/24")
    text = render(a, nodes=[a, b], pools=[PoolInfo("10.240.0.0/16")], blocks=[])
    bird_parse(text, tmp_path)
    assert "passive on" in protocols(text)["Mesh_10_0_0_10"]


def test_ipv6_sessions_only_when_both_ends_have_ipv6(tmp_path):
    h1, h3 = render(H1), render(H3)
    bird_parse(h1, tmp_path)
    bird_parse(h3, tmp_path)
    assert set(p for p in protocols(h1) if "_fd00_" in p) == {"Mesh_fd00_123_1__12"}
    body = protocols(h1)["Mesh_fd00_123_1__12"]
    assert "local fd00:123:1::11 as 64512;" in body and "ipv6 {" in body
    assert "ipv4 {" not in body and "import filter calico_import6;" in body
    # h3 has no IPv6: no IPv6 session, no IPv6 channels at all.
    assert not [p for p in protocols(h3) if "_fd00_" in p]
    assert "ipv6" not in h3


def test_reflector_topology(tmp_path):
    settings = BgpSettings(mesh=False)
    rr1 = BgpNode("rr1", "10.123.1.1/24", rr_cluster_id="224.0.0.1")
    rr2 = BgpNode("rr2", "10.123.1.2/24", rr_cluster_id="224.0.0.1")
    c1 = BgpNode("c1", "10.123.1.21/24")
    c2 = BgpNode("c2", "10.123.1.22/24")
    nodes = [c2, rr2, c1, rr1]
    texts = {n.name: render(n, nodes=nodes, settings=settings, blocks=[]) for n in nodes}
    for text in texts.values():
        bird_parse(text, tmp_path)
        assert "Mesh_" not in text
    client = protocols(texts["c1"])
    assert set(client) == {"Node_10_123_1_1", "Node_10_123_1_2"}
    assert all("rr client" not in body for body in client.values())
    reflector = protocols(texts["rr1"])
    assert set(reflector) == {"Node_10_123_1_2", "Node_10_123_1_21", "Node_10_123_1_22"}
    for name in ("Node_10_123_1_21", "Node_10_123_1_22"):
        assert "rr client;" in reflector[name]
        assert "rr cluster id 224.0.0.1;" in reflector[name]
    assert "rr client" not in reflector["Node_10_123_1_2"]
    # One connecting side per pair here too: the client (higher address) connects.
    assert "passive on" in reflector["Node_10_123_1_21"]
    assert "passive on" not in client["Node_10_123_1_1"]
    assert "route reflector (cluster id 224.0.0.1)" in texts["rr1"]


def test_reflector_cluster_id_may_be_a_number(tmp_path):
    settings = BgpSettings(mesh=False)
    rr = BgpNode("rr", "10.123.1.1/24", rr_cluster_id="1")
    c = BgpNode("c", "10.123.1.21/24")
    text = render(rr, nodes=[rr, c], settings=settings)
    bird_parse(text, tmp_path)
    assert "rr cluster id 0.0.0.1;" in protocols(text)["Node_10_123_1_21"]


def test_mesh_off_without_reflectors_has_no_node_sessions(tmp_path):
    text = render(H1, settings=BgpSettings(mesh=False))
    bird_parse(text, tmp_path)
    assert protocols(text) == {}


def test_explicit_global_and_node_peers_in_another_as(tmp_path):
    peers = [
        BgpPeer("10.123.1.254", 65001),  # global: every node
        BgpPeer("10.123.2.254", 65002, node="h3"),  # only h3
        BgpPeer("fd00:123:1::fe", 65001),
        BgpPeer("10.123.1.12", 65009),  # is node h2: the mesh session wins
    ]
    h1, h3 = render(H1, peers=peers), render(H3, peers=peers)
    bird_parse(h1, tmp_path)
    bird_parse(h3, tmp_path)
    p1, p3 = protocols(h1), protocols(h3)
    assert {p for p in p1 if not p.startswith("Mesh_")} == {
        "Global_10_123_1_254", "Global_fd00_123_1__fe"}
    assert {p for p in p3 if not p.startswith("Mesh_")} == {
        "Global_10_123_1_254", "Node_10_123_2_254"}
    assert "# skipped peer fd00:123:1::fe: this node has no IPv6 address" in h3
    assert "neighbor 10.123.1.12 as 64512;" in p1["Mesh_10_123_1_12"]
    body = p3["Node_10_123_2_254"]
    for option in ("local 10.123.2.13 as 64512;", "neighbor 10.123.2.254 as 65002;",
                   "import filter calico_import4;", "export filter calico_export_local4;",
                   "next hop self;", "graceful restart on;"):
        assert option in body, option
    assert "passive" not in body and "rr client" not in body
    # eBGP export: only what this node originates, never routes learned from others.
    assert "RTS_BGP" not in filter_body(h1, "calico_export_local4")


def test_node_peer_overrides_global_peer_at_the_same_address(tmp_path):
    peers = [BgpPeer("10.123.1.254", 65001), BgpPeer("10.123.1.254", 65005, node="h1")]
    text = render(H1, peers=peers)
    bird_parse(text, tmp_path)
    assert "Global_10_123_1_254" not in protocols(text)
    assert "as 65005;" in protocols(text)["Node_10_123_1_254"]


def test_filters_and_originated_routes_exclude_vxlan_pools(tmp_path):
    text = render(H1)
    bird_parse(text, tmp_path)
    assert "10.250." not in filter_body(text, "calico_import4")
    assert "10.250." not in filter_body(text, "calico_export_nodes4")
    assert "10.250." not in filter_body(text, "calico_kernel_export4")
    assert "10.240.0.0/16+" in filter_body(text, "calico_import4")
    assert "fd00:240::/48+" in filter_body(text, "calico_import6")
    # The kernel never feeds BIRD anything inside any pool (VXLAN ones included).
    assert "10.250.0.0/16+" in filter_body(text, "calico_kernel_import4")
    static4 = re.search(r"protocol static calico_local4 \{\n(.*?)\}", text, re.S).group(1)
    # Our block and the address we borrowed; not h2's block, not h3's borrowing,
    # not our block in the VXLAN pool.
    assert re.findall(r"route (\S+) blackhole;", static4) == ["10.240.0.0/26", "10.240.0.70/32"]
    assert "route fd00:240::/122 blackhole;" in text
    # The kernel gets BGP routes only: never our static blackholes back.
    assert "source = RTS_BGP" in filter_body(text, "calico_kernel_export4")
    assert "calico_local" not in filter_body(text, "calico_kernel_export4")


def test_only_vxlan_pools_means_nothing_imported_or_exported(tmp_path):
    pools = [PoolInfo("10.250.0.0/16", vxlan_mode="always")]
    text = render(H1, pools=pools)
    bird_parse(text, tmp_path)
    for name in ("calico_import4", "calico_export_nodes4", "calico_export_local4",
                 "calico_kernel_export4", "calico_import6"):
        assert filter_body(text, name).strip() == "reject;", name
    assert "route " not in text


def test_output_is_deterministic(tmp_path):
    peers = [BgpPeer("10.123.1.254", 65001), BgpPeer("10.123.2.254", 65002, node="h1")]
    first = render(H1, peers=peers)
    shuffled = render(H1, nodes=list(reversed(NODES)), peers=list(reversed(peers)),
                      pools=list(reversed(POOLS)), blocks=list(reversed(BLOCKS)))
    assert first == shuffled == render(H1, peers=peers)
    bird_parse(first, tmp_path)
    assert "\n\n\n" not in first and first.endswith("}\n")


def test_router_id_given_or_required_without_ipv4(tmp_path):
    v6only = BgpNode("v6", ipv6="fd00:123:1::99/64")
    with pytest.raises(ValueError, match="router id"):
        render(v6only)
    text = render(v6only, router_id="10.255.0.99")
    bird_parse(text, tmp_path)
    assert "router id 10.255.0.99;" in text and "ipv4" not in text
    assert "router id 192.0.2.1;" in render(H1, router_id="192.0.2.1")


def test_as_numbers_from_nodes_and_settings(tmp_path):
    record = NodeRecord("h9", ipv4="10.123.1.19/24", as_number=64600)
    (h9,) = bgp_nodes([record], {}, BgpSettings(default_as=64700))  # the agent's mapping
    assert (h9.name, h9.ipv4, h9.as_number) == ("h9", "10.123.1.19/24", 64600)
    me = BgpNode("h1", "10.123.1.11/24")  # no AS: the settings' default
    text = render(me, nodes=[me, h9], settings=BgpSettings(default_as=64700))
    bird_parse(text, tmp_path)
    body = protocols(text)["Mesh_10_123_1_19"]
    assert "local 10.123.1.11 as 64700;" in body and "neighbor 10.123.1.19 as 64600;" in body


def test_identifiers_are_bird_symbols():
    assert identifier("Mesh", "10.0.0.5") == "Mesh_10_0_0_5"
    assert identifier("Node", "FD00:0:0::1") == "Node_fd00__1"
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", identifier("Global", "2001:db8::a:1"))
