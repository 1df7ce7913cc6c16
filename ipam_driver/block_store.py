"""Allocation blocks in the datastore, their affinity index, and the allocation hot path.

Keys (under ``datastore.base.ROOT``):

``ipam/blocks/<cidr with "/" as "-">``
    One AllocationBlock per claimed cell of a pool's grid. The block record is the
    truth: its ``host`` is its affinity, and claiming a cell is one ``create``.
``ipam/affinity/<host>/<cidr with "/" as "-">``
    The affinity index: one key per host and block (value ``{"block": cidr}``), so a
    host finds its own blocks without listing every block of the subnet. It is a
    hint, checked against the block record whenever it is read: an entry may be
    *stale* (its block gone or another host's: a claimer died between the two
    writes) and is then dropped; it must never be *missing* for a block that names
    its host, and two rules keep it so with single-key writes only:

    * a claim writes the index entry, creates the block, then reads the entry back
      and writes it again if it is gone;
    * whoever deletes an entry (after deleting an emptied block, after losing a
      claim, or when it finds the entry stale) reads the block afterwards and
      writes the entry again if the block exists and names that host.

    An entry can only end missing if its last change is a delete with no later
    write; but the deleter's read of the block comes after its delete, so the
    block was created after that read, and its creator's read-back comes later
    still and restores the entry.

Allocation (``allocate_auto``) works from this process's BlockView: pick a cached
block of this host with a free address in the scope and compare-and-swap it on the
cached revision (one write for a whole batch of requests, as many as the block has
room for; a lost race costs a re-read of that one block). When
no known block has room, claim the next unclaimed grid cell (one read per cell
already taken by another host; this process's cursor passes each cell once). Only
when the cursor has passed every cell does the slow path begin: one read of the
blocks written since the view last read them (``Datastore.list_changed``: addresses
other processes freed, other hosts' blocks with room); if none of this host's has
room, borrow from another host's block at the revision just read; if none has room,
the store's change history, which alone shows deleted blocks (cells freed); and
last the subnet's whole block list. So the cost of an allocation does not grow with
the number of blocks or hosts until the subnet is nearly full, and even then it
reads only what changed.

In the plugin's processes a refresher thread (``refresh``) reads that history every
REFRESH_SECONDS for each mostly claimed scope in use, so a process learns what the
host's other processes freed, the cells of deleted blocks and the other hosts'
blocks with room to borrow before it runs out, and one that sat idle while the
others filled the subnet is not caught far behind (a listing of every block) in the
middle of a burst of requests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from netaddr import IPAddress, IPNetwork, IPSet

from datastore.base import (
    ROOT,
    AlreadyExists,
    Datastore,
    DatastoreError,
    Entry,
    Guard,
    GuardChanged,
    RevisionConflict,
    dumps,
)
from datastore.errors import Exhausted
from ipam_driver.block_view import BlockView, Scope
from ipam_driver.blocks import AllocationBlock
from ipam_driver.pools import SubnetReservation, grid_block, networks_overlap

log = logging.getLogger(__name__)

BLOCKS_PREFIX = ROOT + "ipam/blocks/"
AFFINITY_PREFIX = ROOT + "ipam/affinity/"

# Above this many grid blocks in a range, list every block instead of one get per block.
MAX_BLOCK_GETS = 16
# Changes behind (store revisions) beyond which the slow path and the refresher
# list every block rather than read the history: each change carries a whole block,
# but only the last change of each block is parsed, so a few changes per known block
# still cost less than parsing every block.
CATCH_UP_PER_BLOCK = 4
CATCH_UP_MIN_CHANGES = 256
# The refresher (BlockStore.refresh): how often it runs, and how long after this
# process's last allocation in a scope it keeps that scope's view up to date.
REFRESH_SECONDS = 0.5
REFRESH_IDLE_SECONDS = 120.0
# How long the refresher waits for the history to arrive (an etcd watch delivers it
# as a stream, which a busy machine can hold up past the watch's shortest wait).
REFRESH_WAIT_SECONDS = 0.25

T = TypeVar("T")
Change = Callable[[AllocationBlock | None], tuple[AllocationBlock | None, T]]


def _name(cidr: IPNetwork | str) -> str:
    return str(cidr).replace("/", "-")


def block_key(cidr: IPNetwork | str) -> str:
    return BLOCKS_PREFIX + _name(cidr)


def _cidr_of(name: str) -> IPNetwork:
    address, _, prefix = name.rpartition("-")
    return IPNetwork(f"{address}/{prefix}")


def block_cidr_from_key(key: str) -> IPNetwork:
    return _cidr_of(key[len(BLOCKS_PREFIX):])


def affinity_prefix(host: str) -> str:
    return f"{AFFINITY_PREFIX}{host}/"


def affinity_key(host: str, cidr: IPNetwork | str) -> str:
    return affinity_prefix(host) + _name(cidr)


def _cell_runs(allowed: IPSet, version: int, block_size: int
               ) -> Iterator[tuple[IPNetwork, int]]:
    """Runs of grid cells that hold at least one address of allowed, in order: a
    run's first cell and how many cells it has."""
    last: IPNetwork | None = None  # the last cell yielded
    for cidr in allowed.iter_cidrs():
        if cidr.prefixlen >= block_size:
            cell = grid_block(cidr.first, version, block_size)
            if cell != last:
                last = cell
                yield cell, 1
        else:
            last = grid_block(cidr.last, version, block_size)
            yield grid_block(cidr.first, version, block_size), 2 ** (block_size - cidr.prefixlen)


