"""etcd load of one calico-cnm host, measured on the simulated cluster with real etcd.

Starts `tests.multihost.cluster.Cluster` (three hosts in network namespaces, each with
its own dockerd and `calico-cnm serve`, etcd 3.4 in the router's namespace; the
harness runs every agent with a 2 s resync interval), makes one calico network and
``--per-host`` containers on every host, and measures:

1. Keys watched: every agent watches the whole ROOT prefix (`plugin/agent.py`,
   ``self._store.watch(ROOT, ...)``), so every key under it; their number and bytes
   per kind (first path element under ROOT; ``ipam/`` split one level deeper), from
   one range read of /calico-cnm/ through etcd's JSON gateway (keys outside ROOT, such
   as heartbeats under STATUS_ROOT, are listed as not
   watched). Bytes are the key and value lengths and the exact protobuf size of each
   KeyValue as etcd sends it.
2. Writes per operation: the etcd revision before and after each of ``--runs``
   ``docker run -d`` (and as many ``docker rm -f``) on h1, one at a time, waiting
   ``--settle`` seconds after each for the agents' reactions; the writes in between are
   replayed from etcd's history with a watch from the first revision (JSON gateway) and
   broken down by key kind. Heartbeats (``routing.nodes.NODE_STATUS``) that fall into
   the interval are counted apart. Also the first container of the network on a host (it claims a
   block) and the network create (which every host's network sync copies).
3. Background writes: over ``--idle`` seconds with nothing happening, every write
   (replayed the same way) per host and per second; scaled from the harness's 2 s
   resync interval to the default 10 s.
4. Fan-out: etcd's ``etcd_debugging_mvcc_events_total`` (events sent to watchers)
   over the starts and removals divided by the writes under ROOT in them: events
   delivered per write (and the same over the idle window).
5. Bytes per resync, two ways: (a) measured: the plugins of h2 and h3 are stopped, so
   only h1's agent talks to etcd; over ``--solo`` seconds etcd's
   ``etcd_network_client_grpc_sent_bytes_total`` (the protobuf size of every message
   etcd sends; etcd counts it in its gRPC codec) and ``grpc_server_handled_total`` by
   method, divided by h1's resyncs in the window (each resync writes exactly one
   heartbeat); the plugins are started again afterwards. (b) derived from the code:
   the ranges `Agent.resync` reads (listed in RESYNC_READS, with where each comes
   from), read again through the gateway, with the exact protobuf size of each reply.

Nothing is written to etcd by this script; its reads go through the gateway after
each measured window, never inside one. All traffic stays inside the cluster's
namespaces (the test process reaches etcd through the harness's forwarder).

Usage (as root, from the repository root):
    .venv/bin/python bench/etcd_load.py [--per-host 10] [--runs 10] [--settle 1.5]
                                        [--idle 30] [--solo 20] [--routing static|bgp]
                                        [--no-write]

``--routing bgp`` runs every agent with BIRD (a mesh of the three hosts): the
heartbeat then lists BGP sessions and the resync reads the BGP documents too.

The cluster takes a lock file: if another session runs one, this waits. It is always
stopped at the end (also on Ctrl-C or SIGTERM) and checked gone. Writes the "etcd load
per host" section of BENCHMARKS.md (replaced on every run) unless --no-write.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.sections import BENCHMARKS, write_section  # noqa: E402
from datastore.base import ROOT, STATUS_ROOT  # noqa: E402
from driver.records import ENDPOINTS, NETWORKS  # noqa: E402
from ipam_driver.block_store import BLOCKS_PREFIX  # noqa: E402
from ipam_driver.service import POOLS_KEY  # noqa: E402
from profiles.store import PROFILES  # noqa: E402
from routing.bgp_store import BGP, CONFIG_KEY  # noqa: E402
from routing.nodes import NODE_STATUS, NODES  # noqa: E402
from tests.multihost.cluster import (  # noqa: E402
    Cluster,
    Host,
    Stack,
    wait_for,
)

PROJECT = "/calico-cnm/"
SECTION = "## etcd load per host (issue 7)"
HARNESS_RESYNC = 2.0     # tests/multihost/cluster.py: CALICO_CNM_RESYNC_INTERVAL
DEFAULT_RESYNC = 10.0    # plugin/settings.py: resync_interval


# ------------------------------------------------------------ protobuf sizes

def varint_size(value: int) -> int:
    """Bytes of a protobuf varint (negative int64 values take 10)."""
    if value < 0:
        return 10
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def int_field(number: int, value: int) -> int:
    """A proto3 integer field: absent when zero."""
    return 0 if value == 0 else varint_size(number << 3) + varint_size(value)


def bytes_field(number: int, length: int, always: bool = False) -> int:
    """A length-delimited field (bytes, or an embedded message when ``always``)."""
    if length == 0 and not always:
        return 0
    return varint_size(number << 3 | 2) + varint_size(length) + length


@dataclass(frozen=True)
class Header:
    cluster_id: int
    member_id: int
    revision: int
    raft_term: int

    @classmethod
    def from_json(cls, data: dict) -> Header:
        return cls(*(int(data.get(k, 0)) for k in
                     ("cluster_id", "member_id", "revision", "raft_term")))

    def size(self) -> int:
        return (int_field(1, self.cluster_id) + int_field(2, self.member_id)
                + int_field(3, self.revision) + int_field(4, self.raft_term))


@dataclass(frozen=True)
class Kv:
    """One etcd KeyValue, as the JSON gateway shows it."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_json(cls, data: dict) -> Kv:
        return cls(base64.b64decode(data["key"]).decode(),
                   base64.b64decode(data.get("value", "")),
                   int(data.get("create_revision", 0)), int(data.get("mod_revision", 0)),
                   int(data.get("version", 0)), int(data.get("lease", 0)))

    @property
    def payload(self) -> int:
        """Key plus value bytes."""
        return len(self.key.encode()) + len(self.value)

    def size(self) -> int:
        """The KeyValue message's protobuf size."""
        return (bytes_field(1, len(self.key.encode())) + int_field(2, self.create_revision)
                + int_field(3, self.mod_revision) + int_field(4, self.version)
                + bytes_field(5, len(self.value)) + int_field(6, self.lease))


