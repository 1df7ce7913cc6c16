"""The per-host agent: reconciles this host's kernel to the datastore.

It reconciles at start, whenever an endpoint record of this host changes (a
datastore watch) and every resync interval, so that a plugin restart, a route
deleted by hand or a veth left behind by a crash all converge.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from datastore.base import Datastore, DatastoreError, RevisionConflict
from driver.netlink import Netlink
from driver.reconcile import reconcile_routes
from driver.records import ENDPOINTS
from plugin.settings import Settings
from profiles.iptables import Iptables

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 1.0
FORWARD_CHAIN = "cali-FORWARD"
# Until profiles are enforced, workload traffic is forwarded ahead of Docker's
# FORWARD rules (Docker sets the FORWARD policy to DROP).
FORWARD_RULES = ["-i cali+ -j ACCEPT", "-o cali+ -j ACCEPT"]


class Agent:
    def __init__(self, settings: Settings, store: Datastore) -> None:
        self._settings = settings
        self._store = store
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def program_forwarding(self) -> None:
        for family in (4, 6):
            iptables = Iptables(family)
            iptables.restore("filter", {FORWARD_CHAIN: FORWARD_RULES})
            if iptables.ensure_hooks("filter", [("FORWARD", f"-j {FORWARD_CHAIN}")]):
                log.info("restored the FORWARD hook (IPv%d)", family)

    def reconcile(self) -> None:
        self.program_forwarding()
        with Netlink() as netlink:
            report = reconcile_routes(self._store, self._settings.hostname, netlink)
        if report.changed:
            log.info(
                "reconciled: %d route(s) restored, %d route(s) and %d link(s) removed",
                len(report.routes_added), len(report.routes_removed), len(report.links_removed),
            )

    def run(self, parent_pid: int | None = None) -> None:
        with Netlink() as netlink:
            netlink.enable_forwarding()
        prefix = f"{ENDPOINTS}{self._settings.hostname}/"
        revision = self._store.current_revision()
        next_resync = 0.0
        while not self._stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.info("plugin process is gone; agent exits")
                return
            try:
                if time.monotonic() >= next_resync:
                    revision = self._store.current_revision()
                    self.reconcile()
                    next_resync = time.monotonic() + self._settings.resync_interval
                try:
                    events = self._store.watch(prefix, revision, WATCH_TIMEOUT)
                except RevisionConflict:
                    next_resync = 0.0
                    continue
                if events:
                    revision = events[-1].revision
                    self.reconcile()
            except DatastoreError as exc:
                log.error("agent: datastore error, retrying: %s", exc)
                self._stop.wait(1.0)
            except Exception:
                log.exception("agent: reconcile failed, retrying")
                self._stop.wait(1.0)
