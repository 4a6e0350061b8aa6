"""Arrow schemas of what a run stores, and conversions to them.

Batch files and parts hold *generations* only (keyed by item key); scores are computed from
them when a run is finalised, against the dataset as it is now. That is what lets a metric
change, or an edit to a target field, re-score without calling the model again.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from shardeval.outcome import Outcome

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
    """Final outcomes of requests as a generation table (one row per item key).

    Built a column at a time (one pass per field), not a row at a time: at a thousand
    answers a second the per-row appends were a visible share of the client's CPU.
    """
    keys = [o.key for o in outcomes]
    columns: dict[str, list[object]] = {
        "item_key": list(keys),
        "item_id": [ids.get(k) for k in keys],
        "trial": [trials.get(k) for k in keys],
    }
    for name in _OUTCOME_FIELDS:
        columns[name] = [getattr(o, name) for o in outcomes]
    return pa.Table.from_pydict(columns, schema=GENERATION_SCHEMA)


_OUTCOME_FIELDS = [f.name for f in GENERATION_FIELDS[3:]]
"""Generation columns that are :class:`Outcome` attributes of the same name."""


def conform(table: pa.Table) -> pa.Table:
    """A stored generation table in the current schema (older files may lack a column)."""
    return conform_to(table, GENERATION_SCHEMA)


def conform_to(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: cast, and null where a column is missing.

    Files written by older versions lack newer columns, and a column that was all null in one
    file has type ``null`` there: tables must agree before they are concatenated.
    """
    arrays = [
        table.column(field.name).cast(field.type)
        if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def one_row_per_key(table: pa.Table) -> pa.Table:
    """One row per ``item_key``: an ok row wins over an error, then the latest row wins.

    Rows of one key come from several stored files (parts, older batch files, a retry); a
    key answered once stays answered. The rows kept stay in their order in ``table``.
    """
    if table.num_rows == 0:
        return table
    position = pa.array(range(table.num_rows), pa.int64())
    not_ok = pc.cast(pc.not_equal(table.column("status"), "ok"), pa.int8())
    ranked = pa.table({"key": table.column("item_key"), "not_ok": not_ok, "position": position})
    ranked = ranked.sort_by(
        [("key", "ascending"), ("not_ok", "ascending"), ("position", "descending")]
    )
    keys = ranked.column("key")
    chosen = ranked.column("position").take(pc.index_in(pc.unique(keys), value_set=keys))
    return table.take(chosen.take(pc.sort_indices(chosen)))