def range_reply_size(header: Header, kvs: Sequence[Kv], count: int) -> int:
    """RangeResponse: header (1), kvs (2), more (3), count (4)."""
    return (bytes_field(1, header.size(), always=True)
            + sum(bytes_field(2, kv.size(), always=True) for kv in kvs)
            + int_field(4, count))


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" or "delete"
    kv: Kv

    def size(self) -> int:
        """The Event message (type 1, kv 2) inside a WatchResponse's events (11)."""
        inner = int_field(1, 1 if self.kind == "delete" else 0) + bytes_field(
            2, self.kv.size(), always=True)
        return bytes_field(11, inner, always=True)


# ------------------------------------------------------------ etcd's gateway

def prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def watched(key: str) -> bool:
    """Whether the agents' watch (of ROOT) delivers this key's writes."""
    return key.startswith(ROOT)


def kind_of(key: str) -> str:
    """A key's kind: its first path element under ROOT (``ipam/`` one deeper); a key
    outside ROOT: its path under /calico-cnm/ without the last element."""
    if not watched(key):
        rest = key[len(PROJECT):] if key.startswith(PROJECT) else key
        return rest.rpartition("/")[0] + "/"
    parts = key[len(ROOT):].split("/")
    depth = 2 if parts[0] == "ipam" and len(parts) > 2 else 1
    head = "/".join(parts[:depth])
    return head + "/" if len(parts) > depth else head


def name_in(key: str) -> str:
    """The element after a key's kind (a host name, a CIDR, an ID)."""
    return key.rsplit("/", 1)[-1]


HEARTBEAT = kind_of(NODE_STATUS + "h")


Metrics = dict[str, float]


class Gateway:
    """etcd's JSON gateway (/v3/...) and /metrics, through the cluster's forwarder."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 2379

    def _connection(self, timeout: float | None = 30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def post(self, path: str, body: dict) -> dict:
        connection = self._connection()
        try:
            connection.request("POST", path, body=json.dumps(body),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"etcd {path}: HTTP {response.status}: {data[:200]!r}")
            return json.loads(data)
        finally:
            connection.close()

    def range(self, key: str, prefix: bool = False, count_only: bool = False,
              revision: int = 0) -> tuple[Header, list[Kv], int]:
        body: dict[str, object] = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        if count_only:
            body["count_only"] = True
        if revision:
            body["revision"] = str(revision)
        data = self.post("/v3/kv/range", body)
        kvs = [Kv.from_json(kv) for kv in data.get("kvs", [])]
        return Header.from_json(data["header"]), kvs, int(data.get("count", 0))

    def revision(self) -> int:
        return self.range(PROJECT, prefix=True, count_only=True)[0].revision

    def metrics(self) -> Metrics:
        """Every sample of /metrics, keyed by its line's name{labels} text."""
        connection = self._connection()
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        samples: Metrics = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            try:
                samples[name] = float(value)
            except ValueError:
                continue
        return samples

    def events(self, after: int, until: int, timeout: float = 20) -> list[WatchEvent]:
        """Every write under /calico-cnm/ with after < revision <= until, from etcd's history
        (a watch from after + 1, closed once revision ``until`` has arrived)."""
        if until <= after:
            return []
        connection = self._connection(timeout)
        found: list[WatchEvent] = []
        try:
            connection.request("POST", "/v3/watch", body=json.dumps({"create_request": {
                "key": b64(PROJECT), "range_end": b64(prefix_end(PROJECT)),
                "start_revision": str(after + 1)}}),
                headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"etcd watch: HTTP {response.status}")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    line = response.readline()
                except TimeoutError:
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                for raw in result.get("events", []):
                    kv = Kv.from_json(raw["kv"])
                    if kv.mod_revision <= until:
                        found.append(WatchEvent(
                            "delete" if raw.get("type") == "DELETE" else "put", kv))
                if found and found[-1].kv.mod_revision >= until:
                    break
        finally:
            connection.close()
        return found


