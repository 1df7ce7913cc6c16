"""IPAM speed over the real plugin sockets: RequestAddress and ReleaseAddress in a /16.

Starts `calico-cnm serve` (no agent, no Docker needed) on temporary sockets and drives
the IpamDriver API the way dockerd does, one HTTP request per call, from client
processes (not threads: the clients must not share one interpreter lock):

1. **SQLite**, one host: 1 client and 8 concurrent clients each allocate ``--count``
   addresses and release them again; then 8 clients fill the subnet to 99 % and the
   allocation rate is compared between windows at 0 %, 50 %, 90 % and 99 % full.
2. **etcd**, three hosts (``--etcd-hosts N`` for another number; plugins with their own
   host names on one etcd, the same subnet shared by all, as one network across hosts
   is): 8 clients per host at once; allocations per second per host; then the same
   hosts fill the subnet to 99 %.
3. The **baseline**: the same calls (fewer of them, it is slow) against the code of
   ``--baseline`` (a git revision; default the last commit before the affinity index),
   checked out in a temporary worktree and served from it with the same interpreter, in
   the same run, so that the ratio is not hostage to this machine's noise.

Every address handed out is checked: 0 duplicates, ever (an address returned twice
while it was held), and every release must succeed.

Usage (from the repository root; root is not needed):
    .venv/bin/python bench/ipam.py [--count 2000] [--baseline-count 300]
                                   [--baseline REV | --no-baseline] [--no-fill]
                                   [--only sqlite|etcd] [--etcd-hosts N] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.sections import publish  # noqa: E402
from tests.conftest import EtcdServer  # noqa: E402

SECTION = "## IPAM allocation speed (issue 9)"
# The last commit whose allocator scanned every block of the subnet.
DEFAULT_BASELINE = "f2de12e"
POOL = "10.100.0.0/16"
FILL_WINDOWS = (0, 50, 90, 99)  # percent full at which a window of allocations starts
# Allocations per window, all hosts together: the last window must fit in the 1 % left.
WINDOW = 600
# Windows per fill level: single windows of under a second swing by a third on a
# busy machine, so the median of several.
WINDOW_REPEATS = 9


# ----------------------------------------------------------------- the client side

class UnixHttp:
    """An HTTP/1.1 client of a plugin socket that, as dockerd's, keeps its connection
    unless a reply says `Connection: close` (as a stopping gunicorn worker's does)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buffer = b""

    def call(self, method: str, body: dict[str, object]) -> dict[str, object]:
        payload = json.dumps(body).encode()
        request = (f"POST /{method} HTTP/1.1\r\nHost: plugin\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        for attempt in range(2):
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(self.path)
                self.buffer = b""
            try:
                self.sock.sendall(request)
                return self._reply()
            except (ConnectionError, EOFError):
                self.sock.close()
                self.sock = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _reply(self) -> dict[str, object]:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        closing = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                closing = value.strip().lower() == b"close"
        while len(rest) < length:
            self.buffer = rest
            self._read()
            rest = self.buffer
        self.buffer = rest[length:]
        if closing and self.sock is not None:
            self.sock.close()
            self.sock = None
        status = int(head.split(b" ", 2)[1])
        reply = json.loads(rest[:length])
        if status != 200 or reply.get("Error"):
            raise RuntimeError(f"{method_of(head)} {status}: {reply.get('Error')}")
        return reply

    def _read(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the plugin closed the connection")
        self.buffer += data


def method_of(head: bytes) -> str:
    return head.split(b"\r\n", 1)[0].decode(errors="replace")


def _allocate(args: tuple[str, str, int]) -> list[tuple[float, str]]:
    """One client: count RequestAddress calls; (completion time, address) of each."""
    path, pool_id, count = args
    client = UnixHttp(path)
    done = []
    for _ in range(count):
        reply = client.call("IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "",
                                                          "Options": {}})
        done.append((time.monotonic(), str(reply["Address"])))
    return done


def _release(args: tuple[str, str, list[str]]) -> int:
    path, pool_id, addresses = args
    client = UnixHttp(path)
    for address in addresses:
        client.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id,
                                                  "Address": address.split("/")[0]})
    return len(addresses)


@dataclass
class Host:
    """One plugin and the subnet it holds."""

    name: str
    socket: str
    pool_id: str = ""


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


