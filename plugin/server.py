"""`calico-cnm serve`: gunicorn serving the plugin app on both Docker plugin sockets,
with the per-host agent beside it in a child process."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from datastore.errors import Conflict
from plugin.agent import Agent
from plugin.app import create_app
from plugin.compose import build_ipam, open_datastore
from plugin.metrics import prepare_multiprocess, remove_multiprocess, start_server
from plugin.settings import Settings

log = logging.getLogger(__name__)

# How long start-up waits for the default pools before binding the sockets (seconds).
DEFAULT_POOLS_WAIT = 2.0
KEEPALIVE_SECONDS = 86_400


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _ensure_default_pools(settings: Settings) -> None:
    store = open_datastore(settings)
    try:
        build_ipam(settings, store).ensure_default_pools(list(settings.default_pools))
    finally:
        store.close()


def prepare(settings: Settings) -> None:
    """Start-up before the sockets are bound: nothing here may wait long, since dockerd
    gives an enabling managed plugin about 12 s to answer on its socket."""
    for path in settings.socket_paths:
        # gunicorn would silently replace the socket of a plugin that still runs.
        if _socket_answers(path):
            raise Conflict(f"another plugin is already serving on {path}")
    os.makedirs(settings.plugin_dir, exist_ok=True)
    # The default pools, in a child (this process must not hold an etcd channel when
    # gunicorn forks), waited for briefly: with a slow datastore the agent makes them.
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _ensure_default_pools(settings)
        except BaseException as exc:
            log.warning("default pools not created at start (the agent retries): %s", exc)
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + DEFAULT_POOLS_WAIT
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
        time.sleep(0.02)
    log.warning("the datastore is slow to answer; serving now (the agent creates the "
                "default pools)")


def _run_agent(settings: Settings, parent_pid: int) -> None:
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH,
                signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)  # forget gunicorn's master handlers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us with SIGTERM
    agent = Agent(settings, open_datastore(settings))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    agent.run(parent_pid=parent_pid)


class PluginServer(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._agent_pid: int | None = None
        super().__init__()

    def load_config(self) -> None:
        settings = self._settings
        options: dict[str, Any] = {
            "bind": [f"unix:{path}" for path in settings.socket_paths],
            "workers": settings.workers,
            "worker_class": "gthread",
            "threads": settings.threads,
            "timeout": 60,
            # dockerd keeps idle connections for ever. A server that closes one just as
            # a call is sent makes dockerd retry that call with its body already
            # consumed, i.e. empty (DESIGN.md §2): so idle connections stay for a day.
            # (Closing after every reply instead doubles a lone client's latency.)
            "keepalive": KEEPALIVE_SECONDS,
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

    def _start_agent(self, arbiter: Any) -> None:
        log.info("plugin serving on %s", ", ".join(self._settings.socket_paths))
        if self._settings.metrics_address:
            start_server(self._settings)  # in this master: it outlives the workers
        if not self._settings.run_agent:
            return
        # A plain fork (not multiprocessing, whose exit hooks the workers would
        # inherit): the agent exits by itself when this master process is gone.
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            # The agent must not hold the plugin sockets open: after a crash of this
            # master, a new `serve` would find them still answering.
            for listener in getattr(arbiter, "LISTENERS", []):
                listener.close()
            code = 0
            try:
                _run_agent(self._settings, parent)
            except BaseException:
                log.exception("agent failed")
                code = 1
            finally:
                os._exit(code)
        self._agent_pid = pid

    def _stop_agent(self, _arbiter: object) -> None:
        if self._agent_pid is not None:
            try:
                os.kill(self._agent_pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    if os.waitpid(self._agent_pid, os.WNOHANG) != (0, 0):
                        break
                    time.sleep(0.05)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._agent_pid = None
        for path in self._settings.socket_paths:
            if os.path.exists(path):
                os.unlink(path)
        remove_multiprocess(self._settings)


def serve(settings: Settings) -> None:
    prepare(settings)
    prepare_multiprocess(settings)  # before any process imports prometheus_client
    PluginServer(settings).run()
