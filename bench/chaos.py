"""The chaos test of tests/multihost/test_chaos.py at a larger count: container life
cycles on three simulated hosts under random SIGKILLs of their plugins, then the
duplicate and leak checks. Records the outcome in BENCHMARKS.md.

Usage: sudo .venv/bin/python bench/chaos.py [--cycles 200] [--seed 7] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sections import publish  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Chaos (issue 9)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root")
    per_host = max(1, round(args.cycles / 3))
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s",
         "tests/multihost/test_chaos.py"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "CHAOS_CYCLES": str(per_host), "CHAOS_SEED": str(args.seed)})
    took = time.monotonic() - began
    stats = re.search(r"chaos: (\d+) life cycles \((\d+) runs failed\), (\d+) plugin kills",
                      result.stdout)
    verdict = "passed" if result.returncode == 0 else "FAILED"
    lines = [SECTION, "",
             "`sudo .venv/bin/python bench/chaos.py` (`--no-write` only prints) runs "
             "tests/multihost/test_chaos.py with more cycles: run, connect, disconnect, "
             "stop and rm on three simulated hosts at once, while a random host's plugin is "
             "killed with SIGKILL every 1-4 s and started again 0.2-1.5 s later; then no "
             "duplicate address at any check, and after the agents' grace no address, "
             "endpoint record, cali veth or container route of the test's subnets but the "
             "three survivors', which reach each other. `make test` runs 24 cycles.", "",
             f"{time.strftime('%Y-%m-%d')}, seed {args.seed}: "
             + (f"**{stats.group(1)} life cycles, {stats.group(3)} plugin kills, "
                f"{stats.group(2)} `docker run`s refused while a plugin was down: {verdict}**"
                if stats else f"**{verdict}** (no statistics printed)")
             + f" in {took:.0f} s."]
    if result.returncode != 0:
        lines += ["", "```", result.stdout[-3000:], "```"]
    publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
