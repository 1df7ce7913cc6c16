"""This process's in-memory view of its host's allocation blocks (no I/O).

The datastore stays the only truth: every cached block carries the revision it was
read at, and an allocation from it is a compare-and-swap on that revision, so a stale
view costs one lost write and a re-read, never a duplicate. What the view saves is the
search: which block to allocate from, without listing or parsing every block of the
subnet on each request.

Per allocation scope (a reservation's ip-range or subnet, with its block size) it
keeps the blocks of this host that still have a free address (*candidates*, in the
order they became known), the ones found full, and a cursor over the scope's grid
cells for claiming the next block. Threads of one process allocate from different
candidates at once (a block being written is *busy*), up to ``parallel_blocks`` of
them; past that they wait for a busy block rather than claim more blocks than the
load needs. A block on which this process lost the compare-and-swap twice in one
request (another process of the host is filling it) is *avoided* for a moment, so
that two processes drift onto different blocks instead of fighting over one. Each
process also scans its candidates from its own random starting point: in a nearly
full subnet each candidate has one or two free addresses, and processes that all
began with the first would lose the compare-and-swap to each other on every block.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from netaddr import IPNetwork, IPSet

from ipam_driver.blocks import AllocationBlock

if TYPE_CHECKING:
    from ipam_driver.pools import SubnetReservation

# How long a block lost twice to another writer is left alone.
AVOID_SECONDS = 0.5
# How long a thread waits for a busy block before looking again.
BUSY_WAIT_SECONDS = 0.02
# The share of a scope's cells known to hold a block from which it is mostly claimed.
MOSTLY_CLAIMED = 0.5


@dataclass(eq=False)
class Scope:
    """What one process knows of one allocation scope."""

    key: tuple[str, str | None, int]
    allowed: IPSet
    cells: Iterator[IPNetwork]
    cell_count: int = 0  # how many cells there are (at most): see mostly_claimed
    loaded: bool = False
    cells_done: bool = False
    candidates: dict[str, None] = field(default_factory=dict)
    full: set[str] = field(default_factory=set)
    foreign: set[str] = field(default_factory=set)  # cells taken by other hosts
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # Cells of this scope whose block was deleted (emptied), by block key: free
    # again, and claimed before the cursor moves on, unless a block there is learned
    # first (another process claimed it).
    returned: dict[str, IPNetwork] = field(default_factory=dict)
    # Other hosts' blocks with room, as the last full listing read them (revision and
    # block): borrowed from in turn before the subnet is listed again.
    borrowable: dict[str, tuple[int, AllocationBlock]] = field(default_factory=dict)
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    # The store revision up to which this view has seen every change of the scope's
    # blocks (set before each full read), so the slow path can read only what
    # changed since; None: not known, list instead.
    caught_up: int | None = None
    # The store revision of the last read of the blocks written since (which shows
    # no deletes, so it does not move caught_up).
    changes_read: int = 0
    # One thread at a time on the slow path; a waiter whose turn comes after another
    # thread's pass (the generation moved) just picks again.
    slow_lock: threading.Lock = field(default_factory=threading.Lock)
    slow_generation: int = 0
    # The reservation last allocated from in this scope, and when (monotonic): what
    # the store's refresher reads the scope's blocks by.
    rec: SubnetReservation | None = None
    used_at: float = 0.0


class BlockView:
    """Cached blocks (key -> (revision, block)) and per-scope allocation state."""

    def __init__(self, hostname: str, key_of: Callable[[IPNetwork], str],
                 parallel_blocks: int = 2, start: float | None = None) -> None:
        self.hostname = hostname
        self.key_of = key_of
        self.parallel_blocks = max(1, parallel_blocks)
        self._lock = threading.Condition()
        self._blocks: dict[str, tuple[int, AllocationBlock]] = {}
        self._scopes: dict[tuple[str, str | None, int], Scope] = {}
        self._busy: set[str] = set()
        self._avoid: dict[str, float] = {}
        # Where this process begins its scans, as a fraction of the candidates.
        self._start = random.random() if start is None else start

    # ------------------------------------------------------------------ scopes

    def scopes(self) -> list[Scope]:
        with self._lock:
            return list(self._scopes.values())

    def find(self, key: tuple[str, str | None, int]) -> Scope | None:
        return self._scopes.get(key)

    def scope(self, key: tuple[str, str | None, int], allowed: IPSet,
              cells: Iterator[IPNetwork], cell_count: int = 0) -> Scope:
        with self._lock:
            scope = self._scopes.get(key)
            if scope is None:
                scope = self._scopes[key] = Scope(key, allowed, cells, cell_count)
            return scope

    def known_blocks(self, scope: Scope) -> int:
        """How many of the scope's cells are known to hold a block."""
        with self._lock:
            return len(scope.candidates) + len(scope.full) + len(scope.foreign)

    def mostly_claimed(self, scope: Scope) -> bool:
        """Whether at least MOSTLY_CLAIMED of the scope's cells are known to hold a
        block (all of them are once the cursor has passed every cell): from then on
        more and more room comes from addresses and blocks freed, not new cells."""
        return self.known_blocks(scope) >= MOSTLY_CLAIMED * scope.cell_count

    def ranges(self, scope: Scope, key: str, block: AllocationBlock) -> list[tuple[int, int]]:
        """The scope's allowed addresses inside block (computed once per block)."""
        ranges = scope.ranges.get(key)
        if ranges is None:
            ranges = scope.ranges[key] = block.ranges_within(scope.allowed)
        return ranges

    def restart_cells(self, scope: Scope, cells: Iterator[IPNetwork],
                      foreign: set[str]) -> None:
        """After a full listing: walk the grid again (blocks may have gone since),
        skipping the cells the listing found taken by other hosts."""
        with self._lock:
            scope.cells, scope.cells_done = cells, False
            scope.foreign = set(foreign)

    def note_foreign(self, scope: Scope, key: str) -> None:
        with self._lock:
            scope.foreign.add(key)
            self._cell_taken(key)

    def return_cell(self, scope: Scope, cell: IPNetwork) -> None:
        """A cell known to be free: the next claim takes it."""
        with self._lock:
            scope.returned[self.key_of(cell)] = cell

    # --------------------------------------------------------------- choosing

    def pick(self, scope: Scope) -> str | None:
        """A candidate block to allocate from, marked busy; None: claim a new block.

        Waits while every candidate is busy and parallel_blocks of them are in use.
        Avoided candidates are taken only when no cell is left to claim.
        """
        with self._lock:
            while True:
                now = time.monotonic()
                busy_here = 0
                avoided: str | None = None
                for key in self._scan_order(scope):
                    if key in self._busy:
                        busy_here += 1
                    elif self._avoid.get(key, 0.0) > now:
                        avoided = avoided or key
                    else:
                        self._busy.add(key)
                        return key
                cells_left = bool(scope.returned) or not scope.cells_done
                if avoided is not None and not cells_left:
                    self._busy.add(avoided)
                    return avoided
                if busy_here == 0 or (busy_here < self.parallel_blocks and cells_left):
                    return None
                self._lock.wait(BUSY_WAIT_SECONDS)

    def _scan_order(self, scope: Scope) -> list[str]:
        keys = list(scope.candidates)
        first = int(self._start * len(keys))
        return keys[first:] + keys[:first]

    def done(self, key: str) -> None:
        """The block picked is no longer being written by this thread."""
        with self._lock:
            self._busy.discard(key)
            self._lock.notify_all()

    def avoid(self, key: str) -> None:
        with self._lock:
            self._avoid[key] = time.monotonic() + AVOID_SECONDS

    def next_cell(self, scope: Scope) -> IPNetwork | None:
        """The next grid cell of the scope not known to hold a block; None at the end."""
        with self._lock:
            if scope.returned:
                return scope.returned.popitem()[1]
            if scope.cells_done:
                return None
            for cell in scope.cells:
                if not self._known(scope, self.key_of(cell)):
                    return cell
            scope.cells_done = True
            return None

    def _known(self, scope: Scope, key: str) -> bool:
        return key in scope.candidates or key in scope.full or key in scope.foreign

    # ---------------------------------------------------------------- learning

    def cached(self, key: str) -> tuple[int, AllocationBlock] | None:
        """The cached revision and a private copy of the block (the caller may edit it)."""
        with self._lock:
            held = self._blocks.get(key)
        return (held[0], held[1].copy()) if held is not None else None

    def learn(self, key: str, revision: int, block: AllocationBlock) -> None:
        """A block as read or written at revision (the caller's copy is kept)."""
        with self._lock:
            current = self._blocks.get(key)
            if current is not None and current[0] > revision:
                return  # a newer write by another thread is already known
            if block.host != self.hostname:  # one we borrowed from: still not ours
                foreign_in = [scope for scope in self._scopes.values()
                              if key in scope.foreign]
                self._drop(key)
                for scope in foreign_in:
                    scope.foreign.add(key)
                self._cell_taken(key)
                return
            self._blocks[key] = (revision, block)
            returned_in = self._cell_taken(key)
            for scope in self._scopes.values():
                # A cell returned and now taken by a block of ours (a gateway's, say)
                # is a candidate, as a claim that read it would have made it.
                if scope.loaded and (scope in returned_in or key in scope.full):
                    # Something was freed: worth a look again (pick re-checks it).
                    scope.full.discard(key)
                    scope.candidates[key] = None

    def add_candidate(self, scope: Scope, key: str) -> None:
        with self._lock:
            if key in self._blocks:
                scope.full.discard(key)
                scope.candidates[key] = None

    def mark_full(self, scope: Scope, key: str) -> None:
        """No free address of the scope left in the block: keep only its name."""
        with self._lock:
            scope.candidates.pop(key, None)
            scope.full.add(key)
            if not any(key in other.candidates for other in self._scopes.values()):
                self._blocks.pop(key, None)

    def forget(self, key: str, freed_cell: IPNetwork | None = None) -> None:
        """The block is gone (or another host's); freed_cell: we deleted it, so the
        cell is free to claim again."""
        with self._lock:
            self._drop(key)
            if freed_cell is not None:
                for scope in self._scopes.values():
                    if scope.loaded and _overlaps(freed_cell, scope):
                        scope.returned[key] = freed_cell

    def _cell_taken(self, key: str) -> list[Scope]:
        """A block is known at key: its cell is no longer free to claim. The scopes
        that held it as returned."""
        return [scope for scope in self._scopes.values()
                if scope.returned.pop(key, None) is not None]

    def _drop(self, key: str) -> None:
        self._blocks.pop(key, None)
        for scope in self._scopes.values():
            scope.candidates.pop(key, None)
            scope.full.discard(key)
            scope.foreign.discard(key)
            scope.ranges.pop(key, None)


    # --------------------------------------------------------------- borrowing

    def offer_borrowable(self, scope: Scope, key: str, revision: int,
                         block: AllocationBlock) -> None:
        """Another host's block with room, as read at revision (the view keeps block)."""
        with self._lock:
            scope.borrowable[key] = (revision, block)

    def learn_foreign(self, scope: Scope, key: str, revision: int,
                      block: AllocationBlock | None) -> None:
        """Another host's block, as read at revision: not ours (whatever the view
        held of it), and offered for borrowing while it has room (block), else not."""
        with self._lock:
            held = self._blocks.get(key)
            if held is not None:
                if held[0] > revision:
                    return  # ours since: a newer write of this process is known
                self._drop(key)
            self._cell_taken(key)  # another host claimed the cell again
            offered = scope.borrowable.get(key)
            if offered is not None and offered[0] > revision:
                return  # a newer read is offered already
            scope.foreign.add(key)
            if block is not None:
                scope.borrowable[key] = (revision, block)
            else:
                scope.borrowable.pop(key, None)

    def take_borrowable(self, scope: Scope) -> tuple[str, int, AllocationBlock] | None:
        """One offered block, at random (the host's other processes and the other
        hosts are offered the same ones), taken out so that no other thread of this
        process writes it meanwhile."""
        with self._lock:
            if not scope.borrowable:
                return None
            key = random.choice(list(scope.borrowable))
            revision, block = scope.borrowable.pop(key)
            return key, revision, block


def _overlaps(cell: IPNetwork, scope: Scope) -> bool:
    return bool(scope.allowed & IPSet([cell]))
