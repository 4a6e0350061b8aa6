"""Prefect's cache is the fast path; the run's Parquet files are the truth.

The ``evaluate`` flow runs in this process against Prefect's test harness (a real temporary
API server with its own database) and the real HTTP test server, so every assertion is about
what Prefect recorded and how many requests really reached the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pyarrow.parquet as pq
import pytest

from shardeval.testing.server import TestServer
from tests.helpers.specs import arith_items, write_jsonl, write_spec

pytestmark = pytest.mark.slow

N_ITEMS = 30
BATCH = 10


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API server (and database) for the module's in-process flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_flow(spec: Path, output: Path, run_id: str) -> tuple[Any, dict[str, Any]]:
    """Run the evaluate flow in-process; return its final state and metrics.json content."""
    from flows.evaluate import evaluate

    state = evaluate(spec=str(spec), output=str(output), run_id=run_id, return_state=True)
    assert state.is_completed(), state
    return state, state.result()


def batch_states(state: Any) -> dict[str, str]:
    """``{"batch 1/3": "Cached", ...}`` for the batch task runs of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    flow_run_id: UUID = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    return {
        run.name: run.state.name
        for run in task_runs
        if run.name.startswith("batch ") and run.state is not None
    }


def run_dir(output: Path, run_id: str) -> Path:
    return output / "runs" / run_id


def batch_files(output: Path, run_id: str) -> list[Path]:
    return sorted((run_dir(output, run_id) / "batches").glob("*.parquet"))


def cache_records(output: Path, run_id: str) -> list[Path]:
    """Prefect's cache records of this run's batch tasks, wherever Prefect stored them.

    They live under the run directory (``prefect/``) when the library points Prefect there,
    else in Prefect's local result storage (``PREFECT_HOME/storage``).
    """
    from prefect.settings import get_current_settings

    prefix = f"shardeval-{run_id}-"
    roots = [run_dir(output, run_id), Path(get_current_settings().results.local_storage_path)]
    found: list[Path] = []
    for root in roots:
        if root.exists():
            found += [p for p in root.rglob(f"{prefix}*") if p.is_file()]
    return sorted(found)


def expected_summary(summary: dict[str, Any]) -> None:
    assert summary["complete"] is True
    assert summary["n_items"] == N_ITEMS
    assert summary["n_rows"] == N_ITEMS
    assert summary["n_ok"] == N_ITEMS


@pytest.fixture
def eval_spec(tmp_path: Path, llm_server: TestServer) -> Path:
    return write_spec(tmp_path / "eval", base_url=llm_server.url, n_items=N_ITEMS, batch_size=BATCH)


def test_rerun_with_same_run_id_is_cached_and_sends_nothing(
    prefect_harness: None, eval_spec: Path, tmp_path: Path, llm_server: TestServer
) -> None:
    output = tmp_path / "out"
    first, summary = run_flow(eval_spec, output, "cached-rerun")
    expected_summary(summary)
    assert llm_server.stats()["requests"] == N_ITEMS
    assert set(batch_states(first).values()) == {"Completed"}
    assert len(batch_states(first)) == N_ITEMS // BATCH

    second, again = run_flow(eval_spec, output, "cached-rerun")

    states = batch_states(second)
    assert len(states) == N_ITEMS // BATCH
    assert set(states.values()) == {"Cached"}, states
    assert llm_server.stats()["requests"] == N_ITEMS
    assert again["metrics"] == summary["metrics"]


def test_parquet_is_the_truth_not_prefect_records(
    prefect_harness: None, eval_spec: Path, tmp_path: Path, llm_server: TestServer
) -> None:
    output = tmp_path / "out"
    run_id = "parquet-truth"
    _, summary = run_flow(eval_spec, output, run_id)
    expected_summary(summary)
    assert llm_server.stats()["requests"] == N_ITEMS

    # 1. Without Prefect's records the committed Parquet still answers: nothing is sent.
    records = cache_records(output, run_id)
    assert len(records) == N_ITEMS // BATCH, records
    for record in records:
        record.unlink()
    _, again = run_flow(eval_spec, output, run_id)
    assert llm_server.stats()["requests"] == N_ITEMS
    assert again["metrics"] == summary["metrics"]

    # 2. A record without its Parquet stands for nothing: that batch alone is recomputed.
    victim = batch_files(output, run_id)[1]
    assert any(victim.stem in r.name for r in cache_records(output, run_id)), (
        "the rerun should have left a fresh cache record for every batch"
    )
    victim.unlink()
    third, recomputed = run_flow(eval_spec, output, run_id)

    assert llm_server.stats()["requests"] == N_ITEMS + BATCH
    assert victim.exists()
    assert pq.read_table(victim).num_rows == BATCH
    states = batch_states(third)
    assert sorted(states.values()) == ["Cached", "Cached", "Completed"], states
    assert recomputed["metrics"] == summary["metrics"]
    results = pq.read_table(run_dir(output, run_id) / "results.parquet")
    assert results.column("item_index").to_pylist() == list(range(N_ITEMS))


