"""``shardeval server start|stop|status``: the local Prefect server shardeval runs for itself.

Runs without ``PREFECT_API_URL`` use it (see :mod:`shardeval.local_server`); these commands
let a user see it, start it ahead of time, or stop it (it also stops itself when idle).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from shardeval.display import err_console, out_console, spinner

server_app = typer.Typer(
    help="The local Prefect server shardeval starts for runs without PREFECT_API_URL.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the ``server`` command group."""
    app.add_typer(server_app, name="server")


@server_app.command("start")
def start() -> None:
    """Start the local server now (a run would start it anyway), or say it is running."""
    from shardeval.local_server import ServerFiles, ensure_local_server, shardeval_home

    files = ServerFiles(shardeval_home())
    url = ensure_local_server(home=files.home, waiting=lambda m: spinner(m, enabled=True))
    out_console.print(f"local Prefect server: {url} (UI at {url.removesuffix('/api')})")


@server_app.command("stop")
def stop() -> None:
    """Stop the local server (SIGTERM, SIGKILL after 20 s) and forget it."""
    from shardeval.local_server import stop_local_server

    stopped = stop_local_server()
    if stopped is None:
        out_console.print("no local Prefect server is running")
    else:
        out_console.print(f"stopped the local Prefect server at {stopped.url} (pid {stopped.pid})")


@server_app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show the local server: URL, pids, uptime, idle time and log path."""
    found = _status()
    if as_json:
        print(json.dumps(found, indent=2, sort_keys=True))
    elif not found["running"]:
        out_console.print(f"no local Prefect server is running (home: {found['home']})")
    else:
        out_console.print(f"local Prefect server: {found['url']} ({found['health']})")
        out_console.print(f"  pid {found['pid']}, supervisor pid {found['supervisor_pid']}")
        out_console.print(f"  Prefect {found['prefect_version']}, up {_age(found['uptime_s'])}")
        out_console.print(
            f"  idle {_age(found['idle_s'])}; stops itself after {_age(found['idle_limit_s'])}"
        )
        out_console.print(f"  log: {found['log']}")
    if found.get("stale"):
        err_console.print(f"[yellow]warning[/]: {found['stale']}")


def _status() -> dict[str, Any]:
    from shardeval.local_server import (
        ServerFiles,
        is_healthy,
        pid_alive,
        read_state,
        shardeval_home,
    )

    files = ServerFiles(shardeval_home())
    state = read_state(files)
    base: dict[str, Any] = {"home": str(files.home), "running": False}
    if state is None:
        return base
    if not pid_alive(state.pid):
        base["stale"] = f"{files.state} names pid {state.pid}, which is gone (a run replaces it)"
        return base
    try:
        last_used = files.last_used.stat().st_mtime
    except OSError:
        last_used = state.started_at
    now = time.time()
    return {
        **base,
        "running": True,
        "health": "healthy" if is_healthy(state.url) else "not answering /api/health",
        "url": state.url,
        "pid": state.pid,
        "supervisor_pid": state.supervisor_pid,
        "prefect_version": state.prefect_version,
        "uptime_s": round(now - state.started_at, 1),
        "idle_s": round(max(0.0, now - last_used), 1),
        "idle_limit_s": state.idle_s,
        "log": state.log,
    }


def _age(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
