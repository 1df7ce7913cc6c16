"""`calico-cnm pool ...` against the running plugin's datastore."""

from __future__ import annotations

import json

from datastore.sqlite import SqliteDatastore
from ipam_driver.block_store import BLOCKS_PREFIX
from tests.e2e.conftest import STATE_DIR, Stack


def _pools(stack: Stack) -> dict[str, dict]:
    data = json.loads(stack.plugin.cli("pool", "show", "-o", "json").stdout)
    return {item["pool"]["cidr"]: item for item in data}


def test_pool_add_show_remove(stack: Stack) -> None:
    cli = stack.plugin.cli
    cli("pool", "add", "10.202.0.0/24", "--ipip", "--nat-outgoing", "--block-size", "28")
    cli("pool", "add", "10.203.0.0/24", "--disabled")
    try:
        pools = _pools(stack)
        assert pools["10.202.0.0/24"]["pool"]["ipip_mode"] == "always"
        assert pools["10.202.0.0/24"]["pool"]["vxlan_mode"] == "never"
        assert pools["10.202.0.0/24"]["pool"]["nat_outgoing"] is True
        assert pools["10.202.0.0/24"]["pool"]["block_size"] == 28
        assert pools["10.203.0.0/24"]["pool"]["disabled"] is True
        assert "192.168.0.0/16" in pools  # the default pool, created on first start
        table = cli("pool", "show").stdout
        assert "10.202.0.0/24" in table and "CIDR" in table and "IN USE" in table
    finally:
        cli("pool", "remove", "10.202.0.0/24")
        cli("pool", "remove", "10.203.0.0/24")
    pools = _pools(stack)
    assert "10.202.0.0/24" not in pools and "10.203.0.0/24" not in pools


def test_bad_pools_are_refused_and_change_nothing(stack: Stack) -> None:
    cli = stack.plugin.cli
    before = _pools(stack)
    cases = {
        ("pool", "add", "10.300.0.0/24"): "10.300.0.0/24",
        ("pool", "add", "192.168.5.0/24"): "192.168.0.0/16",  # overlaps the default pool
        ("pool", "add", "10.204.0.0/30"): "block",  # smaller than one block
        ("pool", "add", "banana"): "banana",
        ("pool", "remove", "10.205.0.0/24"): "10.205.0.0/24",  # not a pool
    }
    for args, word in cases.items():
        result = cli(*args, check=False)
        assert result.returncode == 1, args
        assert result.stderr.startswith("error: "), args
        assert word in result.stderr, (args, result.stderr)
    assert _pools(stack) == before


def test_pool_in_use_cannot_be_removed(stack: Stack) -> None:
    cli = stack.plugin.cli
    cli("pool", "add", "10.206.0.0/24")
    try:
        net = stack.network("--subnet", "10.206.0.0/24")
        stack.container(net)
        result = cli("pool", "remove", "10.206.0.0/24", check=False)
        assert result.returncode == 1
        assert "in use" in result.stderr or "10.206.0.0/24" in result.stderr
        assert "10.206.0.0/24" in _pools(stack)
        assert _pools(stack)["10.206.0.0/24"]["allocated"] >= 1
    finally:
        stack.cleanup()
        stack.containers.clear()
        stack.networks.clear()
        cli("pool", "remove", "10.206.0.0/24")


def test_block_format_back_to_1_and_forward_again_under_a_running_plugin(
        stack: Stack) -> None:
    """Before a downgrade: every block rewritten in format 1 while containers hold their
    addresses, which the plugin keeps serving; then format 2 again."""
    cli = stack.plugin.cli
    net = stack.network()
    running = stack.container(net)
    held = json.loads(cli("ipam", "show", "-o", "json").stdout)
    assert cli("ipam", "block-format").stdout.strip() == "block format 2"
    out = cli("ipam", "block-format", "1").stdout
    assert "block format 1" in out and "rewritten in format 1" in out
    store = SqliteDatastore(str(STATE_DIR / "state.db"))
    try:
        assert {e.data.get("format", 1) for e in store.list(BLOCKS_PREFIX)} == {1}
    finally:
        store.close()
    assert json.loads(cli("ipam", "show", "-o", "json").stdout) == held
    other = stack.container(net)
    assert stack.address(other, net) not in {a["address"] for a in held}
    cli("ipam", "block-format", "2")
    assert cli("ipam", "block-format").stdout.strip() == "block format 2"
    stack.exec(running, "ping", "-c", "1", "-W", "2", stack.address(other, net))
    result = cli("ipam", "block-format", "3", check=False)
    assert result.returncode != 0 and "invalid choice" in result.stderr
