"""The only code that runs iptables: whole chains written with
`iptables-restore --noflush`, and jumps kept at the top of built-in chains."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from datastore.errors import InvalidRequest, Unavailable

TABLES = ("filter", "nat", "mangle", "raw")


class Iptables:
    """iptables (family 4) or ip6tables (family 6), optionally inside a named netns."""

    def __init__(self, family: int = 4, netns: str | None = None) -> None:
        if family not in (4, 6):
            raise InvalidRequest(f"IP family {family} is not 4 or 6")
        self.family = family
        self.netns = netns
        self._base = "iptables" if family == 4 else "ip6tables"

    def _run(self, tool: str, args: Sequence[str], stdin: str | None = None) -> str:
        command = [tool, *args]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        result = subprocess.run(command, input=stdin, capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0:
            raise Unavailable(f"{' '.join(command[:4])} failed: {result.stderr.strip()}")
        return result.stdout

    def save(self, table: str) -> dict[str, list[str]]:
        """Every chain of a table with its rules, as `-A CHAIN ...` lines."""
        if table not in TABLES:
            raise InvalidRequest(f"unknown table {table!r}")
        chains: dict[str, list[str]] = {}
        for line in self._run(f"{self._base}-save", ["-t", table]).splitlines():
            if line.startswith(":"):
                chains[line[1:].split()[0]] = []
            elif line.startswith("-A "):
                chains[line.split()[1]].append(line)
        return chains

    def restore(self, table: str, chains: Mapping[str, Sequence[str]],
                delete: Sequence[str] = ()) -> None:
        """Atomically replaces the given chains (creating them) and deletes others."""
        lines = [f"*{table}"]
        lines += [f":{name} - [0:0]" for name in chains]
        lines += [f":{name} - [0:0]" for name in delete]  # flush before deleting
        for name, rules in chains.items():
            lines += [f"-A {name} {rule}" for rule in rules]
        lines += [f"-X {name}" for name in delete]
        lines.append("COMMIT")
        self._run(f"{self._base}-restore", ["--noflush", "-w"], "\n".join(lines) + "\n")

    def ensure_hooks(self, table: str, hooks: Sequence[tuple[str, str]]) -> bool:
        """Keeps each (built-in chain, rule) at the top of its chain, in order, once.

        Returns True if anything had to change (e.g. Docker rewrote FORWARD).
        """
        current = self.save(table)
        changed = False
        by_chain: dict[str, list[str]] = {}
        for chain, rule in hooks:
            by_chain.setdefault(chain, []).append(rule)
        for chain, rules in by_chain.items():
            wanted = [f"-A {chain} {rule}" for rule in rules]
            present = current.get(chain, [])
            if present[: len(wanted)] == wanted and not any(
                line in wanted for line in present[len(wanted):]
            ):
                continue
            changed = True
            for rule in rules:
                while f"-A {chain} {rule}" in present:
                    self._run(self._base, ["-w", "-t", table, "-D", chain, *rule.split()])
                    present.remove(f"-A {chain} {rule}")
            for position, rule in enumerate(rules, start=1):
                self._run(self._base,
                          ["-w", "-t", table, "-I", chain, str(position), *rule.split()])
        return changed
