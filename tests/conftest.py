"""Fixtures shared by every test suite."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ETCD_BINARY = "/usr/bin/etcd"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdServer:
    """A single-member etcd on free 127.0.0.1 ports; restartable with its data.

    Tests that need their own server (to stop it) use this class directly;
    everything else uses the session fixture etcd_endpoints.
    """

    def __init__(self, data_dir: Path, tls: tuple[str, str, str] | None = None) -> None:
        """tls: (ca_cert, cert_file, key_file) to serve https and require client certs."""
        binary = ETCD_BINARY if os.path.exists(ETCD_BINARY) else shutil.which("etcd")
        if binary is None:
            pytest.fail(
                f"{ETCD_BINARY} not found: install Debian's etcd-server package "
                "(scripts/install-deps.sh does) or set ETCD_ENDPOINTS to a running etcd",
                pytrace=False,
            )
        self.binary = binary
        self.data_dir = data_dir
        self.tls = tls
        scheme = "https" if tls else "http"
        self.client_url = f"{scheme}://127.0.0.1:{_free_port()}"
        self.peer_url = f"http://127.0.0.1:{_free_port()}"
        self.log_path = data_dir / "etcd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        name = "test"
        tls_flags: list[str] = []
        if self.tls:
            ca_cert, cert_file, key_file = self.tls
            tls_flags = [
                "--trusted-ca-file", ca_cert, "--cert-file", cert_file,
                "--key-file", key_file, "--client-cert-auth",
            ]
        return [
            self.binary,
            "--name", name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"calico-cnm-test-{os.getpid()}",
            *tls_flags,
        ]

    def healthy(self) -> bool:
        context = None
        if self.tls:
            ca_cert, cert_file, key_file = self.tls
            context = ssl.create_default_context(cafile=ca_cert)
            context.load_cert_chain(cert_file, key_file)
        try:
            with urllib.request.urlopen(
                f"{self.client_url}/health", timeout=1.0, context=context
            ) as response:
                return b'"true"' in response.read()
        except (OSError, urllib.error.URLError):
            return False

    def start(self, timeout: float = 30.0) -> None:
        # etcd reads ETCD_* variables as flags and refuses one that shadows a
        # flag; ETCD_UNSUPPORTED_ARCH must not be set on amd64.
        env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            exited = self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                state = "exited" if exited else f"not healthy after {timeout:.0f}s"
                pytest.fail(f"etcd {state}: {' '.join(self.command())}\n{tail}", pytrace=False)
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def etcd_endpoints() -> Iterator[list[str]]:
    """Client URLs of a real etcd v3 server for this test session.

    ETCD_ENDPOINTS (comma-separated URLs) points at an existing server;
    otherwise a single-member etcd is started on free 127.0.0.1 ports with a
    temporary data dir, and removed at the end of the session.
    """
    configured = os.environ.get("ETCD_ENDPOINTS", "").strip()
    if configured:
        yield [url.strip() for url in configured.split(",") if url.strip()]
        return
    data_dir = Path(tempfile.mkdtemp(prefix="calico-cnm-etcd-"))
    server: EtcdServer | None = None
    try:
        server = EtcdServer(data_dir)
        server.start()
        yield [server.client_url]
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