class Duplicates:
    """Every address currently held, across hosts and phases: a second hand-out of one
    is a duplicate."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.count = 0

    def take(self, addresses: Sequence[str]) -> None:
        for address in addresses:
            if address in self.held:
                self.count += 1
            self.held.add(address)

    def give_back(self, addresses: Sequence[str]) -> None:
        self.held.difference_update(addresses)


def run_allocations(pool: multiprocessing.pool.Pool, hosts: Sequence[Host], clients: int,
                    count: int, duplicates: Duplicates
                    ) -> tuple[dict[str, float], dict[str, list[tuple[float, str]]]]:
    """clients per host allocate count per host, all hosts at once: rate per host."""
    jobs = [(host, n) for host in hosts for n in split(count, clients)]
    began = time.monotonic()
    results = pool.map(_allocate, [(host.socket, host.pool_id, n) for host, n in jobs],
                       chunksize=1)
    per_host: dict[str, list[tuple[float, str]]] = {host.name: [] for host in hosts}
    for (host, _n), done in zip(jobs, results, strict=True):
        per_host[host.name].extend(done)
    rates = {}
    for name, done in per_host.items():
        done.sort()
        rates[name] = len(done) / (done[-1][0] - began) if done else 0.0
        duplicates.take([address for _t, address in done])
    return rates, per_host


def addresses_of(done: dict[str, list[tuple[float, str]]]) -> dict[str, list[str]]:
    """The addresses per host of run_allocations' timed results."""
    return {name: [address for _t, address in items] for name, items in done.items()}


def run_releases(pool: multiprocessing.pool.Pool, hosts: Sequence[Host], clients: int,
                 held: dict[str, list[str]], duplicates: Duplicates) -> float:
    """Every host releases what it holds, clients per host at once: releases per second
    (all hosts together)."""
    jobs = []
    for host in hosts:
        addresses = held[host.name]
        for index in range(clients):
            jobs.append((host.socket, host.pool_id, addresses[index::clients]))
    began = time.monotonic()
    released = sum(pool.map(_release, jobs, chunksize=1))
    took = time.monotonic() - began
    for host in hosts:
        duplicates.give_back(held[host.name])
    return released / took if took else 0.0


# ------------------------------------------------------------------ the plugin side

class Plugins:
    """`calico-cnm serve` for each host name, from one code tree, on one datastore."""

    def __init__(self, code: Path, tmp: Path, names: Sequence[str],
                 etcd: str | None) -> None:
        self.code = code
        self.tmp = tmp
        self.names = names
        self.etcd = etcd
        self.processes: list[subprocess.Popen[bytes]] = []
        self.hosts: list[Host] = []

    def __enter__(self) -> Plugins:
        try:
            self._start()
        except BaseException:
            self.__exit__()  # the plugins started so far must not outlive a failed start
            raise
        return self

    def _start(self) -> None:
        for name in self.names:
            plugin_dir = self.tmp / f"plugins-{name}"
            env = {**{k: v for k, v in os.environ.items()
                      if not k.startswith(("CALICO_CNM_", "ETCD_", "DOCKER_"))},
                   "CALICO_CNM_HOSTNAME": name,
                   "CALICO_CNM_PLUGIN_DIR": str(plugin_dir),
                   "CALICO_CNM_RUN_DIR": str(self.tmp / f"run-{name}"),
                   "CALICO_CNM_RUN_AGENT": "false",
                   "CALICO_CNM_DEFAULT_POOLS": POOL,
                   "CALICO_CNM_LOG_LEVEL": "warning",
                   "DOCKER_HOST": f"unix://{self.tmp}/no-docker.sock",
                   "PYTHONPATH": str(self.code)}
            # The SQLite path is set even on etcd, so that a plugin that missed its
            # etcd setting writes here (and fails the check below), never to the
            # machine's own datastore.
            env["CALICO_CNM_SQLITE_PATH"] = str(self.tmp / "state.db")
            if self.etcd:
                env["ETCD_ENDPOINTS"] = self.etcd
            log = open(self.tmp / f"serve-{name}.log", "ab")  # noqa: SIM115 - kept open
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "plugin.cli", "serve"], cwd=self.code, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            self.hosts.append(Host(name, str(plugin_dir / "calico-ipam.sock")))
        deadline = time.monotonic() + 60
        for host, process in zip(self.hosts, self.processes, strict=True):
            while not os.path.exists(host.socket):
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.tmp / f"serve-{host.name}.log").read_text()[-2000:]
                    raise SystemExit(f"plugin {host.name} did not start:\n{log_text}")
                time.sleep(0.1)
        for host in self.hosts:  # the same --subnet on every host: one shared subnet
            reply = UnixHttp(host.socket).call(
                "IpamDriver.RequestPool", {"AddressSpace": "CalicoGlobal", "Pool": POOL,
                                           "SubPool": "", "Options": {}, "V6": False})
            host.pool_id = str(reply["PoolID"])
        if self.etcd and (self.tmp / "state.db").exists():
            raise SystemExit("the plugins wrote to SQLite, not to etcd: check ETCD_ENDPOINTS")

    def __exit__(self, *_exc: object) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.contextmanager
