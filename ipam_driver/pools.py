"""Pools and network subnets: the pure model (no I/O).

A **Pool** is an address range that Docker networks draw from. Pools never
overlap each other. Every pool is cut into a grid of *blocks* of
``2 ** (max_prefix - block_size)`` addresses (64 by default); blocks carry
host affinity (see ``ipam_driver.blocks``).

A **subnet reservation** is what Docker's ``RequestPool`` creates: one network
subnet inside one pool, claimed by one or more hosts (the same network created
on each host). Subnets never overlap each other.

Pools are stored as one JSON document (``PoolSet`` under ``pools``), so every
check that spans them and the write that follows are one compare-and-swap on
one key. Subnet reservations are stored one key each (a cluster creates
networks concurrently); ``SubnetTable`` is a read-only view of them, and
``ipam_driver.service`` explains how overlaps stay impossible without a
transaction over several keys. ``ipam_driver.service`` does the I/O.

Bounds, chosen so that every block and every network has room for a gateway
and at least one container, and a block document stays small:

* IPv4 block size: /20 (4096 addresses) to /30 (4 addresses); default /26.
* IPv6 block size: /116 (4096 addresses) to /126 (4 addresses); default /122.
* A pool holds at least one block: its prefix length is <= its block size.
* A network subnet is at most /30 (IPv4) or /126 (IPv6).
* Pools may not overlap loopback, link-local, multicast or the unspecified
  ranges: those addresses cannot be routed to a container.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork, IPSet

from datastore.errors import Conflict, InvalidRequest, NotFound

DEFAULT_BLOCK_SIZE = {4: 26, 6: 122}
BLOCK_SIZE_BOUNDS = {4: (20, 30), 6: (116, 126)}
MAX_SUBNET_PREFIX = {4: 30, 6: 126}
MAX_PREFIX = {4: 32, 6: 128}

# Ranges that can never hold container addresses.
FORBIDDEN_RANGES = {
    4: [
        ("0.0.0.0/8", "the 'this network' range"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (class E)"),
    ],
    6: [
        ("::/127", "unspecified/loopback"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    ],
}

ADD_POOL_HINT = "calico-cnm pool add"

# How traffic of a pool reaches other hosts: encapsulated always, only towards hosts
# on another subnet, or never (plain routes).
ENCAP_MODES = ("always", "cross-subnet", "never")


def family_name(version: int) -> str:
    return "IPv6" if version == 6 else "IPv4"


def parse_cidr(text: object, what: str = "CIDR") -> IPNetwork:
    """Parse a CIDR written as ``address/prefixlen``; refuse host bits.

    Raises InvalidRequest with a message naming `what` (e.g. "pool") and, for
    host bits, the network address the operator probably meant.
    """
    if not isinstance(text, str) or "/" not in text:
        raise InvalidRequest(
            f"invalid {what} {text!r}: expected a CIDR such as 10.10.0.0/16 or fd00:10::/64"
        )
    try:
        net = IPNetwork(text.strip())
    except (AddrFormatError, ValueError, TypeError) as exc:
        raise InvalidRequest(
            f"invalid {what} {text!r}: expected a CIDR such as 10.10.0.0/16 or fd00:10::/64"
        ) from exc
    if net.ip != net.network:
        raise InvalidRequest(
            f"invalid {what} {text}: host bits are set; the network address is {net.cidr}"
        )
    return net.cidr


def parse_address(text: object, what: str = "address") -> IPAddress:
    """Parse a plain address (a trailing ``/prefixlen`` is accepted and ignored)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"invalid {what} {text!r}")
    value = text.strip()
    try:
        if "/" in value:
            return IPNetwork(value).ip
        return IPAddress(value)
    except (AddrFormatError, ValueError, TypeError) as exc:
        raise InvalidRequest(f"invalid {what} {text!r}: not an IP address") from exc


