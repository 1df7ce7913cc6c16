"""How much does calico's network set-up add to `docker run`, against Docker's own
bridge driver? Runs `docker run --rm IMAGE true` interleaved on --net none, a
user-defined bridge network and a calico network, and reports medians and the
ratio (calico - none) / (bridge - none). Target: at most 1.0.

Usage: .venv/bin/python bench/docker_run.py [--runs 20] [--image calico-cnm-test:2]
Starts its own `calico-cnm serve` (temporary SQLite file) unless one already
answers on /run/docker/plugins/calico.sock.
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

CLI = str(Path(sys.executable).with_name("calico-cnm"))
SOCKET = "/run/docker/plugins/calico.sock"


def docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def plugin_answers() -> bool:
    if not os.path.exists(SOCKET):
        return False
    probe = ["python3", "-c", (
        "import socket,sys;s=socket.socket(socket.AF_UNIX);s.settimeout(2);"
        f"s.connect('{SOCKET}');s.sendall(b'POST /Plugin.Activate HTTP/1.0\\r\\n\\r\\n');"
        "sys.exit(0 if b'NetworkDriver' in s.recv(4096) else 1)")]
    return subprocess.run(probe, capture_output=True).returncode == 0


def start_plugin(state_dir: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CALICO_CNM_SQLITE_PATH": f"{state_dir}/state.db"}
    process = subprocess.Popen([CLI, "serve"], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not plugin_answers():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("calico-cnm serve did not start")
        time.sleep(0.1)
    return process


def time_run(image: str, network: str) -> float:
    start = time.perf_counter()
    subprocess.run(["docker", "run", "--rm", "--net", network, image, "true"], check=True,
                   capture_output=True, timeout=120)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--image", default="calico-cnm-test:2")
    args = parser.parse_args()

    state_dir = tempfile.mkdtemp(prefix="calico-cnm-bench-")
    process = None if plugin_answers() else start_plugin(state_dir)
    suffix = uuid.uuid4().hex[:6]
    bridge, calico = f"bench-bridge-{suffix}", f"bench-calico-{suffix}"
    samples: dict[str, list[float]] = {"none": [], bridge: [], calico: []}
    try:
        docker("network", "create", "-d", "bridge", bridge)
        docker("network", "create", "-d", "calico", "--ipam-driver", "calico-ipam", calico)
        for network in samples:  # warm-up, not counted
            time_run(args.image, network)
        for _ in range(args.runs):
            for network in samples:
                samples[network].append(time_run(args.image, network))
    finally:
        subprocess.run(["docker", "network", "rm", bridge, calico], capture_output=True)
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        shutil.rmtree(state_dir, ignore_errors=True)

    none_ms, bridge_ms, calico_ms = (statistics.median(samples[n]) * 1000 for n in samples)
    ratio = (calico_ms - none_ms) / (bridge_ms - none_ms)
    print(f"docker run --rm {args.image} true, {args.runs} interleaved runs each (median):")
    print("| network | median ms | cost over --net none, ms |")
    print("|---|---|---|")
    print(f"| none | {none_ms:.1f} | 0 |")
    print(f"| bridge (user-defined) | {bridge_ms:.1f} | {bridge_ms - none_ms:.1f} |")
    print(f"| calico | {calico_ms:.1f} | {calico_ms - none_ms:.1f} |")
    print(f"ratio (calico - none) / (bridge - none) = {ratio:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
