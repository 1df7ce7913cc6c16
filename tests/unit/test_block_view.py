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

