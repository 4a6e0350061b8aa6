"""Scoring without paying again: rescore, trials (pass@k), LLM-as-judge, grouped metrics.

Real components throughout: the CLI as a subprocess, a real Prefect server, the test model
and a second test server acting as the judge, each with its own request counter.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from shardeval.testing.server import ServerConfig, TestServer
from tests.conftest import cli_env
from tests.helpers.specs import arith_items, write_spec

RunCli = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.slow

# The judge echoes its prompt; the rubric puts the verdict in the prompt, so the grade the
# judge "gives" is known to the test and parsing, caching and resuming are what is tested.
RUBRIC = (
    "Item {{ id }}. Response: {{ response }}. Expected: {{ target }}. "
    "{% if response == target %}GRADE: C{% else %}GRADE: I{% endif %}"
)


@pytest.fixture
def judge_server() -> Iterator[TestServer]:
    # It serves (and lists, for the preflight) the judge model the specs name.
    server = TestServer.start_in_thread(
        ServerConfig(mode="echo", latency_min=0.01, model="judge-model")
    )
    yield server
    server.stop()


def run_dir(output: Path) -> Path:
    (path,) = sorted((output / "runs").iterdir())
    return path


def metrics_of(output: Path) -> dict[str, Any]:
    return json.loads((run_dir(output) / "metrics.json").read_text())


def rewrite(spec: Path, **changes: Any) -> None:
    data = yaml.safe_load(spec.read_text())
    data.update(changes)
    spec.write_text(yaml.safe_dump(data, sort_keys=False))


def test_metric_edits_and_rescore_make_no_model_call(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli
) -> None:
    spec = write_spec(tmp_path, base_url=llm_server.url, n_items=30, group_by=["b"])
    assert run_cli("run", str(spec)).returncode == 0
    sent = llm_server.stats()["requests"]
    assert sent == 30

    rewrite(
        spec,
        metrics=[
            {"type": "exact_match", "target": "answer"},
            {"type": "numeric", "target": "answer", "tolerance": 1, "name": "near"},
        ],
    )
    result = run_cli("run", str(spec))
    assert result.returncode == 0, result.stderr
    assert llm_server.stats()["requests"] == sent
    summary = metrics_of(tmp_path / "runs")
    assert summary["metrics"]["near"]["mean"] == 1.0  # wrong answers are off by exactly one
    assert set(summary["by_group"]) == {str(i["b"]) for i in arith_items(30)}

    other = tmp_path / "includes.yaml"
    data = yaml.safe_load(spec.read_text())
    data["metrics"] = [{"type": "includes", "target": "answer", "name": "has_answer"}]
    other.write_text(yaml.safe_dump(data))
    run_id = run_dir(tmp_path / "runs").name
    result = run_cli("rescore", run_id, "--spec", str(other), "--output", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert llm_server.stats()["requests"] == sent
    rescored = metrics_of(tmp_path / "runs")
    assert set(rescored["metrics"]) == {"has_answer"}
    assert rescored["metrics"]["has_answer"]["mean"] == summary["metrics"]["exact_match"]["mean"]
    history = list((run_dir(tmp_path / "runs") / "history").iterdir())
    assert len(history) >= 2  # the metric edit and the rescore each kept the previous file
    table = pq.read_table(run_dir(tmp_path / "runs") / "results.parquet")
    assert "score_has_answer" in table.column_names


def test_rescore_refuses_a_spec_that_needs_the_model(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli
) -> None:
    spec = write_spec(tmp_path, base_url=llm_server.url, n_items=10)
    assert run_cli("run", str(spec)).returncode == 0
    rewrite(spec, prompt={"user": "Compute {{ a }} + {{ b }}."})
    run_id = run_dir(tmp_path / "runs").name
    # Without --output, rescore looks where the spec's `output` says.
    result = run_cli("rescore", run_id, "--spec", str(spec))
    assert result.returncode == 2
    assert "no stored response" in " ".join(result.stderr.split())
    assert llm_server.stats()["requests"] == 10


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator, written independently of shardeval's."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def test_trials_pass_at_k_and_resume_of_missing_trials(
    tmp_path: Path, run_cli: RunCli, prefect_api: str
) -> None:
    server = TestServer.start_in_thread(ServerConfig(mode="random", seed=7, latency_min=0.03))
    try:
        items = [
            {"id": f"q{i}", "question": f"Pick a letter for #{i}", "answer": "A"} for i in range(60)
        ]
        spec = write_spec(
            tmp_path,
            base_url=server.url,
            items=items,
            prompt={"user": "{{ question }}"},
            trials=4,
            batch_size=20,
            model={"concurrency": 4},
        )
        env = cli_env(prefect_api)
        process = subprocess.Popen(
            [sys.executable, "-m", "shardeval", "run", str(spec), "--quiet"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while server.stats()["completions"] < 80 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        at_kill = server.stats()["requests"]
        assert 80 <= at_kill < 240, at_kill

        result = run_cli("run", str(spec))
        assert result.returncode == 0, result.stderr
        total = server.stats()["requests"]
        # Only missing trials were sent: at most the requests in flight (4) and one flush
        # window (16) were lost at the kill.
        assert total <= 240 + 4 + 16, total

        table = pq.read_table(run_dir(tmp_path / "runs") / "results.parquet").to_pylist()
        assert len(table) == 240
        assert sorted({(r["item_id"], r["trial"]) for r in table}) == sorted(
            (f"q{i}", t) for i in range(60) for t in range(4)
        )
        passes: dict[str, list[float]] = defaultdict(list)
        for row in table:
            passes[row["item_id"]].append(row["score_exact_match"])
        stats = metrics_of(tmp_path / "runs")["metrics"]["exact_match"]
        for k in (1, 2, 4):
            expected = sum(pass_at_k(4, int(sum(v)), k) for v in passes.values()) / len(passes)
            assert stats["pass_at_k"][str(k)] == pytest.approx(expected, abs=1e-6)
        assert 0.1 < stats["mean"] < 0.4  # one letter in four
    finally:
        server.stop()


def judge_spec(tmp_path: Path, model_url: str, judge_url: str, n_items: int) -> Path:
    return write_spec(
        tmp_path,
        base_url=model_url,
        n_items=n_items,
        batch_size=25,
        metrics=[
            {"type": "exact_match", "target": "answer"},
            {
                "type": "llm_judge",
                "name": "judge",
                "target": "answer",
                "rubric": RUBRIC,
                "model": {
                    "provider": "openai",
                    "model": "judge-model",
                    "base_url": judge_url,
                    "concurrency": 4,
                    "max_retries": 1,
                },
            },
        ],
    )


def test_llm_judge_grades_are_parsed_and_cached(
    tmp_path: Path, llm_server: TestServer, judge_server: TestServer, run_cli: RunCli
) -> None:
    spec = judge_spec(tmp_path, llm_server.url, judge_server.url, n_items=40)
    result = run_cli("run", str(spec))
    assert result.returncode == 0, result.stderr
    assert judge_server.stats()["requests"] == 40
    # The summary's count of paid calls includes the judge's.
    assert "80 model calls made" in " ".join(result.stdout.split()), result.stdout
    stats = metrics_of(tmp_path / "runs")["metrics"]
    assert stats["judge"]["mean"] == stats["exact_match"]["mean"]
    assert stats["judge"]["n"] == 40

    # A rubric edit re-judges; nothing else about the run calls either model.
    rewrite(spec, batch_size=10)
    assert run_cli("run", str(spec)).returncode == 0
    assert judge_server.stats()["requests"] == 40
    assert llm_server.stats()["requests"] == 40


def test_a_kill_while_judging_resends_no_finished_judgement(
    tmp_path: Path, llm_server: TestServer, run_cli: RunCli, prefect_api: str
) -> None:
    judge = TestServer.start_in_thread(ServerConfig(mode="echo", latency_min=0.05))
    try:
        spec = judge_spec(tmp_path, llm_server.url, judge.url, n_items=200)
        process = subprocess.Popen(
            [sys.executable, "-m", "shardeval", "run", str(spec), "--quiet"],
            env=cli_env(prefect_api),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while judge.stats()["completions"] < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert judge.stats()["completions"] >= 60

        result = run_cli("run", str(spec))
        assert result.returncode == 0, result.stderr
        assert llm_server.stats()["requests"] <= 200 + 8 + 16  # the model was done or nearly
        # At most the judgements in flight (4) and one flush window (16) were paid twice.
        assert judge.stats()["requests"] <= 200 + 4 + 16
        repeated = [n for n in judge.stats()["prompt_completions"].values() if n > 1]
        assert len(repeated) <= 16
        stats = metrics_of(tmp_path / "runs")["metrics"]
        assert stats["judge"]["mean"] == stats["exact_match"]["mean"]
    finally:
        judge.stop()


@pytest.mark.parametrize(
    ("metric", "fragment"),
    [
        ({"type": "exact_mach", "target": "answer"}, "did you mean 'exact_match'"),
        ({"type": "exact_match", "target": "nope"}, "target field 'nope' is missing"),
        ({"type": "regex", "pattern": "(unclosed"}, "does not compile"),
        ({"type": "python", "function": "no_such_module:fn"}, "cannot be imported"),
        (
            {"type": "llm_judge", "rubric": "{{ response }}", "model": {"provider": "nope"}},
            "unknown provider",
        ),
    ],
)
def test_bad_metric_config_exits_2_before_any_call(
    tmp_path: Path, llm_server: TestServer, metric: dict[str, Any], fragment: str
) -> None:
    spec = write_spec(tmp_path, base_url=llm_server.url, n_items=5, metrics=[metric])
    result = subprocess.run(
        [sys.executable, "-m", "shardeval", "run", str(spec)],
        env=cli_env(None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    message = " ".join(result.stderr.split())
    assert result.returncode == 2, message
    assert "metrics[0]" in message and fragment in message
    assert llm_server.stats()["requests"] == 0
