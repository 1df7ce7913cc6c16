"""Chaos, bounded: container life cycles (run, connect, disconnect, stop, rm) on all
three hosts at once while a random host's plugin is killed with SIGKILL at random
moments and started again. No duplicate address at any moment; after the agents'
grace, no address, endpoint record, cali veth or route of ours that belongs to no
container; the containers that lived through it reach each other.

`CHAOS_CYCLES` (default 8 per host) bounds it for `make test`; set more by hand.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import threading
import time

from tests.multihost.cluster import Cluster, Container, Host, Stack, unique, wait_for

CYCLES_PER_HOST = int(os.environ.get("CHAOS_CYCLES", "8"))
POOL = "10.126.0.0/16"  # cross-subnet VXLAN: h3 is on the other segment
SUBNET, SIDE_SUBNET = "10.126.241.0/24", "10.126.242.0/24"


def _addresses(cluster: Cluster, networks: tuple[str, ...]) -> list[str]:
    """Every running container's address on these networks, on every host."""
    found = []
    for host in cluster.hosts:
        ids = host.docker("ps", "-q").stdout.split()
        if not ids:
            continue
        for info in host.inspect(*ids):
            for name, settings in info["NetworkSettings"]["Networks"].items():
                if name in networks and settings.get("IPAddress"):
                    found.append(settings["IPAddress"])
    return found


def _reaches(client: Container, address: str) -> bool:
    return client.ping(address, timeout=1, check=False).returncode == 0


def _ours(address: str) -> bool:
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(s)
               for s in (SUBNET, SIDE_SUBNET))


def test_life_cycles_under_random_plugin_kills_leave_no_duplicate_and_no_leak(
        cluster: Cluster, stack: Stack) -> None:
    h1 = cluster.host("h1")
    added = POOL not in h1.cli("pool", "show").stdout
    if added:
        h1.cli("pool", "add", POOL, "--vxlan-mode", "cross-subnet")
    try:
        _chaos(cluster, stack, h1)
    finally:
        stack.cleanup()
        if added:  # later tests expect no VXLAN pool, hence no vxlan.calico
            h1.cli("pool", "remove", POOL)
            for host in cluster.hosts:
                assert wait_for(lambda h=host: "vxlan.calico" not in h.links(),
                                timeout=20), host.name


def _chaos(cluster: Cluster, stack: Stack, h1: Host) -> None:
    network = stack.network(h1, "--subnet", SUBNET)
    side = stack.network(h1, "--subnet", SIDE_SUBNET)
    for host in cluster.hosts:
        stack.wait_network(host, network)
        stack.wait_network(host, side)
    survivors = {host.name: stack.container(host, network) for host in cluster.hosts}
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "7")))
    stop = threading.Event()
    duplicates: list[list[str]] = []
    kills: list[str] = []
    outcomes: list[bool] = []  # whether each docker run worked
    lock = threading.Lock()  # one kill at a time, and checks between them

    def killer() -> None:
        while not stop.wait(rng.uniform(1.0, 4.0)):
            victim = rng.choice(cluster.hosts)
            with lock:
                victim.plugin_kill(signal.SIGKILL)
                kills.append(victim.name)
            time.sleep(rng.uniform(0.2, 1.5))
            victim.plugin_start()

    def cycles(host: Host) -> None:
        for _ in range(CYCLES_PER_HOST):
            name = unique("cnmhx")
            run = host.docker("run", "-d", "--name", name, "--net", network,
                              cluster.image, "sleep", "600", check=False, timeout=120)
            outcomes.append(run.returncode == 0)
            if run.returncode == 0:
                host.docker("network", "connect", side, name, check=False, timeout=60)
                seen = _addresses(cluster, (network, side))
                if len(seen) != len(set(seen)):
                    duplicates.append(seen)
                host.docker("network", "disconnect", side, name, check=False, timeout=60)
                host.docker("stop", "-t", "1", name, check=False, timeout=60)
            host.docker("rm", "-f", name, check=False, timeout=120)

    chaos = threading.Thread(target=killer, daemon=True)
    chaos.start()
    workers = [threading.Thread(target=cycles, args=(h,)) for h in cluster.hosts]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    chaos.join()
    for host in cluster.hosts:
        if not host.plugin_running():
            host.plugin_start()
    print(f"chaos: {len(outcomes)} life cycles ({outcomes.count(False)} runs failed), "
          f"{len(kills)} plugin kills")
    assert kills, "the plugins were never killed"
    assert duplicates == []

    # Only the survivors (and each subnet's gateway) hold anything of ours now.
    held = {c.ipv4 for c in survivors.values()}
    gateways = {"10.126.241.1", "10.126.242.1"}

    def allocated() -> set[str]:
        rows = json.loads(h1.cli("ipam", "show", "-o", "json").stdout)
        return {r["address"] for r in rows if _ours(r["address"])}

    def endpoints() -> set[str]:
        rows = json.loads(h1.cli("endpoint", "show", "-o", "json").stdout)
        found = {r["ipv4"].split("/")[0] for r in rows if r["ipv4"]}
        return {a for a in found if _ours(a)}

    def routes(host: Host) -> set[str]:
        """Routes to one address in the test's subnets: a local container's (proto
        static, to its veth) or a borrowed address elsewhere (proto 202)."""
        rows = json.loads(host.sh("ip", "-j", "route", "show").stdout)
        return {r["dst"] for r in rows
                if "/" not in r["dst"] and r["dst"] != "default" and _ours(r["dst"])}

    assert wait_for(lambda: allocated() == held | gateways, timeout=60), \
        (sorted(allocated()), sorted(held))
    assert wait_for(lambda: endpoints() == held, timeout=30), sorted(endpoints())
    for host in cluster.hosts:
        mine = {survivors[host.name].ipv4}
        assert wait_for(lambda h=host, m=mine: routes(h) == m, timeout=30), \
            (host.name, routes(host))
        assert wait_for(lambda h=host: len(h.links("cali")) == 1, timeout=30), \
            (host.name, host.links("cali"))
    for name, client in survivors.items():
        for other_name, other in survivors.items():
            if other_name != name:
                assert wait_for(lambda c=client, o=other: _reaches(c, o.ipv4),
                                timeout=15), (name, other_name)
