"""The IPAM service: pools, network subnets, addresses and handles over the datastore.

Every operation is read -> decide (pure code in ``pools`` / ``blocks``) ->
compare-and-swap write, retried from the read when another writer got there
first (bounded by ``max_attempts``; then Unavailable). What is cached in
memory is only ever used as the expected revision of a compare-and-swap, or
checked afterwards (the reservation of an allocation is re-read after it, see
below), so any number of workers, processes and hosts may share one datastore:
this host's blocks (``block_store``) and one flag ("this store has no legacy subnets document").

Datastore keys (all under ``datastore.base.ROOT``, values JSON):

``pools``
    One document, ``{"pools": [Pool...]}``: every pool, in address order.
``ipam/subnets/<cidr with "/" as "-">``
    One SubnetReservation per network subnet, e.g. ``ipam/subnets/10.0.1.0-24``
    (the pool id Docker gets is the CIDR): ``cidr``, ``pool``, ``block_size``,
    ``id`` (unique per reservation), ``sub_pool`` (--ip-range), ``options``,
    ``hosts`` (sorted: every host whose dockerd has a network on it),
    ``created_revision`` (the record's create revision; absent while the
    record is *pending*, see below) and ``migrated`` (copied from the legacy
    document). One key per subnet, so ``docker network create`` on many hosts
    does not rewrite one shared document.
``ipam/subnets`` (legacy)
    The single document ``{"subnets": {cidr: reservation}}`` of earlier
    versions; moved to per-subnet keys and deleted on first use (Migration).
``ipam/blocks/<cidr>`` and ``ipam/affinity/<host>/<cidr>``
    The allocation blocks (one per claimed cell of a pool's grid, e.g.
    ``ipam/blocks/10.0.1.64-26``) and the affinity index beside them: see
    ``ipam_driver.block_store``, which also holds the allocation hot path and
    this process's cached view of its host's blocks. A block whose last address
    is released is deleted (its affinity goes with it). Every address records
    its reservation id; a gateway also records the hosts using it (``hosts``).

Races and why they are safe:

* Overlapping reservations, with only single-key compare-and-swap.
  request_pool creates its record *pending* (``create`` fails if the CIDR's
  key exists), then *decides* it: it lists every reservation and re-reads the
  pools document; the record is doomed if an overlapping reservation has a
  lower create revision (a pending record's mod revision is its create
  revision, since pending records are never updated; a settled one carries
  ``created_revision``, which later updates of ``hosts`` keep), or if its pool
  is gone or being removed. A doomed record is deleted (CAS on the revision
  read) and the request re-runs its checks, which now refuse it (or carve the
  next free subnet); otherwise the record is *settled*: one update, on the
  revision read, that writes ``created_revision``. Exactly the earliest
  survives: revisions are store-wide and increasing, so of overlapping A
  (created at a) and B (at b > a), B's listing comes after b > a, when A still
  exists unless it is already deleted (a key that comes back is a new record
  with a higher revision); B sees A and dooms itself, and A never yields to a
  later record. The check is valid at any time after the create, so any
  process may decide any pending record: a request that meets a pending
  record of its own CIDR (another host creating the same network, or a
  creator that crashed) decides it and goes on; decisions racing on one record
  are CAS on its one revision and either outcome is correct. Pending records
  count in overlap checks (that is what the argument needs), so a record
  doomed by a pending one that is itself doomed later is refused needlessly: a
  refusal in a race, never an overlap. Docker never sees a pending record:
  request_pool returns only settled ones; the address operations,
  ``get_subnet``, ``list_subnets`` and ``list_pools`` ignore pending records.
* ``remove_pool`` vs ``request_pool``: remove marks the pool ``deleting`` (CAS
  on the pools document, at m), then lists the reservations in the pool (at
  l > m): a settled one makes it refuse (and unmark); a pending one it decides
  itself, and as its pools read comes after m it dooms it, unless the creator
  settled it first (CAS on the same revision), and then remove refuses. A
  request creates its record at c: if c < l remove sees it; if c > l > m, the
  request's decision reads the pools after m and dooms its own record. So
  either the removal is refused or the reservation is deleted: never a subnet
  left in a removed pool.
* Sharing one subnet between hosts (each host's dockerd creates its own
  network ``web`` with the same --subnet): a host asking for exactly a settled
  subnet it does not claim, with the same ip-range, adds itself to ``hosts``
  (CAS on the record). ``release_pool`` removes the caller from ``hosts``
  (CAS); the last host deletes the record (CAS on the same revision), so a
  late claim and the final release never both succeed (a claim that lost
  re-reads and creates a fresh reservation), and exactly one release deletes
  the record and sweeps the subnet's leaked addresses.
* The gateway of a shared subnet is allocated once; a gateway request on a
  shared reservation adds the host to the gateway's ``hosts`` (CAS on its
  block) and gets the same address. ``release_address`` of it removes the
  caller and frees it only when no other host uses it and the reservation has
  no other host; claim and free are CAS on the one block. (If the free wins
  against a host that has just joined the reservation, that host's gateway
  request allocates the address again, or is refused if a container took it
  meanwhile: never two owners of one address.)
* Two hosts claiming one block: ``create`` lets exactly one win; every other
  change to a block is an ``update`` or ``delete`` on the revision read.
* ``release_pool`` vs ``request_address`` on the same subnet: the allocation
  is written first and the reservation re-read afterwards; if it is gone (or
  replaced by a new reservation of the same CIDR, recognised by its id), the
  allocation is undone. The sweep of ``release_pool`` runs after the
  reservation is deleted and reads the live reservations after each block, so
  every allocation is either swept or undone, and an allocation of a newer
  reservation of the same CIDR is never swept.

Migration from the legacy document, on first use by any operation that reads
reservations: for each reservation in it, create its key as a pending
``migrated`` record if absent; settle a pending migrated record only when the
legacy document still exists *after* the pending record was read; once every
record is settled, delete the legacy document with a CAS on the revision read
(the commit). Several processes may do this at once: creates are
create-if-absent, settles are CAS, the commit happens once, and the others
then find no document. Ids are kept, so existing addresses stay tied to their
subnets. A migrator that read the document before the commit but creates a
key after it (maybe after a release deleted that subnet) leaves a pending
migrated record that can never settle, because the document never comes
back; so it cannot resurrect a released subnet: such records count as absent
everywhere and are deleted when listed. Stop plugins of the previous version
before upgrading: one that rewrites the document during the migration makes
the commit fail and start over, but a reservation it dropped would remain.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from netaddr import IPAddress, IPNetwork

from datastore.base import (
    ROOT,
    AlreadyExists,
    Datastore,
    DatastoreError,
    Entry,
    Guard,
    GuardChanged,
    RevisionConflict,
    cas_attempts,
    dumps,
    unavailable_as_error,
)
from datastore.errors import Conflict, Exhausted, InvalidRequest, NotFound
from ipam_driver.batching import Batcher
from ipam_driver.block_format import BlockFormat, set_block_format
from ipam_driver.block_store import (
    BlockStore,
    block_key,
)
from ipam_driver.blocks import AddressAllocation, AddressInUse, AllocationBlock
from ipam_driver.pools import (
    ADD_POOL_HINT,
    MAX_SUBNET_PREFIX,
    Pool,
    PoolSet,
    SubnetReservation,
    SubnetTable,
    carve,
    family_name,
    grid_block,
    make_pool,
    parse_address,
    parse_cidr,
    set_flags,
)

POOLS_KEY = ROOT + "pools"
SUBNETS_PREFIX = ROOT + "ipam/subnets/"
# The single subnets document of earlier versions: read once, to migrate it.
LEGACY_SUBNETS_KEY = ROOT + "ipam/subnets"
REQUEST_ADDRESS_TYPE = "RequestAddressType"
GATEWAY_ADDRESS_TYPE = "com.docker.network.gateway"

KIND_GATEWAY = "gateway"
# The IPAM option that marks a node's tunnel-address subnet (routing.tunnels).
TUNNEL_OPTION = "calico-cnm.tunnel"
# Recorded on a subnet carved for a network created without --subnet.
CARVED_OPTION = "calico-cnm.carved"
KIND_AUX = "aux"
KIND_CONTAINER = "container"

_CAS_ERRORS = (AlreadyExists, RevisionConflict)
T = TypeVar("T")

Held = tuple[Entry, SubnetReservation]


def subnet_key(cidr: IPNetwork | str) -> str:
    return SUBNETS_PREFIX + str(cidr).replace("/", "-")

_store_errors = unavailable_as_error("IPAM")


@dataclass(frozen=True)
class Allocation:
    """One allocated address, for `calico-cnm ipam show`."""

    address: str
    subnet: str | None
    handle: str | None
    kind: str
    block: str
    host: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "subnet": self.subnet,
            "handle": self.handle,
            "kind": self.kind,
            "block": self.block,
            "host": self.host,
        }


@dataclass(frozen=True)
class PoolUsage:
    """A pool with its use, for `calico-cnm pool show`. capacity counts every address."""

    pool: Pool
    capacity: int
    allocated: int
    subnets: tuple[str, ...]
    blocks: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.pool.to_dict(),
            "capacity": self.capacity,
            "allocated": self.allocated,
            "subnets": list(self.subnets),
            "blocks": self.blocks,
        }


@dataclass(frozen=True)
class SubnetInfo:
    """What the network driver needs to know about a pool id."""

    pool_id: str
    cidr: str
    pool: str
    sub_pool: str | None
    gateway: str | None
    options: dict[str, str]
    hosts: tuple[str, ...] = ()

    @property
    def v6(self) -> bool:
        return IPNetwork(self.cidr).version == 6

    @property
    def prefixlen(self) -> int:
        return IPNetwork(self.cidr).prefixlen

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool_id": self.pool_id,
            "cidr": self.cidr,
            "pool": self.pool,
            "sub_pool": self.sub_pool,
            "gateway": self.gateway,
            "options": dict(self.options),
            "hosts": list(self.hosts),
        }


def _gateway_users(record: AddressAllocation) -> set[str]:
    """The hosts using a gateway address (older records name only the requester)."""
    hosts = record.attrs.get("hosts")
    if hosts is None:
        requester = record.attrs.get("requested_by")
        return {str(requester)} if requester else set()
    return {str(host) for host in hosts}


def _allocation(
    address: IPAddress, record: AddressAllocation, block: AllocationBlock
) -> Allocation:
    return Allocation(
        address=str(address),
        subnet=record.attrs.get("subnet"),
        handle=record.handle,
        kind=str(record.attrs.get("kind", KIND_CONTAINER)),
        block=str(block.cidr),
        host=block.host,
    )


class IpamService:
    """Pools, network subnets (Docker's IPAM pools), addresses and handles.

    hostname is this host's name for block affinity. Automatic network
    subnets are /network_prefix_v4 (IPv4) or /network_prefix_v6 (IPv6), or a
    whole pool when the pool is smaller.
    """

    def __init__(
        self,
        store: Datastore,
        hostname: str,
        network_prefix_v4: int = 24,
        network_prefix_v6: int = 64,
        max_attempts: int = 100,
        refresh_in_background: bool = False,
    ) -> None:
        for version, prefix in ((4, network_prefix_v4), (6, network_prefix_v6)):
            if not 1 <= prefix <= MAX_SUBNET_PREFIX[version]:
                raise ValueError(
                    f"invalid {family_name(version)} network prefix /{prefix}: "
                    f"it must be between /1 and /{MAX_SUBNET_PREFIX[version]}"
                )
        if not hostname:
            raise ValueError("IpamService needs a hostname for block affinity")
        self.store = store
        self.hostname = hostname
        self.network_prefix = {4: network_prefix_v4, 6: network_prefix_v6}
        self.max_attempts = max(1, max_attempts)
        self._migrated = False
        self.blocks = BlockStore(store, hostname, self._attempts, BlockFormat(store).compact,
                                 refresh_in_background=refresh_in_background)
        self._auto_batches: Batcher[str, dict[str, str], str] = Batcher(self._serve_auto)

    # ================================================================== pools

    @_store_errors
    def add_pool(
        self,
        cidr: str,
        ipip: bool = False,
        nat_outgoing: bool = False,
        disabled: bool = False,
        block_size: int | None = None,
        ipip_mode: str | None = None,
        vxlan_mode: str | None = None,
    ) -> Pool:
        """Create a pool. InvalidRequest for a bad CIDR, block size or encapsulation
        modes; Conflict on overlap."""
        pool = make_pool(cidr, ipip, nat_outgoing, disabled, block_size, ipip_mode,
                         vxlan_mode)

        def add(pools: PoolSet) -> tuple[bool, Pool]:
            pools.add(pool)
            return True, pool

        return self._change_pools(f"adding pool {pool.cidr}", add)

    @_store_errors
    def update_pool(
        self,
        cidr: str,
        ipip: bool | None = None,
        nat_outgoing: bool | None = None,
        disabled: bool | None = None,
        ipip_mode: str | None = None,
        vxlan_mode: str | None = None,
    ) -> Pool:
        """Change a pool's flags (None keeps a flag). Disabling only stops new subnets."""

        def update(pools: PoolSet) -> tuple[bool, Pool]:
            current = pools.get(cidr)
            if current.deleting:
                raise Conflict(f"pool {current.cidr} is being removed")
            updated = set_flags(current, ipip, nat_outgoing, disabled, ipip_mode, vxlan_mode)
            if updated == current:
                return False, current
            pools.replace(updated)
            return True, updated

        return self._change_pools(f"updating pool {cidr}", update)

    @_store_errors
    def get_pools(self) -> list[Pool]:
        """Every pool, in address order (IPv4 first); one datastore read."""
        return list(self._read_pools()[1].pools)

    @_store_errors
    def get_pool(self, cidr: str) -> Pool:
        return self._read_pools()[1].get(cidr)

    @_store_errors
    def ensure_default_pools(self, cidrs: Iterable[str], nat_outgoing: bool = True
                             ) -> list[Pool]:
        """First start: create the given pools of each IP family that has no pool yet.

        Default pools masquerade traffic leaving them (as Calico's default pool does),
        so containers reach the outside world out of the box.
        Returns the pools created (none when every family already had one).
        Safe when several workers start at once: one CAS on the pools document.
        """
        candidates = [make_pool(cidr, nat_outgoing=nat_outgoing) for cidr in cidrs]

        def add_missing(pools: PoolSet) -> tuple[bool, list[Pool]]:
            present = {pool.version for pool in pools.pools}
            created = [pool for pool in candidates if pool.version not in present]
            for pool in created:
                pools.add(pool)
            return bool(created), created

        return self._change_pools("creating the default pools", add_missing)

    @_store_errors
    def remove_pool(self, cidr: str) -> None:
        """Delete a pool. Conflict while a network subnet or an address is in it.

        See the module docstring for why this cannot race with request_pool.
        """
        pool = self._read_pools()[1].get(cidr)
        in_pool = [rec for _e, rec in self._list_reservations() if rec.overlaps(pool.network)]
        tunnels = [rec for rec in in_pool if rec.options.get(TUNNEL_OPTION)]
        if tunnels and len(tunnels) == len(in_pool):
            # Only nodes' tunnel addresses are left: infrastructure, released with the
            # pool (each agent takes a new one from another pool of that mode).
            for rec in tunnels:
                for host in rec.hosts:
                    IpamService(self.store, host, max_attempts=self.max_attempts
                                ).release_pool(rec.cidr)
            in_pool = []
        # Read-only check first: the usual refusal writes nothing (unless it has to
        # clear the mark of an earlier removal that was interrupted).
        try:
            self._check_pool_unused(
                pool, [rec for rec in in_pool if rec.settled], self.blocks.inside(pool.network)
            )
        except Conflict:
            if pool.deleting:
                self._set_deleting(pool.cidr, False)
            raise
        self._set_deleting(pool.cidr, True)
        try:
            # Listed after the mark: a reservation created later dooms itself.
            in_use = []
            for entry, rec in self._list_reservations():
                if not rec.overlaps(pool.network):
                    continue
                if not rec.settled:
                    decided = self._decide(entry.key)  # doomed: the pool is deleting
                    if decided is None:
                        continue
                    rec = decided[1]
                in_use.append(rec)
            self._check_pool_unused(pool, in_use, [])
            for _ in self._attempts(f"removing the blocks of pool {pool.cidr}"):
                blocks = self.blocks.inside(pool.network)
                self._check_pool_unused(pool, [], blocks)
                try:
                    for entry, block in blocks:
                        self.blocks.delete(entry.key, entry.revision, block.host)
                except RevisionConflict:
                    continue
                break
        except Conflict:
            self._set_deleting(pool.cidr, False)
            raise
        for _ in self._attempts(f"removing pool {pool.cidr}"):
            entry, pools = self._read_pools()
            pools.remove(pool.cidr)
            try:
                self._write(POOLS_KEY, entry, pools.to_dict())
            except _CAS_ERRORS:
                continue
            return

    @_store_errors
    def list_pools(self) -> list[PoolUsage]:
        """Every pool with its capacity, allocated addresses, subnets and blocks."""
        pools = self._read_pools()[1].pools
        table = self._settled_table()
        blocks = [block for _entry, block in self.blocks.all()]
        usage = []
        for pool in pools:
            net = pool.network
            inside = [b for b in blocks if b.version == net.version and b.cidr in net]
            usage.append(
                PoolUsage(
                    pool=pool,
                    capacity=net.size,
                    allocated=sum(b.used_count for b in inside),
                    subnets=tuple(r.cidr for r in table.overlapping(net)),
                    blocks=len(inside),
                )
            )
        return usage

    # ================================================================ subnets

    @_store_errors
    def request_pool(
        self,
        pool: str | None,
        sub_pool: str | None,
        options: dict[str, str] | None,
        v6: bool,
    ) -> tuple[str, str, dict[str, str]]:
        """Reserve a network subnet (Docker's RequestPool): (pool_id, subnet cidr, data).

        pool is Docker's --subnet (None or "" to carve one), sub_pool its
        --ip-range. The pool id is the subnet CIDR. A subnet that another host
        already reserved with the same ip-range is shared: this host is added
        to its hosts and gets the same pool id. Carving never shares.
        """
        version = 6 if v6 else 4
        family = family_name(version)
        net: IPNetwork | None = None
        if pool:
            net = parse_cidr(pool, "subnet")
            if net.version != version:
                raise InvalidRequest(
                    f"subnet {net} is {family_name(net.version)} but an {family} "
                    "subnet was requested"
                )
            if net.prefixlen > MAX_SUBNET_PREFIX[version]:
                raise InvalidRequest(
                    f"subnet {net} is too small for a gateway and a container: use "
                    f"/{MAX_SUBNET_PREFIX[version]} or larger"
                )
        range_net: IPNetwork | None = None
        if sub_pool:
            if net is None:
                raise InvalidRequest(f"ip-range {sub_pool} needs an explicit subnet (--subnet)")
            range_net = parse_cidr(sub_pool, "ip-range")
            if range_net.version != net.version or range_net not in net:
                raise InvalidRequest(f"ip-range {range_net} is not inside subnet {net}")
        opts = {str(k): str(v) for k, v in (options or {}).items()}
        wanted_range = str(range_net) if range_net is not None else None

        for _ in self._attempts("reserving a network subnet"):
            held = self._list_reservations()
            pools = self._read_pools()[1]
            if net is not None:
                key = subnet_key(net)
                exact = next(((e, r) for e, r in held if e.key == key), None)
                if exact is not None:
                    entry, existing = exact
                    if not existing.settled:
                        # Another host creating the same network right now (or a
                        # creator that died): decide its record, then look again.
                        self._decide(key)
                        continue
                    existing.check_share(wanted_range, self.hostname)
                    try:
                        self.store.update(
                            key, dumps(existing.with_host(self.hostname).to_dict()),
                            entry.revision,
                        )
                    except RevisionConflict:
                        continue
                    return existing.cidr, existing.cidr, {}
                parent = self._parent_pool(pools, net)
                SubnetTable.of(rec for _e, rec in held).check_free(net)
                rec = self._reservation(net, parent, range_net, opts)
            else:
                rec = self._carve(pools, SubnetTable.of(r for _e, r in held), version, opts)
            key = subnet_key(rec.cidr)
            try:
                created = self.store.create(key, dumps(rec.to_dict()))
            except AlreadyExists:
                continue
            try:
                decided = self._decide(key)
            except BaseException:
                self._abandon(key, created.revision)
                raise
            if decided is None or decided[1].id != rec.id:
                # Doomed (an earlier overlapping subnet, or the pool is being
                # removed): the next pass refuses with the reason, or carves on.
                continue
            return rec.cidr, rec.cidr, {}
        raise AssertionError("unreachable")

    @_store_errors
    def release_pool(self, pool_id: str) -> list[str]:
        """This host gives up a network subnet (Docker's ReleasePool).

        The subnet stays while other hosts claim it (returns []). The last host
        deletes it and frees every address still allocated in it (leaks):
        returns the leaked addresses freed. NotFound for an unknown pool id or
        a subnet that this host does not claim.
        """
        for _ in self._attempts(f"releasing network subnet {pool_id}"):
            entry, rec = self._get_reservation(pool_id)
            if rec.hosts and self.hostname not in rec.hosts:
                raise NotFound(
                    f"network subnet {rec.cidr} is not claimed by host {self.hostname} "
                    f"(it is claimed by {', '.join(rec.hosts)})"
                )
            remaining = rec.without_host(self.hostname)
            try:
                if remaining.hosts:
                    self.store.update(entry.key, dumps(remaining.to_dict()), entry.revision)
                    return []
                self.store.delete(entry.key, entry.revision)
            except RevisionConflict:
                continue
            break
        freed: list[str] = []
        for block_entry, _block in self.blocks.overlapping(rec.network, rec.block_size):
            freed.extend(self._sweep_block(block_entry.key, rec))
        return freed

    @_store_errors
    def get_subnet(self, pool_id: str) -> SubnetInfo:
        """The subnet, ip-range, options, hosts and gateway (if allocated) of a pool id."""
        rec = self._get_reservation(pool_id)[1]
        blocks = [b for _e, b in self.blocks.overlapping(rec.network, rec.block_size)]
        return self._subnet_info(rec, blocks)

    @_store_errors
    def reservations(self) -> list[tuple[int, SubnetReservation]]:
        """Every settled subnet reservation with its record's revision."""
        return [(entry.revision, rec) for entry, rec in self._list_reservations()
                if rec.settled]

    @_store_errors
    def claimed_hosts(self, pool_id: str) -> list[str]:
        """The hosts that hold a network on this subnet, sorted."""
        return list(self._get_reservation(pool_id)[1].hosts)

    @_store_errors
    def list_subnets(self) -> list[SubnetInfo]:
        table = self._settled_table()
        blocks = [block for _entry, block in self.blocks.all()]
        return [self._subnet_info(rec, blocks) for rec in table.sorted()]

    # ============================================================== addresses

    @_store_errors
    def request_address(
        self, pool_id: str, address: str | None, options: dict[str, str] | None
    ) -> str:
        """Allocate an address in a network subnet: "a.b.c.d/<subnet prefix length>".

        Options[RequestAddressType] == com.docker.network.gateway asks for the
        gateway (address, or the subnet's first usable one). An explicit address
        must lie inside the subnet (Conflict if taken) and is recorded as kind
        "aux" until assign_handle() ties it to an endpoint; automatic addresses
        come from the ip-range (else the subnet), kind "container". On a subnet
        shared by several hosts, a gateway request gets the gateway already
        allocated (when it asks for no address or that one; Conflict naming it
        for another one).
        """
        opts = {str(k): str(v) for k, v in (options or {}).items()}
        gateway = opts.pop(REQUEST_ADDRESS_TYPE, None) == GATEWAY_ADDRESS_TYPE
        if not gateway and not address:
            return self._request_auto(pool_id, opts)
        for _ in self._attempts(f"allocating an address in network subnet {pool_id}"):
            try:
                return self._request_given(pool_id, address, opts, gateway)
            except GuardChanged:
                continue  # the reservation changed after it was read: read it again
        raise AssertionError("unreachable")

    def _request_auto(self, pool_id: str, opts: dict[str, str]) -> str:
        """An automatic container address, served with the other automatic requests
        for the same subnet that are waiting in this process (_serve_auto)."""
        return self._auto_batches.submit(pool_id, opts)

    def _serve_auto(self, pool_id: str, requests: list[dict[str, str]]) -> Iterator[str]:
        """Addresses for a batch of automatic requests (their options), in order.

        The reservation is read first, from the store, once per batch and after every
        request of it arrived: in an outage that read fails before anything is written
        (a write sent to a frozen etcd may still be applied once it thaws). Block
        writes are guarded by the revision read, so nothing is allocated for a
        reservation released (or changed) since; each write serves as many requests
        as its block has room for.
        """
        waiting = list(requests)
        for _ in self._attempts(f"allocating an address in network subnet {pool_id}"):
            entry, rec = self._get_reservation(pool_id)
            guard = Guard(entry.key, entry.revision)
            try:
                while waiting:
                    attrs = [self._address_attrs(rec, KIND_CONTAINER, opts)
                             for opts in waiting]
                    ips = self.blocks.allocate_auto(rec, attrs, guard)
                    for ip in ips:
                        yield f"{ip}/{rec.network.prefixlen}"
                    waiting = waiting[len(ips):]
                return
            except GuardChanged:
                continue  # the reservation changed after it was read: read it again

    def _request_given(self, pool_id: str, address: str | None, opts: dict[str, str],
                       gateway: bool) -> str:
        """A gateway, or an address asked for by value; the block write is guarded as
        in _request_auto."""
        entry, rec = self._get_reservation(pool_id)
        ip: IPAddress | None = None
        if address:
            ip = parse_address(address)
            self._check_usable(ip, rec)
        requested = ip
        shared = gateway and len(rec.hosts) > 1
        if shared:
            joined = self._join_gateway(rec, requested)
            if joined is not None:
                self._check_still_reserved(rec, joined)
                return f"{joined}/{rec.network.prefixlen}"
        if gateway and ip is None:
            ip = rec.first_usable()
        attrs = self._address_attrs(rec, KIND_GATEWAY if gateway else KIND_AUX, opts)
        if gateway:
            attrs["hosts"] = [self.hostname]
        if ip is not None:
            try:
                self._allocate_specific(rec, ip, attrs, Guard(entry.key, entry.revision))
            except AddressInUse:
                # Another host of a shared subnet may have allocated the gateway
                # between our look and our write (and may have joined the subnet
                # after we read it): then it is ours too.
                joined = None
                if gateway:
                    current = self._get_reservation(pool_id)[1]
                    if current.id == rec.id and len(current.hosts) > 1:
                        joined = self._join_gateway(current, requested)
                if joined is None:
                    raise
                self._check_still_reserved(rec, joined)
                return f"{joined}/{rec.network.prefixlen}"
        return f"{ip}/{rec.network.prefixlen}"

    def _address_attrs(self, rec: SubnetReservation, kind: str, opts: dict[str, str]
                       ) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "kind": kind,
            "subnet": rec.cidr,
            "reservation": rec.id,
            "requested_by": self.hostname,
        }
        if opts:
            attrs["options"] = opts
        return attrs

    @_store_errors
    def set_block_format(self, block_format: int) -> int:
        """Store the block record format (1 rewrites every block in it: see
        block_format.py); how many blocks were rewritten."""
        return set_block_format(self.store, block_format, self._attempts)

    @_store_errors
    def release_address(self, pool_id: str, address: str) -> None:
        """Free an address. NotFound for an unknown pool id or an address not allocated.

        The gateway of a subnet that other hosts still claim (or whose gateway
        other hosts use) stays allocated: this host only stops using it.
        Docker may repeat a ReleaseAddress; the HTTP layer may treat NotFound
        as success there.
        """
        rec = self._get_reservation(pool_id)[1]
        ip = parse_address(address)
        if ip.version != rec.version or ip not in rec.network:
            raise NotFound(f"address {ip} is not in subnet {rec.cidr}")
        other_hosts = set(rec.hosts) - {self.hostname}
        key = block_key(grid_block(ip, ip.version, rec.block_size))

        def release(block: AllocationBlock | None) -> tuple[bool, None]:
            record = block.get(ip) if block is not None else None
            if block is None or record is None:
                raise NotFound(f"address {ip} is not allocated in subnet {rec.cidr}")
            if (
                record.attrs.get("kind") == KIND_GATEWAY
                and record.attrs.get("reservation") == rec.id
            ):
                users = _gateway_users(record) - {self.hostname}
                if users or other_hosts:
                    if record.attrs.get("hosts") == sorted(users):
                        return False, None
                    record.attrs["hosts"] = sorted(users)
                    return True, None
            block.release(ip)
            return True, None

        self._change_block(key, f"releasing address {ip}", release)

    # ================================================================ handles

    @_store_errors
    def assign_handle(self, address: str, handle: str) -> None:
        """Tag an allocated address with its endpoint id (kind "aux" becomes "container")."""
        ip = parse_address(address)
        rec = self._settled_table().containing(ip)
        if rec is None:
            raise NotFound(f"address {ip} is not in any network subnet")
        key = block_key(grid_block(ip, ip.version, rec.block_size))

        def tag(block: AllocationBlock | None) -> tuple[bool, None]:
            if block is None:
                raise NotFound(f"address {ip} is not allocated")
            record = block.get_or_raise(ip)
            kind = record.attrs.get("kind")
            new_kind = KIND_CONTAINER if kind == KIND_AUX else kind
            if record.handle == handle and kind == new_kind:
                return False, None
            record.handle = handle
            record.attrs["kind"] = new_kind
            return True, None

        self._change_block(key, f"tagging address {ip}", tag)

    @_store_errors
    def release_handle(self, handle: str) -> list[str]:
        """Free every address tagged with handle; the addresses freed (maybe none)."""
        freed: list[str] = []
        for entry, block in self.blocks.all():
            if any(record.handle == handle for _ip, record in block.allocations()):
                freed.extend(self._release_handle_in(entry.key, handle))
        return freed

    @_store_errors
    def release_affinity(self, host: str) -> list[str]:
        """For a host removed for good: frees the addresses it allocated (but not
        gateways, which its networks' other hosts still use) and gives up its blocks;
        a block left empty is deleted, one still holding addresses stays without a
        host. Returns the blocks that were the host's."""

        def gone(_ip: IPAddress, record: AddressAllocation) -> bool:
            return (record.attrs.get("requested_by") == host
                    and record.attrs.get("kind") != KIND_GATEWAY)

        released: list[str] = []
        for entry, block in self.blocks.all():
            owned = block.host == host
            if not owned and not any(gone(ip, r) for ip, r in block.allocations()):
                continue

            def change(current: AllocationBlock | None) -> tuple[bool, None]:
                if current is None:
                    return False, None
                current.release_where(gone)
                if current.host == host:
                    current.host = None
                return True, None

            self._change_block(entry.key, f"releasing the blocks of {host}", change)
            if owned:
                released.append(str(block.cidr))
        return released

    @_store_errors
    def list_allocations(self) -> list[Allocation]:
        """Every allocated address, in address order (IPv4 first)."""
        result = [
            _allocation(ip, record, block)
            for _entry, block in self.blocks.all()
            for ip, record in block.allocations()
        ]
        result.sort(key=lambda a: (IPAddress(a.address).version, int(IPAddress(a.address))))
        return result

    @_store_errors
    def requested_here(self) -> list[tuple[str, str, str | None]]:
        """(address, subnet, handle) of every container or aux address this host
        requested (not gateways); the handle is the endpoint ID, None before one."""
        return [
            (str(ip), str(record.attrs["subnet"]), record.handle)
            for _entry, block in self.blocks.all()
            for ip, record in block.allocations()
            if record.attrs.get("subnet")
            and record.attrs.get("requested_by") == self.hostname
            and record.attrs.get("kind", KIND_CONTAINER) in (KIND_CONTAINER, KIND_AUX)
        ]

    # =============================================================== internal

    def _attempts(self, what: str) -> Iterator[int]:
        return cas_attempts(what, self.max_attempts)

    def _write(self, key: str, entry: Entry | None, data: Any) -> Entry:
        if entry is None:
            return self.store.create(key, dumps(data))
        return self.store.update(key, dumps(data), entry.revision)

    def _read_pools(self) -> tuple[Entry | None, PoolSet]:
        entry = self.store.get(POOLS_KEY)
        return entry, PoolSet.from_dict(entry.data if entry else None)

    # ------------------------------------------------------ subnet reservations

    def _list_reservations(self) -> list[Held]:
        """Every reservation record, pending or settled, in key order.

        A pending migrated record left by a migrator that lost (see the module
        docstring) can never settle: it is left out and deleted.
        """
        self._ensure_migrated()
        held: list[Held] = []
        for entry in self.store.list(SUBNETS_PREFIX):
            rec = SubnetReservation.from_dict(entry.data)
            if rec.migrated and not rec.settled:
                try:
                    self.store.delete(entry.key, entry.revision)
                except RevisionConflict:
                    pass
                continue
            held.append((entry, rec))
        return held

    def _settled_table(self) -> SubnetTable:
        """The reservations Docker can know: the settled ones."""
        return SubnetTable.of(rec for _entry, rec in self._list_reservations() if rec.settled)

    def _get_reservation(self, pool_id: str) -> Held:
        """The settled reservation of a pool id (its CIDR); NotFound otherwise."""
        self._ensure_migrated()
        entry = self.store.get(subnet_key(pool_id))
        rec = SubnetReservation.from_dict(entry.data) if entry is not None else None
        if entry is None or rec is None or not rec.settled or rec.cidr != str(pool_id):
            raise NotFound(f"unknown IPAM pool id {pool_id!r}: no such network subnet")
        return entry, rec

    def _decide(self, key: str) -> Held | None:
        """Settle or delete the pending reservation at key; the settled record, or
        None when it is (now) gone. A settled record is returned as it is."""
        for _ in self._attempts("deciding a network subnet reservation"):
            entry = self.store.get(key)
            if entry is None:
                return None
            rec = SubnetReservation.from_dict(entry.data)
            if rec.settled:
                return entry, rec
            # Called only after the migration: a pending migrated record is garbage.
            doomed = rec.migrated or self._doomed(key, rec, entry.revision)
            try:
                if doomed:
                    self.store.delete(key, entry.revision)
                    return None
                settled = rec.settle(entry.revision)
                new = self.store.update(key, dumps(settled.to_dict()), entry.revision)
            except RevisionConflict:
                continue
            return new, settled
        raise AssertionError("unreachable")

    def _abandon(self, key: str, revision: int) -> None:
        """Best effort: delete our pending record after a failure (gave up, store
        down). If that fails too, the next request of its subnet decides it."""
        try:
            self.store.delete(key, revision)
        except DatastoreError:
            pass

    def _doomed(self, key: str, rec: SubnetReservation, created: int) -> bool:
        """True if rec (created at revision created) must yield: an overlapping
        reservation is older, or its pool is gone or being removed. Both reads
        come after the create (see the module docstring)."""
        net = rec.network
        for entry, other in self._list_reservations():
            if entry.key != key and other.overlaps(net) and other.order(entry.revision) < created:
                return True
        pool = self._read_pools()[1].containing(net)
        return pool is None or pool.cidr != rec.pool or pool.deleting

    def _check_still_reserved(self, rec: SubnetReservation, ip: IPAddress) -> None:
        """After joining a shared gateway (a write that allocates nothing): NotFound
        if the reservation was released meanwhile."""
        entry = self.store.get(subnet_key(rec.cidr))
        current = SubnetReservation.from_dict(entry.data) if entry is not None else None
        if current is None or current.id != rec.id:
            raise NotFound(
                f"network subnet {rec.cidr} was released while address {ip} was being "
                "allocated"
            )

    # ---------------------------------------------------------------- migration

    def _ensure_migrated(self) -> None:
        """Move the legacy single subnets document to one key per subnet, once."""
        if self._migrated:
            return
        for _ in self._attempts("moving the network subnets to one key each"):
            legacy = self.store.get(LEGACY_SUBNETS_KEY)
            if legacy is None:
                self._migrated = True
                return
            table = SubnetTable.from_dict(legacy.data)
            if not all(self._migrate_one(rec) for rec in table.sorted()):
                continue  # the document is gone: another process committed
            try:
                self.store.delete(LEGACY_SUBNETS_KEY, legacy.revision)
            except RevisionConflict:
                continue
            self._migrated = True
            return

    def _migrate_one(self, rec: SubnetReservation) -> bool:
        """Make rec's key hold a settled record; False if the legacy document is gone."""
        key = subnet_key(rec.cidr)
        pending = replace(rec, created_revision=None, migrated=True)
        for _ in self._attempts(f"moving network subnet {rec.cidr}"):
            entry = self.store.get(key)
            if entry is None:
                try:
                    entry = self.store.create(key, dumps(pending.to_dict()))
                except AlreadyExists:
                    continue
            current = SubnetReservation.from_dict(entry.data)
            if current.settled or not current.migrated:
                return True
            # Settle only if the document still exists after the record was read:
            # then the record was created before the commit (never resurrected).
            if self.store.get(LEGACY_SUBNETS_KEY) is None:
                return False
            try:
                self.store.update(key, dumps(current.settle(entry.revision).to_dict()),
                                  entry.revision)
            except RevisionConflict:
                continue
            return True
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- gateways

    def _find_gateway(self, rec: SubnetReservation) -> IPAddress | None:
        blocks = [b for _e, b in self.blocks.overlapping(rec.network, rec.block_size)]
        gateway = self._gateway_in(rec, blocks)
        return IPAddress(gateway) if gateway is not None else None

    def _join_gateway(self, rec: SubnetReservation, ip: IPAddress | None) -> IPAddress | None:
        """On a shared subnet: the gateway already allocated for rec, with this host
        added to its users; None if there is none yet. Conflict if ip is another."""
        for _ in self._attempts(f"sharing the gateway of {rec.cidr}"):
            gateway = self._find_gateway(rec)
            if gateway is None:
                return None
            if ip is not None and ip != gateway:
                raise Conflict(
                    f"network subnet {rec.cidr} (shared by {', '.join(rec.hosts)}) already "
                    f"has gateway {gateway}: the same network on another host must use "
                    f"that gateway, not {ip}"
                )
            key = block_key(grid_block(gateway, gateway.version, rec.block_size))

            def join(block: AllocationBlock | None, gateway: IPAddress = gateway
                     ) -> tuple[bool, bool]:
                record = block.get(gateway) if block is not None else None
                if (
                    record is None
                    or record.attrs.get("kind") != KIND_GATEWAY
                    or record.attrs.get("reservation") != rec.id
                ):
                    return False, False  # released meanwhile: look again
                users = _gateway_users(record)
                if self.hostname in users and "hosts" in record.attrs:
                    return False, True
                record.attrs["hosts"] = sorted(users | {self.hostname})
                return True, True

            if self._change_block(key, f"sharing gateway {gateway}", join):
                return gateway
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ pool helpers

    def _change_pools(self, what: str, change: Callable[[PoolSet], tuple[bool, T]]) -> T:
        """Read, change and compare-and-swap the pools document, retried on conflict.

        change() edits the pools in place and says whether anything is to be written.
        """
        for _ in self._attempts(what):
            entry, pools = self._read_pools()
            write, result = change(pools)
            if not write:
                return result
            try:
                self._write(POOLS_KEY, entry, pools.to_dict())
            except _CAS_ERRORS:
                continue
            return result
        raise AssertionError("unreachable")

    def _set_deleting(self, cidr: str, deleting: bool) -> None:
        def mark(pools: PoolSet) -> tuple[bool, None]:
            current = pools.get(cidr)
            if current.deleting == deleting:
                return False, None
            pools.replace(replace(current, deleting=deleting))
            return True, None

        self._change_pools(f"marking pool {cidr}", mark)

    @staticmethod
    def _check_pool_unused(
        pool: Pool, reservations: list[SubnetReservation],
        blocks: list[tuple[Entry, AllocationBlock]],
    ) -> None:
        subnets = [rec.cidr for rec in SubnetTable.of(reservations).overlapping(pool.network)]
        if subnets:
            raise Conflict(
                f"pool {pool.cidr} is in use by network subnet(s) {', '.join(subnets)}; "
                "remove those Docker networks first"
            )
        used = [str(ip) for _entry, block in blocks for ip, _record in block.allocations()]
        if used:
            sample = ", ".join(used[:5]) + (", ..." if len(used) > 5 else "")
            raise Conflict(
                f"pool {pool.cidr} still has {len(used)} address(es) in use ({sample}); "
                "release them first (see `calico-cnm ipam show`)"
            )

    def _parent_pool(self, pools: PoolSet, net: IPNetwork) -> Pool:
        holder = pools.containing(net)
        if holder is None:
            clash = pools.overlapping(net)
            where = (
                f" (it overlaps pool {', '.join(p.cidr for p in clash)} without fitting "
                "inside it)"
                if clash
                else ""
            )
            known = ", ".join(p.cidr for p in pools.of_family(net.version)) or "none"
            raise InvalidRequest(
                f"subnet {net} is not inside any Calico pool{where}; add one with "
                f"`{ADD_POOL_HINT} {net}` (existing {family_name(net.version)} pools: {known})"
            )
        if holder.disabled:
            raise InvalidRequest(
                f"subnet {net} is inside pool {holder.cidr}, which is disabled; enable it "
                f"or add another pool with `{ADD_POOL_HINT} <cidr>`"
            )
        if holder.deleting:
            raise InvalidRequest(
                f"subnet {net} is inside pool {holder.cidr}, which is being removed; add "
                f"another pool with `{ADD_POOL_HINT} <cidr>`"
            )
        return holder

    def _reservation(
        self,
        net: IPNetwork,
        pool: Pool,
        sub_pool: IPNetwork | None,
        options: dict[str, str],
    ) -> SubnetReservation:
        return SubnetReservation(
            cidr=str(net),
            pool=pool.cidr,
            block_size=pool.block_size,
            id=uuid.uuid4().hex,
            sub_pool=str(sub_pool) if sub_pool is not None else None,
            options=dict(options),
            hosts=(self.hostname,),
            created_at=time.time(),
        )

    def _carve(
        self, pools: PoolSet, table: SubnetTable, version: int, options: dict[str, str]
    ) -> SubnetReservation:
        family = family_name(version)
        candidates = [pool for pool in pools.of_family(version) if pool.usable]
        if not candidates:
            raise Exhausted(
                f"no enabled {family} pool to take a network subnet from; add one with "
                f"`{ADD_POOL_HINT} <cidr>` or give the network a --subnet"
            )
        prefix = self.network_prefix[version]
        for pool in candidates:
            taken = [rec.network for rec in table.overlapping(pool.network)]
            net = carve(pool.network, taken, prefix)
            if net is not None:
                return self._reservation(net, pool, None, {**options, CARVED_OPTION: "true"})
        names = ", ".join(pool.cidr for pool in candidates)
        raise Exhausted(
            f"no free /{prefix} network subnet left in the {family} pools {names}; remove "
            f"unused networks or add a pool with `{ADD_POOL_HINT} <cidr>`"
        )

    def _subnet_info(self, rec: SubnetReservation, blocks: list[AllocationBlock]) -> SubnetInfo:
        return SubnetInfo(
            pool_id=rec.cidr,
            cidr=rec.cidr,
            pool=rec.pool,
            sub_pool=rec.sub_pool,
            gateway=self._gateway_in(rec, blocks),
            options=dict(rec.options),
            hosts=rec.hosts,
        )

    @staticmethod
    def _gateway_in(rec: SubnetReservation, blocks: list[AllocationBlock]) -> str | None:
        """The gateway allocated for rec (kind gateway, rec's id) in blocks, if any."""
        net = rec.network
        for block in blocks:
            if block.version != net.version or not (
                block.cidr.first <= net.last and net.first <= block.cidr.last
            ):
                continue
            for ip, record in block.allocations():
                if (
                    ip in net
                    and record.attrs.get("kind") == KIND_GATEWAY
                    and record.attrs.get("reservation") == rec.id
                ):
                    return str(ip)
        return None

    # ------------------------------------------------------ address allocation

    @staticmethod
    def _check_usable(ip: IPAddress, rec: SubnetReservation) -> None:
        net = rec.network
        if ip.version != net.version or ip not in net:
            raise InvalidRequest(f"address {ip} is not inside subnet {net}")
        if int(ip) == net.first:
            raise InvalidRequest(f"address {ip} is the network address of subnet {net}")
        if net.version == 4 and int(ip) == net.last:
            raise InvalidRequest(f"address {ip} is the broadcast address of subnet {net}")

    def _allocate_specific(
        self, rec: SubnetReservation, ip: IPAddress, attrs: dict[str, Any], guard: Guard
    ) -> None:
        cidr = grid_block(ip, ip.version, rec.block_size)

        def allocate(block: AllocationBlock | None) -> tuple[AllocationBlock, None]:
            block = block if block is not None else AllocationBlock(cidr, self.hostname)
            block.allocate(ip, None, attrs)  # AddressInUse (Conflict) if taken
            return block, None

        self.blocks.change(block_key(cidr), f"allocating address {ip}", allocate, guard)

    def _sweep_block(self, key: str, rec: SubnetReservation) -> list[str]:
        """Free the addresses of a released subnet left in one block.

        An allocation is swept when it lies in the subnet and its reservation is
        not live. The reservations are listed *after* the block is read, so an
        allocation made for a newer reservation of the same CIDR is seen as live.
        """
        net = rec.network
        for _ in self._attempts(f"releasing leaked addresses of {rec.cidr}"):
            entry = self.store.get(key)
            if entry is None:
                return []
            block = AllocationBlock.from_dict(entry.data)
            live = {r.id for _e, r in self._list_reservations()}
            freed = block.release_where(
                lambda ip, record, live=live: ip in net
                and record.attrs.get("reservation") not in live
            )
            if not freed:
                return []
            try:
                self.blocks.write(key, entry.revision, block)
            except _CAS_ERRORS:
                continue
            return [str(ip) for ip in freed]
        raise AssertionError("unreachable")

    def _change_block(self, key: str, what: str,
                      change: Callable[[AllocationBlock | None], tuple[bool, T]]) -> T:
        """Read, change and compare-and-swap one existing block, retried on conflict.

        change() gets None when the block does not exist, edits the block in place
        and says whether anything is to be written.
        """
        def edit(block: AllocationBlock | None) -> tuple[AllocationBlock | None, T]:
            write, result = change(block)
            return (block if write else None), result

        return self.blocks.change(key, what, edit)

    def _release_handle_in(self, key: str, handle: str) -> list[str]:
        def release(block: AllocationBlock | None) -> tuple[bool, list[str]]:
            freed = block.release_handle(handle) if block is not None else []
            return bool(freed), [str(ip) for ip in freed]

        return self._change_block(key, f"releasing handle {handle}", release)
