"""Per-endpoint limits shared by engines of different runs (each on its own event loop)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardeval import endpoint_limits
from shardeval.engine import Engine
from shardeval.spec import ModelSpec
from shardeval.testing.server import ServerConfig, TestServer
from tests.unit.test_engine import request


@pytest.fixture
def server() -> Iterator[TestServer]:
    server = TestServer.start_in_thread(ServerConfig(latency_min=0.02, latency_max=0.03))
    yield server
    server.stop()


def model(url: str, concurrency: int, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate(
        {"provider": "openai", "model": "m", "base_url": url, "concurrency": concurrency, **fields}
    )


def max_in_flight_of_two_engines(server: TestServer, a: ModelSpec, b: ModelSpec) -> int:
    engines = [Engine(a), Engine(b)]
    try:
        futures = [e.submit(request(i + 100 * n)) for n, e in enumerate(engines) for i in range(48)]
        assert {f.result(timeout=60).status for f in futures} == {"ok"}
    finally:
        for engine in engines:
            engine.close()
    return int(server.stats()["max_in_flight"])


def test_two_engines_on_one_endpoint_share_the_smallest_limit(server: TestServer) -> None:
    a, b = model(server.url, 4), model(server.url, 8, params={"temperature": 1})
    # Without a shared limit their limits add up (what a suite must prevent).
    assert max_in_flight_of_two_engines(server, a, b) > 4
    server.reset()
    with endpoint_limits.applied(endpoint_limits.smallest_limits([a, b])):
        assert endpoint_limits.limit_of(b) == 4
        assert max_in_flight_of_two_engines(server, a, b) <= 4
    assert endpoint_limits.limit_of(b) is None  # removed with the block


def test_endpoints_are_told_apart_by_provider_and_url() -> None:
    one = model("http://127.0.0.1:1/v1", 16)
    same = model("http://127.0.0.1:1/v1/", 3, model="other")
    other = model("http://127.0.0.1:2/v1", 5)
    python = ModelSpec(provider="python", function="shardeval.testing.models:arith", concurrency=7)
    limits = endpoint_limits.smallest_limits([one, same, other, python])
    assert limits == {
        ("openai", "http://127.0.0.1:1/v1"): 3,
        ("openai", "http://127.0.0.1:2/v1"): 5,
        ("python", "shardeval.testing.models:arith"): 7,
    }


def test_an_installed_smaller_limit_is_kept_and_restored() -> None:
    key = ("openai", "http://127.0.0.1:1/v1")
    spec = model(key[1], 16)
    with endpoint_limits.applied({key: 2}):
        with endpoint_limits.applied({key: 6}):
            assert endpoint_limits.limit_of(spec) == 2
        with endpoint_limits.applied({key: 1}):
            assert endpoint_limits.limit_of(spec) == 1
        assert endpoint_limits.limit_of(spec) == 2
    assert endpoint_limits.limit_of(spec) is None
