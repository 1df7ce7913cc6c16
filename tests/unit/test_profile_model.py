"""Profile and Rule: validation, normal forms, dict round trips."""

from __future__ import annotations

import json

import pytest

from datastore.errors import InvalidRequest
from profiles.model import (
    MAX_PORT_ENTRIES,
    Profile,
    Rule,
    check_name,
    normalize_cidr,
    normalize_ports,
    normalize_protocol,
    port_weight,
)

# --- valid rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        Rule("allow"),
        Rule("deny"),
        Rule("allow", protocol="tcp", dst_ports=[80, 443, "8000:8080"]),
        Rule("allow", protocol="udp", src_ports=[53], not_dst_ports=["0:1023"]),
        Rule("allow", protocol="icmp", icmp_type=8, icmp_code=0),
        Rule("allow", protocol="icmp", icmp_type=254),
        Rule("allow", protocol="icmpv6", icmp_type=128, src_net="fd00::/8"),
        Rule("allow", protocol=47),
        Rule("allow", protocol=255),
        Rule("deny", src_tag="web", not_src_tag="db", dst_net="10.0.0.0/8",
             not_dst_net="10.1.0.0/16"),
        Rule("allow", protocol="tcp", src_ports=[0, 65535, "0:65535", "80:80"]),
        Rule("allow", src_tag="a" * 128),
        Rule("allow", src_tag="A-z_0.9"),
    ],
)
def test_valid_rules_pass_validation(rule):
    assert rule.validate() is rule


# --- invalid rules: the message names the field and the problem -------------------------


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (Rule("permit"), "action: 'permit' is not one of allow, deny"),
        (Rule("allow", protocol="gre"), "protocol: unknown protocol 'gre'"),
        (Rule("allow", protocol=0), "protocol: protocol 0 would match every protocol"),
        (Rule("allow", protocol=256), "protocol: protocol number 256 is out of range 1-255"),
        (Rule("allow", protocol=True), "protocol: invalid protocol True"),
        (Rule("allow", dst_ports=[80]), "dst_ports: ports need protocol tcp or udp"),
        (Rule("allow", protocol="icmp", src_ports=[80]),
         "src_ports: ports need protocol tcp or udp"),
        (Rule("allow", protocol=47, not_dst_ports=[80]),
         "not_dst_ports: ports need protocol tcp or udp"),
        (Rule("allow", protocol="tcp", dst_ports=[65536]),
         "dst_ports: port 65536 is out of range 0-65535"),
        (Rule("allow", protocol="tcp", dst_ports=[-1]),
         "dst_ports: port -1 is out of range 0-65535"),
        (Rule("allow", protocol="tcp", dst_ports=["90:80"]),
         "dst_ports: port range '90:80' runs backwards"),
        (Rule("allow", protocol="tcp", dst_ports=["80-90"]), "dst_ports: invalid port '80-90'"),
        (Rule("allow", protocol="tcp", dst_ports=["1:70000"]),
         "dst_ports: port 70000 is out of range"),
        (Rule("allow", protocol="tcp", dst_ports=[]), "dst_ports: ports list is empty"),
        (Rule("allow", protocol="tcp", dst_ports=[True]), "dst_ports: invalid port True"),
        (Rule("allow", protocol="tcp", dst_ports="80"), "dst_ports: ports must be a list"),
        (Rule("allow", protocol="tcp", dst_ports=list(range(MAX_PORT_ENTRIES + 1))),
         f"at most {MAX_PORT_ENTRIES} are allowed"),
        (Rule("allow", protocol="icmp", icmp_type=255),
         "icmp_type: ICMP type 255 cannot be matched"),
        (Rule("allow", protocol="icmp", icmp_type=256), "icmp_type: ICMP type 256 is out of range"),
        (Rule("allow", protocol="icmp", icmp_type=-1), "icmp_type: ICMP type -1 is out of range"),
        (Rule("allow", protocol="icmp", icmp_type=3, icmp_code=256),
         "icmp_code: ICMP code 256 is out of range"),
        (Rule("allow", protocol="icmp", icmp_code=0), "icmp_code: an ICMP code needs an ICMP type"),
        (Rule("allow", protocol="tcp", icmp_type=8),
         "icmp_type: ICMP type and code need protocol icmp or icmpv6"),
        (Rule("allow", icmp_type=8), "icmp_type: ICMP type and code need protocol icmp"),
        (Rule("allow", src_net="10.0.0.0/33"), "src_net: invalid CIDR '10.0.0.0/33'"),
        (Rule("allow", not_dst_net="10.0.0"), "not_dst_net: invalid CIDR '10.0.0'"),
        (Rule("allow", dst_net=" 10.0.0.0/8"), "dst_net: invalid CIDR"),
        (Rule("allow", src_net="10.0.0.0/8", dst_net="fd00::/8"),
         "src_net and dst_net: one rule cannot mix IPv4 and IPv6 CIDRs"),
        (Rule("allow", protocol="icmp", src_net="fd00::/8"),
         "src_net: an IPv6 CIDR cannot carry icmp traffic"),
        (Rule("allow", protocol="icmpv6", not_dst_net="10.0.0.0/8"),
         "not_dst_net: an IPv4 CIDR cannot carry icmpv6 traffic"),
        (Rule("allow", src_tag="we b!"), "src_tag: tag 'we b!' has illegal characters"),
        (Rule("allow", not_dst_tag=""), "not_dst_tag: tag must not be empty"),
        (Rule("allow", dst_tag="a" * 129), "dst_tag: tag 'aaaaaaaaaaaaaaaaaaaa...' is longer"),
    ],
)
def test_invalid_rules_name_the_field(rule, message):
    with pytest.raises(InvalidRequest) as caught:
        rule.validate()
    assert message in str(caught.value)
    assert caught.value.status == 400


