"""BGP at scale: BIRD with our generated configurations in N network namespaces.

For N nodes (default 10, 25 and 50) in two topologies, the full iBGP mesh
(`BgpSettings(mesh=True)`) and mesh off with two route reflectors (the first two
nodes have an `rr_cluster_id`), measures:

* sessions per node: the BGP protocols in state Established (`show protocols`),
  for reflectors and clients apart;
* BIRD's memory per node: the resident set of each bird process (VmRSS) and BIRD's
  own account (`show memory`, the effective Total);
* convergence: one node gets a new /26 block (its config re-rendered with
  `render_bird_config`, written, then `configure` on its control socket, or with
  `birdc configure` given --birdc, which adds birdc's start-up); the time
  from just before that command until the block's route is in the kernel routing
  table of every other node, p50 and p95 over the samples.
  Targets (issue 7): p95 <= 1 s at 50 nodes in both topologies; with reflectors,
  sessions per client equal to the number of reflectors.

No dockerd, no agent: every node is a network namespace `cnmb-nNNN` with a veth
(`eth0`, 10.125.0.0/16) into a Linux bridge in `cnmb-bridge`, and one
`bird -f` in it with its own control socket in a temporary directory. One pool,
10.126.0.0/16 without encapsulation; node i first owns the i-th /26. Traffic stays
between those namespaces: they have no default route and no link out. Each node knows
every other node's MAC as a permanent neighbour: the kernel's ARP table limit
(net.ipv4.neigh.default.gc_thresh3, 1024) is shared by all namespaces, a 50-node mesh
needs 2,450 entries, and past the limit the SYNs of new sessions are dropped ("neighbor
table overflow"), so the mesh would never form; a real host needs only N-1.

Arrival is stamped without polling: one rtnetlink socket per namespace (made inside
it), all read by one thread, stamping the first RTM_NEWROUTE of each destination
with protocol `bird` with time.monotonic(), the clock the sample started on.

Usage (as root, from the repository root):
    .venv/bin/python bench/bgp_scale.py [--sizes 10,25,50] [--topologies mesh,rr]
                                        [--samples 20] [--reflectors 2] [--birdc]
                                        [--no-write]

Each configuration gets fresh namespaces and birds. At start, leftovers of a crashed
run (namespaces `cnmb-*`, bird processes whose control socket is under a `cnmb-`
temporary directory, those directories) are removed; at the end (also on Ctrl-C or
SIGTERM) everything is removed again and checked gone. Writes the "BGP scale"
section of BENCHMARKS.md (replaced on every run) unless --no-write.

The only thing added to the generated text: each node's bird.conf is a two-line
wrapper, a `log` statement (so BIRD's warnings land in a file we scan) and an
`include` of the generated configuration.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.sections import BENCHMARKS, write_section  # noqa: E402
from routing.bird import (  # noqa: E402
    CONNECT_DELAY_TIME,
    CONNECT_RETRY_TIME,
    BgpNode,
    BgpSettings,
    render_bird_config,
)
from routing.planner import BlockInfo, PoolInfo  # noqa: E402

SECTION = "## BGP scale (issue 7)"

PREFIX = "cnmb-"                              # namespaces and temporary directories
BRIDGE_NS = f"{PREFIX}bridge"
BRIDGE = "br0"
NODE_NET = ipaddress.ip_network("10.125.0.0/16")
POOL = PoolInfo("10.126.0.0/16")              # no encapsulation: BGP carries it
BLOCK_PREFIX = 26
NEW_BLOCKS_FROM = 512                         # the samples' blocks: /26 number 512 on
CLUSTER_ID = "1.0.0.1"                        # shared by the reflectors, as Calico's are
TOPOLOGIES = ("mesh", "rr")
RTPROT_BIRD = 12                              # /etc/iproute2/rt_protos: "bird"
ESTABLISH_TIMEOUT = 120.0
ROUTE_TIMEOUT = 10.0

T = TypeVar("T")


# --------------------------------------------------------------------- processes

def run(argv: list[str], stdin: str | None = None, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout}")
    return result


def ip_batch(lines: list[str], netns: str | None = None) -> None:
    """Many `ip` commands in one process (`ip -batch -`): far cheaper than one each."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-batch", "-"]
    run(argv, stdin="\n".join(lines) + "\n")


def our_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return sorted(line.split()[0] for line in out.splitlines()
                  if line.split() and line.split()[0].startswith(PREFIX))


def our_dirs() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}*"))


def our_birds() -> dict[int, str]:
    """bird processes whose command line names a `cnmb-` temporary directory: ours
    (another BIRD on this machine is left alone)."""
    marker = os.path.join(tempfile.gettempdir(), PREFIX)
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        text = cmdline.decode(errors="replace").strip()
        if comm == "bird" and marker in text:
            found[int(entry)] = text
    return found


