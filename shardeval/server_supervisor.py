"""The supervisor of shardeval's local Prefect server: start it, record it, stop it when idle.

Started by :func:`shardeval.local_server.ensure_local_server` in a session of its own, it runs
``prefect server start`` as its child, writes ``server.json`` once the child exists, and then
wakes up now and then: when ``server.last-used`` is older than the idle time (and no shardeval
process holds ``server.lock``), or on SIGTERM (``shardeval server stop``), it removes
``server.json`` and stops the server, SIGTERM first and SIGKILL after a deadline. If the server
dies by itself, the supervisor removes the record and exits too, so nothing is left that
``shardeval server status`` cannot see.

    python -m shardeval.server_supervisor --home DIR --port PORT --idle-s SECONDS
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from types import FrameType

from shardeval.server_files import (
    ServerFiles,
    ServerState,
    idle_for,
    remove_state_if,
    terminate,
    write_state,
)

STOP_DEADLINE_S = 20.0


class _Stop(Exception):
    """Raised by the signal handler to leave the watch loop at once."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _idle_stop_due(files: ServerFiles, idle_s: float) -> bool:
    """Idle, checked under the lock so a run that is just reusing the server wins the race."""
    from filelock import FileLock, Timeout

    if idle_for(files) < idle_s:
        return False
    try:
        with FileLock(files.lock, timeout=0):
            if idle_for(files) < idle_s:
                return False
            remove_state_if(files, os.getpid())  # no new run finds it from here on
            return True
    except Timeout:  # a shardeval process is reusing or starting the server right now
        return False


def main(argv: list[str] | None = None) -> int:
    """Run the server until idle or told to stop; the exit code is 0 unless it failed to start."""
    parser = argparse.ArgumentParser(prog="python -m shardeval.server_supervisor")
    parser.add_argument("--home", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-s", type=float, required=True)
    args = parser.parse_args(argv)
    files = ServerFiles(Path(args.home))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)

    command = [sys.executable, "-m", "prefect", "server", "start"]
    command += ["--host", "127.0.0.1", "--port", str(args.port), "--analytics-off"]
    server = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        process_group=0,  # its own group: SIGKILL reaches anything it started
    )
    write_state(
        files,
        ServerState(
            pid=server.pid,
            supervisor_pid=os.getpid(),
            port=args.port,
            url=f"http://127.0.0.1:{args.port}/api",
            started_at=time.time(),
            prefect_version=version("prefect"),
            idle_s=args.idle_s,
            log=str(files.log),
        ),
    )
    why = "idle"
    poll_s = min(30.0, max(0.5, args.idle_s / 10))
    try:
        while True:
            if server.poll() is not None:
                why = f"the server exited by itself (exit {server.returncode})"
                break
            if _idle_stop_due(files, args.idle_s):
                why = f"unused for {args.idle_s:g} s"
                break
            time.sleep(poll_s)
    except _Stop as stop:
        why = f"{stop} received"
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
        remove_state_if(files, os.getpid())
        terminate(server.pid, deadline_s=STOP_DEADLINE_S, group=True)
        server.wait()
    print(f"shardeval server supervisor: stopped ({why})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
