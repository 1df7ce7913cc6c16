"""The CLI rule grammar: every form, every error, and format/parse round trips."""

from __future__ import annotations

import pytest

from datastore.errors import InvalidRequest
from profiles.grammar import format_rule, format_words, parse_rule
from profiles.model import Rule

FORMS = [
    ("allow", Rule("allow")),
    ("deny", Rule("deny")),
    ("allow tcp", Rule("allow", protocol="tcp")),
    ("deny udp", Rule("deny", protocol="udp")),
    ("allow icmp", Rule("allow", protocol="icmp")),
    ("allow icmpv6", Rule("allow", protocol="icmpv6")),
    ("allow 47", Rule("allow", protocol=47)),
    ("allow 6 to ports 80", Rule("allow", protocol="tcp", dst_ports=[80])),
    ("allow icmp type 8", Rule("allow", protocol="icmp", icmp_type=8)),
    ("allow icmp type 3 code 4", Rule("allow", protocol="icmp", icmp_type=3, icmp_code=4)),
    ("allow icmpv6 type 128 code 0", Rule("allow", protocol="icmpv6", icmp_type=128, icmp_code=0)),
    ("allow icmp type 0 from cidr 10.0.0.0/8",
     Rule("allow", protocol="icmp", icmp_type=0, src_net="10.0.0.0/8")),
    ("allow from tag web", Rule("allow", src_tag="web")),
    ("allow from cidr 10.0.0.0/8", Rule("allow", src_net="10.0.0.0/8")),
    ("allow tcp from ports 1024:65535", Rule("allow", protocol="tcp", src_ports=["1024:65535"])),
    ("allow to tag db", Rule("allow", dst_tag="db")),
    ("allow to cidr fd00::/64", Rule("allow", dst_net="fd00::/64")),
    ("allow tcp to ports 80,443,8000:8080",
     Rule("allow", protocol="tcp", dst_ports=[80, 443, "8000:8080"])),
    ("deny from not tag web", Rule("deny", not_src_tag="web")),
    ("deny from not cidr 10.0.0.0/8", Rule("deny", not_src_net="10.0.0.0/8")),
    ("deny udp from not ports 53", Rule("deny", protocol="udp", not_src_ports=[53])),
    ("deny to not tag db", Rule("deny", not_dst_tag="db")),
    ("deny to not cidr 10.0.0.0/8", Rule("deny", not_dst_net="10.0.0.0/8")),
    ("deny tcp to not ports 22", Rule("deny", protocol="tcp", not_dst_ports=[22])),
    # Several matches in a clause, any order, positive and negated together.
    ("allow tcp from ports 80 cidr 10.0.0.0/8 tag web",
     Rule("allow", protocol="tcp", src_ports=[80], src_net="10.0.0.0/8", src_tag="web")),
    ("allow from tag web not tag db cidr 10.0.0.0/8 not cidr 10.1.0.0/16",
     Rule("allow", src_tag="web", not_src_tag="db", src_net="10.0.0.0/8",
          not_src_net="10.1.0.0/16")),
    ("allow tcp to ports 8000:8080 not ports 8081",
     Rule("allow", protocol="tcp", dst_ports=["8000:8080"], not_dst_ports=[8081])),
    ("allow tcp from tag web to ports 80",
     Rule("allow", protocol="tcp", src_tag="web", dst_ports=[80])),
    # 'to' before 'from' is accepted.
    ("allow udp to ports 53 from cidr 10.0.0.0/8",
     Rule("allow", protocol="udp", dst_ports=[53], src_net="10.0.0.0/8")),
    # Normal forms: CIDR network, protocol numbers, keyword case; tag case is kept.
    ("allow from cidr 10.1.2.3/8", Rule("allow", src_net="10.0.0.0/8")),
    ("allow to cidr 10.1.2.3", Rule("allow", dst_net="10.1.2.3/32")),
    ("allow 17 to ports 53", Rule("allow", protocol="udp", dst_ports=[53])),
    ("allow 1 type 8", Rule("allow", protocol="icmp", icmp_type=8)),
    ("ALLOW TCP FROM TAG Web NOT PORTS 1", Rule("allow", protocol="tcp", src_tag="Web",
                                                not_src_ports=[1])),
    # A value is taken literally, even when it looks like a keyword.
    ("allow from tag to", Rule("allow", src_tag="to")),
]


@pytest.mark.parametrize(("text", "expected"), FORMS, ids=[text for text, _ in FORMS])
def test_every_form_parses(text, expected):
    assert parse_rule(text) == expected
    assert parse_rule(text.split()) == expected


@pytest.mark.parametrize(("text", "expected"), FORMS, ids=[text for text, _ in FORMS])
def test_every_form_round_trips(text, expected):
    printed = format_rule(expected)
    assert parse_rule(printed) == expected
    assert format_rule(parse_rule(printed)) == printed


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (Rule("allow"), "allow"),
        (Rule("allow", protocol="icmp", icmp_type=3, icmp_code=1), "allow icmp type 3 code 1"),
        (Rule("deny", protocol="tcp", dst_ports=[80, "8000:8080"], src_tag="web",
              not_src_net="10.1.0.0/16", not_dst_ports=[8001]),
         "deny tcp from tag web not cidr 10.1.0.0/16 to ports 80,8000:8080 not ports 8001"),
        (Rule("allow", protocol=132, dst_net="fd00::/8", not_dst_tag="x", dst_tag="y"),
         "allow 132 to tag y not tag x cidr fd00::/8"),
        (Rule("allow", not_src_tag="a", src_net="10.0.0.0/8"),
         "allow from not tag a cidr 10.0.0.0/8"),
    ],
)
def test_format_rule_prints_a_fixed_order(rule, text):
    assert format_rule(rule) == text
    assert format_words(rule) == text.split()
    assert parse_rule(text) == rule


