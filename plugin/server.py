"""`calico-cnm serve`: gunicorn serving the plugin app on both Docker plugin sockets,
with the per-host agent beside it in a child process."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from datastore.errors import Conflict
from plugin.agent import Agent
from plugin.app import build_ipam, create_app, open_datastore
from plugin.settings import Settings

log = logging.getLogger(__name__)


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def prepare(settings: Settings) -> None:
    """First-start set-up: the default pools and the socket directory."""
    for path in settings.socket_paths:
        # gunicorn would silently replace the socket of a plugin that still runs.
        if _socket_answers(path):
            raise Conflict(f"another plugin is already serving on {path}")
    store = open_datastore(settings)
    try:
        build_ipam(settings, store).ensure_default_pools(list(settings.default_pools))
    finally:
        store.close()
    os.makedirs(settings.plugin_dir, exist_ok=True)


def _run_agent(settings: Settings, parent_pid: int) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s agent %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us with SIGTERM
    agent = Agent(settings, open_datastore(settings))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    agent.run(parent_pid=parent_pid)


class PluginServer(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._agent: multiprocessing.Process | None = None
        super().__init__()

    def load_config(self) -> None:
        settings = self._settings
        options: dict[str, Any] = {
            "bind": [f"unix:{path}" for path in settings.socket_paths],
            "workers": settings.workers,
            "worker_class": "gthread",
            "threads": settings.threads,
            "timeout": 60,
            "graceful_timeout": 5,
            "loglevel": settings.log_level,
            "accesslog": "-" if settings.log_level == "debug" else None,
            "access_log_format": '"%(r)s" %(s)s %(D)sus',
            "when_ready": self._start_agent,
            "on_exit": self._stop_agent,
        }
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 25 opens a control socket in $HOME by default; not needed here.
            options["control_socket_disable"] = True
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        # Runs in each worker after fork: every worker opens its own datastore.
        return create_app(self._settings)

    def _start_agent(self, _arbiter: object) -> None:
        log.info("plugin serving on %s", ", ".join(self._settings.socket_paths))
        if not self._settings.run_agent:
            return
        context = multiprocessing.get_context("fork")
        self._agent = context.Process(
            target=_run_agent, args=(self._settings, os.getpid()), name="calico-cnm-agent"
        )
        self._agent.start()

    def _stop_agent(self, _arbiter: object) -> None:
        if self._agent is not None and self._agent.is_alive():
            self._agent.terminate()
            self._agent.join(5)
        for path in self._settings.socket_paths:
            if os.path.exists(path):
                os.unlink(path)


def serve(settings: Settings) -> None:
    prepare(settings)
    PluginServer(settings).run()
