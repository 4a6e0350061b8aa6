"""A wrong or vanishing endpoint, through the real CLI (subprocesses, the real test server).

* nothing listening at ``base_url``: ``run`` and ``validate --check-endpoint`` exit 2 in
  seconds naming ``model.base_url`` (before Prefect starts);
* an endpoint that needs a key, the variable unset: exit 2 naming the variable, no 401 row
  stored; with the key set, the same command completes with every row ok;
* the server stopped mid-run: exit 1 in bounded time naming the endpoint, the flow run's
  state message is the error's text, and after the server is back the rerun sends only the
  rows that are missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shardeval.status import read_status
from shardeval.testing.server import ServerConfig, TestServer
from tests.conftest import cli_env, free_port
from tests.helpers.specs import write_spec

pytestmark = pytest.mark.slow
KEY_ENV = "SHARDEVAL_GATEWAY_TEST_KEY"


def shardeval(*args: str, env: dict[str, str], timeout: float = 300) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "shardeval", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result.stderr = unwrap(result.stderr)
    return result


def unwrap(text: str) -> str:
    """The console wraps long error lines; compare words, not line breaks."""
    return " ".join(text.split())


def run_id_of(spec: Path, env: dict[str, str]) -> str:
    checked = shardeval("validate", str(spec), env=env)
    assert checked.returncode == 0, checked.stderr
    return checked.stdout.split("run id: ")[1].split()[0]


@pytest.mark.parametrize("command", [["run"], ["validate", "--check-endpoint"]])
def test_nothing_listening_exits_2_in_seconds(tmp_path: Path, command: list[str]) -> None:
    spec = write_spec(tmp_path, base_url=f"http://127.0.0.1:{free_port()}/v1", n_items=20)
    started = time.monotonic()
    result = shardeval(command[0], str(spec), *command[1:], env=cli_env())
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "model.base_url" in result.stderr and "connection refused" in result.stderr
    assert elapsed < 30  # a contract check (seconds, not minutes of retries), not a benchmark
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_key_unset_exits_2_then_the_same_command_completes(
    tmp_path: Path, prefect_api: str
) -> None:
    # It lists the spec's model, so the preflight costs a GET /models and no completion.
    server = TestServer.start_in_thread(
        ServerConfig(require_api_key="sk-gateway", model="test-model")
    )
    try:
        spec = write_spec(tmp_path, base_url=server.url, n_items=30, model={"api_key_env": KEY_ENV})
        env = cli_env(prefect_api)
        env.pop(KEY_ENV, None)
        started = time.monotonic()
        result = shardeval("run", str(spec), env=env)
        assert result.returncode == 2, result.stderr
        assert time.monotonic() - started < 30
        assert f"the environment variable {KEY_ENV} is not set" in result.stderr
        assert server.stats()["completions"] == 0
        assert not list(tmp_path.glob("runs/runs/*/batches/*.parquet"))  # no 401 rows

        # --no-preflight: the first 401 of the run itself stops it, still exit 2, no rows.
        result = shardeval("run", str(spec), "--no-preflight", env=env)
        assert result.returncode == 2, result.stderr
        assert KEY_ENV in result.stderr
        assert not list(tmp_path.glob("runs/runs/*/batches/*.parquet"))
        assert server.stats()["requests"] <= 8 + 2  # a slot's worth (concurrency 8)

        result = shardeval("run", str(spec), env={**env, KEY_ENV: "sk-gateway"})
        assert result.returncode == 0, result.stderr
        assert "sk-gateway" not in result.stdout + result.stderr
        run_id = run_id_of(spec, env)
        metrics = json.loads((tmp_path / "runs" / "runs" / run_id / "metrics.json").read_text())
        assert (metrics["n_ok"], metrics["n_error"]) == (30, 0)
        assert server.stats()["completions"] == 30

        import pandas as pd

        df = pd.read_parquet(tmp_path / "runs" / "runs" / run_id / "results.parquet")
        wrong = df[df.score_exact_match == 0][
            ["item_id", "prompt", "target_exact_match", "response"]
        ]
        assert len(wrong) == 30 - int(df.score_exact_match.sum())
        assert df.prompt.str.startswith("What is ").all()
        assert (df.target_exact_match.astype(int) == df.prompt.map(_sum_asked)).all()
    finally:
        server.stop()


def _sum_asked(prompt: str) -> int:
    a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
    return int(a) + int(b)


def test_server_stopped_mid_run(tmp_path: Path, prefect_api: str) -> None:
    n_items = 240
    config = ServerConfig(latency_min=0.05, model="test-model")
    server = TestServer.start_subprocess(config)
    port = server.port
    spec = write_spec(
        tmp_path,
        base_url=server.url,
        n_items=n_items,
        batch_size=20,
        model={"concurrency": 4, "max_retries": 6, "unreachable_after_s": 3},
    )
    env = cli_env(prefect_api)
    env.pop("SHARDEVAL_BATCH_RETRY_DELAYS", None)  # default batch retries (10 s, 30 s) apply
    process = subprocess.Popen(
        [sys.executable, "-m", "shardeval", "run", str(spec), "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while server.stats()["completions"] < 40:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.2)
        server.stop()
        stopped = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        stderr = unwrap(stderr)
        elapsed = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert process.returncode == 1, stderr
    assert "is unreachable" in stderr and f"127.0.0.1:{port}" in stderr
    # unreachable_after_s (3 s) plus the last probe interval and saving, with a wide margin;
    # without the breaker this took 7 attempts x 3 task retries per batch (minutes).
    assert elapsed < 60

    run_id = run_id_of(spec, env)
    status = read_status(str(tmp_path / "runs"), run_id)
    needed = n_items - status.done
    assert 0 < needed < n_items
    assert _last_flow_run_message(prefect_api).startswith("the endpoint at ")

    server = TestServer.start_subprocess(config, port=port)
    try:
        result = shardeval("run", str(spec), "-q", env=env)
        assert result.returncode == 0, result.stderr
        stats = server.stats()
        # For the record (pytest -s): docs/performance.md-style figures, not assertions.
        print(f"stop->exit {elapsed:.1f} s; rerun needed {needed}, sent {stats['requests']}")
        assert stats["completions"] <= needed  # only what was missing
        assert stats["requests"] <= needed
    finally:
        server.stop()


def _last_flow_run_message(api_url: str) -> str:
    """The state message of the newest failed flow run on the session's Prefect server.

    (Deployments with schedules on the same server create Scheduled runs meanwhile.)
    """
    script = (
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.sorting import FlowRunSort\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=100)\n"
        "    run = next(r for r in runs if r.state is not None and r.state.is_failed())\n"
        "    print(run.state.message)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=cli_env(api_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
