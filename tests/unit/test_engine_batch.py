"""The engine's batch path for sync python providers keeps the per-request path's guarantees.

Real engines and real (sync) provider functions, defined here and named ``module:callable``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from typing import Any

import pytest

from shardeval import interrupt
from shardeval.engine import Engine, Outcome
from shardeval.engine_batch import batch_path
from shardeval.errors import TransientProviderError
from shardeval.providers.base import ProviderRequest
from shardeval.spec import ModelSpec

CALLS: Counter[str] = Counter()
_lock = threading.Lock()
_running = 0
PEAK = [0]


def echo(item: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """Answers the item's text; counts calls and the most calls running at once."""
    global _running
    with _lock:
        CALLS[item["text"]] += 1
        _running += 1
        PEAK[0] = max(PEAK[0], _running)
    try:
        time.sleep(item.get("sleep", 0))
        if item.get("fail") == "transient" and CALLS[item["text"]] == 1:
            raise TransientProviderError("try again")
        if item.get("fail") == "value":
            raise ValueError("bad item")
        if item.get("fail") == "type":
            return 7  # type: ignore[return-value]
        return {"text": item["text"], "prompt_tokens": 3, "completion_tokens": 1}  # type: ignore[return-value]
    finally:
        with _lock:
            _running -= 1


async def echo_async(item: dict[str, Any], messages: list[dict[str, str]]) -> str:
    return str(item["text"])


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    PEAK[0] = 0


def model(function: str = "echo", **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {"provider": "python", "function": f"{__name__}:{function}", "max_retries": 2, **fields}
    )


def request(i: int, **item: Any) -> ProviderRequest:
    text = item.pop("text", f"t{i}")
    return ProviderRequest(
        key=f"k-{text}",
        item_id=str(i),
        messages=[{"role": "user", "content": text}],
        item={"text": text, **item},
        trial=0,
    )


def send(engine: Engine, batches: list[list[ProviderRequest]]) -> list[Outcome]:
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    for number, requests in enumerate(batches, start=1):
        engine.submit_batch(requests, number, done.put)
    return [done.get(timeout=30) for _ in range(sum(map(len, batches)))]


def test_a_sync_function_takes_the_batch_path_and_an_async_one_does_not() -> None:
    sync, asynchronous = Engine(model()), Engine(model("echo_async"))
    try:
        assert batch_path(sync)
        assert not batch_path(asynchronous)
    finally:
        sync.close()
        asynchronous.close()


def test_outcomes_and_the_concurrency_limit_across_batches() -> None:
    engine = Engine(model(concurrency=3))
    try:
        batches = [[request(b * 10 + i, sleep=0.01) for i in range(10)] for b in range(4)]
        outcomes = send(engine, batches)
    finally:
        engine.close()
    assert sorted(o.response or "" for o in outcomes) == sorted(f"t{i}" for i in range(40))
    assert {o.status for o in outcomes} == {"ok"}
    assert all(o.attempts == 1 and o.prompt_tokens == 3 and o.latency_s for o in outcomes)
    assert 1 <= PEAK[0] <= 3
    assert sum(CALLS.values()) == 40


def test_errors_are_rows_and_transient_ones_are_retried() -> None:
    engine = Engine(model())
    try:
        outcomes = send(
            engine,
            [[request(0, fail="transient"), request(1, fail="value"), request(2, fail="type")]],
        )
    finally:
        engine.close()
    by_key = {o.key: o for o in outcomes}
    assert by_key["k-t0"].status == "ok" and CALLS["t0"] == 2  # retried once, then answered
    assert by_key["k-t1"].status == "error" and "ValueError: bad item" in (
        by_key["k-t1"].error or ""
    )
    assert by_key["k-t2"].status == "error" and "expected str" in (by_key["k-t2"].error or "")


def test_identical_requests_are_sent_once() -> None:
    engine = Engine(model())
    try:
        outcomes = send(engine, [[request(0, text="same"), request(1, text="same")]])
    finally:
        engine.close()
    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert CALLS["same"] == 1


def test_a_stopped_run_sends_no_more_chunks() -> None:
    engine = Engine(model(concurrency=2), run_id="stopping-run")
    try:
        interrupt.stop_run("stopping-run", "signal", "stopped by a test")
        outcomes = send(engine, [[request(i) for i in range(6)]])
    finally:
        engine.close()
        interrupt.forget("stopping-run")
    assert {o.status for o in outcomes} == {"cancelled"}
    assert not CALLS
