"""`calico-cnm install --systemd`: the systemd service of the legacy plugin.

Docker's plugin documentation asks that a plugin's service start before
``docker.service``, so that dockerd finds the sockets when it restores networks and
restarts containers at boot. The unit is rendered with the path of the running
``calico-cnm`` executable (a virtualenv's, say); contrib/systemd/ holds the same unit
for an installation in /usr/local/bin. Settings come from an environment file.
"""

from __future__ import annotations

import os
import shutil
import sys

UNIT_NAME = "calico-cnm.service"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
ENV_FILE = "/etc/calico-cnm/calico-cnm.env"


def render_service(executable: str) -> str:
    return f"""\
# calico-cnm: Calico networking for Docker, as a legacy (socket) plugin.
# Settings: {ENV_FILE} (e.g. ETCD_ENDPOINTS=http://10.0.0.1:2379,
# CALICO_CNM_ROUTING=bgp); see `calico-cnm serve --help`.
[Unit]
Description=calico-cnm network and IPAM plugin for Docker
Documentation=https://docs.docker.com/engine/extend/plugin_api/
# Docker restores networks and restarts containers at start: the plugin must answer.
Before=docker.service
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
EnvironmentFile=-{ENV_FILE}
ExecStart={executable} serve
Restart=always
RestartSec=2
# SIGTERM to gunicorn's master only: it stops the workers and the agent, which shuts
# BIRD down with graceful restart; whatever is left is killed after the timeout.
KillMode=mixed
TimeoutStopSec=20

[Install]
WantedBy=multi-user.target docker.service
"""


def this_executable() -> str:
    """The calico-cnm that is running, as an absolute path."""
    found = shutil.which(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return os.path.abspath(found or sys.argv[0] or "calico-cnm")


def install_service(unit_dir: str, executable: str | None = None) -> str:
    """Writes the unit; returns its path. (`systemctl daemon-reload` and `enable` are
    the operator's: this machine may have no systemd running.)"""
    os.makedirs(unit_dir, exist_ok=True)
    path = os.path.join(unit_dir, UNIT_NAME)
    with open(path + ".new", "w") as handle:
        handle.write(render_service(executable or this_executable()))
    os.replace(path + ".new", path)
    return path
