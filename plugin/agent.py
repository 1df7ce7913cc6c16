"""The per-host agent: reconciles this host's kernel to the datastore.

One agent per host. It keeps this host's policy inputs in memory
(:class:`plugin.policy.HostPolicy`, a :class:`~profiles.compiler.PolicyModel`) and
watches the datastore: every relevant event updates the model in place (no
datastore read, no recompile of all endpoints) and the writer sends the kernel only
the chains and sets that changed (a new endpoint is only ``ipset add``s). When this
host's endpoints change it also converges routes and veths. Every resync interval it
does all of it from scratch (routes; a fresh model from a full datastore read, so a
missed event cannot last; every chain and set compared with the kernel; the hooks at
the top of FORWARD/INPUT/nat), so a plugin restart, a route deleted by hand, a veth
left behind by a crash, Docker rewriting FORWARD or someone flushing our chains all
converge within one interval.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from dataplane.netlink import Netlink
from datastore.base import ROOT, Datastore, DatastoreError, Event, RevisionConflict
from driver.reconcile import reconcile_routes
from driver.records import ENDPOINTS, NETWORKS
from driver.service import NetworkService
from plugin.app import build_ipam, build_network_service
from plugin.docker_names import DockerNames
from plugin.garbage import NetworkState, StaleCollector
from plugin.policy import HostPolicy, policy_settings
from plugin.settings import Settings
from profiles.iptables import PolicyWriter

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 1.0


class Agent:
    def __init__(
        self,
        settings: Settings,
        store: Datastore,
        writer: PolicyWriter | None = None,
        netlink_factory: Callable[[], Netlink] = Netlink,
        name_lookup: Callable[[str], str | None] | None = None,
        network_state: NetworkState | None = None,
        stale_grace: float | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._writer = writer or PolicyWriter()
        self._netlink_factory = netlink_factory
        self._networks: NetworkService = build_network_service(
            settings, store, build_ipam(settings, store), netlink_factory, name_lookup
        )
        self._collector = StaleCollector(
            store, self._networks, settings.hostname,
            network_state or DockerNames().network_state,
            settings.stale_grace if stale_grace is None else stale_grace,
        )
        self._stop = threading.Event()
        self._local_endpoints = f"{ENDPOINTS}{settings.hostname}/"
        self._policy = HostPolicy(settings.hostname, policy_settings(settings))
        self._warnings: set[str] = set()

    def stop(self) -> None:
        self._stop.set()

    def reconcile_routes(self) -> None:
        with self._netlink_factory() as netlink:
            report = reconcile_routes(self._store, self._settings.hostname, netlink)
        if report.changed:
            log.info(
                "routes: %d restored, %d removed; %d stale veth(s) removed",
                len(report.routes_added), len(report.routes_removed), len(report.links_removed),
            )

    @property
    def host_policy(self) -> HostPolicy:
        return self._policy

    def program_policy(self, full: bool) -> None:
        """Write the model's policy: ``full`` first rebuilds the model from a full
        datastore read and resyncs the kernel; otherwise only what changed since the
        last write is written."""
        started = time.monotonic()
        if full or not self._policy.loaded:
            self._policy.load(self._store)
        policy = self._policy.policy()
        report = self._writer.resync(policy) if full else self._writer.apply(policy)
        warnings = set(policy.warnings)
        for warning in policy.warnings:
            if warning not in self._warnings:
                log.warning("policy: %s", warning)
        self._warnings = warnings
        log.debug("policy %s in %.1f ms: %s", "resync" if full else "update",
                  (time.monotonic() - started) * 1000, report)

    def resync(self) -> None:
        # Each step runs even if another fails (e.g. policy is programmed even when a
        # route cannot be restored); the first failure is raised afterwards.
        failure: Exception | None = None
        steps: list[Callable[[], object]] = [
            lambda: self._collector.collect(time.monotonic()),
            self._networks.resolve_pending_networks,
            self.reconcile_routes,
            lambda: self.program_policy(full=True),
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:
                log.exception("agent resync step failed")
                failure = failure or exc
        if failure is not None:
            raise failure

    def handle(self, events: list[Event]) -> None:
        # Policy first: the events update the model in memory (nothing to fail on
        # the datastore's side) and enforcement is what a new container waits for.
        if self._policy.apply_events(events):
            self.program_policy(full=False)  # loads the model first if it never was
        keys = [event.key for event in events]
        if any(k.startswith(NETWORKS) for k in keys):
            self._networks.resolve_pending_networks()
        if any(k.startswith(self._local_endpoints) for k in keys):
            self.reconcile_routes()

    def run(self, parent_pid: int | None = None) -> None:
        with self._netlink_factory() as netlink:
            netlink.enable_forwarding()
            if netlink.global_rp_filter() == 2:
                log.warning("net.ipv4.conf.all.rp_filter is 2 (loose): containers can "
                            "spoof addresses the host routes; set it to 0 or 1")
        # The first resync reads the revision: a datastore that is not answering yet
        # (etcd starting with the host) is retried there, never fatal.
        revision = 0
        next_resync = 0.0
        while not self._stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.info("plugin process is gone; agent exits")
                return
            try:
                if time.monotonic() >= next_resync:
                    revision = self._store.current_revision()
                    self.resync()
                    next_resync = time.monotonic() + self._settings.resync_interval
                try:
                    events = self._store.watch(ROOT, revision, WATCH_TIMEOUT)
                except RevisionConflict:
                    next_resync = 0.0  # history compacted: start over
                    continue
                if events:
                    revision = events[-1].revision
                    self.handle(events)
            except DatastoreError as exc:
                log.error("agent: datastore error, retrying: %s", exc)
                self._stop.wait(1.0)
            except Exception:
                log.exception("agent: reconcile failed; full resync next")
                next_resync = 0.0
                self._stop.wait(1.0)

    def uninstall(self) -> None:
        """Removes every chain, set and hook of ours (the agent is not running)."""
        self._writer.remove_all()
