"""Prometheus metrics (`--metrics-address HOST:PORT`): the only module that imports
prometheus_client, and only when metrics are on.

`serve` runs several processes (gunicorn's workers answer Docker, the agent programs
the kernel), so their counters go through prometheus_client's multiprocess mode: each
process writes its samples to files in ``<run-dir>/metrics`` and the master serves the
sum. The variable that selects that mode must be set before prometheus_client is first
imported, which is why every import here is inside a function.

What the datastore holds (pool usage, endpoints per host) and BIRD's sessions are read
when Prometheus scrapes, not kept as gauges: they are then exact, and cost nothing
between scrapes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from datastore.base import (
    AlreadyExists,
    Datastore,
    DatastoreUnavailable,
    Entry,
    Event,
    Guard,
    GuardChanged,
    RevisionConflict,
)
from plugin.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Driver calls take about a millisecond to a second.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROGRAMMING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The project's metrics. Built by :func:`metrics_for`; disabled, every method is
    a no-op and prometheus_client is never imported."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from prometheus_client import Counter, Histogram

        self._requests = Counter("calico_cnm_requests", "Driver calls from Docker",
                                 ["method", "outcome"])
        self._latency = Histogram("calico_cnm_request_seconds", "Driver call latency",
                                  ["method"], buckets=LATENCY_BUCKETS)
        self._allocations = Counter("calico_cnm_ipam_allocations",
                                    "Addresses allocated (RequestAddress that succeeded)")
        self._releases = Counter("calico_cnm_ipam_releases",
                                 "Addresses released (ReleaseAddress that succeeded)")
        self._conflicts = Counter("calico_cnm_datastore_conflicts",
                                  "Compare-and-swap writes that lost (then retried)",
                                  ["operation"])
        self._datastore_errors = Counter("calico_cnm_datastore_errors",
                                         "Datastore calls that failed (unreachable)",
                                         ["operation"])
        self._policy = Histogram("calico_cnm_policy_programming_seconds",
                                 "Writing policy to iptables and ipsets", ["kind"],
                                 buckets=PROGRAMMING_BUCKETS)
        self._policy_failures = Counter("calico_cnm_policy_programming_failures",
                                        "Policy writes that failed")
        self._resync = Histogram("calico_cnm_resync_seconds", "A full agent resync",
                                 buckets=PROGRAMMING_BUCKETS)

    def request(self, method: str, seconds: float, ok: bool) -> None:
        if not self.enabled:
            return
        self._requests.labels(method, "ok" if ok else "error").inc()
        self._latency.labels(method).observe(seconds)
        if ok and method == "IpamDriver.RequestAddress":
            self._allocations.inc()
        elif ok and method == "IpamDriver.ReleaseAddress":
            self._releases.inc()

    def conflict(self, operation: str) -> None:
        if self.enabled:
            self._conflicts.labels(operation).inc()

    def datastore_error(self, operation: str) -> None:
        if self.enabled:
            self._datastore_errors.labels(operation).inc()

    @contextmanager
    def policy_programming(self, kind: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except Exception:
            if self.enabled:
                self._policy_failures.inc()
            raise
        if self.enabled:
            self._policy.labels(kind).observe(time.monotonic() - started)

    def resync(self, seconds: float) -> None:
        if self.enabled:
            self._resync.observe(seconds)


_built: dict[bool, Metrics] = {}


def metrics_for(settings: Settings) -> Metrics:
    """One Metrics per process (prometheus_client refuses a metric name twice)."""
    enabled = bool(settings.metrics_address)
    if enabled not in _built:
        _built[enabled] = Metrics(enabled)
    return _built[enabled]


class MeteredDatastore(Datastore):
    """A datastore that counts lost compare-and-swaps and unreachable calls."""

    def __init__(self, inner: Datastore, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def _call(self, operation: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except (RevisionConflict, AlreadyExists, GuardChanged):
            self._metrics.conflict(operation)
            raise
        except DatastoreUnavailable:
            self._metrics.datastore_error(operation)
            raise

    def get(self, key: str) -> Entry | None:
        return self._call("get", self._inner.get, key)  # type: ignore[no-any-return]

    def list(self, prefix: str) -> list[Entry]:
        return self._call("list", self._inner.list, prefix)  # type: ignore[no-any-return]

    def list_changed(self, prefix: str, after_revision: int) -> tuple[list[Entry], int]:
        return self._call("list", self._inner.list_changed,  # type: ignore[no-any-return]
                          prefix, after_revision)

    def create(self, key: str, value: str, guard: Guard | None = None) -> Entry:
        return self._call("create", self._inner.create, key, value,  # type: ignore[no-any-return]
                          guard)

    def update(self, key: str, value: str, revision: int, guard: Guard | None = None
               ) -> Entry:
        return self._call("update", self._inner.update, key, value,  # type: ignore[no-any-return]
                          revision, guard)

    def delete(self, key: str, revision: int | None = None) -> bool:
        return self._call("delete", self._inner.delete, key, revision)  # type: ignore[no-any-return]

    def current_revision(self) -> int:
        return self._call("revision", self._inner.current_revision)  # type: ignore[no-any-return]

    def watch(self, prefix: str, after_revision: int, timeout: float) -> list[Event]:
        return self._call("watch", self._inner.watch, prefix,  # type: ignore[no-any-return]
                          after_revision, timeout)

    def close(self) -> None:
        self._inner.close()


# ------------------------------------------------------------------ serving


def prepare_multiprocess(settings: Settings) -> None:
    """Before anything imports prometheus_client: a fresh directory for the samples of
    this server's processes (a dead server's would be summed in)."""
    if not settings.metrics_address:
        return
    directory = os.path.join(settings.run_dir, "metrics")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, mode=0o755)
    os.environ[MULTIPROC_ENV] = directory


def remove_multiprocess(settings: Settings) -> None:
    if settings.metrics_address:
        shutil.rmtree(os.path.join(settings.run_dir, "metrics"), ignore_errors=True)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def start_server(settings: Settings) -> None:
    """Serves /metrics on --metrics-address in a thread of this process: the sum of
    every process's samples (multiprocess mode) and what the datastore and BIRD say."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(StateCollector(settings))
    host, port = split_address(str(settings.metrics_address))
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, port)


