"""A simulated cluster for multi-host end-to-end tests.

Every simulated host is a network namespace with its own dockerd and its own
`calico-cnm serve`, on a fabric that also lives in namespaces (see DESIGN.md
section 6)::

    cnmh-fabric   two Linux bridges, seg-a and seg-b; a port per host (named after
                  the host: h1, h2, h3) and the router's legs (router-a, router-b)
    cnmh-router   eth-a 10.123.1.1/24 fd00:123:1::1/64 on seg-a,
                  eth-b 10.123.2.1/24 fd00:123:2::1/64 on seg-b, forwarding on;
                  runs etcd on both addresses and 127.0.0.1 (port 2379)
    cnmh-h1, -h2  eth0 10.123.1.11/24, .12 on seg-a; cnmh-h3 eth0 10.123.2.13/24 on
                  seg-b; default routes via the router; forwarding on

A host's mount namespace is held by an "anchor" process (`sleep infinity` inside
the host's network namespace); it has private tmpfs mounts on /run/docker/plugins
(plugin sockets), /run/containerd (dockerd's own containerd and shim sockets) and
/etc/docker (daemon.json, key.json). dockerd and the plugin are started in both of
the host's namespaces with nsenter, so either can be stopped and started again
while the host (and its mounts) stays. Nothing routes out of the fabric: the
router has no default route, so no test traffic can leave these namespaces.

Everything is named with PREFIX ("cnmh-"), so leftovers of a crashed run are found
and removed when the next cluster starts; a lock file keeps two sessions from
using the names at once. Logs are kept in LOG_DIR (rewritten at every start).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("calico-cnm"))
# The managed plugin's name (scripts/build-plugin.sh's default).
MANAGED_PLUGIN = "calico/cnm:latest"
IMAGE = "calico-cnm-test:2"

PREFIX = "cnmh-"
NETNS_DIR = Path("/run/netns")
DATA_ROOT = Path("/var/lib/cnmh")          # per-host data (docker data-root, SQLite)
LOG_DIR = Path("/var/log/cnmh")            # kept after the session for post-mortems
LOCK_PATH = Path("/run/cnmh.lock")
CGROUP_ROOT = Path("/sys/fs/cgroup")
FABRIC_NETNS = PREFIX + "fabric"
ROUTER_NETNS = PREFIX + "router"
ETCD_PORT = 2379

DOCKERD = "/usr/sbin/dockerd"
ETCD = "/usr/bin/etcd"
REQUIRED_TOOLS = ("ip", "nsenter", "unshare", "mount", "containerd", "runc", "docker",
                  "busybox")
# Private per host, each a tmpfs in the host's mount namespace.
# /run/calico-cnm: the plugin's run directory (BIRD's configuration and socket).
PRIVATE_MOUNTS = ("/run/docker/plugins", "/run/containerd", "/etc/docker", "/run/calico-cnm")
DEFAULT_POOLS = "10.124.0.0/16,fd00:124::/48"
# A container's default command: sleeps, but stops at once on SIGTERM (a bare
# `sleep` as PID 1 ignores it, so every stop, and dockerd's shutdown, waits 10 s).
SLEEPER = ("sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Segment:
    """One L2 segment: a bridge in the fabric and a /24 (and /64) the router serves."""

    name: str      # "a"
    net4: str      # "10.123.1"
    net6: str      # "fd00:123:1"

    @property
    def bridge(self) -> str:
        return f"seg-{self.name}"

    @property
    def router_leg(self) -> str:
        return f"eth-{self.name}"

    @property
    def gateway(self) -> str:
        return f"{self.net4}.1"

    @property
    def gateway6(self) -> str:
        return f"{self.net6}::1"

    @property
    def subnet(self) -> str:
        return f"{self.net4}.0/24"

    @property
    def subnet6(self) -> str:
        return f"{self.net6}::/64"


SEGMENT_A = Segment("a", "10.123.1", "fd00:123:1")
SEGMENT_B = Segment("b", "10.123.2", "fd00:123:2")
SEGMENTS = (SEGMENT_A, SEGMENT_B)
# (name, segment, last octet / IPv6 suffix)
DEFAULT_HOSTS: tuple[tuple[str, Segment, int], ...] = (
    ("h1", SEGMENT_A, 11), ("h2", SEGMENT_A, 12), ("h3", SEGMENT_B, 13),
)


class ClusterError(RuntimeError):
    """Something in the simulated cluster did not come up or go away as it should."""


# ------------------------------------------------------------------ small helpers

def run(*args: str, check: bool = True, timeout: float = 60, input: str | bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a command, capturing text output; AssertionError with both streams on failure."""
    text = not isinstance(input, bytes)
    result = subprocess.run(
        list(args), capture_output=True, text=text, timeout=timeout, input=input, env=env,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0,
             interval: float = 0.1) -> bool:
    """Polls predicate until it is true or timeout passes; returns its last truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without settings of ours, Docker's or etcd's, plus extra."""
    dropped = ("ETCD_", "CALICO_CNM_", "DOCKER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["PATH"] = env.get("PATH", "") + ":" + SYSTEM_PATH
    env.update(extra or {})
    return env


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return f"({path} unreadable)"


# ------------------------------------------------------------ network namespaces

_CLONE_NEWNET = 0x40000000


def _setns(netns_path: str) -> None:
    """Moves the calling thread (only) into a network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(netns_path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), netns_path)
    finally:
        os.close(fd)


def netns_connect(netns_path: str, address: tuple[str, int],
                  timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside a network namespace.

    The socket is created by a throwaway thread that entered the namespace (a
    socket keeps the namespace it was created in), so this process stays put.
    """
    outcome: dict[str, object] = {}

    def connect() -> None:
        try:
            _setns(netns_path)
            outcome["socket"] = socket.create_connection(address, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=connect, name="netns-connect", daemon=True)
    worker.start()
    worker.join(timeout + 5)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "socket" not in outcome:
        raise OSError(errno.ETIMEDOUT, f"connect to {address} in {netns_path} hung")
    return outcome["socket"]  # type: ignore[return-value]


class _NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns_path: str, host: str, port: int, timeout: float = 5) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns_path = netns_path

    def connect(self) -> None:
        self.sock = netns_connect(self._netns_path, (self.host, self.port), self.timeout)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _request(connection: http.client.HTTPConnection, method: str, path: str,
             body: bytes | None = None) -> tuple[int, bytes]:
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def post_unix(socket_path: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    """POSTs to a plugin socket like dockerd does (no Content-Type); (status, JSON)."""
    status, data = _request(_UnixHTTPConnection(socket_path), "POST", path, body)
    return status, json.loads(data or b"{}")


class NetnsForwarder:
    """Forwards 127.0.0.1:<port> of this namespace to an address inside another one.

    Lets the test process (in the machine's own namespace) reach etcd in the
    router namespace without any link or route out of the fabric.
    """

    def __init__(self, netns_path: str, target: tuple[str, int]) -> None:
        self.netns_path = netns_path
        self.target = target
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="netns-forwarder",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pair, args=(client,), daemon=True).start()

    def _pair(self, client: socket.socket) -> None:
        try:
            upstream = netns_connect(self.netns_path, self.target)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.settimeout(None)
        with self._lock:
            self._open.update((client, upstream))
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            # The second pump to finish closes both ends.
            with self._lock:
                if source in self._open:
                    self._open.discard(source)
                else:
                    sink.close()
                    source.close()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self._listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()


