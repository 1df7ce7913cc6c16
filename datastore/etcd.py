"""Multi-host datastore: etcd v3 over gRPC (module `pyetcd`, package etcd-sdk-python).

This is the only module that knows about pyetcd. Every operation of the
`Datastore` contract maps onto one etcd request:

- create: a transaction `version(key) == 0` -> put;
- update / delete with a revision: a transaction `mod_revision(key) == revision`;
- list: one range request over the prefix, sorted by key;
- list_changed: the same with a minimum mod revision;
- watch: a watch from `after_revision + 1`, cancelled once events arrive or the
  timeout passes.

Several endpoints may be given; a request goes to the last endpoint that
answered and fails over to the next one when an endpoint cannot be reached.
Reads and watches are retried on the next endpoint after any availability
error; writes only when the connection itself failed (the request never left
this host), because a write that timed out may have been applied and must not
be sent twice. A write that cannot be confirmed raises DatastoreUnavailable.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd
from pyetcd import exceptions as etcd_exceptions
from pyetcd.events import DeleteEvent

from datastore.base import (
    ROOT,
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

T = TypeVar("T")

DEFAULT_PORT = 2379

# A watch with a tiny timeout still gives the server this long to deliver the
# history events that are already there (they arrive just after the watch is
# created).
WATCH_MIN_WAIT = 0.05

# gRPC channel options: reconnect quickly once etcd is back, detect dead
# connections during a call, and accept large range responses (IPAM lists).
GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]

# gRPC codes that mean "etcd is not reachable or not answering".
_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Texts of an UNAVAILABLE status raised before the request reached a server.
_CONNECT_FAILURE_TEXTS = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "name resolution",
    "dns resolution failed",
)


class _Target:
    """One configured endpoint URL, split into what gRPC needs."""

    def __init__(self, url: str) -> None:
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid etcd endpoint {url!r}: expected http(s)://host:port")
        host = parts.hostname
        self.host = f"[{host}]" if ":" in host else host
        self.port = parts.port or DEFAULT_PORT
        self.secure = parts.scheme == "https"
        self.url = f"{parts.scheme}://{self.host}:{self.port}"


class _Failure:
    """An availability failure of one endpoint, classified for failover."""

    def __init__(self, detail: str, retry_safe_for_writes: bool) -> None:
        self.detail = detail
        self.retry_safe_for_writes = retry_safe_for_writes


class _WatchClosed(Exception):
    """The client's shared watch stream was closed under us; re-create the watch."""


