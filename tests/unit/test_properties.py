"""Property tests (hypothesis): the allocation block never hands out an address twice
and a release restores it exactly; parsing rules and profiles either accepts or raises
the project's error; the rule grammar round-trips."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from netaddr import IPAddress

from datastore.errors import InvalidRequest
from ipam_driver.blocks import AddressInUse, AddressNotAllocated, AllocationBlock
from profiles.grammar import format_rule, parse_rule
from profiles.model import Profile, Rule

BLOCK = "10.0.0.0/28"  # 16 addresses: small enough to fill
OFFSETS = st.integers(min_value=0, max_value=15)
HANDLES = st.sampled_from(["a", "b", "c", None])

operations = st.lists(st.one_of(
    st.tuples(st.just("next"), HANDLES),
    st.tuples(st.just("take"), OFFSETS, HANDLES),
    st.tuples(st.just("release"), OFFSETS),
    st.tuples(st.just("release_handle"), st.sampled_from(["a", "b", "c"])),
), max_size=60)


@given(operations)
@settings(max_examples=200, deadline=None)
def test_a_block_never_hands_out_an_address_twice_and_matches_a_model(ops):
    block = AllocationBlock(BLOCK, "h1")
    model: dict[int, str | None] = {}  # offset -> handle
    base = int(IPAddress("10.0.0.0"))
    for op in ops:
        if op[0] == "next":
            address = block.allocate_next(handle=op[1])
            if len(model) == 16:
                assert address is None
                continue
            assert address is not None
            offset = int(address) - base
            assert offset not in model  # never twice
            assert offset == min(set(range(16)) - set(model))  # the lowest free one
            model[offset] = op[1]
        elif op[0] == "take":
            address = str(IPAddress(base + op[1]))
            if op[1] in model:
                try:
                    block.allocate(address, handle=op[2])
                except AddressInUse:
                    continue
                raise AssertionError(f"{address} was handed out twice")
            block.allocate(address, handle=op[2])
            model[op[1]] = op[2]
        elif op[0] == "release":
            address = str(IPAddress(base + op[1]))
            if op[1] not in model:
                try:
                    block.release(address)
                except AddressNotAllocated:
                    continue
                raise AssertionError(f"{address} was released while free")
            assert block.release(address).handle == model.pop(op[1])
        else:
            freed = block.release_handle(op[1])
            expected = sorted(o for o, h in model.items() if h == op[1])
            assert [int(a) - base for a in freed] == expected
            for offset in expected:
                del model[offset]
        assert {int(a) - base: r.handle for a, r in block.allocations()} == model
        assert AllocationBlock.from_dict(block.to_dict()) == block


@given(operations, HANDLES)
@settings(max_examples=200, deadline=None)
def test_allocating_then_releasing_restores_the_block_exactly(ops, handle):
    block = AllocationBlock(BLOCK, "h1")
    base = int(IPAddress("10.0.0.0"))
    for op in ops:  # some state to start from
        if op[0] == "take" and block.get(str(IPAddress(base + op[1]))) is None:
            block.allocate(str(IPAddress(base + op[1])), handle=op[2])
    before = block.to_dict()
    address = block.allocate_next(handle=handle, attrs={"k": "v"})
    assume(address is not None)
    block.release(address)
    assert block.to_dict() == before


TAGS = st.text(alphabet=string.ascii_lowercase + string.digits + "-_.", min_size=1,
               max_size=12).filter(lambda t: t[0].isalnum())
NETS = st.sampled_from(["10.0.0.0/8", "10.1.2.0/24", "192.168.1.7/32", "fd00::/64",
                        "fd00:1::5/128"])
PORTS = st.lists(st.one_of(st.integers(0, 65535).map(str),
                           st.tuples(st.integers(0, 30000), st.integers(30001, 65535))
                           .map(lambda r: f"{r[0]}:{r[1]}")),
                 min_size=1, max_size=3)


@st.composite
def rule_dicts(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"action": draw(st.sampled_from(["allow", "deny"]))}
    protocol = draw(st.sampled_from([None, "tcp", "udp", "icmp", "icmpv6", "sctp", 47]))
    if protocol is not None:
        data["protocol"] = protocol
    if protocol in ("icmp", "icmpv6") and draw(st.booleans()):
        data["icmp_type"] = draw(st.integers(0, 254))
        if draw(st.booleans()):
            data["icmp_code"] = draw(st.integers(0, 255))
    for side in ("src", "dst"):
        for prefix in ("", "not_"):
            if draw(st.booleans()):
                data[f"{prefix}{side}_tag"] = draw(TAGS)
            if draw(st.booleans()):
                data[f"{prefix}{side}_net"] = draw(NETS)
            if protocol in ("tcp", "udp", "sctp") and draw(st.booleans()):
                data[f"{prefix}{side}_ports"] = draw(PORTS)
    return data


@given(rule_dicts())
@settings(max_examples=400, deadline=None)
def test_the_rule_grammar_and_the_json_form_round_trip(data):
    try:
        rule = Rule.from_dict(data)
    except InvalidRequest:
        assume(False)  # e.g. IPv4 and IPv6 nets mixed in one rule
        return
    assert parse_rule(format_rule(rule)) == rule
    assert Rule.from_dict(rule.to_dict()) == rule


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12),
                                                                 inner, max_size=4),
    max_leaves=12,
)
WORDS = st.lists(st.one_of(
    st.sampled_from(["allow", "deny", "tcp", "udp", "icmp", "from", "to", "tag", "cidr",
                     "ports", "not", "type", "code", "80", "1:2", "10.0.0.0/8", "web",
                     "-1", "99999", "fd00::/64", ","]),
    st.text(max_size=8)), max_size=10)


@given(WORDS)
@settings(max_examples=500, deadline=None)
def test_parsing_rule_words_accepts_or_raises_the_projects_error(words):
    try:
        rule = parse_rule(words)
    except InvalidRequest:
        return
    assert parse_rule(format_rule(rule)) == rule


@given(st.one_of(JSON, st.dictionaries(
    st.sampled_from(["name", "tags", "rules", "inbound", "outbound", "action", "src_tag"]),
    JSON, max_size=4)))
@settings(max_examples=500, deadline=None)
def test_parsing_rule_and_profile_documents_accepts_or_raises_the_projects_error(data):
    for parse in (Rule.from_dict, Profile.from_dict, Profile.from_stored):
        try:
            parse(data)
        except InvalidRequest:
            pass
