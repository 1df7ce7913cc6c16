"""etcd frozen (SIGSTOP) and stopped under a running plugin: every driver call answers
a clear error naming etcd within 5 s, nothing is half-written, and the same plugin
works again once etcd is back, without a restart."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EtcdServer
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