def kill_pids(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM (BIRD shuts down cleanly on it), then SIGKILL what is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def remove_leftovers() -> list[str]:
    """Everything of ours still on the machine, removed; says what it found."""
    found = []
    birds = our_birds()
    if birds:
        found.append(f"{len(birds)} bird processes")
        kill_pids(list(birds))
    names = our_netns()
    if names:
        found.append(f"namespaces {', '.join(names)}")
        # Deleting a namespace deletes its veths too.
        ip_batch([f"netns delete {name}" for name in names])
    for path in our_dirs():
        found.append(f"directory {path}")
        shutil.rmtree(path, ignore_errors=True)
    return found


# ------------------------------------------------------------------ BIRD control

def bird_command(sock: Path, command: str, timeout: float = 10.0) -> tuple[str, list[str]]:
    """One command on BIRD's control socket (birdc's protocol, without starting a
    birdc): the final reply code and the reply's lines without their codes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(sock))
        reader = conn.makefile("rb")
        reader.readline()  # "0001 BIRD 2.0.12 ready."
        conn.sendall(command.encode() + b"\n")
        lines: list[str] = []
        while True:
            raw = reader.readline()
            if not raw:
                raise ConnectionError(f"{sock}: closed during {command!r}")
            line = raw.decode(errors="replace").rstrip("\n")
            if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
                lines.append(line[5:])
                # A reply ends with a 0xxx (done), 8xxx or 9xxx (error) line.
                if line[4] == " " and line[0] in "089":
                    return line[:4], lines
            else:
                lines.append(line[1:])  # a continuation: " text"


def bgp_states(lines: list[str]) -> dict[str, str]:
    """`show protocols` -> BGP protocol name -> its last column (Established, Active,
    Passive, Connect...)."""
    states = {}
    for text in lines:
        fields = text.split()
        if len(fields) >= 5 and fields[1] == "BGP":
            states[fields[0]] = fields[-1]
    return states


_UNITS = {"B": 1, "kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}


def memory_total(lines: list[str]) -> float:
    """`show memory` -> the effective Total, bytes."""
    for text in lines:
        fields = text.split()
        if fields[:1] == ["Total:"] and len(fields) >= 3 and fields[2] in _UNITS:
            return float(fields[1]) * _UNITS[fields[2]]
    raise ValueError(f"no Total in {lines!r}")


def filtered_count(lines: list[str]) -> int:
    """`show route where ... count` -> the routes that passed the condition ("X of Y
    routes for Z networks": Y and Z count everything examined)."""
    for text in lines:
        match = re.search(r"(\d+) of \d+ routes for \d+ networks in table master4", text)
        if match:
            return int(match.group(1))
    raise ValueError(f"no master4 count in {lines!r}")


def pool_routes(sock: Path) -> tuple[int, int]:
    """(paths, networks) inside the pool in master4; paths count add-path copies."""
    where = f"where net ~ [ {POOL.cidr}+ ]"
    return (filtered_count(bird_command(sock, f"show route {where} count")[1]),
            filtered_count(bird_command(sock, f"show route {where} primary count")[1]))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


# ----------------------------------------------------------------- route watching

CLONE_NEWNET = 0x40000000
RTM_NEWROUTE = 24
RTMGRP_IPV4_ROUTE = 0x40
RTA_DST = 1
_libc = ctypes.CDLL(None, use_errno=True)


def in_namespaces(names: list[str], make: Callable[[str], T]) -> dict[str, T]:
    """make(name) run in each namespace, in a short-lived thread that enters them one
    by one (setns moves only the calling thread, and a socket stays in the namespace
    it was made in)."""
    results: dict[str, T] = {}
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            for name in names:
                fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {name}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                results[name] = make(name)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failure.append(exc)

    thread = threading.Thread(target=worker, name="setns")
    thread.start()
    thread.join()
    if failure:
        for value in results.values():
            if isinstance(value, socket.socket):
                value.close()
        raise failure[0]
    return results


class RouteWatch:
    """rtnetlink IPv4 route notifications of many namespaces, one reader thread: the
    arrival time of the first RTM_NEWROUTE of each destination installed by BIRD."""

    def __init__(self, namespaces: list[str]) -> None:
        self.first_seen: dict[tuple[str, str], float] = {}
        self.overruns = 0
        self._cond = threading.Condition()

        def make(_name: str) -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, RTMGRP_IPV4_ROUTE))
            sock.setblocking(False)
            return sock

        self._socks = in_namespaces(namespaces, make)
        self._selector = selectors.DefaultSelector()
        for name, sock in self._socks.items():
            self._selector.register(sock, selectors.EVENT_READ, name)
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="routes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    return
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data = sock.recv(1 << 16)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.ENOBUFS:  # lost notifications: said so
                            self.overruns += 1
                            continue
                        raise
                    stamp = time.monotonic()
                    found = _new_bird_routes(data)
                    if found:
                        with self._cond:
                            for dst in found:
                                self.first_seen.setdefault((key.data, dst), stamp)
                            self._cond.notify_all()

    def wait(self, netns: str, dst: str, deadline: float) -> float | None:
        with self._cond:
            while (netns, dst) not in self.first_seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.first_seen[(netns, dst)]

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        self._selector.close()
        for sock in self._socks.values():
            sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _new_bird_routes(data: bytes) -> list[str]:
    """The IPv4 destinations of the RTM_NEWROUTE messages with protocol bird."""
    found = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        # struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
        if kind == RTM_NEWROUTE and length >= 28:
            family, dst_len, _src, _tos, _table, protocol = struct.unpack_from(
                "=BBBBBB", data, offset + 16)
            if family == socket.AF_INET and protocol == RTPROT_BIRD:
                dst = "0.0.0.0"
                attr = offset + 28
                while attr + 4 <= offset + length:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    if atype == RTA_DST and alen >= 8:
                        dst = socket.inet_ntoa(data[attr + 4:attr + 8])
                    attr += (alen + 3) & ~3
                found.append(f"{dst}/{dst_len}")
        offset += (length + 3) & ~3
    return found


