"""shardeval's own OpenAI-compatible test server: a fake model with knobs for every failure.

Tests, benchmarks and the README quickstart need an endpoint that is deterministic (so accuracy
and resume assertions are exact), observable (so tests can assert *how many* calls were made,
which is the whole point of a resumable evaluator) and breakable on demand (500s, 429s with
``Retry-After``, outages, slow calls, bad keys). A real model gives none of that, so this module
serves ``POST /v1/chat/completions`` from :mod:`shardeval.testing.answers` and exposes:

* ``GET /v1/models``: the one model name, so clients that probe the endpoint are happy.
* ``GET /stats``: the counters (requests, by status, completions, per-prompt counts, in-flight).
* ``POST /reset``: zero the counters between test phases.
* ``GET|POST /config``: read or change any :class:`ServerConfig` field while running.
* ``GET /health``: liveness, unaffected by ``down`` so harnesses can tell "up but failing" from
  "not started".

Magic markers in the last user message let one test item misbehave without reconfiguring the
server: ``[[status:NNN]]`` (400-599) always answers with that status and an OpenAI-style error
body, ``[[sleep:S]]`` adds ``S`` seconds of latency.

The server only ever binds ``127.0.0.1``: it has no authentication worth the name and must never
be reachable from another machine. Run it with :class:`TestServer` (in a thread or a subprocess)
or from the command line::

    python -m shardeval.testing.server --port 0 --latency 0.02 --mode arith

which prints exactly one line, ``shardeval test server listening on http://127.0.0.1:PORT/v1``,
once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, cast

from aiohttp import web

from shardeval.hashing import canonical_json
from shardeval.testing.answers import (
    DEFAULT_WRONG_EVERY,
    answer_arith,
    echo_answer,
    last_user_message,
    message_text,
)

__all__ = [
    "HOST",
    "LISTENING_PREFIX",
    "ServerConfig",
    "TestServer",
    "config_to_argv",
    "create_app",
    "main",
    "prompt_key",
]

HOST = "127.0.0.1"
LISTENING_PREFIX = "shardeval test server listening on "
PROMPT_KEY_CHARS = 16
MODES = ("arith", "echo", "random")
RANDOM_CHOICES = ("A", "B", "C", "D")

Mode = Literal["arith", "echo", "random"]

_STATUS_MARKER = re.compile(r"\[\[status:(\d{3})\]\]")
_SLEEP_MARKER = re.compile(r"\[\[sleep:(\d+(?:\.\d*)?|\.\d+)\]\]")
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# Graceful shutdown waits this long for in-flight handlers: a test that leaves a
# ``[[sleep:60]]`` call running must not make ``stop()`` hang for a minute.
_SHUTDOWN_TIMEOUT_S = 1.0
# Benchmarks open up to 256 connections at once; the default backlog of 128 would drop SYNs
# and add 1 s retransmission stalls that look like server latency.
_BACKLOG = 1024
_CLIENT_MAX_SIZE = 64 * 1024 * 1024

# (type, code) of the OpenAI-style error body, by status; others fall back by status class.
_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout_error", "timeout"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "gateway_timeout"),
}


@dataclass
class ServerConfig:
    """How the fake model behaves; every field can be changed at runtime via ``POST /config``.

    Attributes:
        latency_min: Minimum added latency per completion, in seconds.
        latency_max: Maximum added latency; the delay is drawn uniformly from
            ``[latency_min, max(latency_min, latency_max)]`` with a generator seeded by ``seed``,
            so leaving it at 0 gives a fixed ``latency_min``.
        mode: ``"arith"`` answers "What is A + B?" (echo otherwise), ``"echo"`` answers
            ``"echo: <last user message>"``, ``"random"`` answers one of A/B/C/D.
        wrong_every: In arith mode, questions whose ``sha256 % wrong_every == 0`` get
            ``A + B + 1``: a deterministic ~90% accuracy by default; ``0`` means never wrong.
        seed: Seeds the latency, failure and random-answer generators (reseeded whenever
            ``seed`` is set through ``/config``), so a sequential run is reproducible.
        fail_rate: Probability in ``[0, 1]`` that a completion request fails with
            ``fail_status`` (seeded draw).
        fail_status: HTTP status used for injected failures (``fail_rate``, ``fail_next``,
            ``down``).
        fail_next: The next N completion requests fail with ``fail_status``; counts down to 0.
        down: Simulate an outage: every completion request gets ``fail_status``.
        retry_after: If set, sent as ``Retry-After`` (seconds) and ``retry-after-ms`` on every
            429 and 503 response, to test that clients honour it.
        require_api_key: If set, requests without ``Authorization: Bearer <key>`` get 401.
        model: The model name listed by ``/v1/models`` and used when a request names none.
    """

    latency_min: float = 0.0
    latency_max: float = 0.0
    mode: Mode = "arith"
    wrong_every: int = DEFAULT_WRONG_EVERY
    seed: int = 0
    fail_rate: float = 0.0
    fail_status: int = 500
    fail_next: int = 0
    down: bool = False
    retry_after: float | None = None
    require_api_key: str | None = None
    model: str = "shardeval-test"

    def __post_init__(self) -> None:
        """Reject nonsense early: a bad ``/config`` body must be a 400, not a crashed handler."""
        self.latency_min = _number(self.latency_min, "latency_min", minimum=0.0)
        self.latency_max = _number(self.latency_max, "latency_max", minimum=0.0)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.wrong_every = _integer(self.wrong_every, "wrong_every")
        self.seed = _integer(self.seed, "seed")
        self.fail_rate = _number(self.fail_rate, "fail_rate", minimum=0.0)
        if self.fail_rate > 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {self.fail_rate}")
        self.fail_status = _integer(self.fail_status, "fail_status")
        if not 400 <= self.fail_status <= 599:
            raise ValueError(f"fail_status must be an HTTP error status, got {self.fail_status}")
        self.fail_next = _integer(self.fail_next, "fail_next")
        if self.fail_next < 0:
            raise ValueError(f"fail_next must be >= 0, got {self.fail_next}")
        if not isinstance(self.down, bool):
            raise ValueError(f"down must be a boolean, got {self.down!r}")
        if self.retry_after is not None:
            self.retry_after = _number(self.retry_after, "retry_after", minimum=0.0)
        if self.require_api_key is not None and not isinstance(self.require_api_key, str):
            raise ValueError("require_api_key must be a string or null")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (what ``GET /config`` returns)."""
        return dataclasses.asdict(self)


