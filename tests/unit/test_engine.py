"""The request engine against the real test server: limits, retries, classification."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shardeval import interrupt
from shardeval.engine import Engine
from shardeval.providers.base import ProviderRequest
from shardeval.spec import ModelSpec
from shardeval.testing.server import ServerConfig, TestServer


@pytest.fixture
def server() -> Iterator[TestServer]:
    server = TestServer.start_in_thread(ServerConfig(latency_min=0.02))
    yield server
    server.stop()


def model(server: TestServer, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate(
        {"provider": "openai", "model": "m", "base_url": server.url, "max_retries": 3, **fields}
    )


def request(i: int, text: str | None = None) -> ProviderRequest:
    content = text or f"What is {i} + 1?"
    return ProviderRequest(
        key=f"k{i}",
        item_id=str(i),
        messages=[{"role": "user", "content": content}],
        item={},
        trial=0,
    )


def run_all(engine: Engine, requests: list[ProviderRequest]) -> list:
    futures = [engine.submit(r) for r in requests]
    return [f.result(timeout=60) for f in futures]


def test_answers_and_usage(server: TestServer) -> None:
    engine = Engine(model(server))
    try:
        outcomes = run_all(engine, [request(i) for i in range(20)])
    finally:
        engine.close()
    assert [o.status for o in outcomes] == ["ok"] * 20
    assert outcomes[3].response in {"4", "5"}  # arith mode; some answers are wrong on purpose
    assert outcomes[0].prompt_tokens and outcomes[0].completion_tokens == 1
    assert server.stats()["requests"] == 20


def test_closing_closes_the_loop_and_later_requests_end_cancelled(server: TestServer) -> None:
    # Left to the collector, an unclosed loop can print a traceback from its __del__ (its
    # self-pipe socket finalized first), on the console of a stopped run's exit.
    engine = Engine(model(server))
    assert run_all(engine, [request(1)])[0].status == "ok"
    engine.close()
    assert engine._loop.is_closed()
    engine.close()  # idempotent
    late = engine.submit(request(2)).result(timeout=5)
    assert late.status == "cancelled" and late.error == "engine closed"


def test_concurrency_limit_is_shared_by_all_callers(server: TestServer) -> None:
    engine = Engine(model(server, concurrency=4))
    try:
        run_all(engine, [request(i) for i in range(40)])
    finally:
        engine.close()
    assert server.stats()["max_in_flight"] <= 4


def test_transient_errors_are_retried_then_succeed(server: TestServer) -> None:
    server.configure(fail_next=2, fail_status=503)
    engine = Engine(model(server))
    try:
        (outcome,) = run_all(engine, [request(1)])
    finally:
        engine.close()
    assert outcome.status == "ok"
    assert outcome.attempts == 3
    assert server.stats()["requests"] == 3


def test_retry_after_is_honoured(server: TestServer) -> None:
    server.configure(fail_next=1, fail_status=429, retry_after=1.0)
    engine = Engine(model(server))
    started = time.monotonic()
    try:
        (outcome,) = run_all(engine, [request(1)])
    finally:
        engine.close()
    assert outcome.status == "ok"
    assert time.monotonic() - started >= 0.95


def test_transient_beyond_retries_is_not_final(server: TestServer) -> None:
    server.configure(down=True, fail_status=500)
    engine = Engine(model(server, max_retries=1))
    try:
        (outcome,) = run_all(engine, [request(1)])
    finally:
        engine.close()
    assert outcome.status == "transient"
    assert not outcome.is_final
    assert outcome.http_status == 500
    assert server.stats()["requests"] == 2


def test_permanent_4xx_is_an_error_row_with_status(server: TestServer) -> None:
    engine = Engine(model(server))
    try:
        (outcome,) = run_all(engine, [request(1, "[[status:400]] What is 1 + 1?")])
    finally:
        engine.close()
    assert outcome.status == "error"
    assert outcome.is_final
    assert outcome.http_status == 400
    assert "HTTP 400" in (outcome.error or "")
    assert server.stats()["requests"] == 1  # never retried


def test_connection_refused_is_transient() -> None:
    spec = ModelSpec.model_validate(
        {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "max_retries": 0}
    )
    engine = Engine(spec)
    try:
        (outcome,) = run_all(engine, [request(1)])
    finally:
        engine.close()
    assert outcome.status == "transient"
    assert "connection" in (outcome.error or "")


def test_stop_cancels_new_requests(server: TestServer) -> None:
    server.configure(latency_min=0.2, latency_max=0.2)
    engine = Engine(model(server, concurrency=2))
    try:
        interrupt.stop_run("", "interrupted", "test", grace_period_s=5)
        outcomes = run_all(engine, [request(i) for i in range(6)])
    finally:
        interrupt.forget("")
        engine.close()
    assert all(o.status == "cancelled" for o in outcomes)
    assert server.stats()["requests"] == 0


def test_api_key_is_sent_from_the_environment(
    server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.configure(require_api_key="sk-test-secret")
    monkeypatch.setenv("SHARDEVAL_TEST_KEY", "sk-test-secret")
    engine = Engine(model(server, api_key_env="SHARDEVAL_TEST_KEY"))
    try:
        (outcome,) = run_all(engine, [request(1)])
    finally:
        engine.close()
    assert outcome.status == "ok"


def test_breaker_stops_a_run_whose_endpoint_is_gone(tmp_path: object) -> None:
    """Nothing listening: a few attempts per slot, then every request ends not sent."""
    from shardeval.errors import EndpointUnreachable
    from tests.conftest import free_port

    spec = ModelSpec.model_validate(
        {
            "provider": "openai",
            "model": "m",
            "base_url": f"http://127.0.0.1:{free_port()}/v1",
            "max_retries": 6,
            "concurrency": 2,
            "unreachable_after_s": 1.0,
        }
    )
    engine = Engine(spec)
    started = time.monotonic()
    try:
        outcomes = run_all(engine, [request(i) for i in range(40)])
        sent = sum(o.attempts for o in outcomes)
        with pytest.raises(EndpointUnreachable, match="is unreachable") as caught:
            engine.raise_if_stopped()
    finally:
        engine.close()
    assert time.monotonic() - started < 30  # ~1 s of backoff, not 40 × 7 attempts
    assert all(not o.is_final for o in outcomes)  # never stored
    assert sent <= 2 * 6  # a few attempts per slot (backoff 0.5 s, 1 s, ... within 1 s)
    assert spec.base_url in str(caught.value) and "model.base_url" in str(caught.value)


def test_any_answer_keeps_the_breaker_closed(server: TestServer) -> None:
    """500s are answers: the endpoint is there, ordinary retries apply, nothing stops."""
    server.configure(down=True, fail_status=500)
    engine = Engine(model(server, max_retries=2, unreachable_after_s=0.01))
    try:
        outcomes = run_all(engine, [request(i) for i in range(3)])
    finally:
        engine.close()
    assert engine.stop_error is None
    assert [o.status for o in outcomes] == ["transient"] * 3
    assert [o.attempts for o in outcomes] == [3] * 3


def test_a_401_stops_the_run_and_is_not_stored(
    server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardeval.errors import EndpointError

    server.configure(require_api_key="sk-right")
    monkeypatch.delenv("SHARDEVAL_TEST_KEY", raising=False)
    engine = Engine(model(server, api_key_env="SHARDEVAL_TEST_KEY", concurrency=1))
    try:
        outcomes = run_all(engine, [request(i) for i in range(20)])
        with pytest.raises(EndpointError, match="SHARDEVAL_TEST_KEY is not set"):
            engine.raise_if_stopped()
    finally:
        engine.close()
    assert all(not o.is_final for o in outcomes)
    assert outcomes[0].error_kind == "http_401"
    assert server.stats()["requests"] == 1  # one slot: the first 401 stopped the rest


def test_a_request_abandoned_before_its_first_step_gives_its_slot_back(
    server: TestServer,
) -> None:
    """A stop cancels what is in flight; a request handed a slot whose task had not run yet
    must still give the slot back, or the requests queued behind it never end (the batch
    would wait for them forever: seen as a hang after a lost lease)."""
    engine = Engine(model(server, concurrency=1))
    done: list = []
    try:

        async def hand_over_then_cancel() -> None:
            # One request takes the only slot and, in the same step, its task is cancelled
            # (what a stop's grace period does to everything in flight).
            engine._start_batch([request(1)], 0, done.append, frozenset())
            for task in list(engine._inflight):
                task.cancel()

        engine._call(hand_over_then_cancel()).result(timeout=10)
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [o.status for o in done] == ["cancelled"]
        # The slot came back: a later request is sent and answered.
        assert run_all(engine, [request(2)])[0].status == "ok"
    finally:
        engine.close()