def _find_rpc_error(exc: BaseException) -> grpc.RpcError | None:
    """The gRPC error behind a pyetcd exception (pyetcd raises inside `except`)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, grpc.RpcError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _classify(exc: BaseException) -> _Failure | None:
    """A _Failure when exc means the endpoint is unavailable, else None."""
    rpc = _find_rpc_error(exc)
    if rpc is not None and hasattr(rpc, "code"):
        code = rpc.code()
        details = (rpc.details() or "") if hasattr(rpc, "details") else ""
        if code not in _UNAVAILABLE_CODES:
            return None
        connect_failed = code == grpc.StatusCode.UNAVAILABLE and any(
            text in details.lower() for text in _CONNECT_FAILURE_TEXTS
        )
        return _Failure(f"{code.name}: {details}".rstrip(": "), connect_failed)
    if isinstance(exc, etcd_exceptions.WatchTimedOut):
        return _Failure("watch creation timed out", False)
    if isinstance(
        exc,
        etcd_exceptions.ConnectionFailedError
        | etcd_exceptions.ConnectionTimeoutError
        | etcd_exceptions.InternalServerError
        | etcd_exceptions.NoServerAvailableError,
    ):
        return _Failure(str(exc) or type(exc).__name__, False)
    return None


def _entry(kv: Any) -> Entry:
    return Entry(kv.key.decode("utf-8"), kv.value.decode("utf-8"), kv.mod_revision)


def _event(raw: Any) -> Event:
    key = raw.key.decode("utf-8")
    if isinstance(raw, DeleteEvent):
        return Event("delete", key, None, raw.mod_revision)
    return Event("put", key, raw.value.decode("utf-8"), raw.mod_revision)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


class EtcdDatastore(Datastore):
    """The Datastore contract on an etcd v3 cluster."""

    def __init__(
        self,
        endpoints: list[str],
        ca_cert: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [part for part in endpoints.split(",") if part.strip()]
        if not endpoints:
            raise ValueError("EtcdDatastore needs at least one endpoint URL")
        if (cert_file is None) != (key_file is None):
            raise ValueError("etcd client TLS needs both cert_file and key_file")
        self._targets = [_Target(url) for url in endpoints]
        self._timeout = timeout
        # Read now, so that a wrong path fails at startup rather than at first use.
        self._ca_pem = _read(ca_cert)
        self._cert_pem = _read(cert_file)
        self._key_pem = _read(key_file)
        self._lock = threading.Lock()
        self._clients: list[Any | None] = [None] * len(self._targets)
        self._pid = os.getpid()
        self._preferred = 0

    @property
    def endpoints(self) -> list[str]:
        return [target.url for target in self._targets]

    def __repr__(self) -> str:
        return f"EtcdDatastore({', '.join(self.endpoints)})"

    # Connections.

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._ca_pem,
            private_key=self._key_pem,
            certificate_chain=self._cert_pem,
        )

    def _client(self, index: int) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                # gRPC channels do not survive fork: the child opens its own.
                self._clients = [None] * len(self._targets)
                self._pid = os.getpid()
            client = self._clients[index]
            if client is None:
                target = self._targets[index]
                endpoint = pyetcd.Endpoint(
                    target.host,
                    target.port,
                    secure=target.secure,
                    creds=self._credentials() if target.secure else None,
                    # Never park an endpoint: failover is decided here, per call.
                    time_retry=0,
                    opts=GRPC_OPTIONS,
                )
                client = pyetcd.MultiEndpointEtcd3Client(
                    endpoints=[endpoint], timeout=self._timeout
                )
                self._clients[index] = client
            return client

    def _call(self, op: Callable[[Any], T], idempotent: bool) -> T:
        """Run op against the preferred endpoint, failing over to the others."""
        count = len(self._targets)
        start = self._preferred
        failures: list[str] = []
        for step in range(count):
            index = (start + step) % count
            try:
                result = op(self._client(index))
            except DatastoreError:
                raise
            except Exception as exc:
                failure = _classify(exc)
                if failure is None:
                    if not isinstance(exc, grpc.RpcError | etcd_exceptions.Etcd3Exception):
                        raise
                    raise DatastoreError(
                        f"etcd at {self._targets[index].url}: {_describe(exc)}"
                    ) from exc
                failures.append(f"{self._targets[index].url}: {failure.detail}")
                self._preferred = (index + 1) % count
                if idempotent or failure.retry_safe_for_writes:
                    continue
                raise DatastoreUnavailable(
                    f"etcd did not confirm the write ({'; '.join(failures)}); it may or may "
                    f"not have been applied; endpoints: {', '.join(self.endpoints)}"
                ) from exc
            self._preferred = index
            return result
        raise DatastoreUnavailable(f"etcd unavailable: {'; '.join(failures)}")

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, [None] * len(self._targets)
        for client in clients:
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing is best effort
                    pass

    # Reads.

    def get(self, key: str) -> Entry | None:
        response = self._call(lambda client: client.get_response(key), idempotent=True)
        return _entry(response.kvs[0]) if response.count else None

    def list(self, prefix: str) -> list[Entry]:
        def op(client: Any) -> Any:
            if prefix == "":
                return client.get_all_response(sort_order="ascend", sort_target="key")
            return client.get_prefix_response(prefix, sort_order="ascend", sort_target="key")

        response = self._call(op, idempotent=True)
        return [_entry(kv) for kv in response.kvs]

    def list_changed(self, prefix: str, after_revision: int) -> tuple[list[Entry], int]:
        def op(client: Any) -> Any:
            return client.get_prefix_response(
                prefix, sort_order="ascend", sort_target="key",
                min_mod_revision=max(after_revision, 0) + 1)

        response = self._call(op, idempotent=True)
        return [_entry(kv) for kv in response.kvs], response.header.revision

    def current_revision(self) -> int:
        response = self._call(
            lambda client: client.get_response(ROOT, count_only=True), idempotent=True
        )
        return response.header.revision

    # Writes.

    def create(self, key: str, value: str, guard: Guard | None = None) -> Entry:
        def op(client: Any) -> tuple[bool, list[Any]]:
            txn = client.transactions
            return client.transaction(
                compare=[txn.version(key) == 0, *_guarding(txn, guard)],
                success=[txn.put(key, value)],
                failure=_guard_reads(txn, guard),
            )

        succeeded, responses = self._call(op, idempotent=False)
        if not succeeded:
            _raise_if_guard_changed(guard, responses)
            raise AlreadyExists(key)
        return _written(key, value, responses)

    def update(self, key: str, value: str, revision: int, guard: Guard | None = None
               ) -> Entry:
        if revision <= 0:
            # mod_revision == 0 would match an absent key and create it.
            raise RevisionConflict(f"{key}: invalid revision {revision}")

        def op(client: Any) -> tuple[bool, list[Any]]:
            txn = client.transactions
            return client.transaction(
                compare=[txn.mod(key) == revision, *_guarding(txn, guard)],
                success=[txn.put(key, value)],
                failure=[*_guard_reads(txn, guard), txn.get(key)],
            )

        succeeded, responses = self._call(op, idempotent=False)
        if not succeeded:
            _raise_if_guard_changed(guard, responses)
            raise RevisionConflict(
                f"{key}: expected revision {revision}, found {_found(responses[-1:])}"
            )
        return _written(key, value, responses)

    def delete(self, key: str, revision: int | None = None) -> bool:
        if revision is None:
            return self._call(lambda client: client.delete(key), idempotent=False)
        if revision <= 0:
            raise RevisionConflict(f"{key}: invalid revision {revision}")

        def op(client: Any) -> tuple[bool, list[Any]]:
            txn = client.transactions
            return client.transaction(
                compare=[txn.mod(key) == revision],
                success=[txn.delete(key)],
                failure=[txn.get(key)],
            )

        succeeded, responses = self._call(op, idempotent=False)
        if not succeeded:
            raise RevisionConflict(
                f"{key}: expected revision {revision}, found {_found(responses)}"
            )
        return True

    # Watch.

    def watch(self, prefix: str, after_revision: int, timeout: float) -> list[Event]:
        deadline = time.monotonic() + max(timeout, WATCH_MIN_WAIT)
        return self._call(
            lambda client: self._watch_once(client, prefix, after_revision, deadline),
            idempotent=True,
        )

    def _watch_once(
        self, client: Any, prefix: str, after_revision: int, deadline: float
    ) -> list[Event]:
        while True:
            try:
                return self._watch_stream(client, prefix, after_revision, deadline)
            except _WatchClosed:
                # Another call on this client reset its stubs (after an error),
                # which ends every watch on the shared stream: start again.
                if time.monotonic() >= deadline:
                    return []

    def _watch_stream(
        self, client: Any, prefix: str, after_revision: int, deadline: float
    ) -> list[Event]:
        responses: queue.Queue[Any] = queue.Queue()
        kwargs: dict[str, Any] = {"start_revision": max(after_revision, 0) + 1}
        try:
            if prefix == "":
                watch_id = client.add_watch_callback(
                    b"\0", responses.put, range_end=b"\0", **kwargs
                )
            else:
                watch_id = client.add_watch_prefix_callback(prefix, responses.put, **kwargs)
        except etcd_exceptions.RevisionCompactedError as exc:
            raise self._compacted(after_revision, exc) from exc
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                try:
                    item = responses.get(timeout=remaining)
                except queue.Empty:
                    return []
                events = self._events(item, after_revision)
                if events:
                    # Take whatever else has already arrived, without waiting.
                    while True:
                        try:
                            more = self._events(responses.get_nowait(), after_revision)
                        except (queue.Empty, _WatchClosed, DatastoreError, grpc.RpcError):
                            break
                        events.extend(more)
                    return events
        finally:
            try:
                client.cancel_watch(watch_id)
            except Exception:  # the watch stream may already be gone
                pass

    def _events(self, item: Any, after_revision: int) -> list[Event]:
        """The events of one watch callback item; raises for error items."""
        if item is None:
            raise _WatchClosed()
        if isinstance(item, etcd_exceptions.RevisionCompactedError):
            raise self._compacted(after_revision, item)
        if isinstance(item, BaseException):
            raise item
        return [_event(raw) for raw in item.events if raw.mod_revision > after_revision]

    @staticmethod
    def _compacted(
        after_revision: int, exc: etcd_exceptions.RevisionCompactedError
    ) -> RevisionConflict:
        return RevisionConflict(
            f"revision {after_revision} has been compacted "
            f"(etcd history starts at {exc.compacted_revision})"
        )


def _written(key: str, value: str, responses: list[Any]) -> Entry:
    """The entry a transaction's put wrote: every write of a transaction gets its
    revision, which the put's header carries (no read back of a value we hold)."""
    revision = responses[0].response_put.header.revision
    if revision <= 0:
        raise DatastoreError(f"etcd confirmed the write of {key} without a revision")
    return Entry(key, value, revision)


def _guarding(txn: Any, guard: Guard | None) -> list[Any]:
    return [txn.mod(guard.key) == guard.revision] if guard is not None else []


def _guard_reads(txn: Any, guard: Guard | None) -> list[Any]:
    """The failure branch reads the guard key, to tell which compare failed."""
    return [txn.get(guard.key)] if guard is not None else []


def _raise_if_guard_changed(guard: Guard | None, responses: list[Any]) -> None:
    if guard is None:
        return
    kvs = responses[0]
    found = kvs[0][1].mod_revision if kvs else None
    if found != guard.revision:
        raise GuardChanged(f"{guard.key}: expected revision {guard.revision}, found "
                           f"{found if found is not None else 'no key'}")


def _found(responses: list[Any]) -> str:
    """The current mod revision from a failure branch's get, for messages."""
    try:
        kvs = responses[0]
        return str(kvs[0][1].mod_revision) if kvs else "no key"
    except (IndexError, TypeError, AttributeError):
        return "another revision"


def _describe(exc: BaseException) -> str:
    rpc = _find_rpc_error(exc)
    if rpc is not None and hasattr(rpc, "code"):
        return f"{rpc.code().name}: {rpc.details()}"
    return str(exc) or type(exc).__name__
