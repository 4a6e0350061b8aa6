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

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from shardeval.envvars import env_number
from shardeval.errors import ShardevalError
from shardeval.loopback import is_loopback
from shardeval.processes import pid_alive
from shardeval.server_files import (
    ServerFiles,
    ServerState,
    idle_for,
    is_healthy,
    is_ours,
    read_state,
    shardeval_home,
    terminate,
    touch,
)

__all__ = [
    "LocalServerError",
    "PrefectApi",
    "ServerFiles",
    "ServerState",
    "ensure_local_server",
    "idle_seconds",
    "is_healthy",
    "pid_alive",
    "read_state",
    "server_settings",
    "shardeval_home",
    "stop_local_server",
    "telemetry_off",
    "use_prefect_api",
]

DEFAULT_IDLE_S = 2 * 3600.0
START_BUDGET_S = 180.0  # 28-60 s is usual on 2 cores; 110 s seen at a load of 12
STOP_DEADLINE_S = 20.0
KEEP_ALIVE_MAX_S = 60.0
IN_USE_S = 2.5 * KEEP_ALIVE_MAX_S
"""A server touched this recently may be serving a run right now (runs touch it every minute)."""
_TELEMETRY_OFF = {
    # The server's heartbeat to Prefect (and its "Failed to send telemetry" errors offline).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's SDK analytics, checked when prefect is imported and at every event it emits.
    "DO_NOT_TRACK": "1",
}


_RECORDER_BATCHING = {
    # Prefect's server records each task-run event in a transaction of its own by default (a
    # batch of one). A run's batch tasks then keep the server busy through the request phase,
    # competing with the run for a small machine's cores (docs/performance.md, sixth round).
    # Batched, task runs reach the UI at most FLUSH_INTERVAL seconds later; flow runs, events
    # and automations are not delayed.
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "2",
}


def server_settings(env: dict[str, str] | None = None) -> None:
    """The settings of a Prefect server shardeval starts, in ``env`` (default: this process).

    Unless set explicitly: telemetry off (:func:`telemetry_off`), and task-run states recorded
    in batches instead of one transaction per event.
    """
    target: Any = os.environ if env is None else env
    telemetry_off(target)
    for name, value in _RECORDER_BATCHING.items():
        target.setdefault(name, value)


class LocalServerError(ShardevalError):
    """The local Prefect server could not be started or stopped."""


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


def telemetry_off(env: dict[str, str] | None = None) -> None:
    """Turn Prefect's telemetry off in ``env`` (default: this process), unless set explicitly."""
    target: Any = os.environ if env is None else env
    for name, value in _TELEMETRY_OFF.items():
        target.setdefault(name, value)


def idle_seconds() -> float:
    """``SHARDEVAL_SERVER_IDLE_S``: how long the server may go unused before it stops itself."""
    return env_number("SHARDEVAL_SERVER_IDLE_S", float, minimum=0.001, default=DEFAULT_IDLE_S)


def running_server(files: ServerFiles) -> ServerState | None:
    """The recorded server if it is alive, answers its health check and matches this Prefect.

    A server of another Prefect version (an upgrade, or another environment sharing the home)
    is replaced only when idle: a run in progress elsewhere may be using it, and Prefect 3's
    API is the same across its minor versions.
    """
    state = read_state(files)
    if state is None or not pid_alive(state.pid) or not is_healthy(state.url):
        return None
    if state.prefect_version != version("prefect") and idle_for(files) > IN_USE_S:
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
        LocalServerError: The server did not become healthy within 180 s (the log's tail says why).
    """
    files = ServerFiles(home or shardeval_home())
    try:
        files.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalServerError(
            f"cannot create the shardeval home {files.home} ({exc.strerror}). To resolve this: "
            "set SHARDEVAL_HOME to a writable directory, or PREFECT_API_URL to a Prefect server"
        ) from exc
    with _locked(files, waiting or _no_wait):
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
        _reach_directly(explicit)
        return PrefectApi(explicit, "explicit")
    if os.environ.get("SHARDEVAL_LOCAL_SERVER", "").strip() == "0":
        server_settings()  # Prefect's temporary server is a child of this process
        return PrefectApi(None, "ephemeral")
    files = ServerFiles(shardeval_home())
    url = ensure_local_server(home=files.home, waiting=waiting)
    os.environ["PREFECT_API_URL"] = url
    _reach_directly(url)
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    _keep_alive(files)
    return PrefectApi(url, "local")


_PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
"""What makes Prefect's client (httpx) use a proxy."""


def _reach_directly(api_url: str) -> None:
    """Keep Prefect's client off a proxy the environment sets, for an API on this machine.

    Prefect's client (httpx) honours ``HTTP_PROXY`` but not loopback: a shell that exports a
    company proxy would send every call to ``127.0.0.1`` through it, and the run would wait
    on a server the proxy cannot reach. ``NO_PROXY`` gets the API's host, in this process
    and for its children (Dask workers), only when a proxy is set.
    """
    host = urllib.parse.urlsplit(api_url).hostname
    proxied = any(os.environ.get(name) for name in _PROXY_VARIABLES)
    if not proxied or host is None or not is_loopback(host):
        return
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [h.strip() for h in os.environ.get(name, "").split(",") if h.strip()]
        if host not in hosts:
            os.environ[name] = ",".join([*hosts, host])


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
    interval = min(KEEP_ALIVE_MAX_S, max(0.5, (state.idle_s if state else DEFAULT_IDLE_S) / 3))

    def beat() -> None:
        while True:
            time.sleep(interval)
            try:
                touch(files)
            except OSError:  # the home went away (a test's temp dir): nothing left to keep
                return

    threading.Thread(target=beat, name="shardeval-server-keepalive", daemon=True).start()


@contextmanager
def _locked(
    files: ServerFiles, waiting: Callable[[str], AbstractContextManager[Any]]
) -> Iterator[None]:
    """Hold ``server.lock``; say so if another process holds it (it is starting the server)."""
    from filelock import FileLock, Timeout

    lock = FileLock(files.lock)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        message = "Waiting for another shardeval process starting the local Prefect server..."
        try:
            with waiting(message):
                lock.acquire(timeout=START_BUDGET_S + 2 * STOP_DEADLINE_S)
        except Timeout as exc:
            raise LocalServerError(
                f"{files.lock} is held by another process for more than "
                f"{START_BUDGET_S + 2 * STOP_DEADLINE_S:g} s; `shardeval server status` shows "
                "the server, its log says what it is doing"
            ) from exc
    try:
        yield
    finally:
        lock.release()


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
    server_settings(env)
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
    raise LocalServerError(_failed(f"did not answer within {START_BUDGET_S:g} s", None, files))


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
    if is_ours(state.supervisor_pid, "shardeval.server_supervisor"):
        terminate(state.supervisor_pid, deadline_s=STOP_DEADLINE_S)  # it stops the server first
    if is_ours(state.pid, "prefect"):
        terminate(state.pid, deadline_s=STOP_DEADLINE_S, group=True)
    return state
