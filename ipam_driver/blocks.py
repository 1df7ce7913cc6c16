"""The allocation block: a pure allocator over one small CIDR (no I/O).

A block is one cell of a pool's grid (a /26 or /122 by default, 64
addresses). It has an affinity host (the host that claimed it and allocates
from it first) and, per allocated address, a handle (the endpoint id, once
known) and free-form JSON attributes (the service records the kind:
"gateway" | "aux" | "container", the subnet and its reservation id).

The service reads a block from the datastore, changes it here, and writes it
back with a compare-and-swap on the revision it read; nothing in this module
knows about storage.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork, IPRange, IPSet

from datastore.errors import Conflict, InvalidRequest, NotFound

Allowed = IPSet | IPNetwork | IPRange | str | Iterable[IPNetwork | IPRange | str]
# (first, last) integer ranges inside one block, in address order.
Ranges = Sequence[tuple[int, int]]

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_WIDTH = {4: 4, 6: 16}


def address_text(value: int, version: int) -> str:
    """The canonical text of an address (what netaddr's str() gives), quickly: a block
    record holds up to a few hundred and is written on every allocation."""
    return socket.inet_ntop(_FAMILY[version], value.to_bytes(_WIDTH[version], "big"))


def address_value(text: str, version: int) -> int:
    """The integer of an address text of the given family; ValueError if it is not one."""
    try:
        return int.from_bytes(socket.inet_pton(_FAMILY[version], text), "big")
    except OSError:
        raise ValueError(f"{text!r} is not an IPv{version} address") from None


class AddressInUse(Conflict):
    """allocate() of an address that is already allocated."""


class AddressNotAllocated(NotFound):
    """release() or set_handle() of an address that is not allocated."""


class AddressOutsideBlock(InvalidRequest):
    """An address that this block does not hold."""


def as_ipset(allowed: Allowed) -> IPSet:
    """Normalise an allowed range: an IPSet, a CIDR/range, or an iterable of them."""
    if isinstance(allowed, IPSet):
        return allowed
    if isinstance(allowed, IPNetwork | IPRange | str):
        return IPSet([allowed]) if not isinstance(allowed, IPRange) else IPSet(allowed)
    result = IPSet()
    for item in allowed:
        result.update(IPSet(item) if isinstance(item, IPRange) else IPSet([item]))
    return result


@dataclass
class AddressAllocation:
    """What is known about one allocated address."""

    handle: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"handle": self.handle, "attrs": dict(self.attrs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AddressAllocation:
        return cls(handle=data.get("handle"), attrs=dict(data.get("attrs") or {}))


def _compact_allocation(attributes: list[dict[str, Any]], record: Any, cidr: IPNetwork,
                        address: str) -> AddressAllocation:
    """One address of a format 2 block: [index into attributes, handle]."""
    if (not isinstance(record, list) or len(record) != 2 or type(record[0]) is not int
            or not 0 <= record[0] < len(attributes)):
        raise ValueError(f"block {cidr}, address {address}: malformed allocation {record!r}")
    return AddressAllocation(record[1], dict(attributes[record[0]]))


class AllocationBlock:
    """2 ** (max_prefix - prefixlen) addresses with host affinity and per-address records."""

    def __init__(
        self,
        cidr: IPNetwork | str,
        host: str | None = None,
        allocations: dict[int, AddressAllocation] | None = None,
    ) -> None:
        net = IPNetwork(cidr)
        if net.ip != net.network:
            raise ValueError(f"block {cidr} has host bits set")
        self.cidr: IPNetwork = net.cidr
        self.host = host
        self._allocations: dict[int, AddressAllocation] = {}
        first, last = self.cidr.first, self.cidr.last
        for value, record in (allocations or {}).items():
            if not first <= int(value) <= last:
                self._check_inside(int(value))
            self._allocations[int(value)] = record

    # ----------------------------------------------------------- properties

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def size(self) -> int:
        return self.cidr.size

    @property
    def used_count(self) -> int:
        return len(self._allocations)

    @property
    def is_empty(self) -> bool:
        return not self._allocations

    def __contains__(self, address: object) -> bool:
        try:
            value = int(IPAddress(address))  # type: ignore[arg-type]
        except (AddrFormatError, ValueError, TypeError):
            return False
        return self.cidr.first <= value <= self.cidr.last

    def copy(self) -> AllocationBlock:
        """An independent copy (records copied too), cheaper than a JSON round trip."""
        clone = AllocationBlock.__new__(AllocationBlock)
        clone.cidr, clone.host = self.cidr, self.host
        clone._allocations = {
            value: AddressAllocation(record.handle, dict(record.attrs))
            for value, record in self._allocations.items()
        }
        return clone

    def ranges_within(self, allowed: Allowed | None) -> list[tuple[int, int]]:
        """allowed clipped to this block, as integer ranges for allocate_next()."""
        return self._candidate_ranges(allowed)

    # ------------------------------------------------------------ operations

    def allocate_next(
        self,
        ranges: Ranges | None = None,
        handle: str | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> IPAddress | None:
        """Allocate the lowest free address of ranges (from ranges_within(), computed
        once per block and scope: no address sets are built per call); default the
        whole block. Returns None (and changes nothing) when none is free."""
        for first, last in ranges if ranges is not None else self._candidate_ranges(None):
            for value in range(first, last + 1):
                if value not in self._allocations:
                    self._allocations[value] = AddressAllocation(handle, dict(attrs or {}))
                    return IPAddress(value, self.version)
        return None

    def has_free(self, ranges: Ranges) -> bool:
        return any(value not in self._allocations
                   for first, last in ranges for value in range(first, last + 1))

    def allocate(
        self,
        address: IPAddress | str | int,
        handle: str | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> IPAddress:
        """Allocate one given address; AddressInUse if it is taken."""
        value = self._value(address)
        if value in self._allocations:
            raise AddressInUse(f"address {IPAddress(value, self.version)} is already in use")
        self._allocations[value] = AddressAllocation(handle, dict(attrs or {}))
        return IPAddress(value, self.version)

    def release(self, address: IPAddress | str | int) -> AddressAllocation:
        """Free one address and return its record; AddressNotAllocated if it is free."""
        value = self._value(address)
        try:
            return self._allocations.pop(value)
        except KeyError:
            raise AddressNotAllocated(
                f"address {IPAddress(value, self.version)} is not allocated"
            ) from None

    def release_where(
        self, predicate: Callable[[IPAddress, AddressAllocation], bool]
    ) -> list[IPAddress]:
        """Free every address whose record matches predicate; the freed addresses."""
        freed = [
            IPAddress(value, self.version)
            for value, record in sorted(self._allocations.items())
            if predicate(IPAddress(value, self.version), record)
        ]
        for address in freed:
            del self._allocations[int(address)]
        return freed

    def release_handle(self, handle: str) -> list[IPAddress]:
        return self.release_where(lambda _address, record: record.handle == handle)

    def set_handle(self, address: IPAddress | str | int, handle: str | None) -> None:
        self.get_or_raise(address).handle = handle

    def get(self, address: IPAddress | str | int) -> AddressAllocation | None:
        return self._allocations.get(self._value(address))

    def get_or_raise(self, address: IPAddress | str | int) -> AddressAllocation:
        value = self._value(address)
        record = self._allocations.get(value)
        if record is None:
            raise AddressNotAllocated(
                f"address {IPAddress(value, self.version)} is not allocated"
            )
        return record

    def allocations(self) -> list[tuple[IPAddress, AddressAllocation]]:
        """Every allocated address with its record, in address order."""
        return [
            (IPAddress(value, self.version), record)
            for value, record in sorted(self._allocations.items())
        ]

    # ----------------------------------------------------------- persistence

    def to_dict(self, compact: bool = False) -> dict[str, Any]:
        """The stored record. compact (format 2) keeps each distinct attribute set once,
        with [attribute index, handle] per address: a full block is a quarter the size.
        A version that knows only format 1 fails on it rather than misreading it."""
        version = self.version
        if not compact:
            return {
                "cidr": str(self.cidr),
                "host": self.host,
                "allocations": {
                    address_text(value, version): record.to_dict()
                    for value, record in sorted(self._allocations.items())
                },
            }
        attributes: list[dict[str, Any]] = []
        allocations: dict[str, list[Any]] = {}
        for value, record in sorted(self._allocations.items()):
            # A block has a few distinct sets: comparing dicts beats keying by JSON.
            index = next((i for i, known in enumerate(attributes) if known == record.attrs),
                         len(attributes))
            if index == len(attributes):
                attributes.append(dict(record.attrs))
            allocations[address_text(value, version)] = [index, record.handle]
        return {"cidr": str(self.cidr), "host": self.host, "format": 2,
                "attributes": attributes, "allocations": allocations}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AllocationBlock:
        """Rebuild a block of either format; ValueError if an address lies outside it
        or refers to an attribute set that is not there."""
        cidr = IPNetwork(data["cidr"])
        raw = data.get("allocations") or {}
        if data.get("format", 1) == 1:
            allocations = {
                address_value(address, cidr.version): AddressAllocation.from_dict(record)
                for address, record in raw.items()
            }
        else:
            attributes = data.get("attributes") or []
            allocations = {
                address_value(address, cidr.version): _compact_allocation(
                    attributes, record, cidr, address)
                for address, record in raw.items()
            }
        return cls(cidr, data.get("host"), allocations)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AllocationBlock):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"AllocationBlock({self.cidr}, host={self.host!r}, used={self.used_count})"

    # --------------------------------------------------------------- helpers

    def _value(self, address: IPAddress | str | int) -> int:
        if isinstance(address, int):
            value = address
        else:
            ip = IPAddress(address)
            if ip.version != self.version:
                raise AddressOutsideBlock(f"address {ip} is not inside block {self.cidr}")
            value = int(ip)
        self._check_inside(value)
        return value

    def _check_inside(self, value: int) -> None:
        if not self.cidr.first <= value <= self.cidr.last:
            raise AddressOutsideBlock(
                f"address {IPAddress(value, self.version)} is not inside block {self.cidr}"
            )

    def _candidate_ranges(self, allowed: Allowed | None) -> list[tuple[int, int]]:
        """(first, last) integer ranges of allowed clipped to this block, in order."""
        if allowed is None:
            return [(self.cidr.first, self.cidr.last)]
        inside = as_ipset(allowed) & IPSet([self.cidr])
        return [(r.first, r.last) for r in inside.iter_ipranges()]