def networks_overlap(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.first <= b.last and b.first <= a.last


def grid_block(address: IPAddress | int, version: int, block_size: int) -> IPNetwork:
    """The block of the grid (block_size) that contains address."""
    return IPNetwork((int(address), block_size), version=version).cidr


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True)
class Pool:
    """One address range networks draw from.

    ``deleting`` is set while ``remove_pool`` runs (and stays set if that run
    was interrupted): such a pool hands out no new subnet; removing it again
    finishes the job. ``ipip_mode`` / ``vxlan_mode`` (one of ENCAP_MODES) say how
    its traffic crosses to other hosts; at most one of them is not "never".
    """

    cidr: str
    block_size: int
    ipip_mode: str = "never"
    nat_outgoing: bool = False
    disabled: bool = False
    deleting: bool = False
    vxlan_mode: str = "never"

    @property
    def network(self) -> IPNetwork:
        return IPNetwork(self.cidr)

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def ipip(self) -> bool:
        return self.ipip_mode != "never"

    @property
    def vxlan(self) -> bool:
        return self.vxlan_mode != "never"

    @property
    def usable(self) -> bool:
        """True when new network subnets may be drawn from this pool."""
        return not self.disabled and not self.deleting

    @property
    def block_count(self) -> int:
        return 2 ** (self.block_size - self.network.prefixlen)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cidr": self.cidr,
            "block_size": self.block_size,
            "ipip_mode": self.ipip_mode,
            "vxlan_mode": self.vxlan_mode,
            "nat_outgoing": self.nat_outgoing,
            "disabled": self.disabled,
        }
        if self.deleting:
            data["deleting"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pool:
        # Records written before the modes existed have only "ipip": true/false.
        legacy_ipip = "always" if data.get("ipip") else "never"
        return cls(
            cidr=str(data["cidr"]),
            block_size=int(data["block_size"]),
            ipip_mode=str(data.get("ipip_mode") or legacy_ipip),
            vxlan_mode=str(data.get("vxlan_mode") or "never"),
            nat_outgoing=bool(data.get("nat_outgoing", False)),
            disabled=bool(data.get("disabled", False)),
            deleting=bool(data.get("deleting", False)),
        )


def check_encapsulation(net: IPNetwork, ipip_mode: str, vxlan_mode: str) -> None:
    """InvalidRequest unless the modes are known, not both on, and fit the family."""
    for flag, mode in (("ipip-mode", ipip_mode), ("vxlan-mode", vxlan_mode)):
        if mode not in ENCAP_MODES:
            raise InvalidRequest(
                f"invalid --{flag} {mode!r} for pool {net}: use one of {', '.join(ENCAP_MODES)}"
            )
    if ipip_mode != "never" and vxlan_mode != "never":
        raise InvalidRequest(
            f"pool {net} cannot use both IP-in-IP and VXLAN: choose one "
            "(set the other to never)"
        )
    if net.version == 6 and (ipip_mode != "never" or vxlan_mode != "never"):
        raise InvalidRequest(
            f"pool {net} is IPv6: IP-in-IP carries only IPv4 and VXLAN is supported for "
            "IPv4 pools only; IPv6 pools are routed directly"
        )


def make_pool(
    cidr: str,
    ipip: bool = False,
    nat_outgoing: bool = False,
    disabled: bool = False,
    block_size: int | None = None,
    ipip_mode: str | None = None,
    vxlan_mode: str | None = None,
) -> Pool:
    """A validated Pool (InvalidRequest on a bad CIDR, a bad or too big block size, or
    bad encapsulation modes). ``ipip=True`` means ``ipip_mode="always"``."""
    net = parse_cidr(cidr, "pool")
    version = net.version
    for forbidden, label in FORBIDDEN_RANGES[version]:
        bad = IPNetwork(forbidden)
        if net.first <= bad.last and bad.first <= net.last:
            raise InvalidRequest(
                f"invalid pool {net}: it overlaps {bad} ({label}), which cannot hold "
                "container addresses"
            )
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE[version]
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise InvalidRequest(f"invalid block size {block_size!r}: expected an integer")
    low, high = BLOCK_SIZE_BOUNDS[version]
    if not low <= block_size <= high:
        raise InvalidRequest(
            f"invalid block size /{block_size} for {family_name(version)} pool {net}: "
            f"it must be between /{low} and /{high}"
        )
    if net.prefixlen > block_size:
        raise InvalidRequest(
            f"pool {net} is smaller than one /{block_size} block: use a pool of prefix "
            f"length /{block_size} or shorter, or a smaller block size"
        )
    ipip_mode = ipip_mode or ("always" if ipip else "never")
    vxlan_mode = vxlan_mode or "never"
    check_encapsulation(net, ipip_mode, vxlan_mode)
    return Pool(
        cidr=str(net),
        block_size=block_size,
        ipip_mode=ipip_mode,
        vxlan_mode=vxlan_mode,
        nat_outgoing=bool(nat_outgoing),
        disabled=bool(disabled),
    )


def _sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, net.first, net.prefixlen)


