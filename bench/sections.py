"""BENCHMARKS.md sections: each benchmark owns one `## ...` section and replaces it on
every run, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(heading: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replaces the section that starts with ``heading`` (a ``## ...`` line) by
    ``text`` (which starts with that heading), or appends it."""
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(content):
        content = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", content)
    else:
        content = content.rstrip("\n") + "\n\n" + text
    path.write_text(content.rstrip("\n") + "\n")


def publish(heading: str, text: str, write: bool, path: Path = BENCHMARKS) -> None:
    """Prints a benchmark's section and, if write, puts it in BENCHMARKS.md."""
    print()
    print(text)
    if write:
        write_section(heading, text, path)
        print(f"wrote {heading!r} in {path}")
