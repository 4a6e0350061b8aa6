"""The client side of the test server: :class:`TestServer` starts one and controls it over HTTP.

It starts the server in a daemon thread with its own event loop, or as a
``python -m shardeval.testing.server`` child process, then reads and changes it through the
control endpoints (``/stats``, ``/reset``, ``/config``), which work the same for both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast

from shardeval.testing.server_config import ServerConfig, config_to_argv
from shardeval.testing.server_runner import HOST, LISTENING_PREFIX, base_url, start_listening


class TestServer:
    """Handle on a running test server, in this process (thread) or in a child process.

    Thread mode is the cheap default for tests; subprocess mode gives the server its own GIL
    and survives the test process's event loops, which benchmarks and crash tests need. Both
    are controlled over HTTP, so every method works the same way for both.

    Use :meth:`start_in_thread` or :meth:`start_subprocess` rather than the constructor.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        port: int,
        *,
        thread: threading.Thread | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        process: subprocess.Popen[str] | None = None,
        stderr_tail: collections.deque[str] | None = None,
    ) -> None:
        self._port = port
        self._thread = thread
        self._loop = loop
        self._process = process
        self._stderr_tail = stderr_tail
        self._stopped = False
        # Never route 127.0.0.1 through an HTTP(S)_PROXY from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- starting ----------------------------------------------------------------------------

    @classmethod
    def start_in_thread(
        cls, config: ServerConfig | None = None, port: int = 0, *, timeout: float = 10.0
    ) -> TestServer:
        """Serve from a daemon thread running its own event loop; returns once listening.

        Args:
            config: Initial behaviour (default ``ServerConfig()``).
            port: Port on 127.0.0.1; 0 picks a free one (read it back from :attr:`port`).
            timeout: Seconds to wait for the server to listen.

        Returns:
            The running server's handle.

        Raises:
            OSError: If the port cannot be bound (re-raised from the server thread).
            RuntimeError: If the server does not start within ``timeout``.
        """
        ready = threading.Event()
        started: dict[str, Any] = {}

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                runner, bound_port = loop.run_until_complete(start_listening(config, port))
            except BaseException as exc:
                started["error"] = exc
                loop.close()
                ready.set()
                return
            started.update(loop=loop, port=bound_port)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(runner.cleanup())
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.run_until_complete(asyncio.sleep(0))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="shardeval-test-server", daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"test server thread did not start within {timeout} s")
        if "error" in started:
            raise started["error"]
        return cls(started["port"], thread=thread, loop=started["loop"])

    @classmethod
    def start_subprocess(
        cls, config: ServerConfig | None = None, port: int = 0, *, timeout: float = 30.0
    ) -> TestServer:
        """Run ``python -m shardeval.testing.server`` and wait for its "listening" line.

        The child gets this checkout on ``PYTHONPATH`` so it imports the same ``shardeval``
        as the caller, installed or not.

        Args:
            config: Initial behaviour, passed as command-line flags.
            port: Port on 127.0.0.1; 0 lets the child pick one (it reports it).
            timeout: Seconds to wait for the listening line.

        Returns:
            The running server's handle.

        Raises:
            RuntimeError: If the child exits or stays silent past ``timeout``; the message
                carries the end of its stderr.
        """
        argv = [*config_to_argv(config or ServerConfig()), "--port", str(port)]
        env = os.environ.copy()
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [sys.executable, "-m", "shardeval.testing.server", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        stderr_tail: collections.deque[str] = collections.deque(maxlen=50)
        assert process.stdout is not None and process.stderr is not None
        _drain(process.stdout, lines.put, "shardeval-test-server-stdout", lambda: lines.put(None))
        _drain(process.stderr, stderr_tail.append, "shardeval-test-server-stderr")

        deadline = time.monotonic() + timeout
        pattern = re.compile(re.escape(LISTENING_PREFIX) + r"http://127\.0\.0\.1:(\d+)/v1")
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(remaining, 0.0)) if remaining > 0 else None
            except queue.Empty:
                line = None
            match = pattern.match(line) if line else None
            if match is not None:
                return cls(int(match.group(1)), process=process, stderr_tail=stderr_tail)
            if line is None:  # EOF (child died) or timeout
                _terminate(process)
                tail = "".join(stderr_tail).strip()
                raise RuntimeError(
                    f"test server subprocess did not start (exit code {process.returncode}):\n"
                    f"{tail}"
                )

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        return self._port

    @property
    def url(self) -> str:
        """OpenAI ``base_url``, e.g. ``http://127.0.0.1:PORT/v1``."""
        return base_url(self._port)

    @property
    def root_url(self) -> str:
        """Base of the control endpoints (``/stats``, ``/config``...), without ``/v1``."""
        return f"http://{HOST}:{self._port}"

    # -- control -----------------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        """One JSON request to a control endpoint; sync (urllib) so plain tests can call it."""
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(
            self.root_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode("utf-8", "replace")
            if exc.code == 400:
                raise ValueError(f"{method} {path} rejected: {detail}") from None
            raise RuntimeError(f"{method} {path} failed with {exc.code}: {detail}") from None

    def stats(self) -> dict[str, Any]:
        """The counters, with ``by_status`` keyed by ``int`` status for convenient asserts.

        Returns:
            ``requests``, ``by_status``, ``completions``, ``cancelled``, ``prompts`` and
            ``prompt_completions`` (per :func:`~shardeval.testing.server_stats.prompt_key`),
            ``in_flight``, ``max_in_flight``, ``first_request_at`` and ``last_completion_at``
            (epoch seconds, or None).
        """
        data = cast(dict[str, Any], self._call("GET", "/stats"))
        data["by_status"] = {int(k): v for k, v in data["by_status"].items()}
        return data

    def reset(self) -> None:
        """Zero the counters (the config is left alone)."""
        self._call("POST", "/reset", {})

    def configure(self, **fields: Any) -> dict[str, Any]:
        """Change config fields at runtime, e.g. ``configure(down=True, retry_after=0.1)``.

        Args:
            **fields: :class:`ServerConfig` fields and their new values.

        Returns:
            The full config after the update.

        Raises:
            ValueError: For unknown fields or invalid values (nothing is changed).
        """
        return cast(dict[str, Any], self._call("POST", "/config", fields))

    def get_config(self) -> dict[str, Any]:
        """The current config as a dict."""
        return cast(dict[str, Any], self._call("GET", "/config"))

    # -- stopping ----------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down: thread mode cleans the app up on its loop; subprocess mode SIGTERMs.

        Safe to call more than once.

        Args:
            timeout: Seconds to wait for the thread or process to end.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if self._process is not None:
            _terminate(self._process, timeout)

    @property
    def pid(self) -> int | None:
        """The server's process id when it runs in a subprocess (benchmarks read its CPU)."""
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> TestServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = "subprocess" if self._process is not None else "thread"
        return f"TestServer({kind}, url={self.url!r})"


def _drain(
    stream: IO[str],
    sink: Callable[[str], object],
    name: str,
    on_eof: Callable[[], object] | None = None,
) -> None:
    """Read a child's pipe to EOF in a daemon thread (a full pipe would block the child)."""

    def run() -> None:
        with contextlib.suppress(OSError, ValueError):  # pipe closed by _terminate
            for line in stream:
                sink(line)
        if on_eof is not None:
            on_eof()

    threading.Thread(target=run, name=name, daemon=True).start()


def _terminate(process: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL if the child ignores it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