def grid_cells(allowed: IPSet, version: int, block_size: int) -> Iterator[IPNetwork]:
    """The grid blocks that hold at least one address of allowed, lazily, in order."""
    for first, count in _cell_runs(allowed, version, block_size):
        for index in range(count):
            yield grid_block(first.first + index * first.size, version, block_size)


def grid_cell_count(allowed: IPSet, version: int, block_size: int) -> int:
    """How many cells grid_cells yields, without walking them (an IPv6 subnet has
    2**58)."""
    return sum(count for _first, count in _cell_runs(allowed, version, block_size))


def allowed_in(rec: SubnetReservation) -> IPSet:
    """Where automatic addresses of rec come from: its scope minus the reserved ones."""
    reserved = IPSet([IPAddress(value, rec.version) for value in rec.reserved_addresses()])
    return IPSet([rec.scope]) - reserved


class BlockStore:
    """Block records and their affinity index, read and written through this
    process's view. attempts(what) gives the retry loop of a compare-and-swap."""

    def __init__(self, store: Datastore, hostname: str,
                 attempts: Callable[[str], Iterator[int]], compact: Callable[[], bool],
                 parallel_blocks: int = 2, refresh_in_background: bool = False) -> None:
        self.store = store
        self.hostname = hostname
        self._attempts = attempts
        self._compact = compact  # whether to write format 2 records (block_format.py)
        self.view = BlockView(hostname, block_key, parallel_blocks)
        # The server's processes keep their views fresh in a thread (refresh()).
        self.refresh_in_background = refresh_in_background
        self._refresher_pid: int | None = None

    # ================================================================ reading

    def read(self, key: str) -> tuple[Entry | None, AllocationBlock | None]:
        """One block, fresh from the store (and into the view if it is this host's)."""
        entry = self.store.get(key)
        if entry is None:
            self.view.forget(key)
            return None, None
        block = AllocationBlock.from_dict(entry.data)
        self.view.learn(key, entry.revision, block.copy())
        return entry, block

    def all(self) -> list[tuple[Entry, AllocationBlock]]:
        return [(entry, AllocationBlock.from_dict(entry.data))
                for entry in self.store.list(BLOCKS_PREFIX)]

    def inside(self, net: IPNetwork) -> list[tuple[Entry, AllocationBlock]]:
        """Every existing block inside net (a pool)."""
        result = []
        for entry in self.store.list(BLOCKS_PREFIX):
            cidr = block_cidr_from_key(entry.key)
            if cidr.version == net.version and cidr in net:
                result.append((entry, AllocationBlock.from_dict(entry.data)))
        return result

    def overlapping(self, scope: IPNetwork, block_size: int
                    ) -> list[tuple[Entry, AllocationBlock]]:
        """Existing blocks of the grid that overlap scope, in address order."""
        count = 2 ** max(0, block_size - scope.prefixlen)
        entries: list[Entry] = []
        if count <= MAX_BLOCK_GETS:
            first = grid_block(scope.first, scope.version, block_size)
            for index in range(count):
                cidr = grid_block(first.first + index * first.size, scope.version,
                                  block_size)
                entry = self.store.get(block_key(cidr))
                if entry is not None:
                    entries.append(entry)
        else:
            for entry in self.store.list(BLOCKS_PREFIX):
                cidr = block_cidr_from_key(entry.key)
                if networks_overlap(cidr, scope):
                    entries.append(entry)
        blocks = [(entry, AllocationBlock.from_dict(entry.data)) for entry in entries]
        blocks.sort(key=lambda item: item[1].cidr.first)
        return blocks

    # ================================================================ writing

    def write(self, key: str, revision: int | None, block: AllocationBlock,
              guard: Guard | None = None) -> Entry | None:
        """Create (revision None) or compare-and-swap a block; an empty block is
        deleted instead (with its affinity entry). The caller gives up block.
        Returns the new entry (None when deleted). A guard (the subnet reservation
        the new addresses belong to) goes with creates and updates; GuardChanged
        when it moved."""
        if block.is_empty:
            if revision is not None:
                self.delete(key, revision, block.host)
            return None
        if revision is not None:
            entry = self.store.update(key, dumps(block.to_dict(self._compact())), revision, guard)
        else:
            entry = self._create(key, block, guard)
        self.view.learn(key, entry.revision, block)
        return entry

    def delete(self, key: str, revision: int, host: str | None) -> None:
        """Delete a block (CAS on revision) and the affinity entry of its host."""
        self.store.delete(key, revision)
        cidr = block_cidr_from_key(key)
        self.view.forget(key, freed_cell=cidr if host == self.hostname else None)
        if host:
            self._drop_index(host, cidr)

    def change(self, key: str, what: str, change: Change[T], guard: Guard | None = None
               ) -> T:
        """Read, change and compare-and-swap one block, retried on conflict.

        change() gets the block (None when there is none), edits it in place and
        returns the block to write (None: nothing to write; a new block when there
        was none: create it) and its result. It is tried first on the cached copy:
        a write from it is a CAS on the cached revision, and anything else it
        decides there (nothing to write, an error) is decided again on a fresh read.
        """
        cached = self.view.cached(key)
        if cached is not None:
            revision, block = cached
            try:
                to_write, result = change(block)
            except Exception:  # noqa: BLE001 - judged again on a fresh read below
                to_write = None
            if to_write is not None:
                try:
                    self.write(key, revision, to_write, guard)
                    return result
                except RevisionConflict:
                    pass
        for _ in self._attempts(what):
            entry, fresh = self.read(key)
            to_write, result = change(fresh)
            if to_write is None:
                return result
            try:
                self.write(key, entry.revision if entry is not None else None, to_write,
                           guard)
            except (AlreadyExists, RevisionConflict):
                continue
            return result
        raise AssertionError("unreachable")

    def drop_host_index(self, host: str) -> None:
        """Delete every affinity entry of a host removed for good."""
        for entry in self.store.list(affinity_prefix(host)):
            self.store.delete(entry.key)

    def _create(self, key: str, block: AllocationBlock, guard: Guard | None) -> Entry:
        host, cidr = block.host, block.cidr
        if host:
            self._write_index(host, cidr)
        try:
            entry = self.store.create(key, dumps(block.to_dict(self._compact())), guard)
        except (AlreadyExists, GuardChanged):
            if host:
                self._drop_index(host, cidr)
            raise
        if host and self.store.get(affinity_key(host, cidr)) is None:
            self._write_index(host, cidr)
        return entry

    def _write_index(self, host: str, cidr: IPNetwork) -> None:
        try:
            self.store.create(affinity_key(host, cidr), dumps({"block": str(cidr)}))
        except AlreadyExists:
            pass

    def _drop_index(self, host: str, cidr: IPNetwork) -> None:
        self.store.delete(affinity_key(host, cidr))
        current = self.store.get(block_key(cidr))
        if current is not None and current.data.get("host") == host:
            self._write_index(host, cidr)

    # ============================================================= allocation

    def allocate_auto(self, rec: SubnetReservation, attrs: list[dict[str, Any]],
                      guard: Guard | None = None) -> list[IPAddress]:
        """Addresses from rec's scope for the first k of attrs (one each, 1 <= k <=
        len(attrs)), all written to one block in one compare-and-swap, preferring this
        host's blocks (see the module docstring); the caller asks again for the rest.
        Exhausted when the scope has none left. Every write carries guard:
        GuardChanged (nothing allocated) when it moved."""
        if not attrs:
            return []
        scope = self._scope(rec)
        if not scope.loaded:
            self._load(scope, rec)
        self._keep_fresh(scope, rec)
        attempts = self._attempts(f"allocating an address in {rec.cidr}")
        next(attempts)
        lost: dict[str, int] = {}
        while True:
            key = self.view.pick(scope)
            if key is None:
                ips = self._claim(scope, rec, attrs, attempts, guard)
            else:
                try:
                    ips = self._allocate_from(scope, key, attrs, lost, attempts, guard)
                finally:
                    self.view.done(key)
            if ips:
                return ips

    def _scope(self, rec: SubnetReservation) -> Scope:
        key = (rec.cidr, rec.sub_pool, rec.block_size)
        scope = self.view.find(key)
        if scope is None:
            allowed = allowed_in(rec)
            scope = self.view.scope(key, allowed,
                                    grid_cells(allowed, rec.version, rec.block_size),
                                    grid_cell_count(allowed, rec.version, rec.block_size))
        return scope

    def _load(self, scope: Scope, rec: SubnetReservation) -> None:
        """This host's blocks of the scope, found through the affinity index."""
        with scope.load_lock:
            if scope.loaded:
                return
            scope.caught_up = self.store.current_revision()
            net = rec.scope
            for entry in self.store.list(affinity_prefix(self.hostname)):
                cidr = _cidr_of(entry.key[len(affinity_prefix(self.hostname)):])
                if not networks_overlap(cidr, net):
                    continue
                key = block_key(cidr)
                _entry, block = self.read(key)
                if block is None or block.host != self.hostname:
                    self._drop_index(self.hostname, cidr)  # stale: its claimer died
                elif block.has_free(self.view.ranges(scope, key, block)):
                    self.view.add_candidate(scope, key)
                else:
                    self.view.mark_full(scope, key)
            scope.loaded = True

    def _allocate_from(self, scope: Scope, key: str, attrs: list[dict[str, Any]],
                       lost: dict[str, int], attempts: Iterator[int], guard: Guard | None
                       ) -> list[IPAddress]:
        """One try on one candidate; nothing when it was full or the write lost."""
        cached = self.view.cached(key)
        if cached is None:
            entry, block = self.read(key)
            if entry is None or block is None or block.host != self.hostname:
                return []
            revision = entry.revision
        else:
            revision, block = cached
        ips = _fill(block, self.view.ranges(scope, key, block), attrs)
        if not ips:
            self.view.mark_full(scope, key)
            return []
        try:
            self.write(key, revision, block, guard)
        except RevisionConflict:
            lost[key] = lost.get(key, 0) + 1
            if lost[key] >= 2:
                self.view.avoid(key)  # another process is filling it: go elsewhere
            next(attempts)
            self.read(key)
            return []
        return ips

    def _claim(self, scope: Scope, rec: SubnetReservation, attrs: list[dict[str, Any]],
               attempts: Iterator[int], guard: Guard | None) -> list[IPAddress]:
        """Claim the next free cell of the scope; nothing when the cell turned out to
        be taken (the view knows it now) or another candidate showed up."""
        cell = self.view.next_cell(scope)
        if cell is None:
            return self._allocate_listing(scope, rec, attrs, attempts, guard)
        key = block_key(cell)
        entry, block = self.read(key)
        if block is not None:
            if block.host == self.hostname:
                self._write_index(self.hostname, cell)  # blocks of older versions
                self.view.add_candidate(scope, key)
            else:
                self.view.note_foreign(scope, key)
            return []
        new = AllocationBlock(cell, self.hostname)
        ips = _fill(new, self.view.ranges(scope, key, new), attrs)
        if not ips:  # pragma: no cover - cells overlap the allowed range
            return []
        try:
            self.write(key, None, new, guard)
        except AlreadyExists:  # another process or host claimed it first
            next(attempts)
            _entry, block = self.read(key)
            if block is not None and block.host == self.hostname:
                self.view.add_candidate(scope, key)
            else:
                self.view.note_foreign(scope, key)
            return []
        self.view.add_candidate(scope, key)
        return ips

    def _borrow(self, scope: Scope, key: str, revision: int, block: AllocationBlock,
                attrs: list[dict[str, Any]], attempts: Iterator[int], guard: Guard | None
                ) -> list[IPAddress]:
        """Addresses from another host's block as read at revision; nothing when it
        had no room left or the write lost (the block is dropped from the offers)."""
        ranges = self.view.ranges(scope, key, block)
        ips = _fill(block, ranges, attrs)
        if not ips:
            return []
        try:
            entry = self.write(key, revision, block, guard)
        except RevisionConflict:
            next(attempts)
            return []
        if entry is not None and block.has_free(ranges):
            self.view.offer_borrowable(scope, key, entry.revision, block)
        return ips

    def _allocate_listing(self, scope: Scope, rec: SubnetReservation,
                          attrs: list[dict[str, Any]], attempts: Iterator[int],
                          guard: Guard | None) -> list[IPAddress]:
        """The slow path, once the cursor has passed every cell: read the blocks
        written since the view last read them (nothing: one of ours has room, pick
        again); else borrow from another host's block known to have room, at the
        revision just read; else read the history for cells freed; only if there is
        none, read every block of the scope (_list_scope)."""
        generation = scope.slow_generation
        with scope.slow_lock:
            if scope.slow_generation != generation:
                return []  # another thread has just been here: pick again
            scope.slow_generation += 1
            self._read_changed(scope, rec)
            if scope.candidates:
                return []  # room again, or candidates busy or avoided: pick again
            offered = self.view.take_borrowable(scope)
            if offered is None:
                if self._catch_up(scope, rec):
                    return []
                return self._list_scope(scope, rec, attrs, attempts, guard)
        return self._borrow(scope, *offered, attrs, attempts, guard)

    def _read_changed(self, scope: Scope, rec: SubnetReservation) -> None:
        """Learn the scope's blocks written since the view last read them, with one
        read of their current values (deleted blocks do not show: _catch_up finds
        those)."""
        since = max(scope.caught_up or 0, scope.changes_read)
        if since == 0:
            return  # never read: a listing comes next
        entries, scope.changes_read = self.store.list_changed(BLOCKS_PREFIX, since)
        for entry in entries:
            self._learn_block(scope, rec.scope, entry.key, entry.revision, entry.value)

    def _learn_block(self, scope: Scope, net: IPNetwork, key: str, revision: int,
                     value: str | None) -> bool:
        """One block of the store as written at revision (value None: deleted):
        whether it brings room to the scope (a free cell, a block of this host with
        room, or another host's to borrow from)."""
        cidr = block_cidr_from_key(key)
        if not networks_overlap(cidr, net):
            return False
        if value is None:
            self.view.forget(key, freed_cell=cidr)
            return True  # the next claim takes the cell
        block = AllocationBlock.from_dict(Entry(key, value, revision).data)
        ranges = self.view.ranges(scope, key, block)
        if block.host != self.hostname:
            roomy = block.has_free(ranges)
            self.view.learn_foreign(scope, key, revision, block if roomy else None)
            return roomy
        self.view.learn(key, revision, block)
        if block.has_free(ranges):
            self.view.add_candidate(scope, key)
            return True
        return False

    def _catch_up(self, scope: Scope, rec: SubnetReservation, wait: float = 0.0) -> bool:
        """Learn the scope's blocks changed since the view last read them, from the
        store's history; True when one of this host's has room again, a cell was
        freed or another host's block has room to borrow. False when not, or when
        the history is gone or the view is too far behind for the history to be
        cheaper than a listing; then scope.caught_up is None until the next full
        listing."""
        since = scope.caught_up
        if since is None:
            return False
        behind = self.store.current_revision() - since
        if behind <= 0:
            return False  # nothing changed (and a watch would wait for a change)
        known = self.view.known_blocks(scope)
        if behind > max(CATCH_UP_MIN_CHANGES, CATCH_UP_PER_BLOCK * known):
            scope.caught_up = None
            return False
        try:
            events = self.store.watch(BLOCKS_PREFIX, since, timeout=wait)
        except RevisionConflict:
            scope.caught_up = None
            return False  # compacted
        latest = {event.key: event for event in events}  # only the last change counts
        roomy = False
        for key, event in latest.items():
            value = event.value if event.kind == "put" else None
            roomy = self._learn_block(scope, rec.scope, key, event.revision, value) or roomy
        if events:
            scope.caught_up = max(event.revision for event in events)
        return roomy

    def _list_scope(self, scope: Scope, rec: SubnetReservation,
                    attrs: list[dict[str, Any]], attempts: Iterator[int],
                    guard: Guard | None) -> list[IPAddress]:
        """Every block of the scope. Own blocks with room become candidates again
        (nothing: pick again); else claim a cell freed since, else borrow from another host's
        block (the others with room are kept for the next allocations)."""
        roomy, blocks, others = self._relist(scope, rec)
        if roomy:
            return []
        existing = {block.cidr.first for _entry, block in blocks}
        for cell in grid_cells(scope.allowed, rec.version, rec.block_size):
            if cell.first not in existing:
                self.view.return_cell(scope, cell)
                return []
        roomy_others = [(entry, block) for entry, block in others
                        if block.has_free(self.view.ranges(scope, entry.key, block))]
        for entry, block in roomy_others[1:]:
            self.view.offer_borrowable(scope, entry.key, entry.revision, block)
        if roomy_others:
            entry, block = roomy_others[0]
            return self._borrow(scope, entry.key, entry.revision, block, attrs, attempts,
                                guard)
        where = (f"ip-range {rec.sub_pool} of subnet {rec.cidr}" if rec.sub_pool
                 else f"subnet {rec.cidr}")
        raise Exhausted(f"no free address left in {where}")

    def _relist(self, scope: Scope, rec: SubnetReservation
                ) -> tuple[bool, list[tuple[Entry, AllocationBlock]],
                           list[tuple[Entry, AllocationBlock]]]:
        """Read every block of the scope into the view (the cursor starts again,
        skipping the cells other hosts hold): whether one of this host's has room,
        the blocks, and the other hosts' blocks."""
        revision = self.store.current_revision()  # before the read: nothing missed
        blocks = self.overlapping(rec.scope, rec.block_size)
        scope.caught_up = revision
        own = [(e, b) for e, b in blocks if b.host == self.hostname]
        others = [(e, b) for e, b in blocks if b.host != self.hostname]
        self.view.restart_cells(
            scope, grid_cells(scope.allowed, rec.version, rec.block_size),
            foreign={entry.key for entry, _block in others},
        )
        roomy = False
        for entry, block in own:
            self.view.learn(entry.key, entry.revision, block.copy())
            if block.has_free(self.view.ranges(scope, entry.key, block)):
                self.view.add_candidate(scope, entry.key)
                roomy = True
            else:
                self.view.mark_full(scope, entry.key)
        return roomy, blocks, others

    # ============================================================== refreshing

    def _keep_fresh(self, scope: Scope, rec: SubnetReservation) -> None:
        """Note an allocation in scope, and start this process's refresher thread
        if it has none yet (a forked child starts its own)."""
        scope.rec, scope.used_at = rec, time.monotonic()
        if self.refresh_in_background and self._refresher_pid != os.getpid():
            self._refresher_pid = os.getpid()
            threading.Thread(target=self._refresh_forever, name="ipam-view-refresher",
                             daemon=True).start()

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(REFRESH_SECONDS)
            try:
                self.refresh()
            except DatastoreError as exc:  # an outage: the next round tries again
                log.debug("IPAM view refresh: %s", exc)
            except Exception:  # noqa: BLE001 - the thread must outlive any one round
                log.exception("IPAM view refresh failed")

    def refresh(self, now: float | None = None) -> int:
        """Bring the view of each mostly claimed scope (BlockView.mostly_claimed) that
        this process allocated from in the last REFRESH_IDLE_SECONDS up to date: the
        blocks changed since its last read, from the history, or every block when
        the view is further behind than the history is worth reading (the first
        round after a scope became mostly claimed, when the other processes filled
        it meanwhile: one listing costs less than tens of thousands of changes) or
        the history is gone. So the addresses and cells that the host's other
        processes free, and other hosts' blocks with room to borrow, are known
        before this process runs out, and a process that was idle while others
        filled the subnet does not list every block in the middle of a burst of
        requests. A scope with cells to spare needs none of it (a process out of
        room claims a new block). Skips a scope another thread is on the slow path
        of. Returns how many scopes it read."""
        since = (time.monotonic() if now is None else now) - REFRESH_IDLE_SECONDS
        read = 0
        for scope in self.view.scopes():
            rec = scope.rec
            if (rec is None or not scope.loaded or scope.used_at < since
                    or not self.view.mostly_claimed(scope)):
                continue
            if not scope.slow_lock.acquire(blocking=False):
                continue
            try:
                # Wait for the history a while: this thread holds up no request.
                if (not self._catch_up(scope, rec, wait=REFRESH_WAIT_SECONDS)
                        and scope.caught_up is None):
                    self._relist(scope, rec)
                read += 1
            finally:
                scope.slow_lock.release()
        return read


def _fill(block: AllocationBlock, ranges: list[tuple[int, int]],
          attrs: list[dict[str, Any]]) -> list[IPAddress]:
    """The lowest free addresses of ranges in block, one for each of attrs while any
    is left (allocated in block, not yet written)."""
    ips: list[IPAddress] = []
    for one in attrs:
        ip = block.allocate_next(ranges, None, one)
        if ip is None:
            break
        ips.append(ip)
    return ips
