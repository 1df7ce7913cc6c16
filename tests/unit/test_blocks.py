"""AllocationBlock: the pure allocator (no datastore)."""

from __future__ import annotations

import json

import pytest
from netaddr import IPAddress, IPNetwork, IPRange, IPSet

from datastore.errors import Conflict, InvalidRequest, NotFound
from ipam_driver.block_store import grid_cell_count, grid_cells
from ipam_driver.blocks import (
    AddressAllocation,
    AddressInUse,
    AddressNotAllocated,
    AddressOutsideBlock,
    AllocationBlock,
    as_ipset,
)


def ips(block: AllocationBlock) -> list[str]:
    return [str(ip) for ip, _record in block.allocations()]


def test_default_blocks_hold_64_addresses():
    assert AllocationBlock("10.0.0.0/26").size == 64
    assert AllocationBlock("fd00::/122").size == 64
    block = AllocationBlock("10.0.0.64/26", host="h1")
    assert block.host == "h1"
    assert block.is_empty
    assert block.used_count == 0
    assert block.has_free(block.ranges_within(None))


def test_block_with_host_bits_is_refused():
    with pytest.raises(ValueError):
        AllocationBlock("10.0.0.1/26")


def test_allocate_next_is_sequential_and_records_handle_and_attrs():
    block = AllocationBlock("10.0.0.0/26", "h1")
    first = block.allocate_next(handle="ep1", attrs={"kind": "container"})
    second = block.allocate_next()
    assert (first, second) == (IPAddress("10.0.0.0"), IPAddress("10.0.0.1"))
    record = block.get("10.0.0.0")
    assert record is not None
    assert record.handle == "ep1"
    assert record.attrs == {"kind": "container"}
    assert block.get("10.0.0.1").handle is None
    assert block.used_count == 2


def test_allocate_next_skips_reserved_and_allocated():
    block = AllocationBlock("10.0.0.0/26")
    block.allocate("10.0.0.1")
    allowed = IPSet(["10.0.0.0/26"]) - IPSet(["10.0.0.0/32", "10.0.0.2/32"])
    ip = block.allocate_next(block.ranges_within(allowed))
    assert ip == IPAddress("10.0.0.3")


def test_allocate_next_honours_allowed_range_forms():
    block = AllocationBlock("10.0.0.0/26")

    def next_in(allowed):
        return block.allocate_next(block.ranges_within(allowed))

    assert next_in(IPSet(["10.0.0.40/29"])) == IPAddress("10.0.0.40")
    assert next_in(IPNetwork("10.0.0.40/29")) == IPAddress("10.0.0.41")
    assert next_in("10.0.0.48/30") == IPAddress("10.0.0.48")
    assert next_in(IPRange("10.0.0.10", "10.0.0.12")) == IPAddress("10.0.0.10")
    assert next_in([IPRange("10.0.0.20", "10.0.0.21"), "10.0.0.30/32"]) == IPAddress("10.0.0.20")


def test_allocate_next_returns_none_when_range_is_full_and_changes_nothing():
    block = AllocationBlock("10.0.0.0/26")
    allowed = IPSet(["10.0.0.8/30"])
    got = [block.allocate_next(block.ranges_within(allowed)) for _ in range(4)]
    assert [str(ip) for ip in got] == ["10.0.0.8", "10.0.0.9", "10.0.0.10", "10.0.0.11"]
    before = block.to_dict()
    assert block.allocate_next(block.ranges_within(allowed)) is None
    assert block.to_dict() == before
    # A range entirely outside the block offers nothing.
    assert block.allocate_next(block.ranges_within("10.0.1.0/24")) is None


def test_allocate_next_fills_the_whole_block_exactly_once():
    block = AllocationBlock("10.0.0.0/26")
    got = [block.allocate_next() for _ in range(64)]
    assert len({str(ip) for ip in got}) == 64
    assert block.allocate_next() is None
    assert not block.has_free(block.ranges_within(None))


