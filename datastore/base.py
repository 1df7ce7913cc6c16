"""The datastore contract: a key-value store with revisions.

Every backend (SQLite embedded, etcd v3) offers the same operations with the
same semantics, so the rest of the project never knows which one it talks to.
Values are JSON text; revisions are store-wide and strictly increasing, as in
etcd: every write gets a new revision and an entry remembers the revision of
its last write (its mod revision).
"""

from __future__ import annotations

import functools
import json
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from datastore.errors import Unavailable

# Every key the project writes lives under this prefix.
ROOT = "/calico-cnm/v1/"
# Outside ROOT, which every agent watches: records that every node rewrites often and
# no agent reacts to (heartbeats), so that they are not fanned out to every host.
STATUS_ROOT = "/calico-cnm/status/v1/"


class DatastoreError(Exception):
    """Base class of every datastore failure."""


class AlreadyExists(DatastoreError):
    """create() found the key already present."""


class RevisionConflict(DatastoreError):
    """A compare-and-swap found another revision (or no key) than expected."""


class DatastoreUnavailable(DatastoreError):
    """The backend cannot be reached (etcd down, database locked for too long)."""


class GuardChanged(DatastoreError):
    """A guarded write found its guard key changed or gone: nothing was written."""


@dataclass(frozen=True)
class Guard:
    """A condition a write carries on another key: that it is still at this mod
    revision. It makes "the record this write depends on still holds" part of the
    same atomic write, in place of a read before and a read after."""

    key: str
    revision: int


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    revision: int

    @property
    def data(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class Event:
    """One change seen by watch(): kind is "put" or "delete"."""

    kind: str
    key: str
    value: str | None
    revision: int


class Datastore(ABC):
    """Key-value store with compare-and-swap on per-key mod revisions."""

    @abstractmethod
    def get(self, key: str) -> Entry | None:
        """The entry at key, or None."""

    @abstractmethod
    def list(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with prefix, sorted by key."""

    @abstractmethod
    def list_changed(self, prefix: str, after_revision: int) -> tuple[list[Entry], int]:
        """The entries under prefix last written after after_revision, sorted by key,
        and the store revision this read saw. One request, whatever the history
        holds (compaction does not matter); keys deleted since do not show (watch
        gives deletes)."""

    @abstractmethod
    def create(self, key: str, value: str, guard: Guard | None = None) -> Entry:
        """Write key only if absent; raises AlreadyExists otherwise. With a guard, only
        if the guard holds too; GuardChanged (checked first) otherwise."""

    @abstractmethod
    def update(self, key: str, value: str, revision: int, guard: Guard | None = None
               ) -> Entry:
        """Write key only if its mod revision is still `revision`; else RevisionConflict.
        With a guard, only if the guard holds too; GuardChanged (checked first) otherwise."""

    @abstractmethod
    def delete(self, key: str, revision: int | None = None) -> bool:
        """Delete key. With a revision, only if unchanged (else RevisionConflict).

        Returns False when the key was already gone (and no revision was given).
        """

    @abstractmethod
    def current_revision(self) -> int:
        """The store-wide revision of the latest write."""

    @abstractmethod
    def watch(self, prefix: str, after_revision: int, timeout: float) -> list[Event]:
        """Changes under prefix with revision > after_revision, in order.

        Blocks up to timeout seconds until at least one arrives; returns [] on
        timeout. If history that old is gone (compacted), raises RevisionConflict
        so the caller does a full resync.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # Conveniences shared by every backend.

    def put_json(self, key: str, data: Any) -> Entry:
        """Unconditional write (create or overwrite); for records with one writer."""
        while True:
            current = self.get(key)
            text = dumps(data)
            try:
                if current is None:
                    return self.create(key, text)
                return self.update(key, text, current.revision)
            except (AlreadyExists, RevisionConflict):
                continue


def dumps(data: Any) -> str:
    """The canonical JSON text of a record."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


P = ParamSpec("P")
R = TypeVar("R")


def unavailable_as_error(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: an unreachable datastore becomes the project's Unavailable error."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except DatastoreUnavailable as exc:
                raise Unavailable(f"{what} datastore unavailable: {exc}") from exc

        return wrapper

    return decorate


def cas_attempts(what: str, max_attempts: int) -> Iterator[int]:
    """Attempt numbers for a compare-and-swap retry loop, with a jittered back-off
    between them; gives up with Unavailable when the record keeps changing."""
    for attempt in range(max_attempts):
        if attempt:
            time.sleep(random.uniform(0, min(0.02, 0.0005 * 2 ** min(attempt, 6))))
        yield attempt
    raise Unavailable(
        f"gave up {what} after {max_attempts} attempts: the datastore kept "
        "changing under us (too many concurrent writers?)"
    )
