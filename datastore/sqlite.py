"""Embedded datastore: one SQLite file (WAL) with etcd-like revisions.

Several gunicorn workers and the agent open the same file; SQLite's own
locking serialises writers, and every write is one IMMEDIATE transaction that
bumps the store revision and appends to a change log, which watch() polls.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Any

from datastore.base import (
    AlreadyExists,
    Datastore,
    DatastoreError,
    DatastoreUnavailable,
    Entry,
    Event,
    Guard,
    GuardChanged,
    RevisionConflict,
)

# Change-log rows kept for watchers; older history is compacted away.
CHANGELOG_KEEP = 10000
WATCH_POLL_SECONDS = 0.05
# list_changed reads the keys from the change log up to this many revisions back;
# further back it scans every key under the prefix.
CHANGED_FROM_LOG_MAX = 4096

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
INSERT OR IGNORE INTO meta (name, value) VALUES ('compacted', 0);
"""


def _prefix_upper_bound(prefix: str) -> str:
    return prefix + "\U0010ffff"


def _error(path: str, exc: sqlite3.DatabaseError) -> DatastoreError:
    """Locked or busy (another process): unavailable for now; anything else (not a
    database, corrupt): an error that retrying will not fix."""
    if isinstance(exc, sqlite3.OperationalError):
        return DatastoreUnavailable(f"sqlite datastore {path}: {exc}")
    return DatastoreError(f"sqlite datastore {path} is not usable: {exc}")


class SqliteDatastore(Datastore):
    def __init__(self, path: str, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            conn = self._conn()
            with conn:
                conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise _error(path, exc) from exc

    def _conn(self) -> sqlite3.Connection:
        # One connection per thread (and per process: the pid guards fork).
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def _write(self, key: str, op: str, value: str | None, expect: int | None,
               guard: Guard | None = None) -> Entry | bool:
        """One atomic write. expect: None = unconditional, 0 = must be absent, N = mod rev."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise _error(self.path, exc) from exc
        try:
            if guard is not None:
                row = conn.execute("SELECT revision FROM kv WHERE key = ?",
                                   (guard.key,)).fetchone()
                if row is None or row[0] != guard.revision:
                    raise GuardChanged(
                        f"{guard.key}: expected revision {guard.revision}, found "
                        f"{row[0] if row else 'no key'}")
            row = conn.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
            current = row[0] if row else None
            if expect == 0 and current is not None:
                raise AlreadyExists(key)
            if expect not in (None, 0) and current != expect:
                raise RevisionConflict(f"{key}: expected revision {expect}, found {current}")
            if op == "delete" and current is None:
                conn.execute("ROLLBACK")
                return False
            revision = conn.execute(
                "UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value"
            ).fetchone()[0]
            if op == "put":
                conn.execute(
                    "INSERT INTO kv (key, value, revision) VALUES (?, ?, ?) ON CONFLICT(key) "
                    "DO UPDATE SET value = excluded.value, revision = excluded.revision",
                    (key, value, revision),
                )
            else:
                conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            conn.execute(
                "INSERT INTO changes (revision, kind, key, value) VALUES (?, ?, ?, ?)",
                (revision, op, key, value),
            )
            if revision % 1000 == 0:
                self._compact(conn, revision)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if op == "delete":
            return True
        assert value is not None
        return Entry(key, value, revision)

    @staticmethod
    def _compact(conn: sqlite3.Connection, revision: int) -> None:
        floor = revision - CHANGELOG_KEEP
        if floor > 0:
            conn.execute("DELETE FROM changes WHERE revision <= ?", (floor,))
            conn.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (floor,))

    def _read(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _error(self.path, exc) from exc

    def get(self, key: str) -> Entry | None:
        rows = self._read("SELECT key, value, revision FROM kv WHERE key = ?", (key,))
        return Entry(*rows[0]) if rows else None

    def list(self, prefix: str) -> list[Entry]:
        rows = self._read(
            "SELECT key, value, revision FROM kv WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, _prefix_upper_bound(prefix)),
        )
        return [Entry(*row) for row in rows]

    def list_changed(self, prefix: str, after_revision: int) -> tuple[list[Entry], int]:
        upper = _prefix_upper_bound(prefix)
        conn = self._conn()
        try:
            conn.execute("BEGIN")  # one snapshot for the rows and the revision
            try:
                meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
                revision = meta["revision"]
                if (after_revision >= meta["compacted"]
                        and revision - after_revision <= CHANGED_FROM_LOG_MAX):
                    # The keys from the change log (by revision), not a scan of
                    # every key under the prefix.
                    rows = conn.execute(
                        "SELECT key, value, revision FROM kv WHERE key IN (SELECT key "
                        "FROM changes WHERE revision > ? AND key >= ? AND key < ?) AND "
                        "revision > ? ORDER BY key",
                        (after_revision, prefix, upper, after_revision)).fetchall()
                else:
                    rows = conn.execute(
                        "SELECT key, value, revision FROM kv WHERE key >= ? AND key < ? "
                        "AND revision > ? ORDER BY key",
                        (prefix, upper, after_revision)).fetchall()
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise _error(self.path, exc) from exc
        return [Entry(*row) for row in rows], revision

    def create(self, key: str, value: str, guard: Guard | None = None) -> Entry:
        result = self._write(key, "put", value, 0, guard)
        assert isinstance(result, Entry)
        return result

    def update(self, key: str, value: str, revision: int, guard: Guard | None = None
               ) -> Entry:
        if revision <= 0:
            raise RevisionConflict(f"{key}: invalid revision {revision}")
        result = self._write(key, "put", value, revision, guard)
        assert isinstance(result, Entry)
        return result

    def delete(self, key: str, revision: int | None = None) -> bool:
        if revision is not None and revision <= 0:
            raise RevisionConflict(f"{key}: invalid revision {revision}")
        return bool(self._write(key, "delete", None, revision))

    def current_revision(self) -> int:
        return self._read("SELECT value FROM meta WHERE name = 'revision'", ())[0][0]

    def watch(self, prefix: str, after_revision: int, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            compacted = self._read("SELECT value FROM meta WHERE name = 'compacted'", ())[0][0]
            if after_revision < compacted:
                raise RevisionConflict(f"revision {after_revision} has been compacted")
            rows = self._read(
                "SELECT kind, key, value, revision FROM changes WHERE revision > ? "
                "AND key >= ? AND key < ? ORDER BY revision",
                (after_revision, prefix, _prefix_upper_bound(prefix)),
            )
            if rows:
                return [Event(*row) for row in rows]
            if time.monotonic() >= deadline:
                return []
            time.sleep(WATCH_POLL_SECONDS)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