# ------------------------------------------------------------------------- the lab

@dataclass
class Node:
    index: int
    name: str
    netns: str
    address: str
    bgp: BgpNode
    dir: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    @property
    def mac(self) -> str:            # locally administered, from the index
        return f"02:cb:00:00:{(self.index + 1) >> 8:02x}:{(self.index + 1) & 0xff:02x}"

    @property
    def conf(self) -> Path:          # what bird reads: log + include
        return self.dir / f"{self.name}.conf"

    @property
    def generated(self) -> Path:     # render_bird_config's text
        return self.dir / f"{self.name}.generated.conf"

    @property
    def sock(self) -> Path:
        return self.dir / f"{self.name}.ctl"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"


@dataclass
class Sample:
    origin: str
    origin_reflector: bool
    block: str
    configure_s: float           # until BIRD's "Reconfigured" reply
    delays: dict[str, float]     # node -> route in its kernel, from before configure

    @property
    def last(self) -> float:
        return max(self.delays.values())

    @property
    def first(self) -> float:
        return min(self.delays.values())


@dataclass
class Result:
    size: int
    topology: str
    reflectors: int
    establish_s: float | None = None       # birds started -> every session Established
    initial_routes_s: float | None = None  # birds started -> every block in every kernel
    sessions: dict[str, int] = field(default_factory=dict)       # node -> Established
    reflector_names: set[str] = field(default_factory=set)
    rss: dict[str, int] = field(default_factory=dict)            # bytes
    bird_memory: dict[str, float] = field(default_factory=dict)  # show memory Total, bytes
    routes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (paths, networks)
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)            # from BIRD's logs

    def sessions_of(self, reflectors: bool) -> list[int]:
        return [n for name, n in self.sessions.items()
                if (name in self.reflector_names) == reflectors]