def code_tree(revision: str | None) -> Iterator[Path]:
    """This checkout, or a temporary worktree of revision."""
    if revision is None:
        yield REPO
        return
    where = Path(tempfile.mkdtemp(prefix="calico-cnm-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(where), revision],
                   cwd=REPO, check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO)
        shutil.rmtree(where, ignore_errors=True)


@contextlib.contextmanager
def datastore(kind: str, tmp: Path) -> Iterator[str | None]:
    """None for SQLite (a file in tmp), else a fresh etcd's client URL."""
    if kind == "sqlite":
        yield None
        return
    data = tmp / "etcd"
    data.mkdir()
    server = EtcdServer(data)
    server.start()
    try:
        yield server.client_url
    finally:
        server.stop()


# ----------------------------------------------------------------------- phases

@dataclass
class Figures:
    one_client: float = 0.0
    eight_clients: float = 0.0
    releases: float = 0.0
    windows: dict[int, float] | None = None


def concurrency(code: Path, kind: str, names: Sequence[str], count: int,
                duplicates: Duplicates, fill: bool) -> Figures:
    """1 client (first host only), then 8 per host on every host; then the fill."""
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="calico-cnm-ipam-bench-") as tmp_name, \
            datastore(kind, Path(tmp_name)) as etcd, \
            Plugins(code, Path(tmp_name), names, etcd) as plugins, \
            multiprocessing.get_context("fork").Pool(8 * len(names)) as pool:
        hosts = plugins.hosts
        # The gateway first, as Docker asks for it when it creates the network.
        UnixHttp(hosts[0].socket).call("IpamDriver.RequestAddress", {
            "PoolID": hosts[0].pool_id, "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"}})
        rates, done = run_allocations(pool, hosts[:1], 1, count, duplicates)
        figures.one_client = rates[hosts[0].name]
        run_releases(pool, hosts[:1], 1, addresses_of(done), duplicates)
        rates, done = run_allocations(pool, hosts, 8, count, duplicates)
        figures.eight_clients = min(rates.values())
        figures.releases = run_releases(pool, hosts, 8, addresses_of(done), duplicates)
        if fill:
            figures.windows = fill_windows(pool, hosts, duplicates)
    return figures