def test_argv_words_are_not_split():
    with pytest.raises(InvalidRequest) as caught:
        parse_rule(["allow", "from", "tag", "we b!"])
    assert "tag 'we b!' has illegal characters at word 4" in str(caught.value)


ERRORS = [
    ("", "empty rule; expected allow or deny"),
    ("permit", "unknown keyword 'permit' at word 1; expected one of: allow, deny"),
    ("allow tcp frm tag web", "unknown keyword 'frm' at word 3; expected one of: from, to"),
    ("allow sctp", "unknown keyword 'sctp' at word 2; expected one of: tcp, udp, icmp, "
                   "icmpv6, a protocol number, from, to"),
    ("allow 0", "protocol 0 would match every protocol in iptables; leave the protocol out "
                "at word 2"),
    ("allow 256", "protocol number 256 is out of range 1-255 at word 2"),
    ("allow from ports 80", "ports need protocol tcp or udp at word 3"),
    ("allow icmp to ports 80", "ports need protocol tcp or udp at word 4"),
    ("allow udp from not ports 80 to not ports x", "invalid port 'x' at word 10"),
    ("allow tcp to ports 80,,81", "invalid port '' at word 5"),
    ("allow tcp to ports 70000", "port 70000 is out of range 0-65535 at word 5"),
    ("allow tcp to ports 90:80", "port range '90:80' runs backwards at word 5 (90 > 80)"),
    ("allow to cidr 10.0.0.0/33", "invalid CIDR '10.0.0.0/33' at word 4"),
    ("allow from not cidr nonsense", "invalid CIDR 'nonsense' at word 5"),
    ("allow icmp type 255", "ICMP type 255 cannot be matched at word 4"),
    ("allow icmp type 256", "ICMP type 256 is out of range 0-254 at word 4"),
    ("allow icmp type x", "invalid ICMP type 'x' at word 4"),
    ("allow icmp type 3 code 256", "ICMP code 256 is out of range 0-255 at word 6"),
    ("allow icmp type 3 code -1", "invalid ICMP code '-1' at word 6"),
    ("allow icmp type", "missing value after 'type' at word 3"),
    ("allow icmp type 3 code", "missing value after 'code' at word 5"),
    ("allow icmp code 3", "'code' needs an ICMP type before it at word 3"),
    ("allow icmp type 8 type 9", "'type' given twice at word 5"),
    ("allow icmp type 8 code 0 code 1", "'code' given twice at word 7"),
    ("allow tcp type 8", "'type' needs protocol icmp or icmpv6 at word 3"),
    ("allow type 8", "'type' needs protocol icmp or icmpv6 at word 2"),
    ("allow from tag we!b", "tag 'we!b' has illegal characters at word 4"),
    ("allow from tag " + "a" * 129, "is longer than 128 characters at word 4"),
    ("allow from", "'from' needs tag, cidr or ports after it at word 2"),
    ("allow from to tag a", "'from' needs tag, cidr or ports after it at word 2"),
    ("allow from tag", "missing value after 'tag' at word 3"),
    ("allow to cidr", "missing value after 'cidr' at word 3"),
    ("allow from tag a from tag b", "'from' clause given twice at word 5"),
    ("allow from tag a tag b", "'tag' given twice in the 'from' clause at word 5"),
    ("allow to not tag a not tag b", "'not tag' given twice in the 'to' clause at word 6"),
    ("allow from tag a frm", "unknown keyword 'frm' at word 5; expected one of: tag, cidr, "
                             "ports, not, to"),
    ("allow to tag a from tag b port", "unknown keyword 'port' at word 8; expected one of: "
                                       "tag, cidr, ports, not"),
    ("allow from not", "'not' must be followed by tag, cidr or ports at word 3"),
    ("allow from not net 10.0.0.0/8", "unknown keyword 'net' at word 4; expected one of: "
                                      "tag, cidr, ports"),
    ("allow from tag a to tag b extra", "unknown keyword 'extra' at word 8"),
    ("allow tcp udp", "unknown keyword 'udp' at word 3; expected one of: from, to"),
    ("allow from cidr 10.0.0.0/8 to cidr fd00::/8",
     "invalid rule: src_net and dst_net: one rule cannot mix IPv4 and IPv6 CIDRs"),
    ("allow icmp from cidr fd00::/8", "an IPv6 CIDR cannot carry icmp traffic"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[text for text, _ in ERRORS])
def test_every_invalid_form_says_what_and_where(text, message):
    with pytest.raises(InvalidRequest) as caught:
        parse_rule(text)
    assert message in str(caught.value)
    assert caught.value.status == 400


def test_every_rule_the_model_accepts_round_trips():
    rules = [
        Rule("deny", protocol="udp", src_tag="a", not_src_tag="b", src_net="10.0.0.0/8",
             not_src_net="10.1.0.0/16", src_ports=[1, "2:3"], not_src_ports=[4],
             dst_tag="c", not_dst_tag="d", dst_net="192.168.0.0/16",
             not_dst_net="192.168.1.0/24", dst_ports=[5], not_dst_ports=["6:7"]),
        Rule("allow", protocol="icmpv6", icmp_type=1, icmp_code=255),
        Rule("allow", protocol=255),
    ]
    for rule in rules:
        assert parse_rule(format_rule(rule)) == rule
