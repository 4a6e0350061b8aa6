"""Tests for shardeval's OpenAI-compatible test server (shardeval.testing.server)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from shardeval.testing import ServerConfig, TestServer
from shardeval.testing.answers import answer_arith, arith_is_wrong, parse_arith
from shardeval.testing.models import arith, arith_async
from shardeval.testing.server import LISTENING_PREFIX, config_to_argv, prompt_key

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server() -> Iterator[TestServer]:
    with TestServer.start_in_thread(ServerConfig()) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    """Every test starts from the default config and zeroed counters."""
    if "server" in request.fixturenames:
        srv: TestServer = request.getfixturevalue("server")
        srv.configure(**ServerConfig().to_dict())
        srv.reset()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def post(
    srv: TestServer,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST to /v1/chat/completions with urllib; returns (status, headers, json body)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        srv.url + "/chat/completions",
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())


def ask(srv: TestServer, text: str, **extra: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    return post(srv, {"model": "test-model", "messages": user(text), **extra})


def content(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


async def _gather_posts(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    async with aiohttp.ClientSession() as session:

        async def one(body: dict[str, Any]) -> tuple[int, Any]:
            async with session.post(url + "/chat/completions", json=body) as resp:
                return resp.status, await resp.json()

        return await asyncio.gather(*(one(b) for b in bodies))


# -- answers -----------------------------------------------------------------------------------


def test_arith_response_shape_and_usage(server: TestServer) -> None:
    status, _, body = ask(server, "Please answer. What is 2 + 3?")
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "test-model"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    expected = "6" if arith_is_wrong("Please answer. What is 2 + 3?") else "5"
    assert choice["message"]["content"] == expected
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}


def test_arith_accuracy_is_deterministic_about_ninety_percent(server: TestServer) -> None:
    questions = [(a, b) for a in range(-10, 10) for b in range(-5, 5)]
    bodies = [{"messages": user(f"What is {a} + {b}?")} for a, b in questions]
    results = asyncio.run(_gather_posts(server.url, bodies))
    correct = 0
    for (a, b), (status, body) in zip(questions, results, strict=True):
        assert status == 200
        text = f"What is {a} + {b}?"
        wrong = arith_is_wrong(text)
        assert content(body) == str(a + b + (1 if wrong else 0))
        correct += not wrong
    assert 0.8 <= correct / len(questions) <= 0.97
    # Same questions again: identical answers (no randomness in arith mode).
    again = asyncio.run(_gather_posts(server.url, bodies))
    assert [content(b) for _, b in again] == [content(b) for _, b in results]


def test_arith_parsing_negatives_fewshot_and_echo_fallback(server: TestServer) -> None:
    assert parse_arith("What is -3 + -4?") == (-3, -4)
    assert parse_arith("what is (-3) + 12 ?") == (-3, 12)
    assert parse_arith("What is 1 + 2? 3\nWhat is 40 + 2?") == (40, 2)
    assert parse_arith("hello") is None
    assert answer_arith("What is 1 + 1?", wrong_every=0) == "2"
    assert answer_arith("What is 1 + 1?", wrong_every=1) == "3"
    server.configure(wrong_every=0)
    assert content(ask(server, "What is -3 + -4?")[2]) == "-7"
    assert content(ask(server, "hello there")[2]) == "echo: hello there"


def test_last_user_message_is_answered(server: TestServer) -> None:
    messages = [
        {"role": "system", "content": "What is 100 + 100?"},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": [{"type": "text", "text": "What is 7 + 8?"}]},
    ]
    server.configure(wrong_every=0)
    assert content(post(server, {"messages": messages})[2]) == "15"


def test_echo_mode(server: TestServer) -> None:
    server.configure(mode="echo")
    assert content(ask(server, "What is 1 + 2?")[2]) == "echo: What is 1 + 2?"


def test_random_mode_varies_per_request_and_is_seeded(server: TestServer) -> None:
    server.configure(mode="random", seed=7)
    first = [content(ask(server, "Pick one")[2]) for _ in range(30)]
    assert set(first) <= {"A", "B", "C", "D"}
    assert len(set(first)) > 1  # trials of the same prompt differ
    server.configure(seed=7)  # reseeding replays the same sequence
    assert [content(ask(server, "Pick one")[2]) for _ in range(30)] == first
    # A per-request seed makes the answer a pure function of (prompt, seed).
    seeded = {content(ask(server, "Pick one", seed=123)[2]) for _ in range(10)}
    assert len(seeded) == 1
    by_seed = {content(ask(server, "Pick one", seed=s)[2]) for s in range(40)}
    assert len(by_seed) > 1


def test_python_models_match_server_arith(server: TestServer) -> None:
    for a, b in [(1, 2), (-5, 3), (10, 10), (7, -7), (123, 456)]:
        messages = user(f"What is {a} + {b}?")
        served = content(post(server, {"messages": messages})[2])
        assert arith({"a": a, "b": b}, messages) == served
        assert asyncio.run(arith_async({}, messages)) == served


# -- latency and concurrency -------------------------------------------------------------------


def test_latency_is_honoured_and_requests_overlap(server: TestServer) -> None:
    server.configure(latency_min=0.2)
    started = time.perf_counter()
    assert ask(server, "What is 1 + 1?")[0] == 200
    assert 0.19 <= time.perf_counter() - started < 1.0

    server.configure(latency_min=0.1, latency_max=0.2)
    server.reset()
    bodies = [{"messages": user(f"What is {i} + 1?")} for i in range(20)]
    started = time.perf_counter()
    results = asyncio.run(_gather_posts(server.url, bodies))
    elapsed = time.perf_counter() - started
    assert all(status == 200 for status, _ in results)
    assert 0.1 <= elapsed < 1.5  # concurrent, not 20 x 0.15 s in series
    stats = server.stats()
    assert stats["max_in_flight"] == 20
    assert stats["in_flight"] == 0


def test_sleep_marker_adds_latency(server: TestServer) -> None:
    started = time.perf_counter()
    status, _, body = ask(server, "echo me [[sleep:0.3]]")
    assert status == 200
    assert time.perf_counter() - started >= 0.29
    assert content(body) == "echo: echo me [[sleep:0.3]]"


def test_client_timeout_cancels_the_call(server: TestServer) -> None:
    async def timed_out() -> None:
        timeout = aiohttp.ClientTimeout(total=0.2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(asyncio.TimeoutError):
                body = {"messages": user("slow [[sleep:5]]")}
                async with session.post(server.url + "/chat/completions", json=body):
                    pass

    asyncio.run(timed_out())
    deadline = time.monotonic() + 2
    while server.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = server.stats()
    assert stats == {**stats, "requests": 1, "cancelled": 1, "completions": 0, "in_flight": 0}


# -- counters ----------------------------------------------------------------------------------


def test_counters_and_reset(server: TestServer) -> None:
    ask(server, "What is 1 + 1?")
    ask(server, "What is 1 + 1?")
    ask(server, "What is 2 + 2?")
    ask(server, "boom [[status:500]]")
    stats = server.stats()
    assert stats["requests"] == 4
    assert stats["completions"] == 3
    assert stats["by_status"] == {200: 3, 500: 1}
    key = prompt_key(user("What is 1 + 1?"))
    assert len(key) == 16
    assert stats["prompts"][key] == 2
    assert stats["prompt_completions"][key] == 2
    assert stats["prompts"][prompt_key(user("boom [[status:500]]"))] == 1
    assert prompt_key(user("boom [[status:500]]")) not in stats["prompt_completions"]
    assert stats["max_in_flight"] == 1

    server.reset()
    stats = server.stats()
    assert stats["requests"] == stats["completions"] == stats["max_in_flight"] == 0
    assert stats["by_status"] == {} and stats["prompts"] == {}


# -- failures ----------------------------------------------------------------------------------


def test_fail_next(server: TestServer) -> None:
    server.configure(fail_next=2, fail_status=502)
    statuses = [ask(server, "What is 1 + 1?")[0] for _ in range(4)]
    assert statuses == [502, 502, 200, 200]
    assert server.get_config()["fail_next"] == 0
    stats = server.stats()
    assert stats["by_status"] == {502: 2, 200: 2}
    assert stats["prompts"][prompt_key(user("What is 1 + 1?"))] == 4
    assert stats["prompt_completions"][prompt_key(user("What is 1 + 1?"))] == 2


def test_fail_rate_is_seeded(server: TestServer) -> None:
    server.configure(fail_rate=0.3, seed=11)
    first = [ask(server, f"What is {i} + 0?")[0] for i in range(60)]
    assert set(first) == {200, 500}
    assert 5 <= first.count(500) <= 35
    server.configure(seed=11)
    assert [ask(server, f"What is {i} + 0?")[0] for i in range(60)] == first


def test_down_with_retry_after_and_error_body(server: TestServer) -> None:
    server.configure(down=True, fail_status=503, retry_after=2)
    status, headers, body = ask(server, "What is 1 + 1?")
    assert status == 503
    assert headers["Retry-After"] == "2"
    assert headers["retry-after-ms"] == "2000"
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["type"] == "server_error"
    # Outage covers every completion request, malformed ones included; health stays up.
    assert post(server, None, raw=b"not json")[0] == 503
    with _OPENER.open(server.root_url + "/health", timeout=5) as resp:
        assert json.loads(resp.read()) == {"status": "ok", "down": True}
    server.configure(down=False)
    assert ask(server, "What is 1 + 1?")[0] == 200


def test_status_marker_and_retry_after_only_on_429_503(server: TestServer) -> None:
    server.configure(retry_after=0.5)
    status, headers, body = ask(server, "slow down [[status:429]]")
    assert status == 429
    assert headers["Retry-After"] == "0.5"
    assert body["error"]["code"] == "rate_limit_exceeded"
    status, headers, body = ask(server, "broken [[status:500]]")
    assert status == 500
    assert "Retry-After" not in headers
    assert body["error"]["type"] == "server_error"
    status, headers, _ = ask(server, "[[status:418]]")
    assert status == 418
    assert "Retry-After" not in headers
    server.configure(retry_after=None)
    assert "Retry-After" not in ask(server, "[[status:429]]")[1]


def test_require_api_key(server: TestServer) -> None:
    server.configure(require_api_key="sk-test")
    status, _, body = ask(server, "What is 1 + 1?")
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    bad = {"Authorization": "Bearer wrong"}
    assert post(server, {"messages": user("hi")}, headers=bad)[0] == 401
    good = {"Authorization": "Bearer sk-test"}
    assert post(server, {"messages": user("hi")}, headers=good)[0] == 200
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        _OPENER.open(server.url + "/models", timeout=5)
    excinfo.value.close()
    assert excinfo.value.code == 401
    req = urllib.request.Request(server.url + "/models", headers=good)
    with _OPENER.open(req, timeout=5) as resp:
        assert json.loads(resp.read())["data"][0]["id"] == "test-model"
    # /v1/models is not model traffic: only the three completion calls are counted.
    assert server.stats()["by_status"] == {401: 2, 200: 1}


def test_malformed_requests_get_400(server: TestServer) -> None:
    for raw in (b"{not json", b"[1, 2]", b'{"messages": []}', b'{"model": "m"}'):
        status, _, body = post(server, None, raw=raw)
        assert status == 400, raw
        assert body["error"]["type"] == "invalid_request_error"
    status, _, body = post(server, {"messages": user("hi"), "stream": True})
    assert status == 400
    assert "stream" in body["error"]["message"]
    assert server.stats()["by_status"] == {400: 5}


def test_configure_validates(server: TestServer) -> None:
    with pytest.raises(ValueError, match="unknown config field"):
        server.configure(nope=1)
    with pytest.raises(ValueError, match="mode"):
        server.configure(mode="chaos")
    with pytest.raises(ValueError, match="fail_rate"):
        server.configure(fail_rate=2, mode="echo")
    assert server.get_config()["mode"] == "arith"  # nothing applied from rejected updates
    with pytest.raises(ValueError):
        ServerConfig(fail_status=200)


def test_port_in_use_raises() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(OSError):
            TestServer.start_in_thread(port=sock.getsockname()[1])


# -- subprocess mode ---------------------------------------------------------------------------


def test_subprocess_mode() -> None:
    config = ServerConfig(mode="echo", require_api_key="k", latency_min=0.01, latency_max=0.02)
    assert "--require-api-key" in config_to_argv(config)
    srv = TestServer.start_subprocess(config)
    try:
        assert srv.url == f"http://127.0.0.1:{srv.port}/v1"
        status, _, body = post(srv, {"messages": user("hi")}, headers={"Authorization": "Bearer k"})
        assert (status, content(body)) == (200, "echo: hi")
        assert post(srv, {"messages": user("hi")})[0] == 401
        assert srv.configure(mode="arith", wrong_every=0)["mode"] == "arith"
        ok = {"Authorization": "Bearer k"}
        assert content(post(srv, {"messages": user("What is 2 + 2?")}, headers=ok)[2]) == "4"
        stats = srv.stats()
        assert stats["requests"] == 3
        assert stats["by_status"] == {200: 2, 401: 1}
        srv.reset()
        assert srv.stats()["requests"] == 0
    finally:
        srv.stop()
    process = srv._process
    assert process is not None and process.returncode == 0  # clean exit on SIGTERM
    with pytest.raises(urllib.error.URLError):
        _OPENER.open(srv.root_url + "/health", timeout=2)
    assert LISTENING_PREFIX == "shardeval test server listening on "
