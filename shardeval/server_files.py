"""The files of shardeval's local Prefect server, and the process checks both sides share.

Read by :mod:`shardeval.local_server` (the runs and ``shardeval server``) and by
:mod:`shardeval.server_supervisor` (the process that runs the server); nothing here imports
Prefect, so the supervisor stays small.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from shardeval.processes import pid_alive


@dataclass(frozen=True)
class ServerState:
    """What ``server.json`` records about a running local server (written by its supervisor)."""

    pid: int
    """The ``prefect server start`` process."""
    supervisor_pid: int
    """The process that started it and stops it when idle (``shardeval.server_supervisor``)."""
    port: int
    url: str
    """The API URL, as ``PREFECT_API_URL`` takes it (``http://127.0.0.1:PORT/api``)."""
    started_at: float
    prefect_version: str
    idle_s: float
    log: str


def shardeval_home() -> Path:
    """``SHARDEVAL_HOME`` or ``~/.shardeval``: where the local server's files live."""
    raw = os.environ.get("SHARDEVAL_HOME")
    return Path(raw).expanduser() if raw else Path.home() / ".shardeval"


@dataclass(frozen=True)
class ServerFiles:
    """The paths of one shardeval home's server files."""

    home: Path

    @property
    def state(self) -> Path:  # noqa: D102 - the names say it
        return self.home / "server.json"

    @property
    def log(self) -> Path:  # noqa: D102
        return self.home / "server.log"

    @property
    def last_used(self) -> Path:  # noqa: D102
        return self.home / "server.last-used"

    @property
    def lock(self) -> Path:  # noqa: D102
        return self.home / "server.lock"

    @property
    def prefect_home(self) -> Path:  # noqa: D102
        return self.home / "prefect"


def read_state(files: ServerFiles) -> ServerState | None:
    """The recorded server, or ``None`` if there is none (or the file is unreadable)."""
    try:
        raw = json.loads(files.state.read_text())
        return ServerState(**raw)
    except (OSError, ValueError, TypeError):
        return None


def write_state(files: ServerFiles, state: ServerState) -> None:
    """Write ``server.json`` atomically (a reader sees the old file or the new one)."""
    tmp = files.state.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.replace(tmp, files.state)


def remove_state_if(files: ServerFiles, supervisor_pid: int) -> None:
    """Remove ``server.json`` if it still names this supervisor (a newer server keeps its own)."""
    state = read_state(files)
    if state is not None and state.supervisor_pid == supervisor_pid:
        files.state.unlink(missing_ok=True)


# The local server listens on 127.0.0.1: a proxy the environment sets could not reach it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """``GET {url}/health`` answers 200 (the check Prefect's own client makes)."""
    try:
        with _DIRECT.open(f"{url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def touch(files: ServerFiles) -> None:
    """Record that the server is in use now (the supervisor's idle clock restarts)."""
    files.last_used.touch()


def idle_for(files: ServerFiles) -> float:
    """Seconds since a run last touched the server (infinite if none ever did)."""
    try:
        return time.time() - files.last_used.stat().st_mtime
    except OSError:
        return float("inf")


def is_ours(pid: int, marker: str) -> bool:
    """Whether ``pid`` is still the process we recorded (pids get reused after a reboot)."""
    if not Path("/proc/self/cmdline").exists():  # no procfs (macOS): trust the pid
        return pid_alive(pid)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return marker.encode() in cmdline.read()
    except OSError:
        return False


def terminate(pid: int, *, deadline_s: float, group: bool = False) -> None:
    """SIGTERM (background Prefect processes ignore SIGINT), wait, then SIGKILL."""
    send: Callable[[int, int], None] = os.killpg if group else os.kill
    for signum, wait_s in ((signal.SIGTERM, deadline_s), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            return
        try:
            send(pid, signum)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + wait_s
        while time.monotonic() < end and pid_alive(pid):
            time.sleep(0.1)