class Lab:
    """N nodes of one topology: namespaces, configurations and birds."""

    def __init__(self, size: int, topology: str, reflectors: int, workdir: Path) -> None:
        self.size, self.topology = size, topology
        self.settings = BgpSettings(mesh=topology == "mesh")
        self.nodes: list[Node] = []
        for i in range(size):
            name = f"n{i + 1:03d}"
            address = str(NODE_NET.network_address + i + 1)
            cluster = CLUSTER_ID if topology == "rr" and i < reflectors else None
            self.nodes.append(Node(i, name, f"{PREFIX}{name}", address,
                                   BgpNode(name, f"{address}/{NODE_NET.prefixlen}",
                                           rr_cluster_id=cluster), workdir))
        self.bgp_nodes = [n.bgp for n in self.nodes]
        self.blocks = [BlockInfo(block_cidr(n.index), host=n.name) for n in self.nodes]
        self.started_at = 0.0

    # -- network
    def create_network(self) -> None:
        names = [n.netns for n in self.nodes]
        ip_batch([f"netns add {BRIDGE_NS}"] + [f"netns add {name}" for name in names])
        # Both ends made straight in their namespaces: nothing appears in ours.
        ip_batch([f"link add eth0 netns {n.netns} address {n.mac} type veth "
                  f"peer name {n.name} netns {BRIDGE_NS}" for n in self.nodes])
        ip_batch(["link set lo up", f"link add {BRIDGE} type bridge",
                  f"link set {BRIDGE} up"]
                 + [line for n in self.nodes
                    for line in (f"link set {n.name} master {BRIDGE}",
                                 f"link set {n.name} up")], netns=BRIDGE_NS)
        # Permanent neighbours, after the link is up (going down flushes them): the
        # ARP table's limit (gc_thresh3, 1024 by default) is one for all namespaces of
        # the kernel, and a 50-node mesh needs 2,450 entries; past the limit the SYNs
        # of new sessions are dropped and the mesh never forms. Permanent entries are
        # exempt from it, and leave the table to the machine's other users.
        for n in self.nodes:
            ip_batch(["link set lo up",
                      f"addr add {n.address}/{NODE_NET.prefixlen} dev eth0",
                      "link set eth0 up"]
                     + [f"neigh replace {o.address} lladdr {o.mac} dev eth0 nud permanent"
                        for o in self.nodes if o is not n], netns=n.netns)

    # -- configurations and birds
    def render(self, node: Node) -> None:
        text = render_bird_config(node.bgp, self.bgp_nodes, [], [POOL], self.blocks,
                                  self.settings)
        _write(node.generated, text)
        if not node.conf.exists():
            _write(node.conf, f'log "{node.log}" all;\ninclude "{node.generated}";\n')

    def start_birds(self) -> None:
        for node in self.nodes:
            self.render(node)
        self.started_at = time.monotonic()
        for node in self.nodes:
            node.log_file = open(node.dir / f"{node.name}.stderr", "wb")
            # `ip netns exec` execs bird itself, so the Popen's pid is bird's.
            node.process = subprocess.Popen(
                ["ip", "netns", "exec", node.netns, "bird", "-f", "-c", str(node.conf),
                 "-s", str(node.sock), "-P", str(node.dir / f"{node.name}.pid")],
                stdin=subprocess.DEVNULL, stdout=node.log_file, stderr=subprocess.STDOUT,
                start_new_session=True)  # Ctrl-C reaches us, not the birds
        deadline = time.monotonic() + 10
        while not all(n.sock.exists() for n in self.nodes):
            dead = [n.name for n in self.nodes if n.process and n.process.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"bird did not start on {dead or 'some nodes'}: "
                                   + self._stderr(dead[0] if dead else self.nodes[0].name))
            time.sleep(0.02)

    def _stderr(self, name: str) -> str:
        path = self.nodes[0].dir / f"{name}.stderr"
        return path.read_text(errors="replace")[-500:] if path.exists() else ""

    def stop_birds(self) -> None:
        pids = [n.process.pid for n in self.nodes if n.process and n.process.poll() is None]
        kill_pids(pids)
        for node in self.nodes:
            if node.process is not None:
                node.process.wait(timeout=5)
            if node.log_file is not None:
                node.log_file.close()

    def states(self) -> dict[str, dict[str, str]]:
        return {n.name: bgp_states(bird_command(n.sock, "show protocols")[1])
                for n in self.nodes}

    def wait_established(self, timeout: float) -> tuple[float | None, dict[str, dict[str, str]]]:
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if all(s and all(v == "Established" for v in s.values())
                   for s in states.values()):
                return time.monotonic() - self.started_at, states
            if time.monotonic() > deadline:
                return None, states
            time.sleep(0.25)


def block_cidr(number: int) -> str:
    pool = POOL.network
    size = 2 ** (pool.max_prefixlen - BLOCK_PREFIX)
    return f"{pool.network_address + number * size}/{BLOCK_PREFIX}"