def test_numbered_well_known_protocols_count_as_their_names():
    assert Rule("allow", protocol=6, dst_ports=[80]).validate()
    assert Rule("allow", protocol=1, icmp_type=8).validate()


def test_ip_version_of_a_rule():
    assert Rule("allow").ip_version is None
    assert Rule("allow", protocol="tcp").ip_version is None
    assert Rule("allow", protocol="icmp").ip_version == 4
    assert Rule("allow", protocol=58).ip_version == 6
    assert Rule("allow", not_src_net="fd00::/8").ip_version == 6
    assert Rule("allow", dst_net="10.0.0.0/8").ip_version == 4


# --- value helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("tcp", "tcp"), ("TCP", "tcp"), ("6", "tcp"), (17, "udp"), (1, "icmp"), ("58", "icmpv6"),
     ("icmpv6", "icmpv6"), (47, 47), ("132", 132)],
)
def test_normalize_protocol(value, expected):
    assert normalize_protocol(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10.0.0.0/8", "10.0.0.0/8"), ("10.1.2.3/8", "10.0.0.0/8"), ("10.1.2.3", "10.1.2.3/32"),
     ("fd00::1/64", "fd00::/64"), ("FD00::1", "fd00::1/128"), ("0.0.0.0/0", "0.0.0.0/0")],
)
def test_normalize_cidr(value, expected):
    assert normalize_cidr(value) == expected


@pytest.mark.parametrize("value", ["10.0.0.0/33", "10.0.0", "1", "x", "", "10.0.0.0/8 ", None, 10])
def test_normalize_cidr_refuses(value):
    with pytest.raises(InvalidRequest, match="invalid CIDR"):
        normalize_cidr(value)


def test_normalize_ports_and_weights():
    assert normalize_ports([80, "443", "8000:8080"]) == [80, 443, "8000:8080"]
    assert normalize_ports("80,8000:8080") == [80, "8000:8080"]
    assert [port_weight(p) for p in (80, "1:2")] == [1, 2]


def test_check_name_limits():
    assert check_name("a" * 128) == "a" * 128
    with pytest.raises(InvalidRequest, match="longer than 128"):
        check_name("a" * 129)
    with pytest.raises(InvalidRequest, match="has illegal characters"):
        check_name("a/b")
    with pytest.raises(InvalidRequest, match="must be a string"):
        check_name(5)


# --- dict forms -----------------------------------------------------------------------


def test_rule_to_dict_keeps_only_set_keys_and_marks_negations():
    rule = Rule(
        "allow", protocol="tcp", src_tag="web", dst_ports=[80, "8000:8080"],
        not_dst_net="10.1.0.0/16", not_src_ports=[22],
    )
    assert rule.to_dict() == {
        "action": "allow",
        "protocol": "tcp",
        "src_tag": "web",
        "dst_ports": [80, "8000:8080"],
        "!src_ports": [22],
        "!dst_net": "10.1.0.0/16",
    }


ROUND_TRIP_RULES = [
    Rule("allow"),
    Rule("deny", protocol="udp", src_ports=["1:2"], not_dst_ports=[53]),
    Rule("allow", protocol="icmpv6", icmp_type=128, icmp_code=0, dst_net="fd00::/64"),
    Rule("allow", protocol=47, src_tag="a", dst_tag="b", not_src_tag="c", not_dst_tag="d",
         src_net="10.0.0.0/8", not_src_net="10.1.0.0/16", dst_net="192.168.0.0/16",
         not_dst_net="192.168.1.0/24"),
]


@pytest.mark.parametrize("rule", ROUND_TRIP_RULES)
def test_rule_dict_round_trip_through_json(rule):
    data = json.loads(json.dumps(rule.to_dict()))
    assert Rule.from_dict(data) == rule


