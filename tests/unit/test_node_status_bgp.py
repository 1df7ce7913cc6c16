"""`calico-cnm node status` under BGP routing: whether the agent and BIRD run, one
table per family with peer type, state, since and info, and configuration errors,
in text and JSON (here from another node's heartbeat)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datastore.sqlite import SqliteDatastore
from plugin.cli import main
from routing.nodes import NodeRecord, NodeRegistry, NodeStatus, now

SESSIONS = [
    {"name": "Mesh_10_123_1_12", "state": "up", "since": "00:40:59.796",
     "info": "Established", "peer_type": "node-to-node mesh", "neighbor": "10.123.1.12",
     "family": 4, "error": ""},
    {"name": "Global_10_123_1_1", "state": "start", "since": "00:40:58.164",
     "info": "Active", "peer_type": "global", "neighbor": "10.123.1.1", "family": 4,
     "error": "Socket: No route to host"},
    {"name": "Mesh_fd00_123_1__12", "state": "up", "since": "00:41:00.001",
     "info": "Established", "peer_type": "node-to-node mesh", "neighbor": "fd00:123:1::12",
     "family": 6, "error": ""},
]


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "state.db")
    store = SqliteDatastore(path)
    registry = NodeRegistry(store)
    registry.register(NodeRecord("h7", ipv4="10.123.1.17/24"))
    registry.report(NodeStatus(
        "h7", heartbeat=now(), started=now(), routing="bgp",
        bgp={"running": True, "pid": 4242, "restarts": 1, "sessions": SESSIONS,
             "established": 5, "memory": "71.2 kB",
             "config_error": "the generated BIRD configuration was rejected: line 9"}))
    store.close()
    return path


def test_text_tables_per_family_and_the_configuration_error(db, capsys):
    assert main(["node", "status", "h7", "--sqlite-path", db, "--hostname", "h1"]) == 0
    out = capsys.readouterr().out
    assert "calico-cnm agent on h7 is running (routing bgp)" in out
    assert "BIRD is running (pid 4242, memory 71.2 kB), restarted 1 time(s)" in out
    assert "from its heartbeat: 5 session(s) established" in out
    assert "BIRD configuration error: the generated BIRD configuration was rejected" in out
    v4, v6 = out.split("IPv4 BGP status")[1].split("IPv6 BGP status")
    assert "PEER ADDRESS" in v4 and "10.123.1.12" in v4 and "fd00" not in v4
    row = next(line for line in v4.splitlines() if line.startswith("10.123.1.1 "))
    assert row.split()[1:3] == ["global", "start"] and "No route to host" in row
    assert "fd00:123:1::12" in v6 and "node-to-node mesh" in v6


def test_json_carries_the_same(db, capsys):
    assert main(["node", "status", "h7", "-o", "json", "--sqlite-path", db,
                 "--hostname", "h1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["routing"] == "bgp" and report["as_number"] == 64512
    assert report["bgp"]["source"] == "heartbeat"
    assert [s["neighbor"] for s in report["bgp"]["sessions"]] == [
        "10.123.1.12", "10.123.1.1", "fd00:123:1::12"]
