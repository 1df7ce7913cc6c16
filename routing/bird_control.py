"""BIRD's control socket: a small client and pure parsers of its replies.

The protocol (what ``birdc`` speaks): after a greeting (``0001 BIRD 2.0.12 ready.``)
each command gets reply lines that start with a four-digit code and ``-`` while more
follow, or a space on the last one; a line starting with a space continues the
previous code. Codes 0xxx are final results, 1xxx table rows, 2xxx table headers,
8xxx/9xxx errors.

BGP sessions of ours carry a ``description`` naming their peer type, so a reader of
``show protocols all`` needs nothing else to label them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from datastore.errors import CalicoCnmError, Unavailable

SESSION_PREFIXES = ("Mesh_", "Node_", "Global_")
_ROW = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+(?:\s+\d\d:\d\d:\d\d(?:\.\d+)?)?)"
                  r"\s*(.*)$")


class BirdError(CalicoCnmError):
    """BIRD answered a command with an error (its code and text)."""


@dataclass
class Reply:
    code: int
    lines: list[tuple[int, str]] = field(default_factory=list)  # (code, text)

    @property
    def text(self) -> str:
        return "\n".join(text for _, text in self.lines)

    @property
    def ok(self) -> bool:
        return self.code < 8000


@dataclass
class Session:
    """One BGP session of ours as BIRD reports it."""

    name: str
    state: str  # BIRD's protocol state: up, start, down
    since: str
    info: str  # the BGP state: Established, Active, Connect, Idle, Passive ...
    peer_type: str = ""
    neighbor: str = ""
    family: int = 4
    error: str = ""  # BIRD's last error for the session, if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_reply(raw_lines: list[str]) -> Reply:
    """Reply lines (without newlines, greeting excluded) -> a Reply."""
    reply = Reply(code=0)
    code = 0
    for line in raw_lines:
        if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
            code = int(line[:4])
            text = line[5:]
        else:
            text = line[1:] if line.startswith(" ") else line
        reply.lines.append((code, text))
        reply.code = code
    return reply


def parse_sessions(reply: Reply) -> list[Session]:
    """Our BGP sessions from a ``show protocols all`` reply."""
    sessions: list[Session] = []
    current: Session | None = None
    for code, text in reply.lines:
        if code == 1002:
            current = None
            match = _ROW.match(text)
            if not match or match.group(2) != "BGP":
                continue
            name = match.group(1)
            if not name.startswith(SESSION_PREFIXES):
                continue
            current = Session(name=name, state=match.group(4), since=match.group(5),
                              info=match.group(6).strip())
            sessions.append(current)
        elif code == 1006 and current is not None:
            key, _, value = text.strip().partition(":")
            value = value.strip()
            if key == "Description":
                current.peer_type = value
            elif key == "Neighbor address":
                current.neighbor = value
                try:
                    current.family = ipaddress.ip_address(value).version
                except ValueError:
                    pass
            elif key == "Last error":
                current.error = value
    return sessions


def parse_memory_total(reply: Reply) -> str | None:
    """The effective total from ``show memory`` ("512.3 kB")."""
    for _, text in reply.lines:
        if text.strip().startswith("Total:"):
            parts = text.split()
            if len(parts) >= 3:
                return f"{parts[1]} {parts[2]}"
    return None


class BirdControl:
    """A connection to one BIRD control socket (a new one per command: BIRD serves
    many clients and a command takes milliseconds)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self._timeout = timeout

    def command(self, text: str, check: bool = True) -> Reply:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self._timeout)
                sock.connect(self.path)
                stream = sock.makefile("rwb")
                self._read(stream)  # the greeting
                stream.write(text.encode() + b"\n")
                stream.flush()
                reply = parse_reply(self._read(stream))
        except OSError as exc:
            raise Unavailable(f"BIRD does not answer on {self.path}: {exc}") from exc
        if check and not reply.ok:
            raise BirdError(f"BIRD refused {text.split()[0]!r}: {reply.text.strip()}")
        return reply

    def answers(self) -> bool:
        try:
            self.command("show status")
        except CalicoCnmError:
            return False
        return True

    def sessions(self) -> list[Session]:
        return parse_sessions(self.command("show protocols all"))

    def memory(self) -> str | None:
        """BIRD's own memory total ("512.3 kB")."""
        return parse_memory_total(self.command("show memory"))

    @staticmethod
    def _read(stream: Any) -> list[str]:
        lines = []
        while True:
            raw = stream.readline()
            if not raw:
                raise OSError("connection closed mid-reply")
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if len(line) >= 5 and line[:4].isdigit() and line[4] == " ":
                return lines