def truncate_a_batch(output: Path, run_id: str) -> tuple[Path, bytes, dict[Path, bytes]]:
    """Cut one committed batch file in half; return it, its damaged bytes and the others."""
    victim = batch_files(output, run_id)[2]
    whole = victim.read_bytes()
    damaged = whole[: len(whole) // 2]
    victim.write_bytes(damaged)
    others = {p: p.read_bytes() for p in batch_files(output, run_id) if p != victim}
    return victim, damaged, others


def assert_set_aside(output: Path, run_id: str, victim: Path, damaged: bytes) -> None:
    """The damaged file was moved to quarantine/ intact (kept for inspection, not deleted)."""
    quarantined = list((run_dir(output, run_id) / "quarantine").iterdir())
    assert len(quarantined) == 1, quarantined
    assert quarantined[0].read_bytes() == damaged
    assert victim.stem in quarantined[0].name


def test_truncated_batch_file_is_quarantined_and_recomputed_by_the_next_run(
    prefect_harness: None,
    eval_spec: Path,
    tmp_path: Path,
    llm_server: TestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    output = tmp_path / "out"
    run_id = "quarantine-one-run"
    _, summary = run_flow(eval_spec, output, run_id)
    assert llm_server.stats()["requests"] == N_ITEMS
    victim, damaged, others = truncate_a_batch(output, run_id)

    # A handler on shardeval's own logger: Prefect reconfigures the root logger's handlers
    # when a flow starts, which can detach pytest's caplog handler.
    caplog.set_level(logging.WARNING, logger="shardeval")
    logging.getLogger("shardeval").addHandler(caplog.handler)
    try:
        _, recomputed = run_flow(eval_spec, output, run_id)
    finally:
        logging.getLogger("shardeval").removeHandler(caplog.handler)

    # Only the damaged batch's items were sent again.
    assert llm_server.stats()["requests"] == N_ITEMS + BATCH
    assert_set_aside(output, run_id, victim, damaged)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(victim.stem in message for message in warnings), warnings
    # The batch is whole again, the others were not rewritten, the results are complete.
    assert pq.read_table(victim).num_rows == BATCH
    assert {p: p.read_bytes() for p in others} == others
    expected_summary(recomputed)
    assert recomputed["metrics"] == summary["metrics"]


def test_truncated_batch_file_is_never_trusted(
    prefect_harness: None, eval_spec: Path, tmp_path: Path, llm_server: TestServer
) -> None:
    """Weaker guarantee that holds today: a damaged file is set aside (kept) and never used;
    its items, and only they, are recomputed (at the latest by the next attempt)."""
    from flows.evaluate import evaluate

    output = tmp_path / "out"
    run_id = "quarantine-never-trusted"
    _, summary = run_flow(eval_spec, output, run_id)
    victim, damaged, others = truncate_a_batch(output, run_id)

    state = evaluate(spec=str(eval_spec), output=str(output), run_id=run_id, return_state=True)
    if not state.is_completed():
        # Today the attempt that meets the damage fails (see the xfail above) after setting
        # the file aside; the next attempt recomputes it.
        assert_set_aside(output, run_id, victim, damaged)
        state = evaluate(spec=str(eval_spec), output=str(output), run_id=run_id, return_state=True)

    assert state.is_completed(), state
    assert_set_aside(output, run_id, victim, damaged)
    assert llm_server.stats()["requests"] == N_ITEMS + BATCH
    assert pq.read_table(victim).num_rows == BATCH
    assert {p: p.read_bytes() for p in others} == others
    recomputed = state.result()
    expected_summary(recomputed)
    assert recomputed["metrics"] == summary["metrics"]
    results = pq.read_table(run_dir(output, run_id) / "results.parquet")
    assert results.column("item_index").to_pylist() == list(range(N_ITEMS))


def test_rerun_after_a_dataset_edit_says_what_changed_and_sends_only_that(
    prefect_harness: None,
    tmp_path: Path,
    llm_server: TestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    items = arith_items(N_ITEMS, seed=2)
    spec = write_spec(tmp_path / "eval", base_url=llm_server.url, items=items, batch_size=BATCH)
    output = tmp_path / "out"
    run_id = "dataset-edit"
    run_flow(spec, output, run_id)
    assert llm_server.stats()["requests"] == N_ITEMS

    items[4]["a"] += 1  # one row edited
    items.append({"id": "extra-1", "a": 1, "b": 2, "answer": 3})  # two rows added
    items.append({"id": "extra-2", "a": 5, "b": 8, "answer": 13})
    del items[20]  # one row removed
    write_jsonl(tmp_path / "eval" / "items.jsonl", items)

    # Prefect's run loggers do not propagate to the root logger: listen to them directly.
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(caplog.handler)
    try:
        _, summary = run_flow(spec, output, run_id)
    finally:
        flow_logger.removeHandler(caplog.handler)

    assert llm_server.stats()["requests"] == N_ITEMS + 3
    assert summary["n_items"] == N_ITEMS + 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "2 added, 1 edited, 1 removed" in messages, messages
