"""BIRD as the agent's supervised child: configuration files, start, reload, restart.

Everything lives in the run directory (``/run/calico-cnm`` by default): ``bird.conf``,
the control socket ``bird.ctl``, ``bird.pid`` and BIRD's log ``bird.log``. A new text
is checked with ``bird -p`` before it replaces the running one and is then loaded
with ``configure`` on the control socket: BIRD is never restarted for a change. A
text BIRD refuses is kept as ``bird.conf.rejected`` and reported (``node status``);
BIRD keeps running the last good configuration.

BIRD runs in a session of its own and outlives a crashed agent (its routes and
sessions with it); the next agent adopts it through the pid file and socket. A clean
agent stop shuts BIRD down with BGP graceful restart: the kernel keeps BIRD's routes
(``persist``) and peers keep ours while it is away, so a plugin restart does not
flap routes anywhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from datastore.errors import CalicoCnmError
from routing.bird_control import BirdControl

log = logging.getLogger(__name__)

BIRD_CANDIDATES = ("/usr/sbin/bird", "/sbin/bird")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def find_bird() -> str | None:
    return shutil.which("bird") or next((p for p in BIRD_CANDIDATES if os.path.exists(p)),
                                        None)


@dataclass
class BirdState:
    running: bool
    pid: int | None
    restarts: int
    config_error: str | None
    configured: float | None  # wall-clock time of the last accepted configuration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BirdSupervisor:
    def __init__(self, run_dir: str, bird: str | None = None) -> None:
        self.run_dir = run_dir
        self.config_path = os.path.join(run_dir, "bird.conf")
        self.socket_path = os.path.join(run_dir, "bird.ctl")
        self.pid_path = os.path.join(run_dir, "bird.pid")
        self.log_path = os.path.join(run_dir, "bird.log")
        self.rejected_path = self.config_path + ".rejected"
        self._bird = bird or find_bird()
        self._process: subprocess.Popen[bytes] | None = None
        self._adopted: int | None = None
        self._applied: str | None = None
        self._restarts = 0
        self._config_error: str | None = None
        self._configured: float | None = None
        self.control = BirdControl(self.socket_path)

    # -- state

    @property
    def pid(self) -> int | None:
        if self._process is not None:
            return self._process.pid if self._process.poll() is None else None
        if self._adopted is not None and _bird_alive(self._adopted):
            return self._adopted
        return None

    def running(self) -> bool:
        return self.pid is not None

    def state(self) -> BirdState:
        return BirdState(self.running(), self.pid, self._restarts, self._config_error,
                         self._configured)

    # -- configuration

    def apply(self, text: str) -> bool:
        """Makes BIRD run this configuration; whether it now does. Unchanged text is
        not written or reloaded again."""
        if text == self._applied and self.running():
            self._accepted()  # e.g. back to the running text after a refused one
            return True
        if self._bird is None:
            self._config_error = ("BIRD is not installed: install Debian's bird2 "
                                  "(apt-get install bird2) for --routing bgp")
            return False
        os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
        candidate = self.config_path + ".new"
        with open(candidate, "w") as handle:
            handle.write(text)
        check = subprocess.run([self._bird, "-p", "-c", candidate], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            os.replace(candidate, self.rejected_path)
            why = check.stderr.strip().replace(candidate, self.rejected_path)
            self._reject(f"the generated BIRD configuration was rejected: {why}")
            return self.running()
        os.replace(candidate, self.config_path)
        try:
            if self.running():
                self.control.command(f'configure "{self.config_path}"')
            else:
                self._start()
        except CalicoCnmError as exc:
            self._reject(str(exc))
            return self.running()
        self._applied = text
        self._configured = time.time()
        self._accepted()
        return True

    def _accepted(self) -> None:
        self._config_error = None
        if os.path.exists(self.rejected_path):
            os.unlink(self.rejected_path)

    def _reject(self, message: str) -> None:
        if message != self._config_error:
            log.error("bgp: %s", message)
        self._config_error = message

    def reject(self, message: str) -> None:
        """Records a configuration that could not even be generated."""
        self._reject(message)

    # -- the process

    def ensure_running(self) -> None:
        """Restarts BIRD if it died (once it has ever been configured)."""
        if self._applied is None or self.running():
            return
        self._restarts += 1
        log.warning("bgp: BIRD is not running; restarting it (restart %d)", self._restarts)
        try:
            self._start()
        except CalicoCnmError as exc:
            self._reject(str(exc))

    def _start(self) -> None:
        if self._process is not None:
            self._process.poll()  # reap a dead child
            self._process = None
        adopted = self._running_bird()
        if adopted is not None:
            log.info("bgp: adopting the running BIRD (pid %d)", adopted)
            self._adopted = adopted
            self.control.command(f'configure "{self.config_path}"')
            return
        self._adopted = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen(
                # -R: graceful-restart recovery, so routes an earlier BIRD left in the
                # kernel (persist) stay until the sessions have converged again.
                [str(self._bird), "-f", "-R", "-c", self.config_path, "-s",
                 self.socket_path, "-P", self.pid_path],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                start_new_session=True,  # outlives the agent; not hit by its signals
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.control.answers():
            if self._process.poll() is not None:
                raise BirdStartFailed(f"BIRD exited at start ({self._process.returncode}); "
                                      f"see {self.log_path}: {_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise BirdStartFailed(f"BIRD did not answer on {self.socket_path} in "
                                      f"{START_TIMEOUT:.0f} s")
            time.sleep(0.02)
        log.info("bgp: BIRD started (pid %d)", self._process.pid)

    def _running_bird(self) -> int | None:
        """A BIRD of this run directory left by an earlier agent, if it answers."""
        try:
            with open(self.pid_path) as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            return None
        if _bird_alive(pid) and self.control.answers():
            return pid
        return None

    @property
    def has_run(self) -> bool:
        """Whether a BIRD of this run directory ran (its configuration or pid file is
        still there): its kernel routes may outlive it (persist)."""
        return os.path.exists(self.pid_path) or os.path.exists(self.config_path)

    def forget(self) -> None:
        """After stop(): removes the files that say a BIRD ran here."""
        for path in (self.config_path, self.rejected_path, self.pid_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def stop(self, graceful: bool = True) -> None:
        """Stops BIRD: with BGP graceful restart (peers and the kernel keep the
        routes), or plainly (sessions closed, routes withdrawn)."""
        pid = self.pid or self._running_bird()
        if pid is None:
            return
        try:
            self.control.command("graceful restart" if graceful else "down", check=False)
        except CalicoCnmError:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _bird_alive(pid) and time.monotonic() < deadline:
            if self._process is not None:
                self._process.poll()
            time.sleep(0.05)
        if _bird_alive(pid):
            os.kill(pid, signal.SIGKILL)
        if self._process is not None:
            self._process.wait(timeout=5)
        self._process = None
        self._adopted = None
        self._applied = None


class BirdStartFailed(CalicoCnmError):
    pass


def _bird_alive(pid: int) -> bool:
    """True while pid is a live (non-zombie) bird process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
        with open(f"/proc/{pid}/comm") as handle:
            name = handle.read().strip()
    except OSError:
        return False
    return name == "bird" and stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _tail(path: str, size: int = 600) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode(errors="replace").strip()
    except OSError:
        return ""
