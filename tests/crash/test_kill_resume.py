"""Real crashes: SIGKILL the CLI at random moments, rerun it, nothing lost or paid twice.

The CLI runs as a subprocess (``python -m shardeval run``) against the project's test server
(its own process, 20-50 ms per request) and the session's Prefect server. Each kill lands once
the run has made some progress (the server's answer counter passed a random target), so the
kills hit different phases: sending, flushing parts, committing batches.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq

from shardeval.status import read_status
from shardeval.testing.server import TestServer
from tests.crash.harness import (
    CONCURRENCY,
    crash_spec,
    output_of,
    start_run,
    wait_for_answers,
)
from tests.helpers.specs import arith_items, write_jsonl

N_ITEMS = 1000
FLUSH_EVERY_ITEMS = 16  # the spec's default flush window
KILLS = 5
IGNORED_COLUMNS = {"latency_s"}  # results.parquet has no timestamp columns


def run_dir(output: Path, run_id: str) -> Path:
    return output / "runs" / run_id


def results_without_timings(path: Path) -> list[dict[str, object]]:
    table = pq.read_table(path)
    return table.drop_columns([c for c in table.column_names if c in IGNORED_COLUMNS]).to_pylist()


def unexpected_files(root: Path) -> list[str]:
    """Files and non-empty directories outside the documented layout of a finished run."""
    allowed_files = {
        "spec.json",
        "plan.parquet",
        "results.parquet",
        "metrics.json",
        "report.html",
        "run.json",
        "prefect.log",  # Prefect's own log lines (the CLI keeps them off the console)
    }
    problems = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        top = relative.parts[0]
        if top == "prefect":
            continue
        if path.is_dir():
            if top in ("parts", ".tmp") and any(p.is_file() for p in path.rglob("*")):
                problems.append(f"{relative}/ (not empty)")
            elif top not in ("batches", "parts", ".tmp"):
                problems.append(f"{relative}/")
            continue
        if len(relative.parts) == 1 and relative.name in allowed_files:
            continue
        if top == "batches" and len(relative.parts) == 2 and relative.suffix == ".parquet":
            continue
        problems.append(str(relative))
    return problems


def test_sigkill_at_random_moments_resumes_to_identical_results(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    seed = int(os.environ.get("SHARDEVAL_CRASH_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    spec = crash_spec(
        tmp_path / "eval",
        slow_server,
        n_items=N_ITEMS,
    )
    output = tmp_path / "eval" / "runs"
    logs = tmp_path / "logs"

    # The uninterrupted run, into another output: what the crashed one must end up equal to.
    reference_output = tmp_path / "reference"
    reference = start_run(spec, prefect_api, logs, "--output", str(reference_output))
    assert reference.wait(timeout=300) == 0, output_of(logs)
    run_id = next((reference_output / "runs").iterdir()).name
    slow_server.reset()

    kills = 0
    history: list[str] = []  # per attempt: stored before it, requests it sent
    while kills < KILLS:
        done = read_status(str(output), run_id).done if run_dir(output, run_id).exists() else 0
        remaining = N_ITEMS - done
        left = KILLS - kills
        # A random amount of progress, leaving enough for the kills still to come.
        target = rng.randint(10, max(11, remaining // (left + 1)))
        sent_before = slow_server.stats()["requests"]
        process = start_run(spec, prefect_api, logs)
        progressed = wait_for_answers(slow_server, process, target)
        assert progressed, f"the run ended before kill {kills + 1}: {output_of(logs)}"
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += 1
        history.append(f"{done} stored, then {slow_server.stats()['requests'] - sent_before} sent")

    # One more kill at a random moment once everything has been answered: committing the last
    # batches, aggregating, or already done (then it is not counted as a kill).
    remaining = N_ITEMS - read_status(str(output), run_id).done
    process = start_run(spec, prefect_api, logs)
    if wait_for_answers(slow_server, process, remaining):
        time.sleep(rng.uniform(0, 0.5))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
    process.wait(timeout=30)

    final = start_run(spec, prefect_api, logs)
    assert final.wait(timeout=300) == 0, output_of(logs)

    context = f"seed {seed}; attempts: {'; '.join(history)}"
    stats = slow_server.stats()
    assert results_without_timings(run_dir(output, run_id) / "results.parquet") == (
        results_without_timings(run_dir(reference_output, run_id) / "results.parquet")
    ), context
    bound = N_ITEMS + kills * (CONCURRENCY + FLUSH_EVERY_ITEMS)
    assert stats["requests"] <= bound, f"{stats['requests']} requests > {bound}; {context}"
    assert stats["completions"] >= N_ITEMS
    assert unexpected_files(run_dir(output, run_id)) == [], context
    assert not (run_dir(output, run_id) / "lock.json").exists()
    status = read_status(str(output), run_id)
    assert (status.done, status.total, status.state) == (N_ITEMS, N_ITEMS, "complete")
    print(
        f"{kills} kills, {stats['requests']} requests for {N_ITEMS} items "
        f"(bound {bound}); {context}"
    )


def test_dataset_edited_between_attempts_sends_only_the_changes(
    tmp_path: Path, prefect_api: str, slow_server: TestServer
) -> None:
    items = arith_items(200)
    directory = tmp_path / "eval"
    spec = crash_spec(
        directory,
        slow_server,
        items=items,
    )
    logs = tmp_path / "logs"
    first = start_run(spec, prefect_api, logs)
    assert first.wait(timeout=300) == 0, output_of(logs)
    assert slow_server.stats()["requests"] == 200
    slow_server.reset()

    # 3 added (one inserted in the middle, so every later batch is cut differently),
    # 1 edited, 1 removed.
    edited = [dict(item) for item in items]
    edited[10]["b"] += 1
    del edited[150]
    edited.insert(75, {"id": "new-1", "a": 1, "b": 2, "answer": 3})
    edited.append({"id": "new-2", "a": 3, "b": 4, "answer": 7})
    edited.append({"id": "new-3", "a": 5, "b": 6, "answer": 11})
    write_jsonl(directory / "items.jsonl", edited)

    second = start_run(spec, prefect_api, logs)
    assert second.wait(timeout=300) == 0, output_of(logs)
    said = output_of(logs)
    assert "dataset changed since the last attempt: 3 added, 1 edited, 1 removed" in said, said
    assert slow_server.stats()["requests"] == 4  # 3 added + 1 edited
    results = pq.read_table(next((directory / "runs" / "runs").glob("*/results.parquet")))
    assert results.column("item_id").to_pylist() == [item["id"] for item in edited]

    # Another batch size re-cuts every batch: still nothing to send.
    slow_server.reset()
    third = start_run(spec, prefect_api, logs, "--batch-size", "30")
    assert third.wait(timeout=300) == 0, output_of(logs)
    assert slow_server.stats()["requests"] == 0
