"""``model.prefect_limit``: a Prefect global concurrency limit caps requests across processes."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from shardeval.prefect_limit import prefect_limit_mode
from shardeval.spec import ModelSpec
from tests.conftest import cli_env
from tests.helpers.specs import write_spec


def run_cli(prefect_api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardeval", "run", *args, "--quiet"],
        env=cli_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_limit_caps_requests_in_flight(
    prefect_api: str, client: Any, llm_server: Any, tmp_path: Path
) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"llm-{uuid.uuid4().hex[:6]}"
    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))
    llm_server.configure(latency_min=0.02, latency_max=0.03)
    spec = write_spec(
        tmp_path,
        base_url=llm_server.url,
        n_items=80,
        model={"concurrency": 16, "prefect_limit": name},
    )
    result = run_cli(prefect_api, str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    stats = llm_server.stats()
    assert stats["completions"] == 80
    assert 1 <= stats["max_in_flight"] <= 2, stats["max_in_flight"]
    # Every slot went back to the server when the run ended.
    assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


@pytest.mark.slow
def test_missing_limit_is_a_spec_error(prefect_api: str, llm_server: Any, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, base_url=llm_server.url, model={"prefect_limit": "no-such-limit"})
    result = run_cli(prefect_api, str(spec))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no global concurrency limit named 'no-such-limit'" in result.stderr
    assert "prefect gcl create no-such-limit" in result.stderr
    assert llm_server.stats()["requests"] == 0


def test_without_a_server_only_the_local_limit_applies(caplog: pytest.LogCaptureFixture) -> None:
    """Ephemeral mode (no PREFECT_API_URL, as in this test process): warn once, then ignore."""
    model = ModelSpec(provider="python", function="x:y", prefect_limit="ephemeral-test")
    with caplog.at_level(logging.WARNING, logger="shardeval.engine"):
        assert prefect_limit_mode(model) is None
        assert prefect_limit_mode(model) is None
    warnings = [r.getMessage() for r in caplog.records if "ephemeral-test" in r.getMessage()]
    assert len(warnings) == 1
    assert "only model.concurrency" in warnings[0]
    assert prefect_limit_mode(ModelSpec(provider="python", function="x:y")) is None
