"""Shared fixtures: real servers on 127.0.0.1, a Prefect home per session, CLI runner.

* ``llm_server``: the project's OpenAI-compatible test server in a thread (fresh per test).
* ``prefect_api``: one real ``prefect server start`` per test session, for tests that start
  the CLI as a subprocess many times (each would otherwise start Prefect's temporary server).
* ``run_cli``: runs ``python -m shardeval ...`` as a subprocess and returns the result.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardeval.testing.server import ServerConfig, TestServer

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Give the session its own Prefect home, so no cache record leaks between sessions."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="shardeval-prefect-"))
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.pop("PREFECT_API_URL", None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def llm_server() -> Iterator[TestServer]:
    """The OpenAI-compatible test server: deterministic arith answers, 5-10 ms latency."""
    server = TestServer.start_in_thread(ServerConfig(latency_min=0.005, latency_max=0.01))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1 for the whole session; yields its API URL."""
    port = free_port()
    home = tmp_path_factory.mktemp("prefect-server-home")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def cli_env(prefect_api: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess (pointed at a running Prefect server if given)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    else:
        env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture
def run_cli(prefect_api: str) -> Any:
    """Run ``shardeval`` as a subprocess against the session's Prefect server."""

    def run(
        *args: str, cwd: Path | None = None, timeout: float = 300, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shardeval", *args],
            cwd=cwd,
            env=cli_env(prefect_api, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