def _write(path: Path, text: str) -> None:
    """Written whole, then renamed over: BIRD never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, int(-(-fraction * len(ordered) // 1)))
    return ordered[min(rank, len(ordered)) - 1]


# ------------------------------------------------------------------ measuring

def measure(size: int, topology: str, samples: int, reflectors: int, workdir: Path,
            use_birdc: bool = False) -> Result:
    result = Result(size, topology, reflectors if topology == "rr" else 0)
    lab = Lab(size, topology, reflectors, workdir)
    result.reflector_names = {n.name for n in lab.nodes if n.bgp.reflector
                              and topology == "rr"}
    watch: RouteWatch | None = None
    try:
        lab.create_network()
        # Listening before BIRD starts: the initial routes are stamped too.
        watch = RouteWatch([n.netns for n in lab.nodes])
        lab.start_birds()
        result.establish_s, states = lab.wait_established(ESTABLISH_TIMEOUT)
        result.sessions = {name: sum(v == "Established" for v in s.values())
                           for name, s in states.items()}
        if result.establish_s is None:
            stuck = {name: {p: v for p, v in s.items() if v != "Established"}
                     for name, s in states.items()}
            stuck = {k: v for k, v in stuck.items() if v}
            result.problems.append(
                f"not every session Established after {ESTABLISH_TIMEOUT:.0f} s: "
                f"{len(stuck)} nodes, e.g. {next(iter(stuck.items()))}")
        print(f"  {size:3d} {topology}: sessions up after "
              f"{_s(result.establish_s)}", flush=True)

        # Every initial block in every other kernel before the first sample.
        deadline = time.monotonic() + 30
        missing = [(n, b) for n in lab.nodes for b in lab.blocks if b.host != n.name
                   and watch.wait(n.netns, b.cidr, deadline) is None]
        if missing:
            result.problems.append(f"{len(missing)} initial routes missing after the "
                                   f"sessions were up, e.g. {missing[0][1].cidr} on "
                                   f"{missing[0][0].name}")
        else:
            result.initial_routes_s = max(watch.first_seen.values()) - lab.started_at
        time.sleep(0.5)

        for k in range(samples):
            # Every node in turn (7 is coprime to 10, 25 and 50), reflectors included.
            origin = lab.nodes[(k * 7) % size]
            block = block_cidr(NEW_BLOCKS_FROM + k)
            lab.blocks.append(BlockInfo(block, host=origin.name))
            lab.render(origin)
            others = [n for n in lab.nodes if n is not origin]
            started = time.monotonic()
            if use_birdc:
                out = run(["birdc", "-s", str(origin.sock), "configure"], check=False)
                ok, reply = "Reconfigured" in out.stdout, [out.stdout + out.stderr]
            else:
                code, reply = bird_command(origin.sock, "configure")
                ok = code == "0003"  # "Reconfigured"
            configure_s = time.monotonic() - started
            if not ok:
                result.problems.append(f"configure on {origin.name}: {reply}")
            deadline = time.monotonic() + ROUTE_TIMEOUT
            delays: dict[str, float] = {}
            for node in others:
                arrived = watch.wait(node.netns, block, deadline)
                if arrived is not None:
                    delays[node.name] = arrived - started
            if len(delays) < len(others):
                result.problems.append(
                    f"sample {k + 1}: {block} from {origin.name} reached "
                    f"{len(delays)} of {len(others)} nodes in {ROUTE_TIMEOUT:.0f} s")
            else:
                sample = Sample(origin.name, origin.bgp.reflector and topology == "rr",
                                block, configure_s, delays)
                result.samples.append(sample)
                print(f"    {block} from {origin.name}: configure "
                      f"{configure_s * 1000:.0f} ms, first {sample.first * 1000:.0f} ms, "
                      f"last {sample.last * 1000:.0f} ms", flush=True)
            time.sleep(0.2)  # let the reflectors' second copies pass

        for node in lab.nodes:
            assert node.process is not None
            result.rss[node.name] = rss_bytes(node.process.pid)
            result.bird_memory[node.name] = memory_total(
                bird_command(node.sock, "show memory")[1])
            result.routes[node.name] = pool_routes(node.sock)
        expected = len(lab.blocks)
        short = {name: networks for name, (_, networks) in result.routes.items()
                 if networks != expected}
        if short:
            result.problems.append(f"networks in master4 differ from the {expected} "
                                   f"blocks on {len(short)} nodes: {short}")
        for node in lab.nodes:
            want, have = expected - own_blocks(lab, node), kernel_routes(node.netns)
            if have != want:
                result.problems.append(f"{node.name}: {have} routes of BIRD in its "
                                       f"kernel, expected {want}")
        if watch.overruns:
            result.problems.append(f"{watch.overruns} rtnetlink overruns (ENOBUFS)")
    finally:
        if watch is not None:
            watch.close()
        lab.stop_birds()
        result.warnings = bird_warnings(lab.nodes)
        mine = {n.netns for n in lab.nodes} | {BRIDGE_NS}
        names = [name for name in our_netns() if name in mine]
        if names:
            ip_batch([f"netns delete {name}" for name in names])
        for path in workdir.iterdir():
            path.unlink()
    return result


def own_blocks(lab: Lab, node: Node) -> int:
    return sum(b.host == node.name for b in lab.blocks)


def kernel_routes(netns: str) -> int:
    """The routes BIRD put in the namespace's kernel table, once at the end: the
    listener saw them arrive, this says none went missing after."""
    out = run(["ip", "-n", netns, "-4", "route", "show", "proto", "bird"]).stdout
    return len([line for line in out.splitlines() if line.strip()])


def bird_warnings(nodes: list[Node]) -> list[str]:
    """BIRD's log lines above info level (<WARN>, <ERR>, <BUG>, <FATAL>), one of each
    text with how many nodes logged it."""
    seen: dict[str, set[str]] = {}
    for node in nodes:
        for path in (node.log, node.dir / f"{node.name}.stderr"):
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                match = re.search(r"<(WARN|ERR|BUG|FATAL)> (.*)", line)
                if match and match.group(2) != "Shutdown completed":  # logged as FATAL
                    # The same warning about another neighbour is the same warning.
                    text = re.sub(r"\d+(\.\d+){3}|Mesh_\S+|Node_\S+", "X", match.group(2))
                    seen.setdefault(f"<{match.group(1)}> {text}", set()).add(node.name)
    return [f"{text} ({len(names)} nodes)" for text, names in sorted(seen.items())]


def _s(value: float | None) -> str:
    return f"{value:.1f} s" if value is not None else "never"


# ----------------------------------------------------------------------- report

def _mib(values: list[float]) -> str:
    return (f"{statistics.mean(values) / 2 ** 20:.2f} / {max(values) / 2 ** 20:.2f}"
            if values else "-")


def _sessions(values: list[int]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    text = f"{mean:.0f}" if mean == int(mean) else f"{mean:.1f}"
    return text if min(values) == max(values) else f"{text} ({min(values)}-{max(values)})"


def _ms(values: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction) * 1000:.0f}" if values else "-"


def verdicts(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.size != max(x.size for x in results):
            continue
        lasts = [s.last for s in r.samples]
        if lasts:
            p95 = percentile(lasts, 0.95)
            lines.append(f"convergence p95 at {r.size} nodes, {r.topology}: "
                         f"{p95 * 1000:.0f} ms ({'met' if p95 <= 1.0 else 'NOT met'}, "
                         "target <= 1 s)")
        else:
            lines.append(f"convergence at {r.size} nodes, {r.topology}: no sample")
    for r in results:
        if r.topology == "rr":
            clients = r.sessions_of(False)
            ok = bool(clients) and all(n == r.reflectors for n in clients)
            lines.append(f"sessions per client at {r.size} nodes: {_sessions(clients)} "
                         f"({'met' if ok else 'NOT met'}, target {r.reflectors})")
    return lines


def _per_block(r: Result, reflectors: bool) -> str:
    """Paths per pool network in master4, averaged over the nodes of one role."""
    ratios = [paths / networks for name, (paths, networks) in r.routes.items()
              if networks and (name in r.reflector_names) == reflectors]
    return f"{statistics.mean(ratios):.2f}" if ratios else "-"


def table(results: list[Result]) -> list[str]:
    lines = [
        "| N | topology | BGP sessions per node: clients / reflectors | all sessions up "
        "after | BIRD RSS per node, MiB mean / max | BIRD `show memory` per node, MiB mean "
        "/ max | BIRD paths per block: clients / reflectors | convergence p50 / p95 / max, "
        "ms | configure reply p50, ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.topology == "rr":
            sessions = f"{_sessions(r.sessions_of(False))} / {_sessions(r.sessions_of(True))}"
        else:
            sessions = f"{_sessions(list(r.sessions.values()))} (mesh)"
        lasts = [s.last for s in r.samples]
        if r.topology == "rr":
            paths = (f"{_per_block(r, False)} / {_per_block(r, True)}"
                     if r.routes else "-")
        else:
            paths = _per_block(r, False) if r.routes else "-"
        conv = (f"**{_ms(lasts, 0.5)}** / **{_ms(lasts, 0.95)}** / "
                f"{max(lasts) * 1000:.0f}" if lasts else "no sample")
        configure = _ms([s.configure_s for s in r.samples], 0.5)
        label = "mesh" if r.topology == "mesh" else f"{r.reflectors} reflectors"
        lines.append(
            f"| {r.size} | {label} | {sessions} | {_s(r.establish_s)} "
            f"| {_mib([float(v) for v in r.rss.values()])} "
            f"| {_mib(list(r.bird_memory.values()))} "
            f"| {paths} | {conv} | {configure} |")
    return lines


def breakdown(results: list[Result]) -> list[str]:
    """Where a sample's time goes: BIRD's configure, the first and the last node."""
    lines = []
    for r in results:
        if not r.samples:
            continue
        text = (f"{r.size} {r.topology}: configure "
                f"{_ms([s.configure_s for s in r.samples], 0.5)} ms, first node "
                f"{_ms([s.first for s in r.samples], 0.5)} ms, median node "
                f"{_ms([statistics.median(s.delays.values()) for s in r.samples], 0.5)} ms,"
                f" last node {_ms([s.last for s in r.samples], 0.5)} ms")
        if r.topology == "rr":
            by_client = [s.last for s in r.samples if not s.origin_reflector]
            by_rr = [s.last for s in r.samples if s.origin_reflector]
            text += (f" (last node, from a client {_ms(by_client, 0.5)} ms, from a "
                     f"reflector {_ms(by_rr, 0.5)} ms)")
        if r.initial_routes_s is not None:
            text += f"; every initial block in every kernel {r.initial_routes_s:.1f} s"
        lines.append(text)
    return lines


def findings(results: list[Result]) -> list[str]:
    """What dominates, from this run's figures where they say it."""
    lines: list[str] = []
    ups = [r.establish_s for r in results if r.establish_s is not None]
    if ups:
        retry = CONNECT_DELAY_TIME + CONNECT_RETRY_TIME
        lines += _para(
            f"Sessions: all up {min(ups):.1f}-{max(ups):.1f} s after the birds started. "
            f"That is the generator's `connect delay time {CONNECT_DELAY_TIME}` plus the "
            "handshakes; " + ("no session needed a retry (one would take more than "
                              f"{retry} s, with `connect retry time {CONNECT_RETRY_TIME}`)."
                              if max(ups) < retry else
                              f"some sessions needed a retry (more than {retry} s).")
            + " The lower address of each pair is passive, so a pair never collides.")
        lines.append("")
    mesh = sorted((r for r in results if r.topology == "mesh" and r.bird_memory),
                  key=lambda r: r.size)
    if len(mesh) >= 2 and mesh[-1].size > mesh[0].size:
        small, big = mesh[0], mesh[-1]
        per_session = ((statistics.mean(big.bird_memory.values())
                        - statistics.mean(small.bird_memory.values()))
                       / (big.size - small.size) / 1024)
        per_session_rss = ((statistics.mean(big.rss.values())
                            - statistics.mean(small.rss.values()))
                           / (big.size - small.size) / 1024)
        lines += _para(
            f"Memory: a bird's resident set is about {min(small.rss.values()) / 2 ** 20:.1f}"
            " MiB with few sessions (the binary, libc, its pools); BIRD's own account "
            f"(`show memory`) grows by about {per_session:.0f} KiB per mesh peer (its session "
            "and its block) and the"
            f" resident set by about {per_session_rss:.0f} KiB (mesh, {small.size} to "
            f"{big.size} nodes). With reflectors a client stays at its small-mesh size "
            "whatever N; only the two reflectors carry N-1 sessions.")
        lines.append("")
    lines += _para(
        "Convergence: BIRD advertises a new static route at once (no advertisement "
        "interval), so a sample is BIRD re-reading the whole configuration on "
        "`configure`, then the origin writing N-1 updates (mesh) or one to each "
        "reflector, which writes N-2 (one hop more), then every receiver's import and "
        "kernel write. On 2 cores the N birds run one after another, which is the spread "
        "between the first and the last node above and grows with N; the slowest "
        "samples follow the shared machine's other load." + _margin(results))
    lines.append("")
    lines += _para(
        "Paths per block: a client holds two paths per block (one from each reflector, "
        "`add paths on`); a reflector holds a client's block twice, from the client and "
        "as reflected by the other reflector: BIRD checks the cluster list on import "
        "only on `rr client` sessions, so the reflector-to-reflector session accepts it; "
        "on export it checks the client session's cluster id, so the copy never reaches "
        "a client. Harmless, and one extra path per block on two nodes.")
    lines.append("")
    lines += _para(
        "The simulation's own limit: the kernel's ARP table is shared by all namespaces "
        "(net.ipv4.neigh.default.gc_thresh3 = 1024 entries on this machine) and a "
        "50-node mesh needs 2,450. In a first run with ARP left dynamic, the 50-node "
        "mesh never formed: after 120 s about 17 sessions were still down (the passive "
        "side in Passive, the active one in Connect or `Socket: No route to host`), the "
        "kernel logged `neighbor table overflow` and new blocks reached only 20-36 of 49"
        " nodes; the mesh at 10 and 25 nodes and the reflectors at 50 were unaffected. "
        "The benchmark therefore gives every node the others' MAC addresses as permanent "
        "neighbours (exempt from that limit); a real host needs N-1 entries of its own.")
    return lines


