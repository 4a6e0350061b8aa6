"""End to end through the real CLI: ``python -m shardeval run`` as a subprocess, a real
Prefect server, and the real HTTP test model, whose request counter says exactly which
items were sent.

The expected score of every item is computed here, independently of shardeval, from the
test model's rule (:func:`shardeval.testing.answers.arith_is_wrong`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from shardeval.testing.answers import arith_is_wrong
from shardeval.testing.server import ServerConfig, TestServer
from tests.conftest import cli_env
from tests.helpers.specs import arith_items, write_spec

ROOT = Path(__file__).resolve().parents[2]
TIMESTAMPS = ("started_at", "finished_at")

RunCli = Callable[..., subprocess.CompletedProcess[str]]

# A failing batch is retried by Prefect after 10 s and 30 s by default; one short task retry
# keeps that path (a retried batch resends only its unfinished items) without the wait.
SHORT_TASK_RETRIES = {"SHARDEVAL_BATCH_RETRY_DELAYS": "1"}


# ------------------------------------------------------------------------------- helpers
def user_prompt(item: dict[str, Any]) -> str:
    """The user message the spec written by ``write_spec`` renders for ``item``."""
    return f"What is {item['a']} + {item['b']}?"


def expected_score(item: dict[str, Any]) -> float:
    """1.0 unless the test model deliberately answers this question wrong."""
    return 0.0 if arith_is_wrong(user_prompt(item)) else 1.0


def text_of(result: subprocess.CompletedProcess[str]) -> str:
    """stdout + stderr with whitespace collapsed (rich wraps long lines)."""
    return " ".join((result.stdout + "\n" + result.stderr).split())


def only_run_dir(output: Path) -> Path:
    runs = sorted((output / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())


def without_timestamps(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in TIMESTAMPS}


def metrics_bytes_without_timestamps(run: Path) -> bytes:
    """metrics.json as stored, minus the lines of its two timestamps."""
    lines = (run / "metrics.json").read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if not any(f'"{t}"'.encode() in line for t in TIMESTAMPS)]
    assert len(kept) == len(lines) - len(TIMESTAMPS)
    return b"".join(kept)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file below ``directory``."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def committed_batches(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "batches").glob("*.parquet"))}


def requests(server: TestServer) -> int:
    return int(server.stats()["requests"])


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def edit_spec(spec: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = yaml.safe_load(spec.read_text())
    change(data)
    spec.write_text(yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_run_writes_the_contract_and_a_rerun_is_answered_from_the_cache(
    run_cli: RunCli, llm_server: TestServer, tmp_path: Path
) -> None:
    n = 60
    items = arith_items(n, seed=7)
    bad = 17  # a permanent error (HTTP 400): stored as an error row, not fatal
    items[bad]["a"] = f"[[status:400]] {items[bad]['a']}"
    spec = write_spec(tmp_path / "eval", base_url=llm_server.url, items=items, batch_size=10)
    output = tmp_path / "out"

    ok(run_cli("run", str(spec), "--output", str(output)))

    assert requests(llm_server) == n
    run = only_run_dir(output)
    table = pq.read_table(run / "results.parquet")

    # Columns and types of the design's contract.
    expected_types = {
        "item_id": pa.string(),
        "item_index": pa.int64(),
        "trial": pa.int64(),
        "status": pa.string(),
        "error": pa.string(),
        "response": pa.string(),
        "latency_s": pa.float64(),
        "prompt_tokens": pa.int64(),
        "completion_tokens": pa.int64(),
        "score_exact_match": pa.float64(),
    }
    for name, dtype in expected_types.items():
        assert name in table.column_names, name
        assert table.schema.field(name).type == dtype, (name, table.schema.field(name).type)

    rows = table.to_pylist()
    assert [r["item_index"] for r in rows] == list(range(n))
    assert [r["item_id"] for r in rows] == [item["id"] for item in items]
    assert {r["trial"] for r in rows} == {0}

    # The error row.
    error_row = rows[bad]
    assert error_row["status"] == "error"
    assert error_row["http_status"] == 400
    assert "400" in error_row["error"]
    assert error_row["score_exact_match"] is None

    # Every ok row scored exactly as the test model's rule says.
    expected = {i: expected_score(item) for i, item in enumerate(items) if i != bad}
    assert 0.0 in expected.values(), "the seed should include some deliberately wrong answers"
    for i, row in enumerate(rows):
        if i == bad:
            continue
        assert row["status"] == "ok", row
        assert row["error"] is None
        assert row["response"] is not None
        assert row["latency_s"] is not None and row["latency_s"] >= 0
        assert row["score_exact_match"] == expected[i], (i, row["response"], items[i])

    summary = read_metrics(run)
    accuracy = sum(expected.values()) / len(expected)
    assert summary["run_id"] == run.name
    assert summary["name"] == "arith"
    assert summary["complete"] is True
    assert summary["n_items"] == n
    assert summary["n_rows"] == n
    assert summary["n_ok"] == n - 1
    assert summary["n_error"] == 1
    em = summary["metrics"]["exact_match"]
    assert em["n"] == n - 1
    assert em["mean"] == pytest.approx(accuracy, abs=1e-6)
    # Standard error of a mean of 0/1 scores (sample standard deviation over sqrt(n)).
    m = len(expected)
    assert em["stderr"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / (m - 1)), rel=0.02)
    # A 95% interval around the mean (the method is an internal choice), inside [0, 1].
    low, high = em["ci95"]
    assert 0.0 <= low < em["mean"] < high <= 1.0
    assert summary["usage"]["prompt_tokens"] == sum(r["prompt_tokens"] or 0 for r in rows) > 0
    assert summary["usage"]["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in rows)
    assert summary["model"]["provider"] == "openai"
    assert summary["model"]["model"] == "test-model"
    assert summary["dataset"]["path"].endswith("items.jsonl")
    assert summary["dataset"]["fingerprint"]
    assert summary["started_at"] and summary["finished_at"]
    assert summary["shardeval_version"]

    # The same command again: nothing is sent, it says so, and the numbers are the same.
    results_before = (run / "results.parquet").read_bytes()
    metrics_before = metrics_bytes_without_timestamps(run)
    again = ok(run_cli("run", str(spec), "--output", str(output)))

    assert requests(llm_server) == n
    assert only_run_dir(output) == run
    stdout = " ".join(again.stdout.split())
    assert "all 60 rows came from the cache" in stdout and "no model call" in stdout, stdout
    assert metrics_bytes_without_timestamps(run) == metrics_before
    assert (run / "results.parquet").read_bytes() == results_before


@pytest.mark.slow
def test_limit_then_full_then_metric_and_batch_size_edits_reuse_every_item(
    run_cli: RunCli, llm_server: TestServer, tmp_path: Path
) -> None:
    n = 30
    items = arith_items(n, seed=3)
    spec = write_spec(tmp_path / "eval", base_url=llm_server.url, items=items, batch_size=10)
    output = tmp_path / "out"
    command = ("run", str(spec), "--output", str(output))

    # --limit 5: five rows, five requests.
    ok(run_cli(*command, "--limit", "5"))
    run = only_run_dir(output)
    assert pq.read_table(run / "results.parquet").num_rows == 5
    assert read_metrics(run)["n_items"] == 5
    assert requests(llm_server) == 5

    # The full run is the same run: only the 25 missing items are sent.
    ok(run_cli(*command))
    assert only_run_dir(output) == run
    assert requests(llm_server) == n
    full = read_metrics(run)
    assert full["n_items"] == n

    # A metric added: re-scored from the stored responses, no model call.
    def add_includes(data: dict[str, Any]) -> None:
        data["metrics"].append({"type": "includes", "target": "answer"})

    edit_spec(spec, add_includes)
    rescored = ok(run_cli(*command))
    assert requests(llm_server) == n
    assert only_run_dir(output) == run
    assert "no model call" in text_of(rescored)
    summary = read_metrics(run)
    assert set(summary["metrics"]) == {"exact_match", "includes"}
    assert summary["metrics"]["includes"]["n"] == n
    assert summary["metrics"]["exact_match"] == full["metrics"]["exact_match"]
    table = pq.read_table(run / "results.parquet")
    assert "score_includes" in table.column_names
    # "includes" is at least as lenient as exact match on these answers.
    assert all(
        inc >= em
        for inc, em in zip(
            table.column("score_includes").to_pylist(),
            table.column("score_exact_match").to_pylist(),
            strict=True,
        )
    )

    # Another batching (the spec edited): every item is reused from the old batching's files.
    edit_spec(spec, lambda data: data.update(batch_size=7))
    rebatched = ok(run_cli(*command))
    assert requests(llm_server) == n
    assert only_run_dir(output) == run
    assert "no model call" in text_of(rebatched)
    assert without_timestamps(read_metrics(run))["metrics"] == summary["metrics"]
    table = pq.read_table(run / "results.parquet")
    assert table.column("item_id").to_pylist() == [item["id"] for item in items]


@pytest.mark.slow
def test_fresh_starts_a_new_run_and_leaves_the_old_one_untouched(
    run_cli: RunCli, llm_server: TestServer, tmp_path: Path
) -> None:
    n = 20
    spec = write_spec(tmp_path / "eval", base_url=llm_server.url, n_items=n, batch_size=10)
    output = tmp_path / "out"
    ok(run_cli("run", str(spec), "--output", str(output)))
    old = only_run_dir(output)
    before = snapshot(old)
    assert requests(llm_server) == n

    ok(run_cli("run", str(spec), "--output", str(output), "--fresh"))

    runs = sorted((output / "runs").iterdir())
    assert len(runs) == 2
    (new,) = [r for r in runs if r != old]
    assert new.name.startswith(old.name)  # same eval, a new run of it
    assert requests(llm_server) == 2 * n  # a new run measures the model again
    assert snapshot(old) == before
    fresh_summary = read_metrics(new)
    assert fresh_summary["run_id"] == new.name
    assert fresh_summary["metrics"] == read_metrics(old)["metrics"]


@pytest.mark.slow
def test_rerun_after_a_dataset_edit_says_what_changed(run_cli: RunCli, tmp_path: Path) -> None:
    items = arith_items(10, seed=9)
    spec = write_spec(tmp_path / "eval", items=items)  # the offline python model
    command = ("run", str(spec), "--output", str(tmp_path / "out"))
    ok(run_cli(*command))
    items[2]["a"] += 1
    items.append({"id": "new-1", "a": 2, "b": 2, "answer": 4})
    (tmp_path / "eval" / "items.jsonl").write_text(
        "".join(json.dumps(item) + "\n" for item in items)
    )

    again = ok(run_cli(*command))

    assert "1 added" in text_of(again) and "1 edited" in text_of(again), text_of(again)


def _transient_marker_scenario(run_cli: RunCli, server: TestServer, directory: Path) -> None:
    """An item that always answers 503: exit 1, resumable; once the item is fixed, resumed."""
    n = 30
    items = arith_items(n, seed=11)
    sick = 13
    fixed_a = items[sick]["a"]
    items[sick]["a"] = f"[[status:503]] {fixed_a}"
    spec = write_spec(
        directory / "eval",
        base_url=server.url,
        items=items,
        batch_size=10,
        model={"max_retries": 1},
    )
    output = directory / "out"
    command = ("run", str(spec), "--output", str(output))

    failed = run_cli(*command, **SHORT_TASK_RETRIES)

    assert failed.returncode == 1, text_of(failed)
    message = text_of(failed)
    assert "rerun" in message or "run the same command" in message, message
    run = only_run_dir(output)
    assert not (run / "metrics.json").exists()
    assert not (run / "results.parquet").exists()
    stats = server.stats()
    # Transient errors are never stored: the other two batches are committed, and every
    # other item was sent exactly once (retries resent only the failing item).
    assert len(committed_batches(run)) == 2
    assert stats["by_status"][200] == n - 1
    assert stats["completions"] == n - 1
    assert max(stats["prompt_completions"].values()) == 1
    assert requests(server) - (n - 1) == stats["by_status"][503] >= 2

    # Fix the item (an edit of one row): the rerun sends that row only.
    items[sick]["a"] = fixed_a
    (directory / "eval" / "items.jsonl").write_text(
        "".join(json.dumps(item) + "\n" for item in items)
    )
    sent_before = requests(server)
    ok(run_cli(*command))
    assert requests(server) == sent_before + 1
    summary = read_metrics(run)
    assert summary["n_ok"] == n
    assert summary["n_error"] == 0


def _outage_scenario(run_cli: RunCli, server: TestServer, directory: Path) -> None:
    """The endpoint goes down mid-eval: exit 1 keeps what was committed; a rerun sends the rest."""
    n = 30
    items = arith_items(n, seed=5)
    spec = write_spec(
        directory / "eval",
        base_url=server.url,
        items=items,
        batch_size=10,
        model={"max_retries": 1},
    )
    output = directory / "out"
    command = ("run", str(spec), "--output", str(output))

    # Part of the eval done (the first 20 items, the same run as the whole eval).
    ok(run_cli(*command, "--limit", "20"))
    run = only_run_dir(output)
    kept = committed_batches(run)
    assert len(kept) == 2
    assert requests(server) == 20

    server.configure(down=True, fail_status=503)
    failed = run_cli(*command, **SHORT_TASK_RETRIES)

    assert failed.returncode == 1, text_of(failed)
    assert "rerun" in text_of(failed) or "run the same command" in text_of(failed)
    assert only_run_dir(output) == run
    # Nothing committed was lost or rewritten, and nothing was stored for the outage.
    assert {k: v for k, v in committed_batches(run).items() if k in kept} == kept
    assert len(committed_batches(run)) == 2
    stats = server.stats()
    assert stats["completions"] == 20  # only the 10 missing items were tried
    assert len(stats["prompts"]) == n

    server.configure(down=False)
    sent_before = requests(server)
    ok(run_cli(*command))

    assert requests(server) == sent_before + 10  # the finished items were not sent again
    assert server.stats()["completions"] == n
    assert max(server.stats()["prompt_completions"].values()) == 1
    summary = read_metrics(run)
    assert summary["complete"] is True
    assert summary["n_items"] == n
    assert summary["n_ok"] == n
    assert {k: v for k, v in committed_batches(run).items() if k in kept} == kept


@pytest.mark.slow
def test_transient_failures_exit_1_and_a_rerun_sends_only_what_is_missing(
    run_cli: RunCli, llm_server: TestServer, tmp_path: Path
) -> None:
    """Two independent scenarios, run side by side (each mostly waits on retry back-offs)."""
    second = TestServer.start_in_thread(ServerConfig(latency_min=0.005, latency_max=0.01))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [
                pool.submit(_transient_marker_scenario, run_cli, llm_server, tmp_path / "marker"),
                pool.submit(_outage_scenario, run_cli, second, tmp_path / "outage"),
            ]
            for future in futures:
                future.result()
    finally:
        second.stop()


@pytest.mark.slow
@pytest.mark.parametrize("local_server", ["1", "0"], ids=["local-server", "ephemeral"])
def test_default_mode_runs_the_offline_quickstart_without_a_prefect_server(
    tmp_path: Path, local_server: str
) -> None:
    """What a new user gets: no PREFECT_API_URL, no model server.

    That is shardeval's local Prefect server (in the session's SHARDEVAL_HOME), or with
    ``SHARDEVAL_LOCAL_SERVER=0`` Prefect's temporary in-process server.
    """
    env = cli_env(
        None, PREFECT_HOME=str(tmp_path / "prefect-home"), SHARDEVAL_LOCAL_SERVER=local_server
    )
    assert "PREFECT_API_URL" not in env
    output = tmp_path / "runs-out"

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardeval",
            "run",
            str(ROOT / "examples" / "quickstart.yaml"),
            "--output",
            str(output),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    ok(result)
    said = " ".join(result.stderr.split())
    assert ("using the local Prefect server at" in said) == (local_server == "1"), said
    assert "telemetry" not in said.lower(), said
    run = only_run_dir(output)
    assert run.name.startswith("quickstart-")
    n_items = sum(1 for line in (ROOT / "examples" / "arith.jsonl").open() if line.strip())
    table = pq.read_table(run / "results.parquet")
    assert table.num_rows == n_items
    summary = read_metrics(run)
    assert summary["complete"] is True
    assert summary["n_ok"] == n_items
    assert {"exact_match", "within_one"} <= set(summary["metrics"])
    assert summary["metrics"]["within_one"]["mean"] == 1.0
    assert 0.8 < summary["metrics"]["exact_match"]["mean"] < 1.0
    assert not (tmp_path / "shardeval-runs").exists()  # --output was honoured
