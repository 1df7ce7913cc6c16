"""The embedded datastore's file locked by another process, or not a database: a clear
error naming the file, and nothing corrupted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from datastore.base import DatastoreError, DatastoreUnavailable
from datastore.sqlite import SqliteDatastore


def test_a_locked_file_is_unavailable_naming_it_and_recovers(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = SqliteDatastore(path, busy_timeout=0.2)
    before = store.create("/calico-cnm/v1/k", '"before"')
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holding the file
    try:
        for attempt in (lambda: store.create("/calico-cnm/v1/other", '"x"'),
                        lambda: store.update("/calico-cnm/v1/k", '"after"', before.revision),
                        lambda: store.delete("/calico-cnm/v1/k")):
            with pytest.raises(DatastoreUnavailable, match="state.db.*locked"):
                attempt()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    # Nothing was half-written; the same store works again.
    assert store.get("/calico-cnm/v1/k") == before
    assert store.get("/calico-cnm/v1/other") is None
    assert store.update("/calico-cnm/v1/k", '"after"', before.revision).value == '"after"'


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite\n" * 200)
    with pytest.raises(DatastoreError, match="state.db"):
        SqliteDatastore(str(path)).get("/calico-cnm/v1/k")
    assert path.read_bytes() == b"this is not sqlite\n" * 200  # left as it was