@dataclass
class PoolSet:
    """Every pool: the document stored under ``pools``. Kept in address order."""

    pools: list[Pool] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"pools": [pool.to_dict() for pool in self.pools]}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PoolSet:
        if not data:
            return cls()
        return cls([Pool.from_dict(item) for item in data.get("pools", [])])

    def get(self, cidr: str) -> Pool:
        net = parse_cidr(cidr, "pool")
        for pool in self.pools:
            if pool.network == net:
                return pool
        known = ", ".join(p.cidr for p in self.pools) or "none"
        raise NotFound(f"no pool {net} (pools: {known})")

    def of_family(self, version: int) -> list[Pool]:
        return [pool for pool in self.pools if pool.version == version]

    def overlapping(self, net: IPNetwork) -> list[Pool]:
        return [
            pool
            for pool in self.pools
            if pool.version == net.version
            and pool.network.first <= net.last
            and net.first <= pool.network.last
        ]

    def containing(self, net: IPNetwork | IPAddress) -> Pool | None:
        """The pool that holds net (a subnet or an address), if any."""
        if isinstance(net, IPAddress):
            net = IPNetwork((int(net), MAX_PREFIX[net.version]), version=net.version)
        for pool in self.pools:
            if pool.version == net.version and net in pool.network:
                return pool
        return None

    def add(self, pool: Pool) -> None:
        """Add pool; Conflict naming the pool(s) it overlaps."""
        clash = self.overlapping(pool.network)
        if clash:
            names = ", ".join(
                p.cidr + (" (being removed)" if p.deleting else "") for p in clash
            )
            raise Conflict(f"pool {pool.cidr} overlaps existing pool {names}")
        self.pools.append(pool)
        self.pools.sort(key=lambda p: _sort_key(p.network))

    def replace(self, pool: Pool) -> None:
        self.pools = [pool if p.cidr == pool.cidr else p for p in self.pools]

    def remove(self, cidr: str) -> None:
        self.pools = [p for p in self.pools if p.cidr != cidr]


def set_flags(
    pool: Pool,
    ipip: bool | None = None,
    nat_outgoing: bool | None = None,
    disabled: bool | None = None,
    ipip_mode: str | None = None,
    vxlan_mode: str | None = None,
) -> Pool:
    """pool with the given flags changed (None keeps a flag); ``ipip`` True/False
    means ipip_mode always/never. InvalidRequest for modes that do not go together."""
    changes: dict[str, Any] = {}
    if ipip is not None and ipip_mode is None:
        ipip_mode = "always" if ipip else "never"
    if ipip_mode is not None:
        changes["ipip_mode"] = ipip_mode
    if vxlan_mode is not None:
        changes["vxlan_mode"] = vxlan_mode
    if nat_outgoing is not None:
        changes["nat_outgoing"] = bool(nat_outgoing)
    if disabled is not None:
        changes["disabled"] = bool(disabled)
    updated = replace(pool, **changes)
    check_encapsulation(updated.network, updated.ipip_mode, updated.vxlan_mode)
    return updated


# ------------------------------------------------------------------------- subnets


def _sorted_hosts(hosts: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({str(host) for host in hosts if host}))


