"""BIRD's control-socket replies: the line protocol and our BGP sessions, parsed from
a reply recorded from BIRD 2.0.12 (`show protocols all` with an established mesh
session and a global peer that cannot be reached)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from datastore.errors import Unavailable
from routing.bird_control import (
    BirdControl,
    BirdError,
    parse_memory_total,
    parse_reply,
    parse_sessions,
)

RECORDED = (Path(__file__).parent / "fixtures" / "bird_show_protocols_all.txt").read_text()


def test_sessions_from_a_recorded_reply_keep_only_our_bgp_protocols():
    sessions = parse_sessions(parse_reply(RECORDED.splitlines()))
    assert [s.name for s in sessions] == ["Mesh_10_127_0_2", "Global_10_127_0_9"]
    mesh, peer = sessions
    assert (mesh.neighbor, mesh.family, mesh.state, mesh.info, mesh.peer_type) == (
        "10.127.0.2", 4, "up", "Established", "node-to-node mesh")
    assert mesh.since.count(":") == 2
    assert (peer.state, peer.peer_type, peer.error) == (
        "start", "global", "Socket: No route to host")
    assert peer.info.startswith("Active")


def test_reply_codes_continuations_and_errors():
    reply = parse_reply(["0002-Reading configuration from /x", "8002 /x: No such file"])
    assert reply.code == 8002 and not reply.ok
    assert reply.text == "Reading configuration from /x\n/x: No such file"
    memory = parse_reply(["1018-BIRD memory usage", " Total:              50.3 kB     85.9 kB",
                          "0000 "])
    assert parse_memory_total(memory) == "50.3 kB"


def _serve_once(path: str, answer: bytes) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def run() -> None:
        connection, _ = server.accept()
        with connection, server:
            connection.sendall(b"0001 BIRD 2.0.12 ready.\n")
            connection.recv(1024)
            connection.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_client_reads_to_the_last_line_and_raises_on_errors(tmp_path: Path):
    path = str(tmp_path / "bird.ctl")
    thread = _serve_once(path, RECORDED.encode())
    sessions = BirdControl(path).sessions()
    thread.join(5)
    assert len(sessions) == 2
    thread = _serve_once(path + "2", b"9001 syntax error, unexpected CF_SYM_UNDEFINED\n")
    with pytest.raises(BirdError, match="syntax error"):
        BirdControl(path + "2").command("shwo status")
    thread.join(5)


def test_no_bird_listening_is_unavailable(tmp_path: Path):
    control = BirdControl(str(tmp_path / "missing.ctl"))
    assert not control.answers()
    with pytest.raises(Unavailable, match="does not answer"):
        control.command("show status")
