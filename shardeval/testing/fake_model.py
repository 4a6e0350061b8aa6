"""The fake model behind the test server: its aiohttp app, request handlers and injected failures.

:func:`create_app` routes ``/v1/chat/completions``, ``/v1/models`` and the control endpoints
(``/stats``, ``/reset``, ``/config``, ``/health``) to one :class:`_FakeModel`, which answers
from :mod:`shardeval.testing.answers`, counts every request, and fails on demand: by config
(``fail_rate``, ``fail_next``, ``down``, ``require_api_key``) or by a ``[[status:NNN]]`` or
``[[sleep:S]]`` marker in the last user message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from shardeval.testing.answers import (
    answer_arith,
    echo_answer,
    last_user_message,
    message_text,
)
from shardeval.testing.server_config import ServerConfig
from shardeval.testing.server_stats import RequestCounters, prompt_key

RANDOM_CHOICES = ("A", "B", "C", "D")

_STATUS_MARKER = re.compile(r"\[\[status:(\d{3})\]\]")
_SLEEP_MARKER = re.compile(r"\[\[sleep:(\d+(?:\.\d*)?|\.\d+)\]\]")
_RETRY_AFTER_STATUSES = frozenset({429, 503})
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


class _FakeModel:
    """Request handlers plus their state; all of it lives on the server's one event loop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.counters = RequestCounters()
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
        if counters.first_request_at is None:
            counters.first_request_at = time.time()
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
        requested = body.get("model")
        if self.config.strict_model and requested != self.config.model:
            return self._error(404, f"The model `{requested}` does not exist.")

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
        counters.last_completion_at = time.time()
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