class StateCollector:
    """Pool usage, endpoints per host and this host's BGP sessions, read at scrape."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from plugin.compose import build_ipam, open_datastore

        pools = GaugeMetricFamily("calico_cnm_pool_addresses",
                                  "Addresses of a pool, allocated or in all",
                                  labels=["pool", "kind"])
        endpoints = GaugeMetricFamily("calico_cnm_endpoints", "Endpoints per host",
                                      labels=["host"])
        up = GaugeMetricFamily("calico_cnm_datastore_up", "Whether the datastore answered")
        try:
            store = open_datastore(self._settings)
            try:
                for usage in build_ipam(self._settings, store).list_pools():
                    pools.add_metric([usage.pool.cidr, "allocated"], usage.allocated)
                    pools.add_metric([usage.pool.cidr, "capacity"], usage.capacity)
                from driver.records import ENDPOINTS

                counts: dict[str, int] = {}
                for entry in store.list(ENDPOINTS):
                    host = entry.key[len(ENDPOINTS):].split("/", 1)[0]
                    counts[host] = counts.get(host, 0) + 1
                for host, count in sorted(counts.items()):
                    endpoints.add_metric([host], count)
            finally:
                store.close()
            up.add_metric([], 1)
        except Exception as exc:  # a scrape reports the outage, it does not fail
            log.warning("metrics: reading the datastore failed: %s", exc)
            up.add_metric([], 0)
        yield from (pools, endpoints, up)
        if self._settings.routing == "bgp":
            yield self._bgp_sessions()

    def _bgp_sessions(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from routing.bird_control import BirdControl

        sessions = GaugeMetricFamily("calico_cnm_bgp_sessions",
                                     "This host's BGP sessions by BGP state",
                                     labels=["state"])
        counts: dict[str, int] = {}
        try:
            for session in BirdControl(os.path.join(self._settings.run_dir, "bird.ctl")
                                       ).sessions():
                state = session.info.split()[0] if session.info else session.state
                counts[state] = counts.get(state, 0) + 1
        except Exception as exc:
            log.debug("metrics: BIRD does not answer: %s", exc)
        for state, count in sorted(counts.items()):
            sessions.add_metric([state], count)
        return sessions
