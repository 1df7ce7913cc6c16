"""How the plugin's sockets speak HTTP to dockerd."""

from __future__ import annotations

import socket
import time

from tests.e2e.conftest import Plugin

_CALL = (b"POST /NetworkDriver.GetCapabilities HTTP/1.1\r\nHost: plugin\r\n"
         b"Content-Length: 2\r\n\r\n{}")


def _reply(conn: socket.socket) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received or not received.endswith(b"}\n"):
        chunk = conn.recv(65536)
        assert chunk, f"the plugin closed the connection; so far: {received!r}"
        received += chunk
    return received


def test_an_idle_connection_stays_open_as_dockerd_expects(plugin: Plugin) -> None:
    """dockerd reuses idle connections however old; had the plugin closed this one, a
    call sent as it closed would be retried by dockerd with an empty body."""
    for socket_path in plugin.sockets:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(socket_path)
            conn.sendall(_CALL)
            first = _reply(conn)
            time.sleep(3)  # longer than gunicorn's default keep-alive of 2 s
            conn.sendall(_CALL)
            second = _reply(conn)
        for reply in (first, second):
            head = reply.split(b"\r\n\r\n", 1)[0].lower()
            assert head.startswith(b"http/1.1 200"), reply
            assert b"\r\nconnection: close" not in head, reply