def _number(value: Any, name: str, *, minimum: float) -> float:
    """``value`` as a float >= ``minimum``; raises ``ValueError`` so ``/config`` can answer 400."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    """``value`` as an int (integral floats from JSON are accepted, booleans are not)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def prompt_key(messages: Any) -> str:
    """The key of one prompt in the per-prompt counters.

    It is the sha256 of the repository's canonical JSON of the messages (16 hex characters), so
    a test can compute the key of the messages it expects shardeval to send and look it up in
    ``stats()["prompts"]``.

    Args:
        messages: The ``messages`` list exactly as sent in the request body.

    Returns:
        16 lowercase hex characters.
    """
    encoded = canonical_json(messages).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:PROMPT_KEY_CHARS]


def _word_count(text: str) -> int:
    """Token count stand-in: whitespace-separated words (cheap, deterministic, plausible)."""
    return len(text.split())


def _format_seconds(seconds: float) -> str:
    """``Retry-After`` value: integral seconds as ``"2"``, fractions as ``"0.5"``."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _seeded(*parts: object) -> random.Random:
    """A generator seeded from a stable hash of ``parts``.

    Python's ``hash()`` of strings changes per process (PYTHONHASHSEED), so it would make the
    "deterministic" variants differ between a thread-mode and a subprocess-mode server.
    """
    text = "\x00".join(str(part) for part in parts)
    return random.Random(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big"))


@dataclass
class _Counters:
    """What tests assert on; one instance per server, mutated only on its event loop."""

    requests: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    completions: int = 0
    cancelled: int = 0
    prompts: collections.Counter[str] = field(default_factory=collections.Counter)
    prompt_completions: collections.Counter[str] = field(default_factory=collections.Counter)
    in_flight: int = 0
    max_in_flight: int = 0

    def reset(self) -> None:
        """Zero everything except the live ``in_flight`` gauge (running handlers still finish)."""
        self.requests = 0
        self.by_status.clear()
        self.completions = 0
        self.cancelled = 0
        self.prompts.clear()
        self.prompt_completions.clear()
        self.max_in_flight = self.in_flight

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready snapshot (status codes become string keys, as JSON requires)."""
        return {
            "requests": self.requests,
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "completions": self.completions,
            "cancelled": self.cancelled,
            "prompts": dict(self.prompts),
            "prompt_completions": dict(self.prompt_completions),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


class _FakeModel:
    """Request handlers plus their state; all of it lives on the server's one event loop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.counters = _Counters()
        self._reseed()

    def _reseed(self) -> None:
        """Independent streams, so e.g. enabling ``fail_rate`` does not shift the latencies."""
        seed = self.config.seed
        self._latency_rng = _seeded("latency", seed)
        self._fail_rng = _seeded("fail", seed)
        self._answer_rng = _seeded("answer", seed)

    # -- responses ---------------------------------------------------------------------------

    def _error(self, status: int, message: str, *, count: bool = True) -> web.Response:
        """An OpenAI-style error response, with ``Retry-After`` where configured.

        Args:
            status: HTTP status.
            message: Human-readable reason (says which injection caused it, for debugging).
            count: Whether to add it to ``by_status``; only chat-completion traffic counts.
        """
        default_kind = "server_error" if status >= 500 else "invalid_request_error"
        error_type, code = _ERROR_KINDS.get(status, (default_kind, f"http_{status}"))
        body = {"error": {"message": message, "type": error_type, "code": code, "param": None}}
        headers: dict[str, str] = {}
        retry_after = self.config.retry_after
        if retry_after is not None and status in _RETRY_AFTER_STATUSES:
            headers["Retry-After"] = _format_seconds(retry_after)
            headers["retry-after-ms"] = str(round(retry_after * 1000))
        if count:
            self.counters.by_status[status] += 1
        return web.Response(
            status=status, text=json.dumps(body), content_type="application/json", headers=headers
        )

    def _authorized(self, request: web.Request) -> bool:
        """Whether the request carries the configured bearer key (always, if none is set)."""
        key = self.config.require_api_key
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

    def _answer(self, text: str, body: Mapping[str, Any]) -> str:
        """The completion text for the configured mode."""
        mode = self.config.mode
        if mode == "arith":
            return answer_arith(text, self.config.wrong_every)
        if mode == "random":
            seed = body.get("seed")
            rng = self._answer_rng if seed is None else _seeded("request", seed, text)
            return rng.choice(RANDOM_CHOICES)
        return echo_answer(text)

    def _injected_failure(self) -> str | None:
        """Which injected failure (if any) this request gets; consumes ``fail_next``."""
        config = self.config
        if config.down:
            return "server is down (injected outage)"
        if config.fail_next > 0:
            config.fail_next -= 1
            return "injected failure (fail_next)"
        if config.fail_rate > 0 and self._fail_rng.random() < config.fail_rate:
            return "injected failure (fail_rate)"
        return None

    def _latency(self) -> float:
        """This request's base latency, drawn only when there is a range to draw from."""
        low = self.config.latency_min
        high = max(low, self.config.latency_max)
        return low if high == low else self._latency_rng.uniform(low, high)

    # -- handlers ----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.Response:
        """``POST /v1/chat/completions``: count, maybe fail, wait, answer."""
        counters = self.counters
        counters.requests += 1
        counters.in_flight += 1
        counters.max_in_flight = max(counters.max_in_flight, counters.in_flight)
        try:
            return await self._chat_completions(request)
        except asyncio.CancelledError:
            # The client went away (e.g. its timeout fired); aiohttp cancels the handler.
            counters.cancelled += 1
            raise
        finally:
            counters.in_flight -= 1

    async def _chat_completions(self, request: web.Request) -> web.Response:
        """The body of :meth:`chat_completions`, in the order a real gateway would check."""
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.")

        body, problem = _parse_body(await request.read())
        messages: list[Mapping[str, Any]] = body.get("messages", []) if problem is None else []
        key = prompt_key(messages) if problem is None else None
        if key is not None:
            self.counters.prompts[key] += 1

        # Injected failures come before validation: during an outage *every* request fails,
        # and they answer at once, like a load balancer rejecting work.
        failure = self._injected_failure()
        if failure is not None:
            return self._error(self.config.fail_status, failure)
        if problem is not None or key is None:
            return self._error(400, problem or "invalid request")

        text = last_user_message(messages)
        extra = 0.0
        if "[[" in text:
            sleep_match = _SLEEP_MARKER.search(text)
            extra = float(sleep_match.group(1)) if sleep_match else 0.0
            status_match = _STATUS_MARKER.search(text)
            if status_match is not None and 400 <= int(status_match.group(1)) <= 599:
                if extra > 0:
                    await asyncio.sleep(extra)
                status = int(status_match.group(1))
                return self._error(status, f"forced status {status} ([[status:{status}]] marker)")

        delay = self._latency() + extra
        if delay > 0:
            await asyncio.sleep(delay)

        content = self._answer(text, body)
        prompt_tokens = sum(_word_count(message_text(m.get("content"))) for m in messages)
        completion_tokens = _word_count(content)
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.config.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        counters = self.counters
        counters.by_status[200] += 1
        counters.completions += 1
        counters.prompt_completions[key] += 1
        return web.Response(text=json.dumps(response), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the single fake model (behind the same API key check)."""
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided.", count=False)
        data = {
            "object": "list",
            "data": [
                {"id": self.config.model, "object": "model", "created": 0, "owned_by": "shardeval"}
            ],
        }
        return web.json_response(data)

    async def stats(self, request: web.Request) -> web.Response:
        """``GET /stats``: the counters."""
        return web.json_response(self.counters.to_dict())

    async def reset(self, request: web.Request) -> web.Response:
        """``POST /reset``: zero the counters and return them."""
        self.counters.reset()
        return web.json_response(self.counters.to_dict())

    async def get_config(self, request: web.Request) -> web.Response:
        """``GET /config``: the current config."""
        return web.json_response(self.config.to_dict())

    async def set_config(self, request: web.Request) -> web.Response:
        """``POST /config``: update the given fields (all validated before any is applied)."""
        try:
            changes = json.loads(await request.read() or b"{}")
        except ValueError as exc:
            return self._control_error(f"body is not valid JSON: {exc}")
        if not isinstance(changes, dict):
            return self._control_error("body must be a JSON object of config fields")
        known = {f.name for f in dataclasses.fields(ServerConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            return self._control_error(f"unknown config field(s): {', '.join(unknown)}")
        try:
            self.config = dataclasses.replace(self.config, **changes)
        except (TypeError, ValueError) as exc:
            return self._control_error(str(exc))
        if "seed" in changes:
            self._reseed()
        return web.json_response(self.config.to_dict())

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``: always 200 while the process serves, even when ``down``."""
        return web.json_response({"status": "ok", "down": self.config.down})

    @staticmethod
    def _control_error(message: str) -> web.Response:
        """400 for control endpoints; not counted, as the counters describe model traffic."""
        body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        return web.json_response(body, status=400)


def _parse_body(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """Decode a chat-completions body; returns ``(body, problem)`` with ``problem`` for a 400."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return {}, f"request body is not valid JSON: {exc}"
    if not isinstance(body, dict):
        return {}, "request body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return body, "'messages' must be a non-empty list"
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return body, "each message must be an object with a string 'role'"
    if body.get("stream"):
        return body, "stream=true is not supported by the shardeval test server"
    return body, None


def create_app(config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application, for embedding in an existing event loop or aiohttp test client.

    Args:
        config: Initial behaviour; defaults to ``ServerConfig()`` (arith mode, no latency).

    Returns:
        An application with all routes registered.
    """
    model = _FakeModel(config if config is not None else ServerConfig())
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app.router.add_post("/v1/chat/completions", model.chat_completions)
    app.router.add_get("/v1/models", model.models)
    app.router.add_get("/stats", model.stats)
    app.router.add_post("/reset", model.reset)
    app.router.add_get("/config", model.get_config)
    app.router.add_post("/config", model.set_config)
    app.router.add_get("/health", model.health)
    return app


async def _start(config: ServerConfig | None, port: int) -> tuple[web.AppRunner, int]:
    """Start listening on ``127.0.0.1:port`` (0 = any free port); returns the bound port."""
    runner = web.AppRunner(
        create_app(config),
        access_log=None,  # per-request logging would dominate CPU in the benchmarks
        handler_cancellation=True,  # a client timeout really ends the call, as on a real server
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, port, backlog=_BACKLOG)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return runner, bound_port


def _url(port: int) -> str:
    """The OpenAI ``base_url`` for a server on ``port``."""
    return f"http://{HOST}:{port}/v1"


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
                runner, bound_port = loop.run_until_complete(_start(config, port))
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
        return _url(self._port)

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
            ``prompt_completions`` (per :func:`prompt_key`), ``in_flight``, ``max_in_flight``.
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


# -- command line ----------------------------------------------------------------------------


def config_to_argv(config: ServerConfig) -> list[str]:
    """Command-line flags that make :func:`main` start with ``config`` (inverse of the parser).

    Args:
        config: The config to encode.

    Returns:
        Flags for ``python -m shardeval.testing.server`` (without ``--port``).
    """
    argv = [
        "--latency",
        repr(config.latency_min),
        "--latency-max",
        repr(config.latency_max),
        "--mode",
        config.mode,
        "--wrong-every",
        str(config.wrong_every),
        "--seed",
        str(config.seed),
        "--fail-rate",
        repr(config.fail_rate),
        "--fail-status",
        str(config.fail_status),
        "--fail-next",
        str(config.fail_next),
        "--model",
        config.model,
    ]
    if config.down:
        argv.append("--down")
    if config.retry_after is not None:
        argv += ["--retry-after", repr(config.retry_after)]
    if config.require_api_key is not None:
        argv += ["--require-api-key", config.require_api_key]
    return argv


def _build_parser() -> argparse.ArgumentParser:
    """The CLI; flag names mirror :class:`ServerConfig` fields."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="python -m shardeval.testing.server",
        description="shardeval's OpenAI-compatible test server (binds 127.0.0.1 only).",
    )
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument(
        "--latency",
        "--latency-min",
        dest="latency_min",
        type=float,
        default=defaults.latency_min,
        help="latency per completion in seconds (minimum, if --latency-max is larger)",
    )
    parser.add_argument(
        "--latency-max",
        type=float,
        default=None,
        help="maximum latency; uniform in [latency, latency-max] (default: = --latency)",
    )
    parser.add_argument("--mode", choices=MODES, default=defaults.mode)
    parser.add_argument("--wrong-every", type=int, default=defaults.wrong_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--fail-rate", type=float, default=defaults.fail_rate)
    parser.add_argument("--fail-status", type=int, default=defaults.fail_status)
    parser.add_argument("--fail-next", type=int, default=defaults.fail_next)
    parser.add_argument("--down", action="store_true", help="start in outage mode")
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument("--require-api-key", default=None)
    parser.add_argument("--model", default=defaults.model)
    return parser


async def _serve_until_signalled(config: ServerConfig, port: int) -> None:
    """Listen, announce the URL on stdout, and serve until SIGTERM or SIGINT."""
    runner, bound_port = await _start(config, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"{LISTENING_PREFIX}{_url(bound_port)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m shardeval.testing.server [flags]``.

    Prints exactly one line, ``shardeval test server listening on http://127.0.0.1:PORT/v1``,
    once the socket accepts connections (callers wait for it instead of polling), then serves
    until SIGTERM or SIGINT.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit code (0 after a clean shutdown).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        config = ServerConfig(
            latency_min=args.latency_min,
            latency_max=args.latency_min if args.latency_max is None else args.latency_max,
            mode=args.mode,
            wrong_every=args.wrong_every,
            seed=args.seed,
            fail_rate=args.fail_rate,
            fail_status=args.fail_status,
            fail_next=args.fail_next,
            down=args.down,
            retry_after=args.retry_after,
            require_api_key=args.require_api_key,
            model=args.model,
        )
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_serve_until_signalled(config, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
