"""A real ``prefect server`` on 127.0.0.1, for the test session and the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shardeval.local_server import server_settings

HEALTH_BUDGET_S = 180.0  # 28-60 s is usual on 2 loaded cores


def start_prefect_server(
    home: Path, *, shardeval_settings: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server with its own ``PREFECT_HOME``; return it and its API URL once healthy.

    With ``shardeval_settings`` it runs as shardeval's local server does
    (:func:`shardeval.local_server.server_settings`); Prefect's defaults otherwise.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if shardeval_settings:
        server_settings(env)
    with open(home / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + HEALTH_BUDGET_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_prefect_server(process)
            tail = (home / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"prefect server did not start: {tail}")
        time.sleep(0.5)


def stop_prefect_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (background Prefect processes ignore SIGINT), then SIGKILL if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
