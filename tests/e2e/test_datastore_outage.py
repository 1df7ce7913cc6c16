"""etcd frozen (SIGSTOP) and stopped under a running plugin: every driver call answers
a clear error naming etcd within 5 s, nothing is half-written, and the same plugin
works again once etcd is back, without a restart. With three members, killing one
interrupts nothing: the client fails over across the endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ETCD_BINARY, EtcdServer, _free_port
from tests.e2e.conftest import Plugin, post_unix, wait_for

SOCKET_NAME = "calico-outage"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Plugin, EtcdServer]]:
    etcd = EtcdServer(tmp_path / "etcd")
    (tmp_path / "etcd").mkdir()
    etcd.start()
    env = {
        "CALICO_CNM_PLUGIN_DIR": str(tmp_path / "plugins"),
        "ETCD_ENDPOINTS": etcd.client_url,
        "CALICO_CNM_NETWORK_DRIVER_NAME": SOCKET_NAME,
        "CALICO_CNM_IPAM_DRIVER_NAME": SOCKET_NAME,
        "CALICO_CNM_DEFAULT_POOLS": "10.212.0.0/16",
        "CALICO_CNM_HOSTNAME": "outage-host",
        "CALICO_CNM_RUN_AGENT": "false",  # the main plugin's agent owns this host
    }
    plugin = Plugin(env, tmp_path / "plugin.log")
    plugin.start()
    try:
        yield plugin, etcd
    finally:
        if etcd.process is not None:
            os.kill(etcd.process.pid, signal.SIGCONT)
        plugin.stop()
        etcd.stop()


def _call(plugin: Plugin, method: str, body: dict) -> tuple[int, dict, float]:
    started = time.monotonic()
    status, reply = post_unix(plugin.sockets[0], f"/{method}", json.dumps(body).encode())
    return status, reply, time.monotonic() - started


def _allocations(plugin: Plugin) -> list[str]:
    return sorted(a["address"] for a in
                  json.loads(plugin.cli("ipam", "show", "-o", "json").stdout))


def _outage_calls(pool: str, address: str) -> dict[str, dict]:
    return {
        "IpamDriver.RequestPool": {"AddressSpace": "CalicoLocal", "Pool": "", "V6": False},
        "IpamDriver.RequestAddress": {"PoolID": pool, "Address": ""},
        "IpamDriver.ReleaseAddress": {"PoolID": pool, "Address": address},
        "NetworkDriver.CreateNetwork": {
            "NetworkID": "f" * 64, "Options": {},
            "IPv4Data": [{"Pool": pool, "Gateway": address + "/24"}], "IPv6Data": []},
    }


@pytest.mark.parametrize("outage", ["frozen", "stopped"])
def test_driver_calls_fail_clearly_in_an_etcd_outage_and_work_again_after(
        served: tuple[Plugin, EtcdServer], outage: str, tmp_path: Path) -> None:
    plugin, etcd = served
    status, reply, _ = _call(plugin, "IpamDriver.RequestPool",
                             {"AddressSpace": "CalicoLocal", "Pool": "", "V6": False})
    assert status == 200, reply
    pool = reply["PoolID"]
    status, reply, _ = _call(plugin, "IpamDriver.RequestAddress", {"PoolID": pool})
    assert status == 200, reply
    address = reply["Address"].split("/")[0]
    before = _allocations(plugin)
    assert etcd.process is not None
    if outage == "frozen":
        os.kill(etcd.process.pid, signal.SIGSTOP)
    else:
        etcd.stop()
    try:
        for method, body in _outage_calls(pool, address).items():
            status, reply, took = _call(plugin, method, body)
            assert status == 503, (method, status, reply)
            assert "etcd" in reply["Err"] and reply["Error"] == reply["Err"], reply
            assert took < 5.0, f"{method} answered after {took:.1f} s"
    finally:
        if outage == "frozen":
            os.kill(etcd.process.pid, signal.SIGCONT)
        else:
            etcd.start()
    # The same plugin, no restart: calls work again, and nothing was half-written.
    assert wait_for(lambda: _call(plugin, "IpamDriver.RequestAddress",
                                  {"PoolID": pool})[0] == 200, timeout=15)
    after = _allocations(plugin)
    assert set(before) <= set(after) and len(after) == len(before) + 1, (before, after)


class EtcdCluster:
    """Three etcd members on 127.0.0.1; any one may be killed (quorum stays)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.members = [(f"m{i}", f"http://127.0.0.1:{_free_port()}",
                         f"http://127.0.0.1:{_free_port()}") for i in range(3)]
        self.processes: list[subprocess.Popen[bytes] | None] = []

    @property
    def client_urls(self) -> list[str]:
        return [client for _, client, _ in self.members]

    def start(self) -> None:
        cluster = ",".join(f"{name}={peer}" for name, _, peer in self.members)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        for name, client, peer in self.members:
            log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child's
            self.processes.append(subprocess.Popen(
                [ETCD_BINARY, "--name", name, "--data-dir", str(self.data_dir / name),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", f"calico-cnm-outage-{os.getpid()}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        if not wait_for(lambda: all(_healthy(url) for url in self.client_urls), timeout=30):
            raise AssertionError("the 3-member etcd cluster did not become healthy")

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process is not None:
            process.kill()
            process.wait(timeout=10)
            self.processes[index] = None

    def stop(self) -> None:
        for index in range(len(self.processes)):
            self.kill(index)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as response:
            return b'"true"' in response.read()
    except (OSError, urllib.error.URLError):
        return False


def test_with_three_etcd_members_killing_one_interrupts_no_driver_call(
        tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path)
    env = {
        "CALICO_CNM_PLUGIN_DIR": str(tmp_path / "plugins"),
        "CALICO_CNM_NETWORK_DRIVER_NAME": SOCKET_NAME,
        "CALICO_CNM_IPAM_DRIVER_NAME": SOCKET_NAME,
        "CALICO_CNM_DEFAULT_POOLS": "10.213.0.0/16",
        "CALICO_CNM_HOSTNAME": "outage-host",
        "CALICO_CNM_RUN_AGENT": "false",
    }
    plugin = None
    try:
        cluster.start()
        env["ETCD_ENDPOINTS"] = ",".join(cluster.client_urls)
        plugin = Plugin(env, tmp_path / "plugin.log")
        plugin.start()
        status, reply, _ = _call(plugin, "IpamDriver.RequestPool",
                                 {"AddressSpace": "CalicoLocal", "Pool": "", "V6": False})
        assert status == 200, reply
        pool = reply["PoolID"]
        addresses = []
        for round_no in range(30):
            if round_no == 10:
                cluster.kill(0)  # the member the client prefers: the first endpoint
            status, reply, took = _call(plugin, "IpamDriver.RequestAddress", {"PoolID": pool})
            assert status == 200, (round_no, reply)
            assert took < 5.0, f"call {round_no} took {took:.1f} s"
            addresses.append(reply["Address"])
        assert len(set(addresses)) == 30
    finally:
        if plugin is not None:
            plugin.stop()
        cluster.stop()
