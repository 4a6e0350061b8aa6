"""Arrow schemas of what a run stores, and conversions to them.

Batch files and parts hold *generations* only (keyed by item key); scores are computed from
them when a run is finalised, against the dataset as it is now. That is what lets a metric
change, or an edit to a target field, re-score without calling the model again.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from shardeval.engine import Outcome

GENERATION_FIELDS: list[pa.Field] = [
    pa.field("item_key", pa.string(), nullable=False),
    pa.field("item_id", pa.string()),
    pa.field("trial", pa.int64()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),
    pa.field("http_status", pa.int64()),
    pa.field("response", pa.string()),
    pa.field("latency_s", pa.float64()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("finish_reason", pa.string()),
    pa.field("attempts", pa.int64()),
    pa.field("finished_at", pa.float64()),
]
GENERATION_SCHEMA = pa.schema(GENERATION_FIELDS)

# results.parquet: the design's columns first, then the extras, then one column per metric.
RESULT_BASE_FIELDS: list[pa.Field] = [
    pa.field("item_id", pa.string()),
    pa.field("item_index", pa.int64()),
    pa.field("trial", pa.int64()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("response", pa.string()),
    pa.field("latency_s", pa.float64()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("error_kind", pa.string()),
    pa.field("http_status", pa.int64()),
    pa.field("finish_reason", pa.string()),
    pa.field("item_key", pa.string()),
    pa.field("cost_usd", pa.float64()),  # null when unpriced or tokens unknown, never 0
]


PROMPT_FIELD = pa.field("prompt", pa.string())
"""The rendered last user message: what the model was asked, next to what it answered."""


def results_schema(
    score_columns: Sequence[str], target_columns: Sequence[str] | None = None
) -> pa.Schema:
    """Schema of results.parquet for the given ``score_<name>`` columns.

    With ``target_columns`` (``target_<metric>``, the expected answers as text), the file's
    schema: ``prompt`` and the targets come between the base fields and the scores. Without,
    the schema finalizing keeps in memory (the text columns are added per chunk as written).
    """
    text = (
        []
        if target_columns is None
        else [PROMPT_FIELD, *(pa.field(c, pa.string()) for c in target_columns)]
    )
    return pa.schema(
        [*RESULT_BASE_FIELDS, *text, *(pa.field(c, pa.float64()) for c in score_columns)]
    )


def outcomes_table(
    outcomes: Sequence[Outcome], ids: dict[str, str], trials: dict[str, int]
) -> pa.Table:
    """Final outcomes of requests as a generation table (one row per item key)."""
    columns: dict[str, list[object]] = {f.name: [] for f in GENERATION_FIELDS}
    for outcome in outcomes:
        columns["item_key"].append(outcome.key)
        columns["item_id"].append(ids.get(outcome.key))
        columns["trial"].append(trials.get(outcome.key))
        columns["status"].append(outcome.status)
        columns["error"].append(outcome.error)
        columns["error_kind"].append(outcome.error_kind)
        columns["http_status"].append(outcome.http_status)
        columns["response"].append(outcome.response)
        columns["latency_s"].append(outcome.latency_s)
        columns["prompt_tokens"].append(outcome.prompt_tokens)
        columns["completion_tokens"].append(outcome.completion_tokens)
        columns["finish_reason"].append(outcome.finish_reason)
        columns["attempts"].append(outcome.attempts)
        columns["finished_at"].append(outcome.finished_at)
    return pa.Table.from_pydict(columns, schema=GENERATION_SCHEMA)


def conform(table: pa.Table) -> pa.Table:
    """A stored generation table in the current schema (older files may lack a column)."""
    arrays = []
    for field in GENERATION_FIELDS:
        if field.name in table.column_names:
            arrays.append(table.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=GENERATION_SCHEMA)
