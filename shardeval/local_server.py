"""The local Prefect server that shardeval starts once, reuses, and stops after a long idle time.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server inside every process (10-20 s
on a small machine) as a child in the caller's process group, so a terminal's Ctrl-C or a
``timeout``'s SIGTERM to the group kills it and the run then hangs retrying the dead API. This
module replaces that default: the first run starts ``prefect server start`` in a session of its
own (no terminal signal reaches it) under a supervisor that stops it when nobody has used it for
``SHARDEVAL_SERVER_IDLE_S`` seconds; later runs find it healthy and reuse it in milliseconds.

Everything lives in the shardeval home (``SHARDEVAL_HOME``, default ``~/.shardeval``):
``server.json`` (what is running: pids, port, URL, Prefect version), ``server.log``,
``server.last-used`` (touched by every run that uses the server), ``server.lock`` (so two
processes starting at once start one server) and ``prefect/`` (the server's own
``PREFECT_HOME``, so the user's profiles and database are never touched).

An explicit ``PREFECT_API_URL`` (environment, active profile, or any Prefect settings file)
always wins, and ``SHARDEVAL_LOCAL_SERVER=0`` keeps Prefect's own temporary server. No Prefect
import at module level: ``shardeval server status`` and the health check need none.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from shardeval.errors import ShardevalError, SpecError

DEFAULT_IDLE_S = 2 * 3600.0
START_BUDGET_S = 120.0
STOP_DEADLINE_S = 20.0
_TELEMETRY_OFF = {
    # The server's heartbeat to Prefect (and its "Failed to send telemetry" errors offline).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's SDK analytics, checked when prefect is imported and at every event it emits.
    "DO_NOT_TRACK": "1",
}


class LocalServerError(ShardevalError):
    """The local Prefect server could not be started or stopped."""


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


@dataclass(frozen=True)
class PrefectApi:
    """Which Prefect API this process talks to, and what to tell the user about it."""

    url: str | None
    """``None`` in Prefect's ephemeral mode (``SHARDEVAL_LOCAL_SERVER=0``)."""
    source: Literal["explicit", "local", "ephemeral"]

    @property
    def message(self) -> str | None:
        """The line a run prints once, for the local server only."""
        if self.source != "local":
            return None
        return (
            f"using the local Prefect server at {self.url} "
            "(started by shardeval; `shardeval server stop` stops it)"
        )


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


def telemetry_off(env: dict[str, str] | None = None) -> None:
    """Turn Prefect's telemetry off in ``env`` (default: this process), unless set explicitly."""
    target: Any = os.environ if env is None else env
    for name, value in _TELEMETRY_OFF.items():
        target.setdefault(name, value)