def fill_windows(pool: multiprocessing.pool.Pool, hosts: Sequence[Host],
                 duplicates: Duplicates) -> dict[int, float]:
    """Fill the subnet with 8 clients per host; at each of FILL_WINDOWS percent full,
    allocations per second (all hosts) over a window of WINDOW allocations, the median
    of WINDOW_REPEATS windows (each window's addresses are released again, untimed, so
    every window starts at the same fill level)."""
    usable = 2 ** 16 - 3  # network, broadcast and the gateway
    held: dict[str, list[str]] = {host.name: [] for host in hosts}
    filled = 0
    windows: dict[int, float] = {}
    per_host = WINDOW // len(hosts)
    for percent in FILL_WINDOWS:
        target = usable * percent // 100
        if target > filled:  # the untimed part up to the window
            _rates, done = run_allocations(pool, hosts, 8, (target - filled) // len(hosts),
                                           duplicates)
            for name, addresses in addresses_of(done).items():
                held[name].extend(addresses)
            filled += (target - filled) // len(hosts) * len(hosts)
        rates = []
        for _ in range(WINDOW_REPEATS):
            began = time.monotonic()
            _rates, done = run_allocations(pool, hosts, 8, per_host, duplicates)
            rates.append(per_host * len(hosts) / (time.monotonic() - began))
            run_releases(pool, hosts, 8, addresses_of(done), duplicates)
        windows[percent] = statistics.median(rates)
        print(f"  {percent:>2} % full: {windows[percent]:.0f} allocations/s "
              f"(windows: {', '.join(f'{r:.0f}' for r in rates)})", flush=True)
    run_releases(pool, hosts, 8, held, duplicates)
    return windows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000,
                        help="allocations per phase and host (default 2000)")
    parser.add_argument("--baseline-count", type=int, default=300)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-fill", action="store_true")
    parser.add_argument("--only", choices=("sqlite", "etcd"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--etcd-hosts", type=int, default=3,
                        help="plugins on the one etcd (all on this machine's CPUs)")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["sqlite", "etcd"]
    hosts_of = {"sqlite": ["bench-h1"],
                "etcd": [f"bench-h{n}" for n in range(1, args.etcd_hosts + 1)]}
    duplicates = Duplicates()
    results: dict[tuple[str, str], Figures] = {}
    for kind in kinds:
        print(f"{kind}: this tree", flush=True)
        results[(kind, "now")] = concurrency(REPO, kind, hosts_of[kind], args.count,
                                             duplicates, fill=not args.no_fill)
        print(f"  {results[(kind, 'now')]}", flush=True)
        if not args.no_baseline:
            print(f"{kind}: baseline {args.baseline}", flush=True)
            with code_tree(args.baseline) as tree:
                results[(kind, "base")] = concurrency(
                    tree, kind, hosts_of[kind], args.baseline_count, duplicates, fill=False)
            print(f"  {results[(kind, 'base')]}", flush=True)
    publish(SECTION, report(args, results, duplicates), write=not args.no_write)
    return 1 if duplicates.count else 0


def report(args: argparse.Namespace, results: dict[tuple[str, str], Figures],
           duplicates: Duplicates) -> str:
    cpus = os.cpu_count()
    lines = [SECTION, "",
             "`.venv/bin/python bench/ipam.py` (`--no-write` only prints): "
             "`IpamDriver.RequestAddress` and `ReleaseAddress` over the real plugin sockets "
             f"(`calico-cnm serve`, 2 workers x 8 threads, no agent) in the /16 {POOL}, "
             "from client processes that, as dockerd, reuse one connection unless told to "
             "close; on etcd "
             f"{args.etcd_hosts} plugins with their own host names share one etcd and one "
             f"subnet and allocate at once. {time.strftime('%Y-%m-%d')}, {cpus} CPUs; the baseline "
             f"is commit {args.baseline} (every allocation listed and parsed every block "
             "of the subnet), run in the same session "
             f"with {args.baseline_count} allocations per phase and host.", "",
             "| datastore | what | baseline | now | ratio | target |",
             "|---|---|---:|---:|---:|---|"]
    targets = {"sqlite": "≥ 1,000/s at 8 clients", "etcd": "≥ 300/s per host"}
    for kind in ("sqlite", "etcd"):
        now = results.get((kind, "now"))
        if now is None:
            continue
        base = results.get((kind, "base"))
        per = f" per host ({args.etcd_hosts} hosts at once)" if kind == "etcd" else ""
        rows = [("1 client", now.one_client, base.one_client if base else None, ""),
                (f"8 clients{per}", now.eight_clients,
                 base.eight_clients if base else None, targets[kind]),
                ("releases, all clients", now.releases, base.releases if base else None, "")]
        for what, value, old, target in rows:
            ratio = f"{value / old:.1f}x" if old else "-"
            old_text = f"{old:,.0f}/s" if old else "-"
            lines.append(f"| {kind} | {what} | {old_text} | {value:,.0f}/s | {ratio} | "
                         f"{target} |")
    for kind in ("sqlite", "etcd"):
        now = results.get((kind, "now"))
        if now is None or not now.windows:
            continue
        low, high = min(now.windows.values()), max(now.windows.values())
        spread = ", ".join(f"{p} %: {r:,.0f}/s" for p, r in now.windows.items())
        lines += ["", f"Filling the /16 on {kind} with 8 clients per host, {WINDOW:,} "
                  f"allocations (all hosts together) timed at each fill level, the median "
                  f"of {WINDOW_REPEATS} windows: {spread}; slowest / "
                  f"fastest **{low / high:.2f}** (target: within 20 %, ≥ 0.80)."]
    lines += ["", f"Duplicates: **{duplicates.count}** (every address handed out, checked "
              "against every address held at that moment, over every phase)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