def _margin(results: list[Result]) -> str:
    biggest = max(r.size for r in results)
    p95s = [percentile([s.last for s in r.samples], 0.95) for r in results
            if r.size == biggest and r.samples]
    if not p95s or max(p95s) <= 0:
        return ""
    return (f" At {biggest} nodes the worst p95 ({max(p95s) * 1000:.0f} ms) is "
            f"{1.0 / max(p95s):.0f} times inside the 1 s target.")


def _para(text: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), width=88, break_on_hyphens=False)


def render(results: list[Result], args: argparse.Namespace, versions: dict[str, str],
           elapsed: float) -> str:
    lines = [SECTION, ""]
    lines += _para(
        "`sudo .venv/bin/python bench/bgp_scale.py` (`--no-write` only prints) runs BIRD "
        "with the configurations of `routing/bird.py` in N network namespaces, no dockerd "
        "and no agent: each node a namespace with a veth into one Linux bridge (its "
        "own namespace), one `bird -f` with its own control socket, one pool "
        f"{POOL.cidr} without encapsulation, one /26 block per node; it rewrites this "
        "section and removes every namespace, bird and file it made.")
    lines.append("")
    lines += _para(
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel "
        f"{platform.release()}, {versions.get('bird', 'BIRD')}; sizes {args.sizes}, "
        f"topologies {args.topologies} (reflectors: the first {args.reflectors} nodes, "
        f"cluster id {CLUSTER_ID}), {args.samples} samples each, {elapsed:.0f} s in all; "
        "convergence = from just before `configure` on the node given a new block to its "
        "route in the kernel of the last other node:")
    lines += [""] + table(results) + [""]
    lines += ["Targets:", ""] + [f"- {v}" for v in verdicts(results)] + [""]
    lines += ["Where a sample's time goes (p50 of each):", ""]
    for item in breakdown(results):
        lines += textwrap.wrap(item, width=88, initial_indent="- ", subsequent_indent="  ",
                               break_on_hyphens=False)
    lines.append("")
    lines += findings(results) + [""]
    lines += _para(
        "Method: one sample gives one node (every node in turn, reflectors included) a "
        "new /26; its configuration is re-rendered with `render_bird_config` and "
        "written, then `configure` is sent "
        + ("with `birdc -s SOCK configure` (`--birdc`). " if args.birdc else
           "on its control socket (birdc's protocol, without starting a birdc, which "
           "would add its own start-up; `--birdc` uses birdc). ")
        + "One rtnetlink "
        "socket per namespace, made inside it before the birds start and read by one "
        "thread, stamps the first RTM_NEWROUTE of each destination with protocol bird "
        "with the monotonic clock the sample started on, so nothing polls 50 routing "
        "tables. Sessions: BGP protocols Established in `show protocols`, after every "
        "session of every node was; memory after the samples: VmRSS of each bird and the "
        "effective Total of `show memory`. Paths per block: `show route where net ~ "
        "[ pool+ ] count` over the same with `primary`, so every path BIRD holds per "
        "block (add-path and reflection give a block several); the networks and each "
        "kernel's `proto bird` routes are checked against the blocks at the end. One run "
        "on a "
        "shared 2-core machine where all N birds compete for the CPU: single samples "
        "swing, p95 of 20 samples is the second-worst.")
    problems = [f"{r.size} {r.topology}: {p}" for r in results for p in r.problems]
    warnings = [f"{r.size} {r.topology}: {w}" for r in results for w in r.warnings]
    if warnings:
        lines += ["", "BIRD's warnings and errors in this run (its log, all levels):", ""]
        lines += [f"- {w}" for w in warnings]
    if problems:
        lines += ["", "Problems seen in this run:", ""]
        lines += [f"- {p.splitlines()[0]}" for p in problems]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,25,50")
    parser.add_argument("--topologies", default="mesh,rr")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--reflectors", type=int, default=2)
    parser.add_argument("--birdc", action="store_true",
                        help="send configure with the birdc command, not on the socket")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: comma-separated integers")
    topologies = args.topologies.split(",")
    if not all(3 <= s <= 250 for s in sizes) or any(t not in TOPOLOGIES for t in topologies):
        parser.error(f"sizes 3-250, topologies from {','.join(TOPOLOGIES)}")
    if not 1 <= args.samples <= 200 or not 1 <= args.reflectors < min(sizes):
        parser.error("samples 1-200; reflectors at least 1 and fewer than the nodes")
    if os.geteuid() != 0:
        parser.error("run as root")
    if shutil.which("bird") is None:
        parser.error("bird (BIRD 2) is not installed")

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    versions = {"bird": run(["bird", "--version"], check=False).stderr.strip()
                or run(["bird", "--version"], check=False).stdout.strip()}
    found = remove_leftovers()
    if found:
        print("removed leftovers of an earlier run: " + "; ".join(found), flush=True)
    began = time.monotonic()
    results: list[Result] = []
    interrupted = False
    try:
        workdir = Path(tempfile.mkdtemp(prefix=PREFIX))
        for size in sizes:
            for topology in topologies:
                print(f"{size} nodes, {topology}:", flush=True)
                results.append(measure(size, topology, args.samples, args.reflectors,
                                       workdir, args.birdc))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        remove_leftovers()
    elapsed = time.monotonic() - began
    leftovers = our_netns() + [f"bird {pid}" for pid in our_birds()] + [
        str(p) for p in our_dirs()]
    if interrupted:
        print("interrupted: " + ("LEFTOVERS: " + ", ".join(leftovers) if leftovers
                                 else "cleaned up, nothing left behind"))
        return 130

    text = render(results, args, versions, elapsed)
    print()
    print(text)
    print(f"total {elapsed:.0f} s")
    if leftovers:
        print("LEFTOVERS: " + ", ".join(leftovers))
    else:
        print(f"nothing left behind: no {PREFIX}* namespace, bird process or directory")
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote the section {SECTION!r} of {BENCHMARKS}")
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