def idle_seconds() -> float:
    """``SHARDEVAL_SERVER_IDLE_S``: how long the server may go unused before it stops itself."""
    raw = os.environ.get("SHARDEVAL_SERVER_IDLE_S", "").strip()
    if not raw:
        return DEFAULT_IDLE_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise SpecError(f"SHARDEVAL_SERVER_IDLE_S={raw!r}: expected a number of seconds above 0")
    return value


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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """``GET {url}/health`` answers 200 (the check Prefect's own client makes)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def touch(files: ServerFiles) -> None:
    """Record that the server is in use now (the supervisor's idle clock restarts)."""
    files.last_used.touch()


def running_server(files: ServerFiles) -> ServerState | None:
    """The recorded server if it is alive, answers its health check and matches this Prefect."""
    state = read_state(files)
    if state is None or not pid_alive(state.pid) or not is_healthy(state.url):
        return None
    if state.prefect_version != version("prefect"):
        return None
    return state


def ensure_local_server(
    *,
    home: Path | None = None,
    waiting: Callable[[str], AbstractContextManager[Any]] | None = None,
) -> str:
    """Reuse shardeval's local Prefect server, or start it; return its API URL.

    Under ``server.lock``, so processes starting at once start one server. A recorded server
    that is dead, unhealthy or of another Prefect version is stopped and replaced.

    Args:
        home: The shardeval home (default: :func:`shardeval_home`).
        waiting: Wraps the wait for a fresh server (the CLI passes a spinner).

    Returns:
        The API URL, e.g. ``http://127.0.0.1:51234/api``.

    Raises:
        LocalServerError: The server did not become healthy within 120 s (the log's tail says why).
    """
    from filelock import FileLock

    files = ServerFiles(home or shardeval_home())
    files.home.mkdir(parents=True, exist_ok=True)
    with FileLock(files.lock):
        state = running_server(files)
        if state is None:
            _stop_recorded(files)
            with (waiting or _no_wait)(
                "Starting shardeval's local Prefect server (once; later runs reuse it)..."
            ):
                state = _start(files)
        touch(files)
        return state.url


def stop_local_server(home: Path | None = None) -> ServerState | None:
    """Stop the recorded server (SIGTERM, then SIGKILL after a deadline); what was stopped."""
    from filelock import FileLock

    files = ServerFiles(home or shardeval_home())
    if not files.home.exists():
        return None
    with FileLock(files.lock):
        return _stop_recorded(files)


def use_prefect_api(
    *, waiting: Callable[[str], AbstractContextManager[Any]] | None = None
) -> PrefectApi:
    """Decide which Prefect API this process uses, starting the local server if that is it.

    Call it before the first flow run. An explicit ``PREFECT_API_URL`` (environment, active
    profile, Prefect settings files) wins; ``SHARDEVAL_LOCAL_SERVER=0`` keeps Prefect's ephemeral
    mode; otherwise the local server's URL goes into ``os.environ`` (so Dask workers and other
    child processes inherit it) and Prefect's global settings are refreshed, because Prefect
    reads its settings once when it is imported. Turns Prefect's telemetry off in every case.
    While the process lives, a daemon thread keeps the server's idle clock from running out.
    """
    telemetry_off()
    explicit = os.environ.get("PREFECT_API_URL") or _configured_api_url()
    if explicit:
        return PrefectApi(explicit, "explicit")
    if os.environ.get("SHARDEVAL_LOCAL_SERVER", "").strip() == "0":
        return PrefectApi(None, "ephemeral")
    files = ServerFiles(shardeval_home())
    url = ensure_local_server(home=files.home, waiting=waiting)
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    _keep_alive(files)
    return PrefectApi(url, "local")


def _configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from Prefect's settings sources other than the environment."""
    telemetry_off()  # prefect reads DO_NOT_TRACK when it is imported
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


_keep_alive_started: set[Path] = set()


def _keep_alive(files: ServerFiles) -> None:
    """Touch ``last-used`` while this process lives, so a run longer than the idle time is safe."""
    if files.home in _keep_alive_started:
        return
    _keep_alive_started.add(files.home)
    state = read_state(files)
    interval = min(60.0, max(0.5, (state.idle_s if state else DEFAULT_IDLE_S) / 3))

    def beat() -> None:
        while True:
            time.sleep(interval)
            try:
                touch(files)
            except OSError:  # the home went away (a test's temp dir): nothing left to keep
                return

    threading.Thread(target=beat, name="shardeval-server-keepalive", daemon=True).start()


def _no_wait(message: str) -> AbstractContextManager[None]:
    return nullcontext()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(files: ServerFiles) -> ServerState:
    """Start the supervisor (which starts the server) in a new session; wait for health."""
    files.prefect_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH", "PREFECT_API_KEY"):
        env.pop(name, None)
    env["PREFECT_HOME"] = str(files.prefect_home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    env["PREFECT_SERVER_LOGGING_LEVEL"] = env.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    port = _free_port()
    touch(files)
    command = [sys.executable, "-m", "shardeval.server_supervisor", "--home", str(files.home)]
    command += ["--port", str(port), "--idle-s", str(idle_seconds())]
    with open(files.log, "ab") as log:
        supervisor = subprocess.Popen(
            command,
            cwd=files.home,  # not the user's directory: its .env / prefect.toml are not ours
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no terminal signal (Ctrl-C, SIGTERM to the group) reaches it
        )
    deadline = time.monotonic() + START_BUDGET_S
    while time.monotonic() < deadline:
        if supervisor.poll() is not None:
            raise LocalServerError(_failed("exited", supervisor.returncode, files))
        state = read_state(files)
        if state is not None and state.supervisor_pid == supervisor.pid and is_healthy(state.url):
            return state
        time.sleep(0.25)
    terminate(supervisor.pid, deadline_s=STOP_DEADLINE_S)
    raise LocalServerError(_failed("did not answer within 120 s", None, files))


def _failed(what: str, code: int | None, files: ServerFiles) -> str:
    try:
        tail = files.log.read_text(errors="replace")[-1500:]
    except OSError:
        tail = ""
    status = f" (exit {code})" if code is not None else ""
    return (
        f"the local Prefect server {what}{status}; its log is {files.log}:\n{tail}\n"
        "To resolve this: read the log, or set PREFECT_API_URL to a Prefect server you run, "
        "or SHARDEVAL_LOCAL_SERVER=0 for Prefect's temporary server"
    )


def _stop_recorded(files: ServerFiles) -> ServerState | None:
    """Stop what ``server.json`` names (caller holds the lock) and remove the file."""
    state = read_state(files)
    if state is None:
        return None
    files.state.unlink(missing_ok=True)
    if _is_ours(state.supervisor_pid, "shardeval.server_supervisor"):
        terminate(state.supervisor_pid, deadline_s=STOP_DEADLINE_S)  # it stops the server first
    if _is_ours(state.pid, "prefect"):
        terminate(state.pid, deadline_s=STOP_DEADLINE_S, group=True)
    return state


def _is_ours(pid: int, marker: str) -> bool:
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
