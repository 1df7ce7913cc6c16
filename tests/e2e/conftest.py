"""End-to-end fixtures: the real plugin (`calico-cnm serve`) serving the real dockerd.

The plugin runs as a child process group on the standard socket names
(calico, calico-ipam) with its own SQLite file, so tests drive it exactly as a
user would: through the Docker CLI.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("calico-cnm"))
IMAGE = "calico-cnm-test:2"
PLUGIN_DIR = "/run/docker/plugins"
STATE_DIR = Path("/var/lib/calico-cnm-e2e")


def run(*args: str, check: bool = True, timeout: float = 60, input: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def docker(*args: str, check: bool = True, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return run("docker", *args, check=check, timeout=timeout)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("plugin", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self._path)


def post_unix(socket_path: str, path: str, body: bytes) -> tuple[int, dict]:
    """POSTs like dockerd does (no Content-Type) and returns (status, JSON reply)."""
    connection = _UnixConnection(socket_path)
    try:
        connection.request("POST", path, body=body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Plugin:
    """One `calico-cnm serve` process group and its settings."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def environment(self) -> dict[str, str]:
        """The process environment: ours, less any datastore settings of the caller."""
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("ETCD_", "CALICO_CNM_"))}
        return {**inherited, **self.env}

    @property
    def sockets(self) -> list[str]:
        names = (self.env.get("CALICO_CNM_NETWORK_DRIVER_NAME", "calico"),
                 self.env.get("CALICO_CNM_IPAM_DRIVER_NAME", "calico-ipam"))
        plugin_dir = self.env.get("CALICO_CNM_PLUGIN_DIR", PLUGIN_DIR)
        return [os.path.join(plugin_dir, f"{n}.sock") for n in names]

    def cli(self, *args: str, check: bool = True, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [CLI, *args], capture_output=True, text=True, timeout=60,
            env=self.environment, input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"calico-cnm {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            [CLI, "serve"], env=self.environment, stdout=log, stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"plugin exited early; log:\n{self.log_path.read_text()}")
            if all(self._answers(s) for s in self.sockets):
                return
            time.sleep(0.1)
        raise AssertionError(f"plugin did not start; log:\n{self.log_path.read_text()}")

    @staticmethod
    def _answers(socket_path: str) -> bool:
        if not os.path.exists(socket_path):
            return False
        try:
            status, body = post_unix(socket_path, "/Plugin.Activate", b"")
        except OSError:
            return False
        return status == 200 and "NetworkDriver" in body.get("Implements", [])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        if sig == signal.SIGKILL:
            # Give orphaned workers time to notice their parent is gone.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _group_alive(self.process.pid):
                time.sleep(0.1)
        self.process = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="session")
def plugin() -> Iterator[Plugin]:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (run them through `make test`)")
    if docker("info", check=False).returncode != 0:
        pytest.fail("no Docker daemon answers; `make test` starts one")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        run("sh", str(REPO / "scripts/build-test-image.sh"), IMAGE)
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    STATE_DIR.mkdir(parents=True)
    env = {
        "CALICO_CNM_SQLITE_PATH": str(STATE_DIR / "state.db"),
        "CALICO_CNM_RESYNC_INTERVAL": "2",
        "CALICO_CNM_STALE_GRACE": "2",
        "CALICO_CNM_LOG_LEVEL": "info",
        "CALICO_CNM_RUN_DIR": str(STATE_DIR / "run"),
        "CALICO_CNM_METRICS_ADDRESS": f"127.0.0.1:{_free_port()}",
    }
    server = Plugin(env, STATE_DIR / "plugin.log")
    server.start()
    # An earlier run's networks keep their subnets in use in Docker's eyes, so this
    # run's fresh datastore would hand them out again and never reclaim them.
    earlier = _remove_calico_networks()
    if earlier:
        print(f"\nWARNING: removed Docker networks an earlier run left: {earlier}",
              file=sys.stderr)
    yield server
    leaked = _remove_calico_networks()
    server.stop()
    if leaked:
        raise AssertionError(f"the end-to-end tests left Docker networks behind: {leaked}")
    # Leave no chains, sets or hooks of ours behind on this host.
    server.cli("uninstall")


