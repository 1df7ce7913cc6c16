"""BIRD 2 run by the agent's supervisor, for real: two namespaces peer over a veth
with generated configurations. Reloads keep the process; a refused configuration
keeps the last good one running and is reported; a killed BIRD is restarted and
adopted by a new supervisor; graceful restart keeps kernel routes and the peer's."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from routing.bird import BgpNode, BgpSettings, render_bird_config
from routing.bird_process import BirdSupervisor, find_bird
from routing.planner import BlockInfo, PoolInfo
from tests.functional.helpers import Lab, ip, run_in_netns

A = BgpNode("a", "10.127.0.1/24")
B = BgpNode("b", "10.127.0.2/24")
POOLS = [PoolInfo("10.128.0.0/16")]
A_BLOCK, B_BLOCK, B_NEW_BLOCK = "10.128.0.0/26", "10.128.0.64/26", "10.128.0.128/26"


def _config(me: BgpNode, blocks: list[BlockInfo]) -> str:
    return render_bird_config(me, [A, B], [], POOLS, blocks, BgpSettings())


def _bird_routes(ns: str) -> str:
    return ip(ns, "route", "show", "proto", "bird").stdout


def _wait(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def _established(supervisor: BirdSupervisor) -> bool:
    return any(s.info.startswith("Established") for s in supervisor.control.sessions())


@pytest.fixture
def pair(lab: Lab, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    if find_bird() is None:
        pytest.fail("bird is not installed: install Debian's bird2 (apt-get install bird2)")
    ns_a, ns_b = lab.netns("bgpa"), lab.netns("bgpb")
    ip(ns_a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ns_b)
    for ns, node in ((ns_a, A), (ns_b, B)):
        ip(ns, "addr", "add", str(node.ipv4), "dev", "eth0")
        ip(ns, "link", "set", "eth0", "up")
    try:
        yield ns_a, ns_b, tmp_path
    finally:
        for name in ("a", "b"):
            pid_file = tmp_path / name / "bird.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


def test_supervised_bird_reloads_refuses_restarts_adopts_and_restarts_gracefully(pair):
    ns_a, ns_b, tmp = pair
    a = BirdSupervisor(str(tmp / "a"))
    b = BirdSupervisor(str(tmp / "b"))
    blocks = [BlockInfo(A_BLOCK, "a"), BlockInfo(B_BLOCK, "b")]
    assert run_in_netns(ns_a, lambda: a.apply(_config(A, blocks)))
    assert run_in_netns(ns_b, lambda: b.apply(_config(B, blocks)))
    assert _wait(lambda: _established(a) and _established(b)), a.control.sessions()
    assert _wait(lambda: B_BLOCK in _bird_routes(ns_a) and A_BLOCK in _bird_routes(ns_b))
    assert (a.control.memory() or "").endswith("B")  # "71.2 kB"

    # A new block: a reload (same process), and the peer learns it.
    pid = b.pid
    more = [*blocks, BlockInfo(B_NEW_BLOCK, "b")]
    assert run_in_netns(ns_b, lambda: b.apply(_config(B, more)))
    assert b.pid == pid
    assert _wait(lambda: B_NEW_BLOCK in _bird_routes(ns_a), timeout=5)

    # A configuration BIRD refuses: reported, the last good one keeps running.
    good = Path(b.config_path).read_text()
    assert run_in_netns(ns_b, lambda: b.apply(good.replace("router id", "router idd")))
    state = b.state()
    assert state.running and state.pid == pid and "rejected" in (state.config_error or "")
    assert Path(b.config_path).read_text() == good and Path(b.rejected_path).exists()
    assert run_in_netns(ns_b, lambda: b.apply(_config(B, more)))
    assert b.state().config_error is None and not Path(b.rejected_path).exists()

    # BIRD killed: its kernel routes stay (persist), the peer keeps its routes
    # (graceful restart), and the supervisor starts a new BIRD.
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: not b.running(), timeout=5)
    assert A_BLOCK in _bird_routes(ns_b)
    run_in_netns(ns_b, b.ensure_running)
    assert b.running() and b.pid != pid and b.state().restarts == 1
    assert _wait(lambda: _established(b))
    assert B_BLOCK in _bird_routes(ns_a) and A_BLOCK in _bird_routes(ns_b)

    # A new supervisor (a restarted agent) adopts the running BIRD.
    pid_a = a.pid
    adopter = BirdSupervisor(str(tmp / "a"))
    assert run_in_netns(ns_a, lambda: adopter.apply(_config(A, more)))
    assert adopter.pid == pid_a

    # A graceful stop: BIRD exits, routes stay in its kernel and at the peer.
    adopter.stop(graceful=True)
    assert not adopter.running()
    time.sleep(1)
    assert B_NEW_BLOCK in _bird_routes(ns_a) and A_BLOCK in _bird_routes(ns_b)
    b.stop(graceful=False)
    assert not b.running()
