"""`docker run` on the managed plugin against the legacy one, on this machine's dockerd.

The two cannot serve one dockerd at once (they would share the cali- chains), so the
run alternates blocks: the legacy `calico-cnm serve` (temporary SQLite file), then the
managed plugin (built as calico/cnm:bench by scripts/build-plugin.sh, its state in a
temporary directory), --blocks times. Each block times `docker run --rm IMAGE true`
interleaved on --net none, a user-defined bridge network and the calico network, and
the section reports medians over all blocks: each plugin's issue-2 ratio
(calico - none) / (bridge - none), and managed cost / legacy cost.

Usage: sudo .venv/bin/python bench/managed_run.py [--blocks 3] [--runs 10] [--no-write]
Refuses to run while a calico plugin already serves this dockerd.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.docker_run import CLI, docker, plugin_answers, start_plugin, time_run  # noqa: E402
from bench.sections import publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "calico/cnm:bench"
SECTION = "## `docker run` on the managed plugin (issue 8)"


def timed_block(image: str, driver: str, ipam: str, runs: int,
                samples: dict[str, list[float]], kind: str) -> None:
    suffix = uuid.uuid4().hex[:6]
    bridge, calico = f"bench-bridge-{suffix}", f"bench-calico-{suffix}"
    try:
        docker("network", "create", "-d", "bridge", bridge)
        docker("network", "create", "-d", driver, "--ipam-driver", ipam, calico)
        names = {"none": "none", f"bridge-{kind}": bridge, kind: calico}
        for network in names.values():  # warm-up, not counted
            time_run(image, network)
        for _ in range(runs):
            for label, network in names.items():
                samples.setdefault(label, []).append(time_run(image, network))
    finally:
        subprocess.run(["docker", "network", "rm", bridge, calico], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--image", default="calico-cnm-test:2")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root")
    if plugin_answers():
        parser.error("a calico plugin already serves this dockerd: stop it first")

    legacy_dir = tempfile.mkdtemp(prefix="calico-cnm-bench-legacy-")
    managed_dir = tempfile.mkdtemp(prefix="calico-cnm-bench-managed-")
    os.makedirs(f"{managed_dir}/tls")
    print(f"building {PLUGIN}", flush=True)
    subprocess.run(["sh", str(REPO / "scripts" / "build-plugin.sh")], check=True,
                   env={**os.environ, "PLUGIN": PLUGIN}, stdout=subprocess.DEVNULL)
    docker("plugin", "set", PLUGIN, f"state.source={managed_dir}",
           f"etcd-tls.source={managed_dir}/tls")
    samples: dict[str, list[float]] = {}
    try:
        for block in range(args.blocks):
            process = start_plugin(legacy_dir)
            try:
                timed_block(args.image, "calico", "calico-ipam", args.runs, samples,
                            "legacy")
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            docker("plugin", "enable", PLUGIN)
            try:
                timed_block(args.image, PLUGIN, PLUGIN, args.runs, samples, "managed")
            finally:
                docker("plugin", "disable", "-f", PLUGIN)
            print(f"  block {block + 1}: " + ", ".join(
                f"{k} {statistics.median(v) * 1000:.0f} ms" for k, v in samples.items()),
                flush=True)
    finally:
        subprocess.run(["docker", "plugin", "rm", "-f", PLUGIN], capture_output=True)
        subprocess.run([CLI, "uninstall", "--force"], capture_output=True,
                       env={**os.environ, "CALICO_CNM_SQLITE_PATH": f"{legacy_dir}/state.db"})
        shutil.rmtree(legacy_dir, ignore_errors=True)
        shutil.rmtree(managed_dir, ignore_errors=True)

    ms = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    none = ms["none"]
    cost = {kind: ms[kind] - none for kind in ("legacy", "managed")}
    ratio = {kind: cost[kind] / (ms[f"bridge-{kind}"] - none) for kind in cost}
    lines = [
        SECTION, "",
        "`sudo .venv/bin/python bench/managed_run.py` (`--no-write` only prints): the "
        "legacy `serve` and the managed plugin take turns on this machine's dockerd "
        f"({args.blocks} blocks each, {args.runs} interleaved `docker run --rm "
        f"{args.image} true` per network per block; medians over all blocks).", "",
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"dockerd {docker('version', '-f', '{{.Server.Version}}').strip()}:", "",
        "| network | median ms | cost over --net none, ms | (calico - none) / (bridge - none) |",
        "|---|---|---|---|",
        f"| none | {none:.1f} | 0 | |",
        f"| bridge (legacy blocks) | {ms['bridge-legacy']:.1f} | "
        f"{ms['bridge-legacy'] - none:.1f} | |",
        f"| calico, legacy plugin | {ms['legacy']:.1f} | {cost['legacy']:.1f} | "
        f"{ratio['legacy']:.2f} |",
        f"| bridge (managed blocks) | {ms['bridge-managed']:.1f} | "
        f"{ms['bridge-managed'] - none:.1f} | |",
        f"| calico/cnm (managed plugin) | {ms['managed']:.1f} | {cost['managed']:.1f} | "
        f"{ratio['managed']:.2f} |",
        "",
        f"**Managed cost / legacy cost: {cost['managed'] / cost['legacy']:.2f}.** The "
        "code is the same; the managed plugin's calls go through the same socket "
        "protocol, from a runc container in the host's network namespace.",
    ]
    publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