def test_allocate_specific_and_taken():
    block = AllocationBlock("10.0.0.0/26")
    assert block.allocate("10.0.0.5", "h", {"kind": "aux"}) == IPAddress("10.0.0.5")
    with pytest.raises(AddressInUse, match="address 10.0.0.5 is already in use"):
        block.allocate(IPAddress("10.0.0.5"))
    assert issubclass(AddressInUse, Conflict)
    assert block.get("10.0.0.5").attrs == {"kind": "aux"}


def test_allocate_outside_block_is_refused():
    block = AllocationBlock("10.0.0.0/26")
    with pytest.raises(AddressOutsideBlock, match="not inside block 10.0.0.0/26"):
        block.allocate("10.0.0.64")
    with pytest.raises(AddressOutsideBlock):
        block.allocate("fd00::1")
    assert issubclass(AddressOutsideBlock, InvalidRequest)
    assert block.is_empty


def test_release_and_reallocate():
    block = AllocationBlock("10.0.0.0/26")
    block.allocate_next(handle="a")
    block.allocate_next(handle="b")
    record = block.release("10.0.0.0")
    assert record.handle == "a"
    assert ips(block) == ["10.0.0.1"]
    assert block.allocate_next() == IPAddress("10.0.0.0")


def test_release_of_free_address_is_not_found():
    block = AllocationBlock("10.0.0.0/26")
    with pytest.raises(AddressNotAllocated, match="10.0.0.3 is not allocated"):
        block.release("10.0.0.3")
    assert issubclass(AddressNotAllocated, NotFound)


def test_set_handle_and_release_handle():
    block = AllocationBlock("10.0.0.0/26")
    for _ in range(4):
        block.allocate_next()
    block.set_handle("10.0.0.1", "ep1")
    block.set_handle("10.0.0.3", "ep1")
    block.set_handle("10.0.0.2", "ep2")
    with pytest.raises(AddressNotAllocated):
        block.set_handle("10.0.0.9", "ep3")
    assert [str(ip) for ip in block.release_handle("ep1")] == ["10.0.0.1", "10.0.0.3"]
    assert ips(block) == ["10.0.0.0", "10.0.0.2"]
    assert block.release_handle("nobody") == []


def test_release_where():
    block = AllocationBlock("10.0.0.0/26")
    for index in range(6):
        block.allocate_next(attrs={"n": index})
    freed = block.release_where(lambda _ip, record: record.attrs["n"] % 2 == 0)
    assert [str(ip) for ip in freed] == ["10.0.0.0", "10.0.0.2", "10.0.0.4"]
    assert ips(block) == ["10.0.0.1", "10.0.0.3", "10.0.0.5"]


def test_free_within_allowed_ranges():
    block = AllocationBlock("10.0.0.0/26")
    block.allocate("10.0.0.1")
    block.allocate("10.0.0.40")
    assert block.used_count == 2
    assert block.ranges_within("10.0.0.0/28") == [(block.cidr.first, block.cidr.first + 15)]
    assert block.has_free(block.ranges_within("10.0.0.0/28"))
    assert not block.has_free(block.ranges_within(["10.0.0.1/32", "10.0.0.40/32"]))
    assert block.ranges_within("10.1.0.0/28") == []


def test_contains():
    block = AllocationBlock("10.0.0.64/26")
    assert "10.0.0.64" in block
    assert "10.0.0.127" in block
    assert "10.0.0.128" not in block
    assert "garbage" not in block


def test_to_dict_round_trip_is_json():
    block = AllocationBlock("10.0.0.0/26", "h1")
    block.allocate("10.0.0.9", "ep9", {"kind": "container", "subnet": "10.0.0.0/24"})
    block.allocate_next(attrs={"kind": "gateway"})
    data = json.loads(json.dumps(block.to_dict()))
    assert data == {
        "cidr": "10.0.0.0/26",
        "host": "h1",
        "allocations": {
            "10.0.0.0": {"handle": None, "attrs": {"kind": "gateway"}},
            "10.0.0.9": {
                "handle": "ep9",
                "attrs": {"kind": "container", "subnet": "10.0.0.0/24"},
            },
        },
    }
    again = AllocationBlock.from_dict(data)
    assert again == block
    assert again.host == "h1"
    assert ips(again) == ["10.0.0.0", "10.0.0.9"]


