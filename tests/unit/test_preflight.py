"""The preflight check against the real test server (and a port where nothing listens)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardeval.errors import EndpointError, SpecError
from shardeval.preflight import endpoints, preflight
from shardeval.spec import EvalSpec, load_spec
from shardeval.testing.server import ServerConfig, TestServer
from tests.conftest import free_port
from tests.helpers.specs import write_spec

KEY_ENV = "SHARDEVAL_PREFLIGHT_TEST_KEY"


@pytest.fixture
def server() -> Iterator[TestServer]:
    server = TestServer.start_in_thread(ServerConfig())
    yield server
    server.stop()


def spec_for(tmp_path: Path, base_url: str, **model: object) -> EvalSpec:
    return load_spec(write_spec(tmp_path, base_url=base_url, n_items=3, model=model))


def test_nothing_listening_names_base_url_in_seconds(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    started = time.monotonic()
    with pytest.raises(EndpointError, match=r"model\.base_url: cannot connect") as caught:
        preflight(spec)
    assert time.monotonic() - started < 30  # contract: seconds, not retries per item
    assert "connection refused" in str(caught.value)
    assert isinstance(caught.value, SpecError) and caught.value.exit_code == 2


def test_unresolvable_host_names_base_url(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "http://no-such-host.invalid:8000/v1")
    with pytest.raises(EndpointError, match=r"model\.base_url: .*cannot resolve"):
        preflight(spec)


def test_listed_model_needs_one_request(tmp_path: Path, server: TestServer) -> None:
    preflight(spec_for(tmp_path, server.url, model="test-model"))
    assert server.stats()["requests"] == 0  # GET /models only; no completion was made


def test_unlisted_model_is_probed_with_one_completion(tmp_path: Path, server: TestServer) -> None:
    preflight(spec_for(tmp_path, server.url, model="other-name"))  # the server accepts any
    assert server.stats()["requests"] == 1


def test_unknown_model_names_model_field(tmp_path: Path) -> None:
    strict = TestServer.start_in_thread(ServerConfig(strict_model=True))
    try:
        with pytest.raises(EndpointError, match=r"model\.model: 'gpt-nope' is not served") as e:
            preflight(spec_for(tmp_path, strict.url, model="gpt-nope"))
        assert "test-model" in str(e.value)  # the hint lists what /models offers
    finally:
        strict.stop()


def test_missing_key_names_the_variable_and_says_unset(
    tmp_path: Path, server: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.configure(require_api_key="sk-right")
    monkeypatch.delenv(KEY_ENV, raising=False)
    spec = spec_for(tmp_path, server.url, api_key_env=KEY_ENV)
    with pytest.raises(EndpointError, match=f"{KEY_ENV} is not set"):
        preflight(spec)

    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(EndpointError, match=f"rejected the key in {KEY_ENV}") as caught:
        preflight(spec)
    assert "sk-wrong" not in str(caught.value)  # the key itself is never printed

    monkeypatch.setenv(KEY_ENV, "sk-right")
    preflight(spec)


def test_python_provider_needs_no_check(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, n_items=2))
    assert endpoints(spec) == []
    preflight(spec)


def test_judge_model_is_checked_too(tmp_path: Path, server: TestServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    path = write_spec(
        tmp_path,
        base_url=server.url,
        n_items=2,
        metrics=[
            {
                "type": "llm_judge",
                "name": "judge",
                "model": {"provider": "openai", "model": "j", "base_url": dead},
                "rubric": "Grade {{ response }}",
            }
        ],
    )
    with pytest.raises(EndpointError, match=r"metrics\[0\]\.model\.base_url"):
        preflight(load_spec(path))