# ------------------------------------------------- finding (and removing) our things

def netns_names(prefix: str = PREFIX) -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (PID 1 here may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pids_in_netns(netns_paths: Iterable[str]) -> list[int]:
    inodes = {i for i in (_inode(p) for p in netns_paths) if i is not None}
    if not inodes:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            if _inode(f"/proc/{entry}/ns/net") in inodes:
                found.append(int(entry))
    return found


def _our_cgroups(prefix: str = PREFIX) -> list[Path]:
    """Cgroup directories named with prefix (the hosts' --cgroup-parent), deepest first."""
    found: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return found
    hierarchies = [CGROUP_ROOT, *[p for p in CGROUP_ROOT.iterdir() if p.is_dir()]]
    for hierarchy in hierarchies:
        try:
            tops = [p for p in hierarchy.iterdir() if p.name.startswith(prefix) and p.is_dir()]
        except OSError:
            continue
        for top in tops:
            for dirpath, _dirs, _files in os.walk(top):
                found.append(Path(dirpath))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def pids_in_cgroups(prefix: str = PREFIX) -> list[int]:
    pids: set[int] = set()
    for group in _our_cgroups(prefix):
        try:
            pids.update(int(x) for x in (group / "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            pass
    return sorted(pids)


def kill_and_wait(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGKILLs the processes and waits for them; returns any still alive."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=timeout, interval=0.05)
    return [p for p in pids if _alive(p)]


def _our_mounts() -> list[str]:
    """Mount points in this mount namespace that belong to a simulated host."""
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split(" - ")
            point = fields[0].split()[4]
            source = fields[1].split()[1] if len(fields) > 1 else ""
            if (point.startswith((str(DATA_ROOT), f"/run/{PREFIX}"))
                    or source.startswith(PREFIX)):
                points.append(point)
    return points


def _remove_tree(path: Path, timeout: float = 10.0) -> bool:
    """rm -rf that retries while a dying mount namespace still pins a mount point."""
    deadline = time.monotonic() + timeout
    while path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return not path.exists()


def remove_leftovers() -> list[str]:
    """Removes everything named PREFIX: processes, namespaces, cgroups, mounts, dirs.

    Returns what could not be removed. Safe to call when nothing is left.
    """
    problems: list[str] = []
    names = netns_names()
    stubborn = kill_and_wait(
        set(pids_in_netns(str(NETNS_DIR / n) for n in names)) | set(pids_in_cgroups())
    )
    if stubborn:
        problems.append(f"processes that would not die: {stubborn}")
    for name in names:
        result = run("ip", "netns", "delete", name, check=False)
        if result.returncode != 0:
            problems.append(f"ip netns delete {name}: {result.stderr.strip()}")
    for point in reversed(_our_mounts()):
        run("umount", "-l", point, check=False)
    for group in _our_cgroups():
        try:
            group.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cgroup {group}: {exc}")
    for path in [DATA_ROOT, *Path("/run").glob(PREFIX + "*")]:
        if not _remove_tree(path):
            problems.append(f"could not remove {path}")
    return problems


def root_links(prefix: str = "cali") -> list[str]:
    out = run("ip", "-o", "link", "show", check=False).stdout
    names = [line.split(": ")[1].split("@")[0] for line in out.splitlines() if ": " in line]
    return [n for n in names if n.startswith(prefix)]


def preflight() -> list[str]:
    """What this machine lacks for a simulated cluster (empty when all is there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, mounts and dockerd need it)")
    for path, package in ((DOCKERD, "docker.io"), (ETCD, "etcd-server")):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} (Debian package {package})")
    env_path = _environment()["PATH"]
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool, path=env_path) is None:
            missing.append(f"{tool} on PATH")
    if not os.access(CLI, os.X_OK):
        missing.append(f"{CLI} (install the project into the venv)")
    if not Path("/proc/self/ns/mnt").exists():
        missing.append("mount namespaces (/proc/self/ns/mnt)")
    return missing


# ------------------------------------------------------------------------ hosts

class Machine:
    """A machine of the cluster: its network namespace on a segment, its addresses
    and its run directory (/run/cnmh-NAME)."""

    def __init__(self, cluster: Cluster, name: str, segment: Segment, octet: int) -> None:
        self.cluster = cluster
        self.name = name
        self.segment = segment
        self.netns = PREFIX + name
        self.netns_path = str(NETNS_DIR / self.netns)
        self.address = f"{segment.net4}.{octet}"
        self.address6 = f"{segment.net6}::{octet}"
        self.run_dir = Path(f"/run/{PREFIX}{name}")

    def sh(self, *args: str, check: bool = True, timeout: float = 30,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        """A command inside this machine's network namespace (the machine's filesystem)."""
        return run("nsenter", f"--net={self.netns_path}", "--", *args, check=check,
                   timeout=timeout, input=input, env=_environment())


class Host(Machine):
    """One simulated host: a network namespace, a private mount namespace held by an
    anchor process, a dockerd and a `calico-cnm serve` inside both."""

    def __init__(self, cluster: Cluster, name: str, segment: Segment, octet: int) -> None:
        super().__init__(cluster, name, segment, octet)
        self.cidr = f"{self.address}/24"
        self.cidr6 = f"{self.address6}/64"
        self.gateway = segment.gateway
        self.gateway6 = segment.gateway6
        self.fabric_port = name            # this host's port on its bridge in the fabric
        self.data_dir = DATA_ROOT / name
        self.docker_socket = self.run_dir / "docker.sock"
        self.docker_host = f"unix://{self.docker_socket}"
        self.sqlite_path = self.data_dir / "state.db"
        self.cgroup_parent = f"/{PREFIX}{name}"
        self.etcd_endpoint = f"http://{segment.gateway}:{ETCD_PORT}"
        self.plugin_log_path = LOG_DIR / f"{name}-plugin.log"
        self.dockerd_log_path = LOG_DIR / f"{name}-dockerd.log"
        self.anchor_log_path = LOG_DIR / f"{name}-anchor.log"
        # Extra plugin environment for this host (applies at the next plugin_start()).
        self.plugin_env: dict[str, str] = {}
        # Extra dockerd flags for this host (apply at the next dockerd_start()).
        self.dockerd_flags: list[str] = []
        self.anchor: subprocess.Popen[bytes] | None = None
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.plugin: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address}>"

    # ---- entering the host
    @property
    def mount_ns(self) -> str:
        if self.anchor is None:
            raise ClusterError(f"{self.name} has no mount namespace (not started)")
        return f"/proc/{self.anchor.pid}/ns/mnt"

    def _nsenter(self, mount: bool = True) -> list[str]:
        flags = [f"--mount={self.mount_ns}"] if mount else []
        return ["nsenter", *flags, f"--net={self.netns_path}", "--"]

    def path(self, path: str) -> str:
        """A path as this host's mount namespace sees it, reachable from outside."""
        if self.anchor is None:
            raise ClusterError(f"{self.name} is not started")
        return f"/proc/{self.anchor.pid}/root{path}"

    def ping(self, address: str, count: int = 1, timeout: int = 2,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Pings from this host's namespace (busybox ping; -6 for IPv6 addresses)."""
        family = ["-6"] if ":" in address else []
        return self.sh("busybox", "ping", *family, "-c", str(count), "-W", str(timeout),
                       address, check=check, timeout=count * timeout + 10)

    def links(self, prefix: str = "") -> list[str]:
        out = run("ip", "-n", self.netns, "-o", "link", "show").stdout
        names = [line.split(": ")[1].split("@")[0] for line in out.splitlines()]
        return [n for n in names if n.startswith(prefix)]

    def set_uplink(self, up: bool) -> None:
        """Cuts (or restores) this host's cable: its port on the fabric bridge."""
        run("ip", "-n", FABRIC_NETNS, "link", "set", self.fabric_port,
            "up" if up else "down")

    def routes(self, family: int = 4, table: str = "main") -> str:
        return run("ip", "-n", self.netns, f"-{family}", "route", "show", "table",
                   table).stdout

    # ---- Docker
    def docker(self, *args: str, check: bool = True, timeout: float = 60,
               input: str | bytes | None = None) -> subprocess.CompletedProcess[str]:
        """The Docker CLI against this host's dockerd."""
        return run("docker", "-H", self.docker_host, *args, check=check, timeout=timeout,
                   input=input, env=_environment())

    def docker_ping(self) -> bool:
        try:
            status, _ = _request(_UnixHTTPConnection(str(self.docker_socket), timeout=2),
                                 "GET", "/_ping")
        except OSError:
            return False
        return status == 200

    def inspect(self, *names: str, kind: str = "container") -> list[dict]:
        return json.loads(self.docker(kind, "inspect", *names).stdout)

    def has_network(self, name: str) -> bool:
        return self.docker("network", "inspect", name, check=False).returncode == 0

    def containers(self) -> list[str]:
        return self.docker("ps", "-aq").stdout.split()

    def networks(self, driver: str | None = None) -> list[str]:
        out = self.docker("network", "ls", "--format", "{{.Name}} {{.Driver}}").stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        return [n for n, d in rows if driver is None or d == driver]

    def dockerd_command(self) -> list[str]:
        return [
            DOCKERD,
            "--data-root", str(self.data_dir / "docker"),
            "--exec-root", str(self.run_dir / "exec"),
            "--pidfile", str(self.run_dir / "docker.pid"),
            "-H", self.docker_host,
            "--bridge=none",
            "--cgroup-parent", self.cgroup_parent,
            *self.dockerd_flags,
        ]

    def dockerd_start(self, timeout: float = 30) -> None:
        self._dockerd_spawn()
        self._dockerd_wait(timeout)

    def _dockerd_spawn(self) -> None:
        if self.dockerd is not None and self.dockerd.poll() is None:
            raise ClusterError(f"dockerd of {self.name} already runs")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.dockerd_log_path, "ab") as log:
            log.write(f"=== dockerd start {time.ctime()} ===\n".encode())
            log.flush()
            self.dockerd = subprocess.Popen(
                [*self._nsenter(), *self.dockerd_command()], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, env=_environment(), cwd="/",
                start_new_session=True,
            )

    def _dockerd_wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.docker_ping():
            if self.dockerd is None or self.dockerd.poll() is not None:
                raise ClusterError(f"dockerd of {self.name} exited:\n"
                                   f"{_tail(self.dockerd_log_path)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"dockerd of {self.name} did not answer in {timeout}s:\n"
                                   f"{_tail(self.dockerd_log_path)}")
            time.sleep(0.05)

    def dockerd_stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Stops dockerd (SIGTERM stops its containers and containerd; SIGKILL does not,
        which leaves containers running as after a crash)."""
        if self.dockerd is None:
            return
        try:
            os.kill(self.dockerd.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.dockerd.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.dockerd.pid, signal.SIGKILL)
            self.dockerd.wait(timeout=10)
        self.dockerd = None

    def dockerd_log(self) -> str:
        return self.dockerd_log_path.read_text(errors="replace")

    # ---- the plugin
    def settings_env(self) -> dict[str, str]:
        """The plugin's settings, as environment variables (used by serve and cli)."""
        return {
            "CALICO_CNM_HOSTNAME": self.name,
            "ETCD_ENDPOINTS": self.etcd_endpoint,
            "CALICO_CNM_SQLITE_PATH": str(self.sqlite_path),
            "DOCKER_HOST": self.docker_host,
            "CALICO_CNM_RESYNC_INTERVAL": "2",
            "CALICO_CNM_STALE_GRACE": "2",
            "CALICO_CNM_DEFAULT_POOLS": self.cluster.default_pools,
            "CALICO_CNM_LOG_LEVEL": "info",
            **self.cluster.plugin_env,
            **self.plugin_env,
        }

    @property
    def plugin_sockets(self) -> list[str]:
        """The plugin's sockets, reachable from the test process."""
        env = self.settings_env()
        plugin_dir = env.get("CALICO_CNM_PLUGIN_DIR", "/run/docker/plugins")
        names = (env.get("CALICO_CNM_NETWORK_DRIVER_NAME", "calico"),
                 env.get("CALICO_CNM_IPAM_DRIVER_NAME", "calico-ipam"))
        return [self.path(f"{plugin_dir}/{n}.sock") for n in names]

    def cli(self, *args: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """`calico-cnm ARGS` inside this host's namespaces, with its plugin's settings."""
        result = run(*self._nsenter(), CLI, *args, check=False, timeout=timeout,
                     input=input, env=_environment(self.settings_env()))
        if check and result.returncode != 0:
            raise AssertionError(
                f"[{self.name}] calico-cnm {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def plugin_running(self) -> bool:
        return self.plugin is not None and self.plugin.poll() is None

    def plugin_answers(self) -> bool:
        for path in self.plugin_sockets:
            try:
                status, body = post_unix(path, "/Plugin.Activate")
            except (OSError, ValueError, http.client.HTTPException):
                return False
            if status != 200 or not body.get("Implements"):
                return False
        return True

    def plugin_start(self, timeout: float = 30) -> None:
        """Starts `calico-cnm serve` and waits until both sockets answer Activate."""
        self._plugin_spawn()
        self._plugin_wait(timeout)

    def _plugin_spawn(self) -> None:
        if self.plugin_running():
            raise ClusterError(f"the plugin of {self.name} already runs")
        env = self.settings_env()
        command = [CLI, "serve", "--hostname", self.name,
                   "--etcd-endpoints", env["ETCD_ENDPOINTS"],
                   "--sqlite-path", env["CALICO_CNM_SQLITE_PATH"]]
        with open(self.plugin_log_path, "ab") as log:
            log.write(f"=== plugin start {time.ctime()} ===\n".encode())
            log.flush()
            self.plugin = subprocess.Popen(
                [*self._nsenter(), *command], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, env=_environment(env), cwd="/",
                start_new_session=True,
            )

    def _plugin_wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.plugin_answers():
            if not self.plugin_running():
                raise ClusterError(f"the plugin of {self.name} exited:\n"
                                   f"{_tail(self.plugin_log_path)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"the plugin of {self.name} did not answer in "
                                   f"{timeout}s:\n{_tail(self.plugin_log_path)}")
            time.sleep(0.05)

    def plugin_kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        """Sends sig to the plugin's whole process group and waits for it to end."""
        if self.plugin is None:
            return
        pgid = self.plugin.pid
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        try:
            self.plugin.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.plugin.wait(timeout=10)
        # Workers and the agent may outlive the master for a moment.
        if not wait_for(lambda: not _group_alive(pgid), timeout=10, interval=0.05):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_for(lambda: not _group_alive(pgid), timeout=5, interval=0.05)
        self.plugin = None

    def plugin_stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL after timeout."""
        self.plugin_kill(signal.SIGTERM, timeout=timeout)

    def plugin_log(self) -> str:
        return self.plugin_log_path.read_text(errors="replace")

    # ---- the managed plugin (in place of `calico-cnm serve`)
    @property
    def managed_state_dir(self) -> Path:
        """The managed plugin's state mount on this host (its /var/lib/calico-cnm)."""
        return self.data_dir / "managed-state"

    def managed_settings(self) -> list[str]:
        """`docker plugin set` arguments: what settings_env() gives `serve`, as env
        values and mount sources."""
        state = self.managed_state_dir
        return [
            f"ETCD_ENDPOINTS={self.etcd_endpoint}",
            f"CALICO_CNM_HOSTNAME={self.name}",
            "CALICO_CNM_RESYNC_INTERVAL=2",
            "CALICO_CNM_STALE_GRACE=2",
            f"CALICO_CNM_DEFAULT_POOLS={self.cluster.default_pools}",
            f"state.source={state}",
            f"docker-socket.source={self.docker_socket}",
            f"etcd-tls.source={state / 'tls'}",
        ]

    def managed_create(self, plugin_dir: Path, enable: bool = True,
                       name: str = MANAGED_PLUGIN) -> None:
        """`docker plugin create` from an assembled plugin directory, set, enable."""
        (self.managed_state_dir / "tls").mkdir(parents=True, exist_ok=True)
        self.docker("plugin", "create", name, str(plugin_dir), timeout=300)
        self.docker("plugin", "set", name, *self.managed_settings())
        if enable:
            self.docker("plugin", "enable", name, timeout=60)

    def managed_remove(self, name: str = MANAGED_PLUGIN) -> None:
        self.docker("plugin", "disable", "-f", name, check=False, timeout=60)
        self.docker("plugin", "rm", "-f", name, check=False, timeout=60)

    def managed_pids(self) -> list[int]:
        """The managed plugin's `calico-cnm serve` processes (master, workers, agent)
        in this host's network namespace; the legacy plugin must not be running."""
        found = []
        for pid in pids_in_netns([self.netns_path]):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"plugin.cli" in cmdline and b"serve" in cmdline:
                found.append(pid)
        return found

    def managed_master_pid(self) -> int | None:
        """The managed plugin's gunicorn master: the serve process whose parent is not
        one (PID 1 of the plugin's container)."""
        pids = set(self.managed_pids())
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) not in pids:
                return pid
        return None

    # ---- the host itself
    def _anchor_spawn(self) -> None:
        mounts = "; ".join(
            f"mkdir -p {p} && mount -t tmpfs -o mode=0755 {self.netns} {p}"
            for p in PRIVATE_MOUNTS
        )
        script = f"set -e; {mounts}; exec nsenter --net={self.netns_path} sleep infinity"
        with open(self.anchor_log_path, "ab") as log:
            self.anchor = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=_environment(),
                cwd="/", start_new_session=True,
            )

    def _anchor_wait(self, timeout: float = 10) -> None:
        target = _inode(self.netns_path)
        anchor = self.anchor
        assert anchor is not None
        if not wait_for(lambda: anchor.poll() is None
                        and _inode(f"/proc/{anchor.pid}/ns/net") == target,
                        timeout=timeout, interval=0.01):
            raise ClusterError(f"the mount namespace of {self.name} did not come up:\n"
                               f"{_tail(self.anchor_log_path)}")

    def remove_workloads(self) -> None:
        """Removes every container and every non-builtin network on this host."""
        if not self.docker_ping():
            return
        ids = self.containers()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=120)
        for network in self.networks():
            if network not in ("none", "host", "bridge"):
                self.docker("network", "rm", network, check=False)


class BareNode(Machine):
    """A node with no Docker: a network namespace on a segment that runs only
    `calico-cnm agent` (a route reflector, say)."""

    def __init__(self, cluster: Cluster, name: str, segment: Segment, octet: int) -> None:
        super().__init__(cluster, name, segment, octet)
        self.log_path = LOG_DIR / f"{name}-agent.log"
        self.agent: subprocess.Popen[bytes] | None = None

    def create(self) -> None:
        run("ip", "netns", "add", self.netns)
        self.cluster._sysctl(self.netns)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cluster._ip_batch(self.cluster.fabric_netns, [
            f"link add {self.name} type veth peer name eth0 netns {self.netns}",
            f"link set {self.name} master {self.segment.bridge} up",
        ])
        self.cluster._ip_batch(self.netns, [
            "link set lo up", "link set eth0 up",
            f"addr add {self.address}/24 dev eth0",
            f"addr add {self.address6}/64 dev eth0 nodad",
            f"route add default via {self.segment.gateway}",
            f"route add ::/0 via {self.segment.gateway6}",
        ])

    def settings_env(self) -> dict[str, str]:
        return {
            "CALICO_CNM_HOSTNAME": self.name,
            "ETCD_ENDPOINTS": f"http://{self.segment.gateway}:{ETCD_PORT}",
            "CALICO_CNM_SQLITE_PATH": str(self.run_dir / "unused.db"),
            "CALICO_CNM_RUN_DIR": str(self.run_dir / "calico-cnm"),
            "DOCKER_HOST": f"unix://{self.run_dir}/no-docker.sock",
            "CALICO_CNM_SYNC_NETWORKS": "false",
            "CALICO_CNM_RESYNC_INTERVAL": "2",
            "CALICO_CNM_LOG_LEVEL": "info",
            **self.cluster.plugin_env,
        }

    def cli(self, *args: str, check: bool = True, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        result = run("nsenter", f"--net={self.netns_path}", "--", CLI, *args, check=False,
                     timeout=timeout, env=_environment(self.settings_env()))
        if check and result.returncode != 0:
            raise AssertionError(f"[{self.name}] calico-cnm {' '.join(args)} exited "
                                 f"{result.returncode}\n{result.stdout}\n{result.stderr}")
        return result

    def agent_start(self, *flags: str) -> None:
        if self.agent is not None and self.agent.poll() is None:
            raise ClusterError(f"the agent of {self.name} already runs")
        with open(self.log_path, "ab") as log:
            self.agent = subprocess.Popen(
                ["nsenter", f"--net={self.netns_path}", "--", CLI, "agent",
                 "--hostname", self.name, *flags],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env=_environment(self.settings_env()), cwd="/", start_new_session=True)

    def agent_stop(self, timeout: float = 15) -> None:
        if self.agent is None:
            return
        self.agent.terminate()
        try:
            self.agent.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait(timeout=10)
        self.agent = None

    def destroy(self) -> None:
        """Stops the agent, kills what is left in the namespace, removes it all."""
        self.agent_stop()
        kill_and_wait(pids_in_netns([self.netns_path]))
        run("ip", "netns", "del", self.netns, check=False)
        run("ip", "-n", self.cluster.fabric_netns, "link", "del", self.name, check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process is in the process group."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            try:
                if os.getpgid(int(entry)) == pgid:
                    return True
            except OSError:
                continue
    return False


# ---------------------------------------------------------------------- cluster

class Cluster:
    """The fabric, the router with etcd, and the hosts; start() and stop()."""

    def __init__(self, hosts: Sequence[tuple[str, Segment, int]] = DEFAULT_HOSTS,
                 default_pools: str = DEFAULT_POOLS, image: str = IMAGE,
                 plugin_env: dict[str, str] | None = None) -> None:
        self.default_pools = default_pools
        self.image = image
        self.plugin_env: dict[str, str] = dict(plugin_env or {})  # for every host
        self.hosts = [Host(self, name, segment, octet) for name, segment, octet in hosts]
        self.segments = sorted({h.segment for h in self.hosts} | set(SEGMENTS),
                               key=lambda s: s.name)
        self.fabric_netns = FABRIC_NETNS
        self.router_netns = ROUTER_NETNS
        self.router_netns_path = str(NETNS_DIR / ROUTER_NETNS)
        self.etcd_endpoints = [f"http://{s.gateway}:{ETCD_PORT}" for s in self.segments]
        self.etcd_log_path = LOG_DIR / "etcd.log"
        self.etcd: subprocess.Popen[bytes] | None = None
        self.forwarder: NetnsForwarder | None = None
        self.timings: dict[str, float] = {}
        self._lock_file: TextIO | None = None
        self._root_links_before: set[str] = set()
        # Mount points the anchors create on the machine's /run (e.g. /run/calico-cnm).
        self._mount_points_made: list[Path] = []

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} (hosts: {[h.name for h in self.hosts]})")

    @property
    def etcd_local_endpoint(self) -> str:
        """etcd as the test process (outside the fabric) reaches it, through a forwarder."""
        if self.forwarder is None:
            raise ClusterError("the cluster is not started")
        return self.forwarder.url

    def router_sh(self, *args: str, check: bool = True, timeout: float = 30
                  ) -> subprocess.CompletedProcess[str]:
        return run("nsenter", f"--net={self.router_netns_path}", "--", *args, check=check,
                   timeout=timeout, env=_environment())

    def fabric_sh(self, *args: str, check: bool = True, timeout: float = 30
                  ) -> subprocess.CompletedProcess[str]:
        return run("nsenter", f"--net={NETNS_DIR / FABRIC_NETNS}", "--", *args,
                   check=check, timeout=timeout, env=_environment())

    # ---- start
    def start(self) -> None:
        """Brings the whole cluster up; on any failure removes what it made and raises."""
        missing = preflight()
        if missing:
            raise ClusterError("the simulated cluster needs: " + "; ".join(missing))
        self._lock()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _lock(self, timeout: float = 900) -> None:
        handle = open(LOCK_PATH, "a+")  # noqa: SIM115 - held for the whole session
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    print(f"waiting for {LOCK_PATH}: another session runs a simulated "
                          "cluster", file=sys.stderr)
                    waited = True
                if time.monotonic() > deadline:
                    handle.seek(0)
                    holder = handle.read().strip()
                    handle.close()
                    raise ClusterError(
                        f"{LOCK_PATH} is held by another test session ({holder}) "
                        f"for more than {timeout:.0f}s"
                    ) from None
                time.sleep(0.5)
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def _phase(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - started, 3)
        return now

    def _start(self) -> None:
        begin = mark = time.monotonic()
        problems = remove_leftovers()
        if problems:
            raise ClusterError("leftovers of an earlier run remain: " + "; ".join(problems))
        for path in (LOG_DIR, DATA_ROOT):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        for host in self.hosts:
            host.data_dir.mkdir(parents=True)
            host.run_dir.mkdir(parents=True)
        self._root_links_before = set(root_links())
        self._mount_points_made = [Path(p) for p in PRIVATE_MOUNTS if not Path(p).exists()]
        mark = self._phase("cleanup", mark)

        self._make_fabric()
        mark = self._phase("fabric", mark)

        with ThreadPoolExecutor(max_workers=8) as pool:
            image = pool.submit(self._image_archive)
            self._etcd_spawn()
            for host in self.hosts:
                host._anchor_spawn()
            for host in self.hosts:
                host._anchor_wait()
                host._dockerd_spawn()
            for future in [pool.submit(h._dockerd_wait, 30) for h in self.hosts]:
                future.result()
            mark = self._phase("dockerd", mark)
            archive = image.result()
            if archive is None:  # the machine's dockerd cannot supply it: build into h1
                archive = self._build_into(self.hosts[0])
            for future in [pool.submit(self._load_image, h, archive) for h in self.hosts]:
                future.result()
            mark = self._phase("image", mark)
            self._etcd_wait()
            mark = self._phase("etcd", mark)
            for host in self.hosts:
                host._plugin_spawn()
            for future in [pool.submit(h._plugin_wait, 60) for h in self.hosts]:
                future.result()
            mark = self._phase("plugins", mark)
        self.forwarder = NetnsForwarder(self.router_netns_path, ("127.0.0.1", ETCD_PORT))
        self.timings["total"] = round(time.monotonic() - begin, 3)
        (LOG_DIR / "timings.json").write_text(json.dumps(self.timings, indent=1))

    def _make_fabric(self) -> None:
        for name in [FABRIC_NETNS, ROUTER_NETNS, *(h.netns for h in self.hosts)]:
            run("ip", "netns", "add", name)
        for name in [ROUTER_NETNS, *(h.netns for h in self.hosts)]:
            self._sysctl(name)  # before the links arrive: accept_dad=0 for new links
        # The fabric is pure L2: no addresses, no IPv6 chatter of its own.
        run("nsenter", f"--net={NETNS_DIR / FABRIC_NETNS}", "--", "sysctl", "-q", "-w",
            "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        fabric = []
        for segment in self.segments:
            fabric += [
                f"link add {segment.bridge} type bridge stp_state 0 forward_delay 0 "
                "mcast_snooping 0",
                f"link set {segment.bridge} up",
                f"link add router-{segment.name} type veth peer name {segment.router_leg} "
                f"netns {ROUTER_NETNS}",
                f"link set router-{segment.name} master {segment.bridge} up",
            ]
        for host in self.hosts:
            fabric += [
                f"link add {host.fabric_port} type veth peer name eth0 netns {host.netns}",
                f"link set {host.fabric_port} master {host.segment.bridge} up",
            ]
        router = ["link set lo up"]
        for segment in self.segments:
            router += [
                f"link set {segment.router_leg} up",
                f"addr add {segment.gateway}/24 dev {segment.router_leg}",
                f"addr add {segment.gateway6}/64 dev {segment.router_leg} nodad",
            ]
        self._ip_batch(FABRIC_NETNS, fabric)
        self._ip_batch(ROUTER_NETNS, router)
        for host in self.hosts:
            self._ip_batch(host.netns, [
                "link set lo up",
                "link set eth0 up",
                f"addr add {host.cidr} dev eth0",
                f"addr add {host.cidr6} dev eth0 nodad",
                f"route add default via {host.gateway}",
                f"route add ::/0 via {host.gateway6}",
            ])

    @staticmethod
    def _ip_batch(netns: str, commands: list[str]) -> None:
        run("ip", "-n", netns, "-batch", "-", input="\n".join(commands) + "\n")

    @staticmethod
    def _sysctl(netns: str) -> None:
        run("nsenter", f"--net={NETNS_DIR / netns}", "--", "sysctl", "-q", "-w",
            "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.accept_dad=0")

    # ---- etcd in the router
    def _etcd_spawn(self) -> None:
        data = DATA_ROOT / "etcd"
        clients = [f"http://127.0.0.1:{ETCD_PORT}", *self.etcd_endpoints]
        peer = f"http://127.0.0.1:{ETCD_PORT + 1}"
        command = [
            ETCD, "--name", "router", "--data-dir", str(data),
            "--listen-client-urls", ",".join(clients),
            "--advertise-client-urls", ",".join(self.etcd_endpoints),
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"router={peer}", "--initial-cluster-state", "new",
            "--initial-cluster-token", f"cnmh-{os.getpid()}",
        ]
        with open(self.etcd_log_path, "ab") as log:
            self.etcd = subprocess.Popen(
                ["nsenter", f"--net={self.router_netns_path}", "--", *command],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=_environment(),
                cwd="/", start_new_session=True,
            )

    def etcd_healthy(self) -> bool:
        connection = _NetnsHTTPConnection(self.router_netns_path, "127.0.0.1", ETCD_PORT, 2)
        try:
            status, body = _request(connection, "GET", "/health")
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and b'"true"' in body

    def _etcd_wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.etcd_healthy():
            if self.etcd is None or self.etcd.poll() is not None:
                raise ClusterError(f"etcd exited:\n{_tail(self.etcd_log_path)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"etcd not healthy in {timeout}s:\n"
                                   f"{_tail(self.etcd_log_path)}")
            time.sleep(0.05)

    def etcd_stop(self) -> None:
        if self.etcd is None:
            return
        self.etcd.terminate()
        try:
            self.etcd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.etcd.kill()
            self.etcd.wait(timeout=10)
        self.etcd = None

    # ---- the test image
    def _image_archive(self) -> bytes | None:
        """`docker save` of the image from the machine's dockerd (built there if missing);
        None when the machine has no dockerd answering."""
        env = _environment()
        if run("docker", "info", check=False, env=env, timeout=30).returncode != 0:
            return None
        if run("docker", "image", "inspect", self.image, check=False, env=env).returncode:
            run("sh", str(REPO / "scripts/build-test-image.sh"), self.image, env=env,
                timeout=300)
        saved = subprocess.run(["docker", "save", self.image], capture_output=True,
                               env=env, timeout=120, check=False)
        if saved.returncode != 0:
            raise ClusterError(f"docker save {self.image}: {saved.stderr.decode()}")
        return saved.stdout

    def _build_into(self, host: Host) -> bytes:
        run("sh", str(REPO / "scripts/build-test-image.sh"), self.image, timeout=300,
            env=_environment({"DOCKER_HOST": host.docker_host}))
        saved = subprocess.run(["docker", "-H", host.docker_host, "save", self.image],
                               capture_output=True, env=_environment(), timeout=120,
                               check=True)
        return saved.stdout

    def _load_image(self, host: Host, archive: bytes) -> None:
        if host.docker("image", "inspect", self.image, check=False).returncode == 0:
            return
        host.docker("load", input=archive, timeout=120)

    # ---- stop
    def stop(self) -> list[str]:
        """Removes everything the cluster made; returns what could not be removed."""
        problems: list[str] = []
        begin = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, len(self.hosts))) as pool:
            steps: list[Callable[[Host], None]] = [
                Host.remove_workloads, Host.plugin_stop, Host.dockerd_stop,
            ]
            for step in steps:
                mark = time.monotonic()
                for host, future in [(h, pool.submit(_guarded, step, h)) for h in self.hosts]:
                    error = future.result()
                    if error:
                        problems.append(f"{host.name}: {step.__name__}: {error}")
                self.timings[f"stop:{step.__name__}"] = round(time.monotonic() - mark, 3)
        if self.forwarder is not None:
            self.forwarder.close()
            self.forwarder = None
        self.etcd_stop()
        for host in self.hosts:
            if host.anchor is not None:
                host.anchor.kill()
                host.anchor.wait(timeout=10)
                host.anchor = None
        for path in self._mount_points_made:
            try:
                path.rmdir()  # only if empty: nothing of the machine's is removed
            except OSError:
                pass
        mark = time.monotonic()
        problems += remove_leftovers()
        problems += self.leftovers()
        self.timings["stop:leftovers"] = round(time.monotonic() - mark, 3)
        self.timings["stop"] = round(time.monotonic() - begin, 3)
        if LOG_DIR.is_dir():
            (LOG_DIR / "timings.json").write_text(json.dumps(self.timings, indent=1))
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        return problems

    def leftovers(self) -> list[str]:
        """What of ours is still there (namespaces, processes, links, mounts, dirs)."""
        found = []
        names = netns_names()
        if names:
            found.append(f"namespaces {names}")
        daemons = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or not _alive(int(entry)):
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(DATA_ROOT).encode() in cmdline or f"/run/{PREFIX}".encode() in cmdline:
                daemons.append(f"{entry}: {cmdline.decode(errors='replace')[:80]}")
        if daemons:
            found.append(f"processes {daemons}")
        new_links = set(root_links()) - self._root_links_before
        if new_links:
            found.append(f"cali* links in the machine's namespace: {sorted(new_links)}")
        if _our_mounts():
            found.append(f"mounts {_our_mounts()}")
        if DATA_ROOT.exists() or list(Path("/run").glob(PREFIX + "*")):
            found.append("data or run directories")
        return found


def _guarded(step: Callable[[Host], None], host: Host) -> str | None:
    try:
        step(host)
    except Exception as exc:  # noqa: BLE001 - teardown goes on and reports
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------ per-test workloads

@dataclass
class Container:
    host: Host
    name: str
    network: str

    def inspect(self) -> dict:
        return self.host.inspect(self.name)[0]

    def address(self, network: str | None = None, family: int = 4) -> str:
        """The container's address on a network (its first network by default)."""
        networks = self.inspect()["NetworkSettings"]["Networks"]
        settings = networks[network or self.network]
        return settings["IPAddress"] if family == 4 else settings["GlobalIPv6Address"]

    @property
    def ipv4(self) -> str:
        return self.address(family=4)

    @property
    def ipv6(self) -> str:
        return self.address(family=6)

    def exec(self, *command: str, check: bool = True, timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
        return self.host.docker("exec", self.name, *command, check=check, timeout=timeout)

    def ping(self, address: str, count: int = 1, timeout: int = 2,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        family = ["-6"] if ":" in address else []
        return self.exec("ping", *family, "-c", str(count), "-W", str(timeout), address,
                         check=check, timeout=count * timeout + 10)


class Stack:
    """Networks and containers a test made on any host; cleanup() removes them all."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.containers: list[Container] = []
        self.networks: list[tuple[Host, str]] = []

    def _host(self, host: Host | str) -> Host:
        return host if isinstance(host, Host) else self.cluster.host(host)

    def network(self, host: Host | str, *args: str, name: str | None = None,
                driver: str = "calico", ipam_driver: str | None = "calico-ipam") -> str:
        """`docker network create -d calico --ipam-driver calico-ipam ARGS NAME` on host."""
        host = self._host(host)
        name = name or unique("cnmh")
        ipam = ["--ipam-driver", ipam_driver] if ipam_driver else []
        self.networks.append((host, name))
        host.docker("network", "create", "-d", driver, *ipam, *args, name)
        return name

    def wait_network(self, host: Host | str, name: str, timeout: float = 15) -> None:
        """Waits until a network (e.g. one synchronised from another host) exists on host."""
        host = self._host(host)
        if not wait_for(lambda: host.has_network(name), timeout=timeout, interval=0.25):
            raise AssertionError(f"network {name} did not appear on {host.name}")

    def container(self, host: Host | str, network: str, *args: str, name: str | None = None,
                  command: Sequence[str] = SLEEPER) -> Container:
        """`docker run -d --name NAME --net NETWORK ARGS IMAGE COMMAND` on host."""
        host = self._host(host)
        made = Container(host, name or unique("cnmhc"), network)
        self.containers.append(made)
        host.docker("run", "-d", "--name", made.name, "--net", network, *args,
                    self.cluster.image, *command, timeout=120)
        return made

    def exec(self, container: Container, *command: str, check: bool = True,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return container.exec(*command, check=check, timeout=timeout)

    def address(self, container: Container, network: str | None = None,
                family: int = 4) -> str:
        return container.address(network, family)

    def cleanup(self, timeout: float = 20) -> None:
        """Removes the containers, then each network on its own host first and then on
        every other host (where the plugin may have synchronised it), until none has it."""
        by_host: dict[str, list[str]] = {}
        for container in self.containers:
            by_host.setdefault(container.host.name, []).append(container.name)
        for host_name, names in by_host.items():
            self.cluster.host(host_name).docker("rm", "-f", *names, check=False,
                                                timeout=120)
        for host, name in reversed(self.networks):
            host.docker("network", "rm", name, check=False)
        names = {name for _, name in self.networks}

        def gone() -> bool:
            remaining = False
            for host in self.cluster.hosts:
                if not host.docker_ping():
                    continue
                present = names & set(host.networks())
                for name in present:
                    remaining = True
                    host.docker("network", "rm", name, check=False)
            return not remaining

        if names:
            wait_for(gone, timeout=timeout, interval=0.5)
        self.containers.clear()
        self.networks.clear()