@dataclass(frozen=True)
class SubnetReservation:
    """One network subnet reserved by Docker's RequestPool.

    ``id`` is unique per reservation (a reservation of the same CIDR made after
    a release gets another id); every address allocated in the subnet records
    it, so releasing the subnet never frees a later network's addresses.

    ``hosts`` (sorted) are the hosts whose dockerd holds a network on this
    subnet: the creator, then every host that created the same network with
    the same --subnet and --ip-range (see ``check_share``).

    ``created_revision`` is the store revision at which the record was
    created; it orders overlapping reservations (the earliest wins) and never
    changes. It is None while the reservation is *pending*: just created and
    not yet checked against overlapping reservations and its pool. A pending
    record is never updated (only settled or deleted), so its mod revision is
    its create revision; settling writes that revision into the value, so the
    order survives later updates of ``hosts``. ``migrated`` marks a record
    copied from the legacy single document (see ``ipam_driver.service``).
    """

    cidr: str
    pool: str
    block_size: int
    id: str
    sub_pool: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()
    created_revision: int | None = None
    migrated: bool = False
    created_at: float | None = None  # wall-clock seconds; None in older records

    @property
    def network(self) -> IPNetwork:
        return IPNetwork(self.cidr)

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def scope(self) -> IPNetwork:
        """Where automatic addresses come from: the ip-range if given, else the subnet."""
        return IPNetwork(self.sub_pool) if self.sub_pool else self.network

    @property
    def settled(self) -> bool:
        """True once the reservation passed its overlap and pool checks."""
        return self.created_revision is not None

    def order(self, revision: int) -> int:
        """The create revision, given the record's current mod revision."""
        return self.created_revision if self.created_revision is not None else revision

    def overlaps(self, net: IPNetwork) -> bool:
        return networks_overlap(self.network, net)

    def describe(self) -> str:
        """The subnet and, if any, its ip-range, for messages."""
        return self.cidr + (f" (ip-range {self.sub_pool})" if self.sub_pool else "")

    def reserved_addresses(self) -> set[int]:
        """Never handed out: the network address and, for IPv4, the broadcast address."""
        net = self.network
        reserved = {net.first}
        if net.version == 4:
            reserved.add(net.last)
        return reserved

    def first_usable(self) -> IPAddress:
        return IPAddress(self.network.first + 1, self.version)

    def settle(self, revision: int) -> SubnetReservation:
        return replace(self, created_revision=revision)

    def with_host(self, host: str) -> SubnetReservation:
        return replace(self, hosts=_sorted_hosts((*self.hosts, host)))

    def without_host(self, host: str) -> SubnetReservation:
        return replace(self, hosts=tuple(h for h in self.hosts if h != host))

    def check_share(self, sub_pool: str | None, host: str) -> None:
        """Conflict unless host may join this reservation for a network of its own
        with the same subnet and the given ip-range (None: none)."""
        if host in self.hosts:
            raise Conflict(
                f"subnet {self.cidr} overlaps subnet {self.describe()}, already used by "
                f"another network on this host ({host})"
            )
        if sub_pool != self.sub_pool:
            claimed = ", ".join(self.hosts) or "another host"
            raise Conflict(
                f"subnet {self.cidr} is already used by a network of {claimed} with "
                f"{'ip-range ' + self.sub_pool if self.sub_pool else 'no ip-range'}; "
                "the same network on another host must use the same --subnet and "
                f"--ip-range, not {'ip-range ' + sub_pool if sub_pool else 'no ip-range'}"
            )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cidr": self.cidr,
            "pool": self.pool,
            "block_size": self.block_size,
            "id": self.id,
            "sub_pool": self.sub_pool,
            "options": dict(self.options),
            "hosts": list(self.hosts),
        }
        if self.created_revision is not None:
            data["created_revision"] = self.created_revision
        if self.migrated:
            data["migrated"] = True
        if self.created_at is not None:
            data["created_at"] = self.created_at
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubnetReservation:
        # Records written before subnets could be shared name only their creator.
        hosts = data.get("hosts")
        if hosts is None:
            hosts = [data["host"]] if data.get("host") else []
        created = data.get("created_revision")
        return cls(
            cidr=str(data["cidr"]),
            pool=str(data["pool"]),
            block_size=int(data["block_size"]),
            id=str(data["id"]),
            sub_pool=data.get("sub_pool") or None,
            options={str(k): str(v) for k, v in (data.get("options") or {}).items()},
            hosts=_sorted_hosts(hosts),
            created_revision=int(created) if created is not None else None,
            migrated=bool(data.get("migrated", False)),
            created_at=float(data["created_at"]) if data.get("created_at") is not None
            else None,
        )


@dataclass
class SubnetTable:
    """A set of network subnet reservations, by CIDR: a read-only view.

    The service builds it from the per-subnet records (one key each). The
    legacy format, one document ``{"subnets": {cidr: reservation}}`` under
    ``ipam/subnets`` written by earlier versions, is read by ``from_dict``
    (and written by ``to_dict``) for the migration only.
    """

    subnets: dict[str, SubnetReservation] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Iterable[SubnetReservation]) -> SubnetTable:
        return cls({rec.cidr: rec for rec in records})

    def to_dict(self) -> dict[str, Any]:
        return {"subnets": {cidr: rec.to_dict() for cidr, rec in self.subnets.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SubnetTable:
        if not data:
            return cls()
        return cls(
            {
                str(cidr): SubnetReservation.from_dict(rec)
                for cidr, rec in (data.get("subnets") or {}).items()
            }
        )

    def get(self, cidr: str) -> SubnetReservation | None:
        return self.subnets.get(cidr)

    def sorted(self) -> list[SubnetReservation]:
        return sorted(self.subnets.values(), key=lambda r: _sort_key(r.network))

    def overlapping(self, net: IPNetwork) -> list[SubnetReservation]:
        return [rec for rec in self.sorted() if rec.overlaps(net)]

    def containing(self, address: IPAddress) -> SubnetReservation | None:
        for rec in self.subnets.values():
            if rec.version == address.version and address in rec.network:
                return rec
        return None

    def check_free(self, net: IPNetwork) -> None:
        """Conflict naming the reservations (and their ip-ranges) that overlap net."""
        clash = self.overlapping(net)
        if clash:
            names = ", ".join(r.describe() for r in clash)
            raise Conflict(
                f"subnet {net} overlaps subnet {names}, already used by another network"
            )


def carve(pool: IPNetwork, taken: Iterable[IPNetwork], prefixlen: int) -> IPNetwork | None:
    """The first subnet of prefixlen inside pool that overlaps nothing in taken.

    A pool smaller than prefixlen is one subnet as a whole. Works on the free
    space (an IPSet), so it is cheap even for an IPv6 /48 pool cut into /64s.
    """
    size = max(prefixlen, pool.prefixlen)
    free = IPSet([pool]) - IPSet(list(taken))
    for cidr in free.iter_cidrs():
        if cidr.prefixlen <= size:
            return IPNetwork((cidr.first, size), version=pool.version).cidr
    return None
