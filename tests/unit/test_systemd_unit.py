"""The systemd service of the legacy plugin: `systemd-analyze verify` accepts the unit
`calico-cnm install --systemd` writes (with this checkout's executable) without a
single warning, it starts before Docker, and contrib/systemd/ holds the same unit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plugin.systemd import UNIT_NAME, render_service

REPO = Path(__file__).resolve().parents[2]


def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package")
    executable = str(Path(sys.executable).with_name("calico-cnm"))
    installed = subprocess.run([executable, "install", "--systemd", "--unit-dir",
                                str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0 and "systemctl" in installed.stdout, installed
    unit = tmp_path / UNIT_NAME
    text = unit.read_text()
    assert f"ExecStart={executable} serve" in text
    assert "Before=docker.service" in text and "WantedBy=multi-user.target docker.service" \
        in text
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() \
        and not result.stderr.strip(), result


def test_contrib_unit_is_the_rendered_one_for_usr_local_bin():
    contrib = (REPO / "contrib" / "systemd" / UNIT_NAME).read_text()
    assert contrib == render_service("/usr/local/bin/calico-cnm")
