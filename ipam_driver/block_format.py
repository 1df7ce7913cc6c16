"""Which record format this datastore's allocation blocks are written in.

Format 2 (``AllocationBlock.to_dict(compact=True)``) keeps each distinct attribute set
of a block once; versions before it cannot read it (they fail on it rather than misread
it). So it is written only once the datastore says so, in the record ``ipam/config``
(``{"block_format": 2}``):

* a datastore that has no block yet when its first block is written gets format 2;
* one that already has blocks gets format 1 and keeps it until
  ``calico-cnm ipam block-format 2``, to be run once every host runs this version;
* before going back to an older version: ``calico-cnm ipam block-format 1``, which
  waits until every process has seen the setting and rewrites every block in format 1.

Readers accept both formats whatever the setting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from datastore.base import ROOT, AlreadyExists, Datastore, RevisionConflict, dumps
from datastore.errors import InvalidRequest
from ipam_driver.block_store import BLOCKS_PREFIX
from ipam_driver.blocks import AllocationBlock

CONFIG_KEY = ROOT + "ipam/config"
FORMATS = (1, 2)
# How long a process writes by the setting it last read (seconds).
REFRESH_SECONDS = 10.0


class BlockFormat:
    """The setting as this process last read it, read again every REFRESH_SECONDS."""

    def __init__(self, store: Datastore, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.store = store
        self._clock = clock
        self._format: int | None = None
        self._read_at = 0.0

    def compact(self) -> bool:
        now = self._clock()
        if self._format is None or now - self._read_at >= REFRESH_SECONDS:
            self._format = self._read_or_decide()
            self._read_at = now
        return self._format == 2

    def _read_or_decide(self) -> int:
        entry = self.store.get(CONFIG_KEY)
        if entry is not None:
            return _format_of(entry.data)
        decided = 1 if self.store.list(BLOCKS_PREFIX) else 2
        try:
            self.store.create(CONFIG_KEY, dumps({"block_format": decided}))
        except AlreadyExists:
            entry = self.store.get(CONFIG_KEY)
            return _format_of(entry.data) if entry is not None else 1
        return decided


def _format_of(data: object) -> int:
    value = data.get("block_format", 1) if isinstance(data, dict) else 1
    return value if value in FORMATS else 1


def read_block_format(store: Datastore) -> int | None:
    """The stored setting; None before the first block was written."""
    entry = store.get(CONFIG_KEY)
    return _format_of(entry.data) if entry is not None else None


def set_block_format(store: Datastore, block_format: int,
                     attempts: Callable[[str], Iterator[int]],
                     wait: Callable[[float], None] = time.sleep) -> int:
    """Store the setting. For format 1, wait until every process writes by it, then
    rewrite every format 2 block in format 1; returns how many blocks were rewritten."""
    if block_format not in FORMATS:
        raise InvalidRequest(f"unknown block format {block_format}: use 1 or 2")
    store.put_json(CONFIG_KEY, {"block_format": block_format})
    if block_format == 2:
        return 0
    wait(REFRESH_SECONDS + 1)
    rewritten = 0
    for listed in store.list(BLOCKS_PREFIX):
        for _ in attempts(f"rewriting block {listed.key} in format 1"):
            entry = store.get(listed.key)
            if entry is None or entry.data.get("format", 1) == 1:
                break
            block = AllocationBlock.from_dict(entry.data)
            try:
                store.update(entry.key, dumps(block.to_dict()), entry.revision)
            except RevisionConflict:
                continue
            rewritten += 1
            break
    return rewritten
