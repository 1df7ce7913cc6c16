"""Memory of `calico-cnm serve` (gunicorn master, workers and the agent) on the
embedded datastore with N endpoints: proportional set size (PSS, shared pages split
between the processes that share them) per process and in total. Target (issue 9):
at most 100 MB in total with 1,000 endpoints.

The plugin runs in a network namespace of its own (its iptables and ipsets stay
there), with no Docker (name lookups fail at once, so no record is judged stale).
The endpoints are this host's records in one network and profile, with no veths:
the agent holds each in its policy model, chains and ipsets as for containers.

Usage: sudo .venv/bin/python bench/memory.py [--endpoints 1000] [--no-write]
       [--workers N] (several values compare them: --workers 2 --workers 1)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sections import publish  # noqa: E402
from datastore.base import dumps  # noqa: E402
from datastore.sqlite import SqliteDatastore  # noqa: E402
from driver.records import EndpointRecord, NetworkRecord, Subnet, endpoint_key, network_key  # noqa: E402
from profiles.model import Profile  # noqa: E402
from profiles.store import ProfileStore  # noqa: E402

CLI = str(Path(sys.executable).with_name("calico-cnm"))
NETNS = "cnm-memory"
SECTION = "## Memory (issue 9)"
T = TypeVar("T")


def populate(path: str, count: int) -> None:
    store = SqliteDatastore(path)
    ProfileStore(store).ensure(Profile.network_default("bench"))
    network = NetworkRecord("n" * 64, Subnet("10.240.0.0/16", "10.240.0.1"), None,
                            profiles=["bench"], name="bench", hostname="bench-host")
    store.create(network_key(network.id), dumps(network.to_dict()))
    for index in range(count):
        endpoint_id = f"{index:011x}" + "e" * 53  # interface names differ
        address = f"10.240.{(index + 2) // 256}.{(index + 2) % 256}/16"
        record = EndpointRecord(endpoint_id, network.id, "bench-host", address, None,
                                state="joined", profiles=["bench"])
        store.create(endpoint_key("bench-host", endpoint_id), dumps(record.to_dict()))
    store.close()


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def group(pgid: int) -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) == pgid:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return found


def ipset_members(name: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", NETNS, "ipset", "list", name],
                         capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line[:1].isdigit())


def measure(count: int, workers: int) -> tuple[dict[str, int], float]:
    with tempfile.TemporaryDirectory(prefix="calico-cnm-memory-") as tmp:
        populate(f"{tmp}/state.db", count)
        env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith(("CALICO_CNM_", "ETCD_", "DOCKER_"))},
               "CALICO_CNM_SQLITE_PATH": f"{tmp}/state.db",
               "CALICO_CNM_PLUGIN_DIR": f"{tmp}/plugins", "CALICO_CNM_RUN_DIR": f"{tmp}/run",
               "CALICO_CNM_HOSTNAME": "bench-host", "CALICO_CNM_WORKERS": str(workers),
               "DOCKER_HOST": f"unix://{tmp}/no-docker.sock",
               "CALICO_CNM_NODE_IP": "192.0.2.10/24",
               "CALICO_CNM_DEFAULT_POOLS": "10.240.0.0/16"}
        process = subprocess.Popen(["ip", "netns", "exec", NETNS, CLI, "serve"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        began = time.monotonic()
        try:
            set_name = "cali4-t-bench"
            while ipset_members(set_name) < count:
                if process.poll() is not None or time.monotonic() - began > 120:
                    raise SystemExit("the plugin did not program the endpoints")
                time.sleep(0.5)
            programmed = time.monotonic() - began
            time.sleep(3)  # a resync or two more
            procs = group(process.pid)
            by_kind: dict[str, int] = {}
            for pid, cmdline in sorted(procs.items(), key=lambda p: p[0] != process.pid):
                if "serve" not in cmdline:
                    continue  # `ip netns exec` has exec'ed; ipset children come and go
                by_kind["master" if pid == process.pid else f"child {pid}"] = pss_kib(pid)
            return by_kind, programmed
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def in_fresh_netns(run: Callable[[], T]) -> T:
    """Runs the measurement in a new namespace (no ipsets of an earlier run), with an
    uplink carrying the node address."""
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        for command in (["ip", "link", "set", "lo", "up"],
                        ["ip", "link", "add", "eth0", "type", "veth", "peer", "name",
                         "eth0peer"],
                        ["ip", "addr", "add", "192.0.2.10/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"],
                        ["ip", "link", "set", "eth0peer", "up"]):
            subprocess.run(["ip", "netns", "exec", NETNS, *command], check=True)
        return run()
    finally:
        subprocess.run(["ip", "netns", "delete", NETNS])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--workers", type=int, action="append")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root")
    results = []
    for workers in args.workers or [2]:
        processes, programmed = in_fresh_netns(lambda w=workers: measure(args.endpoints, w))
        total = sum(processes.values()) / 1024
        results.append((workers, processes, total, programmed))
        print(f"workers={workers}: total PSS {total:.1f} MiB over {len(processes)} "
              f"processes ({', '.join(f'{v / 1024:.1f}' for v in processes.values())}); "
              f"endpoints programmed in {programmed:.1f} s", flush=True)
    lines = [SECTION, "",
             "`sudo .venv/bin/python bench/memory.py` (`--no-write` only prints): "
             f"`calico-cnm serve` on the embedded datastore with {args.endpoints} "
             "endpoints (this host's records without veths, in the agent's model, chains "
             "and ipsets), in "
             "a network namespace of its own, no Docker. PSS from /proc/PID/smaps_rollup "
             "of every process of the server (master, workers, agent), after the "
             "endpoints are in the ipsets. Target: total <= 100 MB.", "",
             f"{time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}:", "",
             "| workers | processes | PSS per process (master first), MiB | total PSS, MiB "
             "| endpoints in the ipsets after |",
             "|---|---|---|---|---|"]
    for workers, processes, total, programmed in results:
        lines.append(f"| {workers} | {len(processes)} | "
                     f"{', '.join(f'{v / 1024:.1f}' for v in processes.values())} | "
                     f"**{total:.1f}** | {programmed:.1f} s |")
    lines += ["", "The children are the workers and the agent (all forked from the master "
              "after it imported the project, so code pages are shared). gRPC and the "
              "etcd client are imported only with etcd."]
    publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
