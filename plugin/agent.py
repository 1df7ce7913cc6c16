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

from dataplane.netlink import RTPROT_BIRD, Netlink
from datastore.base import ROOT, Datastore, DatastoreError, Event, RevisionConflict
from datastore.errors import Unavailable
from driver.reconcile import reconcile_routes
from driver.records import ENDPOINTS, NETWORKS
from driver.service import NetworkService
from plugin.compose import build_ipam, build_network_service, host_netlink
from plugin.docker_names import DockerNames, DockerNetworks
from plugin.garbage import (
    NetworkState,
    OrphanAddressCollector,
    OrphanSubnetCollector,
    StaleCollector,
)
from plugin.metrics import MeteredDatastore, metrics_for
from plugin.network_sync import NetworkSync
from plugin.policy import HostPolicy, policy_settings
from plugin.settings import Settings
from profiles.iptables import PolicyWriter
from routing.bgp_sync import BgpModel
from routing.bird_control import BirdControl
from routing.bird_process import BirdSupervisor
from routing.nodes import NodeRegistry, NodeStatus, local_node, now
from routing.sync import RouteSync
from routing.tunnels import ensure_tunnel_addresses

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 1.0
MAX_REASONS = 5  # unreachable blocks reported per peer in the heartbeat


class Agent:
    def __init__(
        self,
        settings: Settings,
        store: Datastore,
        writer: PolicyWriter | None = None,
        netlink_factory: Callable[[], Netlink] | None = None,
        name_lookup: Callable[[str], str | None] | None = None,
        network_state: NetworkState | None = None,
        stale_grace: float | None = None,
        docker_networks: DockerNetworks | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics_for(settings)
        if self._metrics.enabled:
            store = MeteredDatastore(store, self._metrics)
        self._store = store
        self._writer = writer or PolicyWriter()
        netlink_factory = netlink_factory or host_netlink(settings)
        self._netlink_factory = netlink_factory
        self._ipam = build_ipam(settings, store)
        self._networks: NetworkService = build_network_service(
            settings, store, self._ipam, netlink_factory, name_lookup
        )
        self._stop = threading.Event()
        docker_networks = docker_networks or DockerNetworks(settings.docker_host)
        self._network_sync = NetworkSync(
            settings, store, self._ipam, self._networks, docker_networks, self._stop)
        grace = settings.stale_grace if stale_grace is None else stale_grace
        self._orphan_subnets = OrphanSubnetCollector(
            self._ipam, self._networks, settings.hostname,
            lambda: docker_networks.ipam_subnets(settings.docker_drivers[1]), grace)
        self._orphan_addresses = OrphanAddressCollector(
            self._ipam, self._networks, settings.hostname,
            lambda: docker_networks.ipam_addresses(settings.docker_drivers[1]), grace)
        self._collector = StaleCollector(
            store, self._networks, settings.hostname,
            network_state or DockerNames(settings.docker_host).network_state,
            grace,
        )
        self._local_endpoints = f"{ENDPOINTS}{settings.hostname}/"
        self._policy = HostPolicy(settings.hostname, policy_settings(settings))
        self._warnings: set[str] = set()
        self._registry = NodeRegistry(store)
        self._bgp_routing = settings.routing == "bgp"
        self._routes = RouteSync(store, settings.hostname, netlink_factory,
                                 bgp=self._bgp_routing)
        self._bgp = BgpModel(settings.hostname)
        self._bird = BirdSupervisor(settings.run_dir)
        self._started = now()
        self._last_resync: float | None = None
        self._node_errors: list[str] = []

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

    def register_node(self) -> None:
        """(Re)writes this host's node record from its interfaces (addresses can
        change while the agent runs; the record is rewritten only when they do)."""
        settings = self._settings
        with self._netlink_factory() as netlink:
            record = local_node(
                settings.hostname, netlink.list_addresses(), netlink.link_mtu,
                netlink.source_address, settings.node_ip, settings.node_ipv6,
                settings.ip_autodetection, settings.ipv6_autodetection, settings.as_number,
            )
        registered = self._registry.register(record)
        registered = ensure_tunnel_addresses(self._ipam, self._registry, registered)
        self._routes.apply_node(registered)

    def request_network_sync(self) -> None:
        self._network_sync.request()

    def program_routes(self) -> None:
        report = self._routes.program()
        self._node_errors = list(report.errors)

    def program_bgp(self) -> None:
        """Renders bird.conf from the model and makes BIRD run it (a reload only
        when the text changed)."""
        if not self._bgp_routing:
            return
        try:
            text = self._bgp.render(self._routes.nodes, self._routes.pools,
                                    self._routes.blocks)
        except ValueError as exc:
            self._bird.reject(f"no BIRD configuration: {exc}")
            return
        self._bird.apply(text)

    def bgp_report(self) -> dict[str, object] | None:
        """BIRD's state and sessions, for the heartbeat (None without BGP)."""
        if not self._bgp_routing:
            return None
        state = self._bird.state()
        sessions = []
        memory = None
        if state.running:
            try:
                control = BirdControl(self._bird.socket_path)
                sessions = control.sessions()
                memory = control.memory()
            except Exception as exc:  # a status report must not fail the resync
                log.warning("bgp: reading BIRD's sessions failed: %s", exc)
        # Only the sessions that are not up: the heartbeat's size follows the problems,
        # not the cluster (it is rewritten every resync, into etcd's history).
        up = [s for s in sessions if s.info.startswith("Established")]
        return {**state.to_dict(), "established": len(up), "memory": memory,
                "sessions": [s.to_dict() for s in sessions if s not in up]}

    def report_status(self) -> None:
        """The heartbeat, with what this node knows of its routing."""
        plan = self._routes.plan
        report = self._routes.last_report
        peers = []
        if plan is not None:
            # Only peers with unreachable blocks (a few reasons each): see bgp_report.
            for peer in sorted(plan.peers.values(), key=lambda p: p.name):
                if peer.unreachable:
                    peers.append({"name": peer.name, "modes": sorted(peer.modes),
                                  "routes": peer.routes,
                                  "unreachable": peer.unreachable[:MAX_REASONS]})
        self._registry.report(NodeStatus(
            name=self._settings.hostname, heartbeat=now(), started=self._started,
            last_resync=self._last_resync, errors=self._node_errors,
            tunnels=dict(report.tunnels) if report else {}, peers=peers,
            routes=len(plan.routes) if plan else 0,
            routing=self._settings.routing, bgp=self.bgp_report(),
        ))

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
        with self._metrics.policy_programming("resync" if full else "update"):
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
        started = time.monotonic()
        steps: list[Callable[[], object]] = [
            self.register_node,
            lambda: self._collector.collect(time.monotonic()),
            lambda: self._orphan_subnets.collect(time.monotonic()),
            lambda: self._orphan_addresses.collect(time.monotonic()),
            self._networks.resolve_pending_networks,
            self.request_network_sync,
            self.reconcile_routes,
            self._routes.load,
            self.program_routes,
            lambda: self._bgp.load(self._store) if self._bgp_routing else None,
            self.program_bgp,
            lambda: self.program_policy(full=True),
        ]
        errors: list[str] = []
        for step in steps:
            try:
                step()
            except Exception as exc:
                log.exception("agent resync step failed")
                errors.append(str(exc))
                failure = failure or exc
        self._metrics.resync(time.monotonic() - started)
        self._last_resync = now()
        self._node_errors = errors + self._node_errors if errors else self._node_errors
        try:
            self.report_status()
        except Exception as exc:
            log.exception("reporting this node's status failed")
            failure = failure or exc
        if failure is not None:
            raise failure

    def handle(self, events: list[Event]) -> None:
        # Routes first (a netlink diff, a few ms: a new block is routed at once), then
        # policy: the events update the model in memory and the writer sends the kernel
        # what changed (an iptables-restore can take tens of ms).
        routing_changed = self._routes.apply_events(events)
        if routing_changed:
            self.program_routes()
        if (self._bgp.apply_events(events) or routing_changed) and self._bgp_routing:
            self.program_bgp()
        if self._policy.apply_events(events):
            self.program_policy(full=False)  # loads the model first if it never was
        keys = [event.key for event in events]
        if any(k.startswith(NETWORKS) for k in keys):
            self._networks.resolve_pending_networks()
            self.request_network_sync()
        if any(k.startswith(self._local_endpoints) for k in keys):
            self.reconcile_routes()

    def run(self, parent_pid: int | None = None) -> None:
        with self._netlink_factory() as netlink:
            netlink.enable_forwarding()
            if netlink.global_rp_filter() == 2:
                log.warning("net.ipv4.conf.all.rp_filter is 2 (loose): containers can "
                            "spoof addresses the host routes; set it to 0 or 1")
        if not self._bgp_routing:
            self._retire_bird()
        self._network_sync.start()
        try:
            self._loop(parent_pid)
        finally:
            if self._bgp_routing:
                # Graceful restart: peers and the kernel keep the routes until the
                # next agent's BIRD is back.
                self._bird.stop(graceful=True)

    def _retire_bird(self) -> None:
        """Static routing: a BIRD left running from BGP routing is stopped and its
        kernel routes removed (the agent programs every route now)."""
        if self._bird.pid is None and not self._bird.has_run:
            return
        self._bird.stop(graceful=False)
        with self._netlink_factory() as netlink:
            removed = netlink.list_routes(protocol=RTPROT_BIRD)
            for route in removed:
                netlink.remove_route(route, protocol=RTPROT_BIRD)
        self._bird.forget()  # retired: the next start has nothing to retire
        log.info("static routing: stopped BIRD and removed its %d kernel route(s)",
                 len(removed))

    def _loop(self, parent_pid: int | None) -> None:
        # The first resync reads the revision: a datastore that is not answering yet
        # (etcd starting with the host) is retried there, never fatal.
        revision = 0
        next_resync = 0.0
        default_pools_ready = False  # `serve` may have started before the datastore
        while not self._stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.info("plugin process is gone; agent exits")
                return
            try:
                if not default_pools_ready:
                    self._ipam.ensure_default_pools(list(self._settings.default_pools))
                    default_pools_ready = True
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
                if self._bgp_routing:
                    self._bird.ensure_running()
            except (DatastoreError, Unavailable) as exc:
                log.error("agent: datastore error, retrying: %s", exc)
                self._stop.wait(1.0)
            except Exception:
                log.exception("agent: reconcile failed; full resync next")
                next_resync = 0.0
                self._stop.wait(1.0)

    def uninstall(self) -> None:
        """Removes every chain, set and hook of ours (the agent is not running)."""
        self._writer.remove_all()
