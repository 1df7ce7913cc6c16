"""Helpers run in threads and in child processes (importable, no pytest)."""

from __future__ import annotations

from typing import Any

from datastore.base import Datastore, RevisionConflict, dumps
from datastore.sqlite import SqliteDatastore


def increment(store: Datastore, key: str, times: int) -> int:
    """Add 1 to the JSON counter at key `times` times by compare-and-swap.

    Returns how many conflicts were retried.
    """
    conflicts = 0
    for _ in range(times):
        while True:
            entry = store.get(key)
            assert entry is not None, f"{key} vanished"
            try:
                store.update(key, dumps(entry.data + 1), entry.revision)
                break
            except RevisionConflict:
                conflicts += 1
    return conflicts


def increment_sqlite(path: str, key: str, times: int, barrier: Any, results: Any) -> None:
    """Child process: open the SQLite file, wait for the others, then increment().

    barrier and results are a multiprocessing Barrier and Queue; the number of
    conflicts retried goes to results, or the text of the error that stopped it.
    """
    store = SqliteDatastore(path)
    try:
        barrier.wait(timeout=60)
        results.put(increment(store, key, times))
    except Exception as exc:  # reported to the parent test
        results.put(f"{type(exc).__name__}: {exc}")
    finally:
        store.close()