class KeyWatch:
    """A watch on one key through the gateway, read by a thread: each put's arrival,
    revision and the protobuf size of the WatchResponse that carried it."""

    def __init__(self, gateway: Gateway, key: str) -> None:
        self.arrivals: list[tuple[int, int]] = []  # (mod revision, response bytes)
        self._cond = threading.Condition()
        self._closing = False
        self.error: str | None = None
        self._connection = gateway._connection(timeout=None)
        start = gateway.revision() + 1
        self._connection.request("POST", "/v3/watch", body=json.dumps({"create_request": {
            "key": b64(key), "start_revision": str(start)}}),
            headers={"Content-Type": "application/json"})
        self._response = self._connection.getresponse()
        if self._response.status != 200:
            raise RuntimeError(f"etcd watch: HTTP {self._response.status}")
        self._thread = threading.Thread(target=self._run, name="key-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while line := self._response.readline():
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                events = [WatchEvent("put", Kv.from_json(raw["kv"]))
                          for raw in result.get("events", []) if raw.get("type") != "DELETE"]
                if not events:
                    continue
                size = (bytes_field(1, Header.from_json(result["header"]).size(), True)
                        + int_field(2, int(result.get("watch_id", 0)))
                        + sum(e.size() for e in events))
                with self._cond:
                    for event in events:
                        self.arrivals.append((event.kv.mod_revision, size))
                        size = 0  # one response, counted once
                    self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - reported by wait()
            if not self._closing:
                self.error = f"{type(exc).__name__}: {exc}"

    def wait(self, count: int, timeout: float = 30) -> int:
        """Waits for the count-th put; returns the number seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.arrivals) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.error:
                    raise RuntimeError(f"no heartbeat within {timeout} s ({self.error})")
                self._cond.wait(left)
            return len(self.arrivals)

    def close(self) -> None:
        self._closing = True
        try:
            if self._connection.sock is not None:
                self._connection.sock.shutdown(2)
        except OSError:
            pass
        self._connection.close()
        self._thread.join(timeout=2)


def metric(samples: Metrics, name: str, **labels: str) -> float:
    """The sum of every sample of a metric whose labels include ``labels``."""
    total = 0.0
    for text, value in samples.items():
        base, _, rest = text.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def delta(before: Metrics, after: Metrics, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


# ------------------------------------------------------------ what resync reads

@dataclass(frozen=True)
class Read:
    label: str
    key: str
    prefix: bool
    count_only: bool = False
    where: str = ""


def resync_reads(hostname: str, bgp: bool = False) -> list[Read]:
    """The etcd reads of one `Agent.resync` (no encapsulated pool, every local
    endpoint routed), in order, derived from the code."""
    me_eps = f"{ENDPOINTS}{hostname}/"
    bgp_reads = [
        Read("BGP configuration", CONFIG_KEY, False, where="BgpModel.load"),
        Read("BGP documents", BGP, True, where="BgpModel.load"),
    ] if bgp else []
    return [
        Read("revision", ROOT, True, True, "Agent._loop: current_revision (count only)"),
        Read("own node record", NODES + hostname, False, where="register_node: "
             "NodeRegistry.update"),
        Read("pools", POOLS_KEY, False, where="ensure_tunnel_addresses: get_pools"),
        Read("local endpoints", me_eps, True, where="StaleCollector.collect"),
        Read("networks", NETWORKS, True, where="StaleCollector.collect"),
        Read("networks", NETWORKS, True, where="resolve_pending_networks"),
        Read("networks", NETWORKS, True, where="NetworkSync.sync (its thread)"),
        Read("local endpoints", me_eps, True,
             where="NetworkSync._replace_carved_conflicts: list_endpoints"),
        Read("local endpoints", me_eps, True, where="reconcile_routes"),
        Read("nodes", NODES, True, where="RouteSync.load"),
        Read("pools", POOLS_KEY, False, where="RouteSync.load"),
        Read("blocks", BLOCKS_PREFIX, True, where="RouteSync.load"),
        *bgp_reads,
        Read("profiles", PROFILES, True, where="HostPolicy.load"),
        Read("nodes", NODES, True, where="HostPolicy.load"),
        Read("pools", POOLS_KEY, False, where="HostPolicy.load"),
        Read("networks", NETWORKS, True, where="HostPolicy.load"),
        Read("all endpoints", ENDPOINTS, True, where="HostPolicy.load"),
        Read("own heartbeat", NODE_STATUS + hostname, False,
             where="report_status: put_json reads before its swap"),
    ]


@dataclass
class ReadSize:
    read: Read
    keys: int
    size: int  # RangeResponse protobuf bytes


def measure_reads(gateway: Gateway, reads: Iterable[Read]) -> list[ReadSize]:
    result = []
    for read in reads:
        header, kvs, count = gateway.range(read.key, read.prefix, read.count_only)
        result.append(ReadSize(read, count, range_reply_size(header, kvs, count)))
    return result


# ------------------------------------------------------------ measurements

@dataclass
class KindStats:
    keys: int = 0
    payload: int = 0   # key + value bytes
    size: int = 0      # KeyValue protobuf bytes
    largest: int = 0   # largest value


def keyspace(kvs: Iterable[Kv]) -> dict[str, KindStats]:
    stats: dict[str, KindStats] = {}
    for kv in kvs:
        entry = stats.setdefault(kind_of(kv.key), KindStats())
        entry.keys += 1
        entry.payload += kv.payload
        entry.size += kv.size()
        entry.largest = max(entry.largest, len(kv.value))
    return dict(sorted(stats.items()))


def block_growth(kvs: Iterable[Kv]) -> tuple[int, float, float]:
    """Blocks: how many, their mean number of allocations, and the bytes each
    allocation adds to a block's value (its size less the same block with none)."""
    blocks = allocations = added = 0
    for kv in kvs:
        if not kv.key.startswith(BLOCKS_PREFIX):
            continue
        data = json.loads(kv.value)
        count = len(data.get("allocations") or {})
        empty = json.dumps({**data, "allocations": {}}, sort_keys=True,
                           separators=(",", ":"))
        blocks += 1
        allocations += count
        added += len(kv.value) - len(empty.encode())
    return blocks, allocations / blocks if blocks else 0.0, \
        added / allocations if allocations else 0.0


@dataclass
class Operation:
    """The writes etcd saw between two revisions around one operation."""

    label: str
    events: list[WatchEvent]
    seconds: float
    txns: float = 0.0    # Txn RPCs in the interval (compare-and-swaps, failed ones too)
    ranges: float = 0.0  # Range RPCs in the interval (every host's, resyncs included)
    sent_events: float = 0.0  # watch events etcd sent in the interval (every watcher)
    # Per write (heartbeats excluded): "<kind> create|update|delete: changed fields".
    changes: list[str] = field(default_factory=list)
    unchanged: int = 0   # updates whose value equals the previous one

    @property
    def writes(self) -> list[WatchEvent]:
        return [e for e in self.events if kind_of(e.kv.key) != HEARTBEAT]

    @property
    def heartbeats(self) -> int:
        return len(self.events) - len(self.writes)

    @property
    def watched_events(self) -> int:
        """Writes in the interval that the agents' watch delivers (heartbeats too,
        where they are under ROOT)."""
        return sum(1 for e in self.events if watched(e.kv.key))

    def kinds(self) -> Counter[str]:
        return Counter(f"{kind_of(e.kv.key)} {e.kind}" for e in self.writes)

    def value_bytes(self) -> int:
        return sum(len(e.kv.value) for e in self.writes)

    def event_bytes(self) -> int:
        return sum(e.size() for e in self.writes)


def observe(gateway: Gateway, label: str, action: Callable[[], object],
            settle: float) -> Operation:
    first = gateway.revision()
    before = gateway.metrics()
    began = time.monotonic()
    action()
    time.sleep(settle)
    seconds = time.monotonic() - began
    after = gateway.metrics()
    last = gateway.revision()
    operation = Operation(label, gateway.events(first, last), seconds,
                          txns=delta(before, after, "grpc_server_handled_total",
                                     grpc_method="Txn"),
                          ranges=delta(before, after, "grpc_server_handled_total",
                                       grpc_method="Range"),
                          sent_events=delta(before, after, "etcd_debugging_mvcc_events_total"))
    describe(gateway, operation)
    return operation


def changed_fields(old: bytes, new: bytes) -> list[str] | None:
    """The top-level fields of a JSON record that differ (None: not JSON objects)."""
    try:
        before, after = json.loads(old), json.loads(new)
    except ValueError:
        return None
    if not isinstance(before, dict) or not isinstance(after, dict):
        return None
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def describe(gateway: Gateway, operation: Operation) -> None:
    """What each write changed: its previous value read at the revision before it
    (etcd keeps the history; this runs after the operation's metric window)."""
    for event in operation.writes:
        kind = kind_of(event.kv.key)
        if event.kind == "delete":
            operation.changes.append(f"{kind} delete")
            continue
        if event.kv.version == 1:
            operation.changes.append(f"{kind} create")
            continue
        _, previous, _ = gateway.range(event.kv.key, revision=event.kv.mod_revision - 1)
        if not previous:
            operation.changes.append(f"{kind} update (previous value compacted)")
            continue
        fields = changed_fields(previous[0].value, event.kv.value)
        if previous[0].value == event.kv.value or fields == []:
            operation.unchanged += 1
            operation.changes.append(f"{kind} update: **value unchanged**")
        else:
            operation.changes.append(f"{kind} update: {', '.join(fields or ['(not JSON)'])}")


@dataclass
class Window:
    """An idle window: etcd's counters before and after, and every write in it."""

    seconds: float
    before: Metrics
    after: Metrics
    events: list[WatchEvent]
    # What this script's own heartbeat watch received inside the window (subtracted).
    own_bytes: int = 0
    own_messages: int = 0
    heartbeats_seen: int | None = None  # counted by a watch on the heartbeat key

    def d(self, name: str, **labels: str) -> float:
        value = delta(self.before, self.after, name, **labels)
        if name == "etcd_network_client_grpc_sent_bytes_total":
            value -= self.own_bytes
        elif name == "grpc_server_msg_sent_total" and labels.get("grpc_method") == "Watch":
            value -= self.own_messages
        elif name == "etcd_debugging_mvcc_events_total":
            value -= self.own_messages
        return value

    def writes_by(self, kind: str | None = None) -> Counter[str]:
        """Writes per key (kind and last element), of one kind or all."""
        counts: Counter[str] = Counter()
        for event in self.events:
            k = kind_of(event.kv.key)
            if kind is None or k == kind:
                counts[f"{k}{name_in(event.kv.key)}"] += 1
        return counts

    def resyncs(self, host: str) -> int:
        if self.heartbeats_seen is not None:
            return self.heartbeats_seen
        return sum(1 for e in self.events if e.kv.key == NODE_STATUS + host)


def idle_window(gateway: Gateway, seconds: float) -> Window:
    first = gateway.revision()
    before = gateway.metrics()
    began = time.monotonic()
    time.sleep(seconds)
    after = gateway.metrics()
    elapsed = time.monotonic() - began
    last = gateway.revision()
    return Window(elapsed, before, after, gateway.events(first, last))


def solo_window(gateway: Gateway, host: str, seconds: float) -> Window:
    """From just after one heartbeat of host to just after the first heartbeat once
    ``seconds`` have passed: whole resyncs only (each ends with its heartbeat)."""
    watch = KeyWatch(gateway, NODE_STATUS + host)
    try:
        start = watch.wait(1, timeout=4 * DEFAULT_RESYNC)
        before = gateway.metrics()
        began = time.monotonic()
        time.sleep(seconds)
        end = watch.wait(len(watch.arrivals) + 1, timeout=4 * DEFAULT_RESYNC)
        after = gateway.metrics()
        elapsed = time.monotonic() - began
        inside = watch.arrivals[start:end]
        first, last = watch.arrivals[start - 1][0], watch.arrivals[end - 1][0]
    finally:
        watch.close()
    return Window(elapsed, before, after, gateway.events(first, last),
                  own_bytes=sum(size for _, size in inside),
                  own_messages=sum(1 for _, size in inside if size),
                  heartbeats_seen=len(inside))


@dataclass
class Results:
    hosts: int
    per_host: int
    network_create: Operation | None = None
    first_on_host: list[Operation] = field(default_factory=list)
    starts: list[Operation] = field(default_factory=list)
    removals: list[Operation] = field(default_factory=list)
    keys: dict[str, KindStats] = field(default_factory=dict)
    watched_kinds: set[str] = field(default_factory=set)
    blocks: tuple[int, float, float] = (0, 0.0, 0.0)
    status_sample: dict | None = None
    idle: Window | None = None
    solo: Window | None = None
    solo_host: str = "h1"
    bgp: bool = False
    reads: list[ReadSize] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def populate(stack: Stack, gateway: Gateway, cluster: Cluster, network: str,
             per_host: int, settle: float, results: Results) -> None:
    """The first container of each host one at a time (measured: it claims a block),
    then the rest on all hosts in parallel."""
    for host in cluster.hosts:
        results.first_on_host.append(observe(
            gateway, f"first container on {host.name}",
            lambda h=host: stack.container(h, network), settle))
    errors: list[str] = []

    def fill(host: Host) -> None:
        try:
            for _ in range(per_host - 1):
                stack.container(host, network)
        except Exception as exc:  # noqa: BLE001 - reported after the join
            errors.append(f"{host.name}: {exc}")

    threads = [threading.Thread(target=fill, args=(h,)) for h in cluster.hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("populating failed: " + "; ".join(errors))


def measure(cluster: Cluster, args: argparse.Namespace, results: Results) -> None:
    gateway = Gateway(cluster.etcd_local_endpoint)
    h1 = cluster.host("h1")
    stack = Stack(cluster)
    try:
        name = "etcdload"

        def create() -> None:
            stack.network(h1, name=name)
            for host in cluster.hosts[1:]:
                stack.wait_network(host, name, timeout=30)

        results.network_create = observe(gateway, "network create", create, args.settle)
        print(f"network create: {len(results.network_create.writes)} writes", flush=True)
        populate(stack, gateway, cluster, name, args.per_host, args.settle, results)
        print(f"{args.per_host} containers on each of {len(cluster.hosts)} hosts",
              flush=True)
        time.sleep(3 * HARNESS_RESYNC)  # steady: every agent has resynced since

        _, kvs, _ = gateway.range(PROJECT, prefix=True)
        results.keys = keyspace(kvs)
        results.watched_kinds = {kind_of(kv.key) for kv in kvs if watched(kv.key)}
        results.blocks = block_growth(kvs)
        status = next((kv for kv in kvs if kv.key == NODE_STATUS + h1.name), None)
        results.status_sample = json.loads(status.value) if status else None

        print(f"idle window, every agent ({args.idle:.0f} s)", flush=True)
        results.idle = idle_window(gateway, args.idle)

        made = []
        for i in range(args.runs):
            holder: dict[str, str] = {}

            def start(holder: dict[str, str] = holder) -> None:
                holder["name"] = stack.container(h1, name).name

            results.starts.append(observe(gateway, f"start {i + 1}", start, args.settle))
            made.append(holder["name"])
        print(f"{args.runs} starts on h1: writes {[len(o.writes) for o in results.starts]}",
              flush=True)
        for container in made:
            results.removals.append(observe(
                gateway, f"remove {container}",
                lambda c=container: h1.docker("rm", "-f", c, timeout=120), args.settle))
        stack.containers = [c for c in stack.containers if c.name not in made]
        print(f"{args.runs} removals on h1: writes "
              f"{[len(o.writes) for o in results.removals]}", flush=True)

        time.sleep(2 * HARNESS_RESYNC)
        others = [h for h in cluster.hosts if h.name != results.solo_host]
        for host in others:
            host.plugin_stop()
        time.sleep(HARNESS_RESYNC + 1)
        print(f"only {results.solo_host}'s agent runs ({args.solo:.0f} s)", flush=True)
        try:
            results.solo = solo_window(gateway, results.solo_host, args.solo)
            results.reads = measure_reads(gateway, resync_reads(results.solo_host,
                                                                results.bgp))
        finally:
            for host in others:
                host.plugin_start()
    finally:
        stack.cleanup(timeout=60)


# ------------------------------------------------------------ report

def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else 0.0


def kinds_median(operations: Sequence[Operation]) -> str:
    kinds = sorted({k for o in operations for k in o.kinds()})
    parts = []
    for k in kinds:
        value = median(o.kinds()[k] for o in operations)
        if value:
            parts.append(f"{k} {fmt(value, 1 if value % 1 else 0)}")
    return ", ".join(parts) or "none"


def op_row(label: str, operations: Sequence[Operation], watchers: float) -> str:
    writes = [len(o.writes) for o in operations]
    events = [o.event_bytes() for o in operations]
    return (f"| {label} | {len(operations)} | **{fmt(median(writes), 1)}** "
            f"({min(writes)}-{max(writes)}) | "
            f"{fmt(median(o.unchanged for o in operations), 1)} | "
            f"{kinds_median(operations)} | "
            f"{fmt(median(o.value_bytes() for o in operations))} | "
            f"{fmt(median(events))} | {fmt(median(events) * watchers)} |")


def sequence(operation: Operation) -> str:
    return "; ".join(f"({i}) {change}" for i, change in enumerate(operation.changes, 1))


def status_breakdown(status: dict | None) -> str:
    if not status:
        return "no heartbeat record found"
    peers = status.get("peers", [])
    whole = len(json.dumps(status, sort_keys=True, separators=(",", ":")))
    per_peer = (len(json.dumps(peers, separators=(",", ":"))) / len(peers)) if peers else 0
    text = (f"h1's heartbeat record is {fmt(whole)} bytes of JSON, of which its `peers` "
            f"list is {len(peers)} entries of about {fmt(per_peer)} bytes each (one per "
            "other node: it grows with the cluster)")
    sessions = (status.get("bgp") or {}).get("sessions") or []
    if sessions:
        per_session = len(json.dumps(sessions, separators=(",", ":"))) / len(sessions)
        text += (f", and its BGP `sessions` list {len(sessions)} entries of about "
                 f"{fmt(per_session)} bytes each (one per BGP session and family)")
    return text


def render(results: Results, args: argparse.Namespace) -> str:
    idle, solo = results.idle, results.solo
    assert idle is not None and solo is not None
    hosts = results.hosts
    lines = [
        SECTION,
        "",
        "`sudo .venv/bin/python bench/etcd_load.py` (`--no-write` only prints) starts the "
        "simulated cluster of tests/multihost (three hosts, each with its own dockerd and "
        "`calico-cnm serve`, one etcd 3.4 in the router namespace; the harness runs every "
        f"agent with a {HARNESS_RESYNC:.0f} s resync interval, the default is "
        f"{DEFAULT_RESYNC:.0f} s), makes one calico network and {results.per_host} "
        "containers per host, measures, rewrites this section and stops the cluster.",
        "",
        f"2026-12-02, 2 cores, kernel {platform.release()}, "
        + ", ".join(f"{k} {v}" for k, v in results.versions.items())
        + f"; routing {args.routing}; {hosts} hosts x {results.per_host} containers, "
        "IPv4 network; "
        f"{args.runs} starts and removals on h1, {args.settle} s settle each; idle "
        f"window {idle.seconds:.0f} s (every agent), solo window {solo.seconds:.0f} s "
        f"(only {results.solo_host}'s agent).",
        "",
        f"**Keys watched.** Every agent watches the whole prefix `{ROOT}` "
        "(`plugin/agent.py`, `watch(ROOT, ...)`), so a write of any key marked watched "
        "below is delivered to every agent"
        + f"; keys under `{STATUS_ROOT}` are outside that watch"
        + ":",
        "",
        "| kind | watched | keys | key + value bytes | protobuf bytes | mean bytes per key "
        "| largest value |",
        "|---|---|---|---|---|---|---|",
    ]
    total = KindStats()
    for kind, stats in results.keys.items():
        seen = kind in results.watched_kinds
        lines.append(f"| `{kind}` | {'yes' if seen else 'no'} | {stats.keys} | "
                     f"{fmt(stats.payload)} | {fmt(stats.size)} "
                     f"| {fmt(stats.size / stats.keys)} | {fmt(stats.largest)} |")
        if seen:
            total.keys += stats.keys
            total.payload += stats.payload
            total.size += stats.size
    lines += [f"| watched | | **{total.keys}** | {fmt(total.payload)} | "
              f"**{fmt(total.size)}** |  |  |", ""]
    blocks, allocations, per_allocation = results.blocks
    lines += [
        f"A block's value grows with its allocations: {blocks} blocks hold "
        f"{fmt(allocations, 1)} allocations on average, each adding "
        f"{fmt(per_allocation)} bytes (address, handle = the 64-character endpoint ID, "
        "kind, requesting host), so a full /26 is about "
        f"{fmt(64 * per_allocation / 1000, 1)} kB.",
        "",
    ]

    writes = len(idle.events)
    operations = [*results.starts, *results.removals]
    delivered = sum(o.sent_events for o in operations)
    watched_writes = sum(o.watched_events for o in operations)
    fanout = delivered / watched_writes if watched_writes else 0.0
    watchers = fanout if fanout else float(hosts)
    lines += [
        f"**Writes per operation** (medians; heartbeats in the interval excluded; "
        f"fan-out bytes = event bytes x {fmt(watchers, 2)} watchers, measured below):",
        "",
        "| operation | samples | writes (min-max) | of them unchanged rewrites | writes by "
        "kind (median) | value bytes written | watch event bytes | bytes fanned out |",
        "|---|---|---|---|---|---|---|---|",
        op_row("`docker run -d` (h1, block already claimed)", results.starts, watchers),
        op_row("`docker rm -f` (h1)", results.removals, watchers),
        op_row("first container of the network on a host (claims a block)",
               results.first_on_host, watchers),
    ]
    if results.network_create is not None:
        lines.append(op_row(f"`docker network create` on h1, synced to {hosts - 1} hosts",
                            [results.network_create], watchers))
    txn_start = median(o.txns - o.heartbeats for o in results.starts)
    txn_rm = median(o.txns - o.heartbeats for o in results.removals)
    solo_resyncs = results.solo.resyncs(results.solo_host) if results.solo else 0
    per_resync = (results.solo.d("grpc_server_handled_total", grpc_method="Range")
                  / solo_resyncs) if results.solo and solo_resyncs else 0.0
    reads_start = median(o.ranges - o.heartbeats * per_resync - 2 for o in results.starts)
    reads_rm = median(o.ranges - o.heartbeats * per_resync - 2 for o in results.removals)
    lines += [
        "",
        f"Transactions (compare-and-swaps, failed ones included) per start: "
        f"{fmt(txn_start, 1)}, per removal: {fmt(txn_rm, 1)} (etcd's Txn count in the "
        "interval less the heartbeats). Range calls per start, roughly (every host's "
        "Range count in the interval less the resyncs that fell into it, "
        f"{fmt(per_resync, 1)} each, and this script's own two): {fmt(reads_start)}, per "
        f"removal {fmt(reads_rm)}.",
        "",
        "What each write was (the first sample; previous values read back from etcd's "
        "history):",
        "",
        f"- `docker run -d`: {sequence(results.starts[0])}" if results.starts else "",
        f"- `docker rm -f`: {sequence(results.removals[0])}" if results.removals else "",
        f"- first container on a host: {sequence(results.first_on_host[-1])}"
        if results.first_on_host else "",
        f"- `docker network create`: {sequence(results.network_create)}"
        if results.network_create else "",
        "",
        "In libnetwork's order (from the code): a start is RequestAddress (block), "
        "CreateEndpoint (the handle in the block, then the endpoint record), Join (its "
        "state) and ProgramExternalConnectivity; a removal is RevokeExternalConnectivity, "
        "Leave (state), DeleteEndpoint and ReleaseAddress. "
        + ("ProgramExternalConnectivity and RevokeExternalConnectivity rewrite the record "
           "unchanged when no port is published (`NetworkService._update_endpoint` writes "
           "even when the change changed nothing)."
           if any(o.unchanged for o in results.starts) else
           "With no port published, ProgramExternalConnectivity and "
           "RevokeExternalConnectivity write nothing (each used to rewrite the record "
           "unchanged: one write more per start and per removal, before commit 5bf0706)."),
        "",
    ]

    per_host_writes = writes / hosts / idle.seconds
    value_rate = sum(len(e.kv.value) for e in idle.events) / hosts / idle.seconds
    heartbeat_writes = sum(idle.writes_by(HEARTBEAT).values())
    # The default interval: the writes of one resync (one heartbeat each) every 10 s.
    per_resync = writes / heartbeat_writes if heartbeat_writes else 0.0
    value_per_resync = (sum(len(e.kv.value) for e in idle.events) / heartbeat_writes
                        if heartbeat_writes else 0.0)
    other = writes - heartbeat_writes
    idle_watched = sum(1 for e in idle.events if watched(e.kv.key))
    idle_events = idle.d("etcd_debugging_mvcc_events_total")
    watch_requests = idle.d("grpc_server_msg_received_total", grpc_method="Watch")
    beats = ", ".join(f"{k} {v}" for k, v in sorted(idle.writes_by(HEARTBEAT).items()))
    rest = ", ".join(f"{k} {v}" for k, v in sorted(idle.writes_by().items())
                     if not k.startswith(HEARTBEAT))
    lines += [
        f"**Background writes** (idle, {idle.seconds:.0f} s, {hosts} hosts): {writes} "
        f"writes, {heartbeat_writes} of them heartbeats (`{HEARTBEAT}<host>`, "
        f"{'watched' if watched(NODE_STATUS) else 'not watched'}, one per resync: "
        f"{beats or 'none'}), {other} other"
        + (f" ({rest})" if other else "")
        + f". Per host: **{fmt(per_host_writes, 2)} writes/s** at the harness's "
        f"{HARNESS_RESYNC:.0f} s interval ({fmt(value_rate)} value bytes/s; a resync "
        f"takes a few hundred ms, so a cycle is a little longer than the interval), "
        f"{fmt(per_resync, 2)} writes per resync, so **{fmt(per_resync / DEFAULT_RESYNC, 2)}"
        f" writes/s** at the default {DEFAULT_RESYNC:.0f} s "
        f"({fmt(value_per_resync / DEFAULT_RESYNC)} value bytes/s, all kept in etcd's "
        "history until it is compacted); "
        f"{status_breakdown(results.status_sample)}.",
        "",
        f"**Fan-out.** Over the {len(operations)} starts and removals etcd sent "
        f"{fmt(delivered)} watch events (`etcd_debugging_mvcc_events_total`) for "
        f"{watched_writes} writes under the watched prefix: **{fmt(fanout, 2)} events per "
        f"write**: a write under the watched prefix goes to each of the {hosts} agents. "
        "The ratio departs from the number of agents both ways: an agent that starts a "
        "resync takes the current revision and skips the events its full read covers "
        "(`Agent._loop`), and a write can reach both a watch being cancelled and its "
        "replacement. In the idle window: "
        f"{fmt(idle_events)} events for {idle_watched} watched writes"
        + (f" ({writes - idle_watched} writes outside the watched prefix reach no agent)"
           if writes - idle_watched else "")
        + ". The agent re-creates its watch after every batch and every second without one "
        "(`WATCH_TIMEOUT`; `datastore/etcd.py` cancels the watch when `watch()` returns): "
        f"etcd received {fmt(watch_requests)} watch requests (create + cancel) in the idle "
        f"window, {fmt(watch_requests / hosts / idle.seconds, 2)} per host per second.",
        "",
    ]

    resyncs = solo.resyncs(results.solo_host)
    sent = solo.d("etcd_network_client_grpc_sent_bytes_total")
    received = solo.d("etcd_network_client_grpc_received_bytes_total")
    ranges = solo.d("grpc_server_handled_total", grpc_method="Range")
    txns = solo.d("grpc_server_handled_total", grpc_method="Txn")
    watch_in = solo.d("grpc_server_msg_received_total", grpc_method="Watch")
    watch_out = solo.d("grpc_server_msg_sent_total", grpc_method="Watch")
    derived = sum(r.size for r in results.reads)
    per = (lambda value: value / resyncs) if resyncs else (lambda value: 0.0)
    lines += [
        f"**Bytes per resync.** Measured: with the plugins of the other hosts stopped, "
        f"{results.solo_host}'s agent alone did {resyncs} whole resyncs in "
        f"{solo.seconds:.0f} s (the window runs from just after one of its heartbeats to "
        "just after another, seen by a watch on that key whose own messages are "
        f"subtracted); etcd sent {fmt(sent)} bytes "
        "(`etcd_network_client_grpc_sent_bytes_total`: protobuf bytes of every reply, "
        "watch responses included) and received "
        f"{fmt(received)}: **{fmt(per(sent))} bytes sent per resync** "
        f"({fmt(per(received))} received), in {fmt(per(ranges), 1)} Range and "
        f"{fmt(per(txns), 1)} Txn calls and {fmt(per(watch_in), 1)} watch requests / "
        f"{fmt(per(watch_out), 1)} watch responses per resync. Derived from the code: "
        f"the {len(results.reads)} reads of `Agent.resync`, read again through the "
        f"gateway, are {fmt(derived)} bytes:",
        "",
        "| read | where | keys | reply bytes |",
        "|---|---|---|---|",
    ]
    for size in results.reads:
        lines.append(f"| {size.read.label} | {size.read.where} | {size.keys} | "
                     f"{fmt(size.size)} |")
    lines += [
        f"| all | {len(results.reads)} reads | | **{fmt(derived)}** |",
        "",
        f"At the default {DEFAULT_RESYNC:.0f} s interval that is "
        f"{fmt(per(sent) / DEFAULT_RESYNC)} bytes/s per host from resyncs alone. "
        "docs/scaling.md extrapolates all of this to 1,000 hosts.",
        "",
    ]
    if results.problems:
        lines += ["Problems in this run:", ""] + [f"- {p}" for p in results.problems] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def check(results: Results) -> None:
    """Sanity checks, reported as problems."""
    derived = len(results.reads)
    solo = results.solo
    if solo is not None:
        resyncs = solo.resyncs(results.solo_host)
        others = [e.kv.key for e in solo.events
                  if e.kv.key != NODE_STATUS + results.solo_host]
        if others:
            results.problems.append(f"writes other than {results.solo_host}'s heartbeat "
                                    f"in the solo window: {others[:5]}")
        if resyncs:
            ranges = solo.d("grpc_server_handled_total", grpc_method="Range") / resyncs
            if abs(ranges - derived) > 1.5:
                results.problems.append(
                    f"measured {ranges:.1f} Range calls per resync, the code-derived list "
                    f"has {derived}: RESYNC_READS is out of date")
        else:
            results.problems.append("no resync in the solo window")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-host", type=int, default=10)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--settle", type=float, default=1.5)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--solo", type=float, default=20.0)
    parser.add_argument("--routing", choices=("static", "bgp"), default="static",
                        help="the agents' --routing (bgp: BIRD mesh of the hosts)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.per_host <= 40 or not 1 <= args.runs <= 40:
        parser.error("per-host and runs: 1-40")
    if not 0 <= args.settle <= 10 or not 5 <= args.idle <= 300 or not 5 <= args.solo <= 300:
        parser.error("settle 0-10 s, idle and solo 5-300 s")
    if os.geteuid() != 0:
        parser.error("run as root")

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)

    cluster = Cluster(plugin_env={"CALICO_CNM_ROUTING": args.routing})
    results = Results(hosts=len(cluster.hosts), per_host=args.per_host,
                      bgp=args.routing == "bgp")
    began = time.monotonic()
    stop_problems: list[str] = []
    try:
        cluster.start()
        print(f"cluster up in {time.monotonic() - began:.1f} s", flush=True)
        h1 = cluster.host("h1")
        results.versions["dockerd"] = h1.docker(
            "version", "-f", "{{.Server.Version}}").stdout.strip()
        results.versions["etcd"] = cluster.router_sh(
            "/usr/bin/etcd", "--version").stdout.split("\n")[0].split()[-1]
        if not wait_for(lambda: all(h.plugin_answers() for h in cluster.hosts), 30):
            raise RuntimeError("the plugins do not answer")
        measure(cluster, args, results)
    finally:
        stop_problems = cluster.stop()

    leftovers = list(stop_problems)  # Cluster.stop checks namespaces and processes
    check(results)
    text = render(results, args)
    print()
    print(text)
    for problem in results.problems:
        print(f"PROBLEM: {problem}")
    print(f"total {time.monotonic() - began:.0f} s")
    if leftovers:
        print("LEFTOVERS: " + "; ".join(leftovers))
    else:
        print("the cluster left nothing behind (namespaces, processes, mounts, links)")
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote the section {SECTION!r} of {BENCHMARKS}")
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
