"""The per-process block view's choice of block: processes start their scans at
different candidates, so that in a nearly full subnet they do not all fight over the
same block's last address."""

from __future__ import annotations

from netaddr import IPNetwork, IPSet

from ipam_driver.block_store import block_key
from ipam_driver.block_view import BlockView
from ipam_driver.blocks import AllocationBlock

SUBNET = IPNetwork("10.100.0.0/24")


def _view_with_candidates(start: float) -> tuple[BlockView, object, list[str]]:
    view = BlockView("h1", block_key, parallel_blocks=4, start=start)
    cells = list(SUBNET.subnet(26))
    scope = view.scope(("10.100.0.0/24", None, 26), IPSet([SUBNET]), iter(cells))
    keys = []
    for cell in cells:
        key = block_key(cell)
        view.learn(key, 1, AllocationBlock(cell, "h1"))
        view.add_candidate(scope, key)
        keys.append(key)
    return view, scope, keys


def test_each_process_begins_at_its_own_candidate_and_wraps_around() -> None:
    first, scope_a, keys = _view_with_candidates(start=0.0)
    second, scope_b, _ = _view_with_candidates(start=0.5)
    assert first.pick(scope_a) == keys[0]
    picked = [second.pick(scope_b) for _ in range(4)]  # each stays busy: the next one
    assert picked == [keys[2], keys[3], keys[0], keys[1]]


def test_another_hosts_block_from_the_history_is_offered_unless_we_know_it_newer() -> None:
    view, scope, keys = _view_with_candidates(start=0.0)
    theirs = AllocationBlock(IPNetwork("10.100.0.0/26"), "h2")
    view.learn_foreign(scope, keys[0], 0, theirs)  # older than our revision 1: stale
    assert keys[0] in scope.candidates and not scope.borrowable
    view.learn_foreign(scope, keys[0], 2, theirs)  # newer: the block is h2's now
    assert keys[0] not in scope.candidates and keys[0] in scope.foreign
    assert view.take_borrowable(scope) == (keys[0], 2, theirs)
    view.learn_foreign(scope, keys[1], 3, None)  # full: nothing to borrow
    assert keys[1] in scope.foreign and view.take_borrowable(scope) is None


def test_an_offer_is_replaced_by_newer_reads_only() -> None:
    """The history's events may arrive after a newer read of the same block: the
    offer keeps the newer revision (an older one would lose its compare-and-swap)."""
    view, scope, keys = _view_with_candidates(start=0.0)
    theirs = AllocationBlock(IPNetwork("10.100.1.0/26"), "h2")
    key = block_key(theirs.cidr)
    view.learn_foreign(scope, key, 7, theirs)
    view.learn_foreign(scope, key, 5, None)  # an older event: it was full then
    assert view.take_borrowable(scope) == (key, 7, theirs)
    view.learn_foreign(scope, key, 8, theirs)
    view.learn_foreign(scope, key, 9, None)  # a newer one: full now
    assert view.take_borrowable(scope) is None


def test_a_freed_cell_is_not_claimed_once_a_block_there_is_learned() -> None:
    """Every process learns of a deleted block from the history: once one of them has
    claimed the cell again and that is learned, the others no longer try it (a read
    each)."""
    view = BlockView("h1", block_key)
    cells = list(SUBNET.subnet(26))
    scope = view.scope(("10.100.0.0/24", None, 26), IPSet([SUBNET]), iter(()))
    scope.loaded = True
    for cell in cells[:3]:
        view.forget(block_key(cell), freed_cell=cell)
    view.learn_foreign(scope, block_key(cells[0]), 5, None)  # another host's now
    view.learn(block_key(cells[1]), 6, AllocationBlock(cells[1], "h1"))  # ours
    assert view.next_cell(scope) == cells[2]
    assert view.next_cell(scope) is None
    # Ours (a gateway's block, written by value): allocated from, not a new block.
    assert view.pick(scope) == block_key(cells[1])
