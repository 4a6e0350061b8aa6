"""Rows stored as HTTP 401/403 (by versions before the preflight) are not final: re-sent.

An earlier version stored every item of a run without a key as an error row (``http_401``)
and answered the next run "from storage". Here a run's committed batch is rewritten the way
that version left it, finalized like it did (metrics.json counting ``http_401``), and then
the resume is driven through the library: survey, batch works, run_batch, finalize.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from shardeval.engines import close_engines, engine_for
from shardeval.finality import is_final, summary_has_auth_errors
from shardeval.finalize import finalize
from shardeval.overrides import resolve_spec
from shardeval.progress import forget, progress_for
from shardeval.runner import BatchWork, RunRef, run_batch
from shardeval.session import RunSession
from shardeval.storage import RunStore
from shardeval.survey import survey
from shardeval.testing.server import TestServer
from shardeval.validation import Validated, validate
from tests.helpers.specs import write_spec

N_ITEMS = 12
REJECTED = [2, 5, 9]


def generation_works(store: RunStore, validated: Validated) -> list[BatchWork]:
    """The generation stage's batch works, as an attempt of the run session builds them."""
    session = RunSession(validated, store.run_id, store)
    with session.attempt():
        stage = next(session.stages())
        return [work for work, _stale in stage.works]


def run_all(store: RunStore, validated: Validated, run: RunRef) -> None:
    try:
        for work in generation_works(store, validated):
            run_batch(store, work, engine_for(run.run_id, run.model), progress_for(run.run_id))
    finally:
        close_engines(run.run_id)
        forget(run.run_id)


def as_legacy_401(table: pa.Table, rows: list[int]) -> pa.Table:
    """What an earlier version stored for items whose request got a 401."""
    mask = pa.array([i in rows for i in range(table.num_rows)])

    def put(column: str, value: object, kind: pa.DataType) -> None:
        nonlocal table
        index = table.schema.get_field_index(column)
        replaced = pc.if_else(mask, pa.scalar(value, kind), table.column(column))
        table = table.set_column(index, table.schema.field(column), replaced)

    put("status", "error", pa.string())
    put("error", "HTTP 401: Incorrect API key provided.", pa.string())
    put("error_kind", "http_401", pa.string())
    put("http_status", 401, pa.int64())
    put("response", None, pa.string())
    return table


def test_rows_stored_as_401_by_an_older_version_are_sent_again(
    tmp_path: Path, llm_server: TestServer
) -> None:
    spec = write_spec(tmp_path, base_url=llm_server.url, n_items=N_ITEMS, batch_size=N_ITEMS)
    validated = validate(resolve_spec(str(spec)))
    store = RunStore(str(tmp_path / "out"), "legacy-401")
    run = RunRef("legacy-401", store.output, validated.spec.model)
    run_all(store, validated, run)
    (batch,) = validated.plan.batches
    path = store.batch_path(batch.key)
    legacy = as_legacy_401(store.read_table(path), REJECTED)
    store.write_table(path, legacy)
    now = datetime.now(UTC)
    done = finalize(store, validated.plan, validated.metrics, started_at=now, finished_at=now)
    assert done.metrics_json["errors_by_kind"] == {"http_401": len(REJECTED)}
    assert summary_has_auth_errors(done.metrics_json)
    llm_server.reset()

    found = survey(store, validated.plan)
    assert batch.key not in found.committed  # reopened, its other rows reused from the file
    assert found.done_rows == N_ITEMS - len(REJECTED)
    run_all(store, validated, run)

    assert llm_server.stats()["completions"] == len(REJECTED)  # only the rejected items
    table = store.read_table(path)
    assert table.column("status").to_pylist() == ["ok"] * N_ITEMS
    assert table.column("item_key").to_pylist() == legacy.column("item_key").to_pylist()


def test_a_retried_batch_with_401_rows_sends_only_those(
    tmp_path: Path, llm_server: TestServer
) -> None:
    """The runner itself does not trust a committed file with 401 rows (no survey needed)."""
    spec = write_spec(tmp_path, base_url=llm_server.url, n_items=N_ITEMS, batch_size=N_ITEMS)
    validated = validate(resolve_spec(str(spec)))
    store = RunStore(str(tmp_path / "out"), "legacy-401b")
    run = RunRef("legacy-401b", store.output, validated.spec.model)
    run_all(store, validated, run)
    (batch,) = validated.plan.batches
    store.write_table(
        store.batch_path(batch.key),
        as_legacy_401(store.read_table(store.batch_path(batch.key)), REJECTED),
    )
    llm_server.reset()

    (work,) = generation_works(store, validated)
    assert not work.nothing_stored  # committed, as far as the listing says
    try:
        pointer = run_batch(store, work, engine_for(run.run_id, run.model), progress_for("x"))
    finally:
        close_engines(run.run_id)
    assert (pointer.sent, pointer.reused) == (len(REJECTED), N_ITEMS - len(REJECTED))
    assert llm_server.stats()["completions"] == len(REJECTED)


def test_finality_rule() -> None:
    assert is_final("ok") and is_final("error", 400) and is_final("error", None)
    assert not is_final("error", 401) and not is_final("error", 403)
    assert not is_final("transient") and not is_final("cancelled")