def _full_block() -> AllocationBlock:
    block = AllocationBlock("10.0.0.0/26", "h1")
    shared = {"kind": "container", "subnet": "10.0.0.0/16", "requested_by": "h1",
              "reservation": "0123456789abcdef0123456789abcdef"}
    block.allocate_next(attrs={"kind": "gateway", "hosts": ["h1", "h2"]})
    while block.allocate_next(attrs=shared) is not None:
        pass
    block.set_handle("10.0.0.9", "ep9")
    return block


def test_compact_record_round_trips_and_keeps_each_attribute_set_once():
    block = _full_block()
    data = json.loads(json.dumps(block.to_dict(compact=True)))
    assert data["format"] == 2
    assert len(data["attributes"]) == 2
    assert data["allocations"]["10.0.0.9"] == [1, "ep9"]
    again = AllocationBlock.from_dict(data)
    assert again == block and again.host == "h1"
    assert again.get("10.0.0.9").attrs == block.get("10.0.0.9").attrs
    # Records are independent again: editing one edits no other.
    again.get("10.0.0.9").attrs["kind"] = "aux"
    assert again.get("10.0.0.10").attrs["kind"] == "container"
    assert len(json.dumps(data)) * 3 < len(json.dumps(block.to_dict()))


def test_a_format_1_reader_fails_on_a_compact_record_instead_of_misreading_it():
    """Versions before format 2 parse each address record as {"handle", "attrs"}."""
    record = _full_block().to_dict(compact=True)["allocations"]["10.0.0.9"]
    with pytest.raises(AttributeError):
        AddressAllocation.from_dict(record)


@pytest.mark.parametrize("allocation", [[5, None], ["x"], 3])
def test_a_malformed_compact_record_is_refused(allocation):
    data = {"cidr": "10.0.0.0/26", "host": "h1", "format": 2,
            "attributes": [{"kind": "container"}], "allocations": {"10.0.0.1": allocation}}
    with pytest.raises(ValueError, match="malformed allocation"):
        AllocationBlock.from_dict(data)


def test_from_dict_rejects_address_outside_block():
    with pytest.raises(AddressOutsideBlock):
        AllocationBlock.from_dict(
            {"cidr": "10.0.0.0/26", "host": None, "allocations": {"10.0.0.99": {}}}
        )


def test_ipv6_block():
    block = AllocationBlock("fd00:1::/122", "h6")
    allowed = IPSet(["fd00:1::/122"]) - IPSet(["fd00:1::/128"])
    assert block.allocate_next(block.ranges_within(allowed)) == IPAddress("fd00:1::1")
    assert block.allocate("fd00:1::3f") == IPAddress("fd00:1::3f")
    with pytest.raises(AddressOutsideBlock):
        block.allocate("fd00:1::40")
    with pytest.raises(AddressOutsideBlock):
        block.allocate("10.0.0.1")
    got = {str(block.allocate_next()) for _ in range(62)}
    assert len(got) == 62
    assert "fd00:1::" in got
    assert block.allocate_next() is None
    again = AllocationBlock.from_dict(json.loads(json.dumps(block.to_dict())))
    assert again == block
    assert again.used_count == 64


def test_as_ipset():
    assert as_ipset("10.0.0.0/30") == IPSet(["10.0.0.0/30"])
    assert as_ipset(IPRange("10.0.0.0", "10.0.0.3")) == IPSet(["10.0.0.0/30"])
    assert as_ipset(["10.0.0.0/31", IPNetwork("10.0.0.2/31")]) == IPSet(["10.0.0.0/30"])


def test_the_grid_cell_count_is_the_number_of_cells_walked():
    for allowed, version, size in (
            (IPSet(["10.100.0.0/21"]) - IPSet(["10.100.0.0/31", "10.100.7.255/32"]), 4, 26),
            (IPSet(["10.1.0.0/24", "10.1.0.200/32", "10.3.0.64/27", "10.3.0.100/30"]), 4, 26),
            (IPSet(["fd00::/120", "fd00::1:0/125"]), 6, 122)):
        walked = list(grid_cells(allowed, version, size))
        assert grid_cell_count(allowed, version, size) == len(walked)
    assert grid_cell_count(IPSet(["fd00::/64"]), 6, 122) == 2 ** 58