class Stack:
    """Containers and networks a test made, removed at the end even on failure."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.containers: list[str] = []
        self.networks: list[str] = []

    def network(self, *args: str, name: str | None = None) -> str:
        name = name or unique("cnm")
        docker("network", "create", "-d", "calico", "--ipam-driver", "calico-ipam", *args, name)
        self.networks.append(name)
        return name

    def container(self, network: str, *args: str, name: str | None = None,
                  command: tuple[str, ...] = ("sleep", "600")) -> str:
        name = name or unique("cnmc")
        self.containers.append(name)
        docker("run", "-d", "--name", name, "--net", network, *args, IMAGE, *command)
        return name

    def exec(self, container: str, *command: str, check: bool = True, timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
        return docker("exec", container, *command, check=check, timeout=timeout)

    def inspect_network(self, name: str) -> dict:
        return json.loads(docker("network", "inspect", name).stdout)[0]

    def address(self, container: str, network: str, family: int = 4) -> str:
        info = json.loads(docker("inspect", container).stdout)[0]
        settings = info["NetworkSettings"]["Networks"][network]
        return settings["IPAddress"] if family == 4 else settings["GlobalIPv6Address"]

    def cleanup(self) -> None:
        """Removes what the test made; a network left behind fails the test, because a
        later plugin sees Docker use its subnet and never reclaims it."""
        if self.containers:
            docker("rm", "-f", *self.containers, check=False)
        left = [n for n in reversed(self.networks) if not remove_network(n)]
        if left:
            raise AssertionError(f"could not remove Docker network(s) {left}")


def remove_network(name: str, timeout: float = 20) -> bool:
    """`docker network rm`, retried while the plugin restarts or an endpoint goes;
    returns whether Docker no longer has the network."""
    deadline = time.monotonic() + timeout
    while True:
        docker("network", "rm", name, check=False)
        if docker("network", "inspect", name, check=False).returncode != 0:
            return True
        if time.monotonic() > deadline:
            return False
        # Endpoints a dockerd restart left on the network keep `rm` refusing.
        for endpoint in docker("network", "inspect", "-f",
                               "{{range .Containers}}{{.Name}} {{end}}", name,
                               check=False).stdout.split():
            docker("network", "disconnect", "-f", name, endpoint, check=False)
        time.sleep(1)


def _calico_networks() -> list[str]:
    """Names of the host Docker's networks on our driver or our IPAM driver."""
    ids = docker("network", "ls", "-q").stdout.split()
    if not ids:
        return []
    found = json.loads(docker("network", "inspect", *ids).stdout)
    return sorted(n["Name"] for n in found
                  if n["Driver"] == "calico" or n["IPAM"]["Driver"] == "calico-ipam")


def _remove_calico_networks() -> list[str]:
    """Removes every network _calico_networks() finds, with its containers; returns
    their names."""
    names = _calico_networks()
    for name in names:
        users = docker("network", "inspect", "-f",
                       "{{range $id, $c := .Containers}}{{$id}} {{end}}", name,
                       check=False).stdout.split()
        if users:
            docker("rm", "-f", *users, check=False)
        if not remove_network(name):
            print(f"\nWARNING: Docker network {name} could not be removed", file=sys.stderr)
    return names


@pytest.fixture
def stack(plugin: Plugin) -> Iterator[Stack]:
    made = Stack(plugin)
    yield made
    made.cleanup()


def host_links(prefix: str = "cali") -> list[str]:
    out = run("ip", "-o", "link", "show").stdout
    names = [line.split(": ")[1].split("@")[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(prefix)]


def host_routes(family: int = 4) -> str:
    return run("ip", f"-{family}", "route", "show").stdout


def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]
