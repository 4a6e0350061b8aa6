"""Shared fixtures: real servers on 127.0.0.1, a Prefect home per session, CLI runner.

* ``llm_server``: the project's OpenAI-compatible test server in a thread (fresh per test).
* ``prefect_api``: one real ``prefect server start`` per test session, for tests that start
  the CLI as a subprocess many times (each would otherwise start Prefect's temporary server).
* ``run_cli``: runs ``python -m shardeval ...`` as a subprocess and returns the result.
* S3 servers and buckets (``s3_backend``, ``bucket``): tests/s3/fixtures.py.

A CLI run without ``PREFECT_API_URL`` starts shardeval's local Prefect server in
``SHARDEVAL_HOME``: the session points that at a temporary directory (so no test leaves a server
running in the user's ``~/.shardeval``) and stops whatever was started there when it ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardeval.testing.server import ServerConfig, TestServer
from tests.helpers.prefect_server import start_prefect_server, stop_prefect_server

# CPython 3.11 keeps the AST constructor's recursion depth in state that threads share
# (python/cpython#106905): pytest rewriting a third-party module named conftest.py
# (beartype's, which Prefect's server imports in the first test that starts one) while
# another thread builds an AST fails that test's setup with "SystemError: AST constructor
# recursion depth mismatch". Importing it here does the rewrite while only one thread runs.
with contextlib.suppress(ImportError):
    import beartype  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.s3.fixtures"]
"""The S3 servers (moto, SeaweedFS): used by tests/s3 and the store contract suite."""


def pytest_configure(config: pytest.Config) -> None:
    """Give the session its own Prefect home, so no cache record leaks between sessions."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="shardeval-prefect-"))
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["SHARDEVAL_HOME"] = tempfile.mkdtemp(prefix="shardeval-home-")
    # A session killed before its teardown leaves at most a server that soon stops itself.
    os.environ.setdefault("SHARDEVAL_SERVER_IDLE_S", "600")


@pytest.fixture(scope="session", autouse=True)
def _stop_local_prefect_server() -> Iterator[None]:
    """Stop the local Prefect server a default-mode CLI run started in the session's home."""
    yield
    from shardeval.local_server import stop_local_server

    stop_local_server(Path(os.environ["SHARDEVAL_HOME"]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_test_model() -> Iterator[TestServer]:
    """The project's test server in a thread, 5-10 ms latency, stopped after the test."""
    server = TestServer.start_in_thread(ServerConfig(latency_min=0.005, latency_max=0.01))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def llm_server() -> Iterator[TestServer]:
    """The OpenAI-compatible test server: deterministic arith answers, 5-10 ms latency."""
    yield from serve_test_model()


@pytest.fixture
def second_server() -> Iterator[TestServer]:
    """Another test server: an endpoint to take down, or a model to change, on its own."""
    yield from serve_test_model()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1 for the whole session; yields its API URL."""
    process, url = start_prefect_server(tmp_path_factory.mktemp("prefect-server-home"))
    try:
        yield url
    finally:
        stop_prefect_server(process)


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


SLOW_DIRECTORIES = ("crash", "s3", "deploy")
"""Every test in these directories starts subprocesses or servers: part of the full suite only."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark crash, S3 and deployment tests slow, so `pytest -m "not slow"` is the fast loop."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if len(parts) > 2 and parts[0] == "tests" and parts[1] in SLOW_DIRECTORIES:
            item.add_marker(pytest.mark.slow)