def test_rule_from_dict_normalizes():
    rule = Rule.from_dict({
        "action": "allow", "protocol": "TCP", "src_net": "10.1.2.3/8",
        "dst_ports": ["80", "8000:8080"], "!src_ports": "22,23", "dst_tag": None,
    })
    assert rule == Rule(
        "allow", protocol="tcp", src_net="10.0.0.0/8", dst_ports=[80, "8000:8080"],
        not_src_ports=[22, 23],
    )
    assert Rule.from_dict({"action": "allow", "protocol": 6}).protocol == "tcp"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"protocol": "tcp"}, "action: a rule needs an action"),
        ({"action": "allow", "not_src_net": "10.0.0.0/8"}, "unknown rule key 'not_src_net'"),
        ({"action": "allow", "!action": "deny"}, "unknown rule key '!action'"),
        ({"action": "allow", "src": "x"}, "unknown rule key 'src'"),
        ({"action": "allow", "!dst_net": "10.0.0.0/33"}, "!dst_net: invalid CIDR '10.0.0.0/33'"),
        ({"action": "allow", "dst_ports": [80]}, "dst_ports: ports need protocol tcp or udp"),
        ({"action": "allow", "protocol": "icmp", "icmp_type": 255}, "ICMP type 255"),
        ({"action": "allow", "src_tag": "we b!"}, "src_tag: tag 'we b!' has illegal"),
        ({"action": "allow", "protocol": "tcp", "dst_ports": 80},
         "dst_ports: ports must be a list"),
        (["allow"], "a rule must be an object"),
    ],
)
def test_rule_from_dict_refuses(data, message):
    with pytest.raises(InvalidRequest) as caught:
        Rule.from_dict(data)
    assert message in str(caught.value)


def test_profile_dict_round_trip_through_json():
    profile = Profile(
        "web", ["web", "frontend"],
        inbound_rules=[Rule("deny", src_net="10.9.0.0/16"), Rule("allow", src_tag="web")],
        outbound_rules=[Rule("allow")],
    )
    data = profile.to_dict()
    assert data == {
        "name": "web",
        "tags": ["web", "frontend"],
        "rules": {
            "inbound": [{"action": "deny", "src_net": "10.9.0.0/16"},
                        {"action": "allow", "src_tag": "web"}],
            "outbound": [{"action": "allow"}],
        },
    }
    assert Profile.from_dict(json.loads(json.dumps(data))) == profile


def test_profile_from_dict_defaults():
    assert Profile.from_dict({"name": "p"}) == Profile("p")
    assert Profile.from_dict({"name": "p", "tags": None, "rules": {"inbound": []}}) == Profile("p")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tags": []}, "name: a profile needs a name"),
        ({"name": "we b"}, "name: profile name 'we b' has illegal characters"),
        ({"name": "p", "tag": []}, "unknown profile key 'tag'"),
        ({"name": "p", "tags": "web"}, "tags: must be a list"),
        ({"name": "p", "tags": ["a", "a"]}, "tags: tag 'a' is listed twice"),
        ({"name": "p", "tags": ["a!"]}, "tags: tag 'a!' has illegal characters"),
        ({"name": "p", "rules": []}, "rules: must be an object"),
        ({"name": "p", "rules": {"ingress": []}}, "rules: unknown direction 'ingress'"),
        ({"name": "p", "rules": {"inbound": {}}}, "rules.inbound: must be a list"),
        ({"name": "p", "rules": {"outbound": [{"action": "allow"}, {"action": "maybe"}]}},
         "rules.outbound[1].action: 'maybe' is not one of allow, deny"),
        ({"name": "p", "rules": {"inbound": [{"action": "allow", "dst_ports": [1]}]}},
         "rules.inbound[0].dst_ports: ports need protocol tcp or udp"),
        ("web", "a profile must be an object"),
    ],
)
def test_profile_from_dict_refuses(data, message):
    with pytest.raises(InvalidRequest) as caught:
        Profile.from_dict(data)
    assert message in str(caught.value)


def test_profile_validate_reports_the_rule_position():
    profile = Profile("p", inbound_rules=[Rule("allow"), Rule("allow", protocol="icmp",
                                                                   icmp_type=255)])
    with pytest.raises(InvalidRequest, match=r"rules\.inbound\[1\]\.icmp_type: ICMP type 255"):
        profile.validate()


def test_network_default_profile():
    profile = Profile.network_default("web")
    assert profile == Profile(
        "web", ["web"], inbound_rules=[Rule("allow", src_tag="web")],
        outbound_rules=[Rule("allow")],
    )
    assert profile.referenced_tags() == {"web"}


def test_referenced_tags_cover_every_side_and_negation():
    profile = Profile("p", ["own"], inbound_rules=[Rule("allow", src_tag="a", not_dst_tag="b")],
                      outbound_rules=[Rule("deny", dst_tag="c", not_src_tag="d")])
    assert profile.referenced_tags() == {"a", "b", "c", "d"}
