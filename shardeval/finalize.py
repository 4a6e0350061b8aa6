"""After the batches: join, score and publish ``results.parquet`` and ``metrics.json``.

Scores are computed here, from the stored responses and the dataset as it is now, so that a
change of metrics, or of a target field the prompt does not use, never calls the model again.
``metrics.json`` is written last: its presence means the run is complete. Its content depends
only on the data (timestamps aside, and ``cost.saved_usd``, which is what *this attempt* read
from storage): two runs over the same stored results give the same file otherwise.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardeval import __version__
from shardeval.cost import CostTally, cost_summary, judge_tallies, priced_as, track_judge_use
from shardeval.hashing import digest
from shardeval.judging import Judgements, judge_metrics, load_judgements, with_judgements
from shardeval.metrics import Metric, score_row, summarize
from shardeval.metrics.trials import bootstrap_ci95, item_means, trial_statistics
from shardeval.planning import RunPlan
from shardeval.prompts import PromptRenderer
from shardeval.results import RESULT_BASE_FIELDS, conform, conform_to, results_schema
from shardeval.storage import RunStore


@dataclass(frozen=True)
class Finalized:
    """What finalizing produced."""

    metrics_json: dict[str, Any]
    results_uri: str
    metrics_uri: str


def metrics_fingerprint(metrics: list[Metric]) -> str:
    """One digest of every metric's fingerprint (to tell whether scores are current)."""
    return digest([m.fingerprint() for m in metrics])


def is_current(
    summary: Any,
    *,
    plan_fingerprint: str | None,
    metrics: list[Metric] | None = None,
    prices: list[dict[str, Any] | None] | None = None,
) -> bool:
    """Whether a metrics.json describes this plan (and, given ``metrics``, these metrics).

    Given ``prices`` (:func:`shardeval.cost.part_prices`), its cost must also have been
    computed with them: a price edit alone finalizes again (from the stored tokens, no model
    call). The one criterion for "complete": every command that asks uses this.
    """
    if not isinstance(summary, dict) or not summary.get("complete"):
        return False
    if plan_fingerprint is None or summary.get("plan_fingerprint") != plan_fingerprint:
        return False
    if prices is not None and not priced_as(summary, prices):
        return False
    return metrics is None or summary.get("metrics_fingerprint") == metrics_fingerprint(metrics)


def finalize(
    store: RunStore,
    plan: RunPlan,
    metrics: list[Metric],
    *,
    started_at: datetime,
    finished_at: datetime,
    judgements: dict[str, Judgements] | None = None,
    stored: list[pa.Table] | None = None,
    sent_keys: Collection[str] | None = None,
) -> Finalized:
    """Write results.parquet (dataset order), then metrics.json (the previous one to history/).

    ``judgements`` (metric name → judgements) are the ``llm_judge`` metrics' inputs; without
    them the judgements stored in the run are read, so finalizing on its own scores the same.
    ``stored`` are the plan's committed batch tables when the caller has read them already
    (the list is consumed: its entries are set to None as they are scored).
    ``sent_keys`` are the item keys (the run's and its judges') sent to a model in this
    attempt, for ``cost.saved_usd``; None decides by each row's stored ``finished_at``
    against ``started_at`` instead (see :mod:`shardeval.cost`).
    """
    if judgements is None:
        judgements = {m.name: load_judgements(store, m) for m in judge_metrics(metrics)}
    metrics = track_judge_use(with_judgements(metrics, judgements))
    costs = CostTally("model", plan.spec.model, started_at=started_at, sent_keys=sent_keys)
    chunks: list[pa.Table] = []
    groups: list[str] = []
    score_errors: Counter[str] = Counter()
    tables: list[pa.Table | None]
    if stored is None:
        tables = list(store.read_tables([store.batch_path(batch.key) for batch in plan.batches]))
    else:
        tables = stored  # consumed: each is released once scored (a million rows: ~100 MB)
    for position, batch in enumerate(plan.batches):
        table, tables[position] = tables[position], None
        if table is None:
            raise FileNotFoundError(f"committed batch {batch.key} vanished before finalizing")
        rows = plan.rows.slice(batch.start, batch.stop - batch.start)
        chunk, chunk_groups = _score_chunk(plan, rows, conform(table), metrics, score_errors, costs)
        chunks.append(chunk)
        groups.extend(chunk_groups)
    score_columns = sorted({c for t in chunks for c in t.column_names if c.startswith("score_")})
    schema = results_schema(score_columns)
    conformed = [conform_to(chunk, schema) for chunk in chunks]
    targets = {f"target_{m.name}": m.target_field for m in metrics if m.target_field}
    file_schema = results_schema(score_columns, list(targets))
    texts = _TextColumns(plan, targets)

    def write_results() -> None:
        # Prompts and targets are rendered per chunk as it is written, not held for the run.
        with store.open_table_writer(store.results_path, file_schema) as writer:
            for batch, chunk in zip(plan.batches, conformed, strict=True):
                rows = plan.rows.slice(batch.start, batch.stop - batch.start)
                writer.write_table(texts.add(chunk, rows, file_schema))

    # The previous metrics.json goes to history/ while results.parquet is written; the new
    # metrics.json is written only after both (its presence means the run is complete).
    store.gather(write_results, lambda: keep_history(store))
    table = pa.concat_tables(conformed) if conformed else schema.empty_table()
    summary = _summary(store, plan, metrics, table, score_columns, score_errors)
    if plan.spec.group_by:
        summary["group_by"] = list(plan.spec.group_by)
        summary["by_group"] = _by_group(table, groups, score_columns)
    summary["started_at"] = started_at.isoformat(timespec="seconds")
    summary["finished_at"] = finished_at.isoformat(timespec="seconds")
    judges = judge_tallies(store, metrics, started_at=started_at, sent_keys=sent_keys)
    summary["cost"] = cost_summary([costs, *judges])
    if plan.spec.report:
        from shardeval.report.writer import write_report_quietly

        if (report_url := write_report_quietly(store, table, summary)) is not None:
            summary["report"] = report_url
    store.write_json(store.metrics_path, summary)
    store.tidy()
    return Finalized(summary, store.url_of(store.results_path), store.url_of(store.metrics_path))


class _TextColumns:
    """``prompt`` (the rendered last user message) and ``target_<metric>`` for a chunk.

    Targets are the dataset's field as text, the way metrics compare them (``7`` and ``"7"``
    are the same target), null where the item lacks the field.
    """

    def __init__(self, plan: RunPlan, targets: dict[str, str]) -> None:
        self._plan = plan
        self._targets = targets
        self._renderer = PromptRenderer(plan.spec.prompt)

    def add(self, chunk: pa.Table, rows: pa.Table, schema: pa.Schema) -> pa.Table:
        item_indices = rows.column("item_index").to_pylist()
        item_ids = rows.column("item_id").to_pylist()
        first = item_indices[0]
        items = self._plan.dataset.items(first, item_indices[-1] + 1)
        prompts: dict[int, str | None] = {}
        for index, item_id in zip(item_indices, item_ids, strict=True):
            if index not in prompts:
                messages = self._renderer.render(items[index - first], item_id)
                user = [m["content"] for m in messages if m["role"] == "user"]
                prompts[index] = user[-1] if user else None
        columns = {name: chunk.column(name) for name in chunk.column_names}
        columns["prompt"] = pa.array([prompts[i] for i in item_indices], pa.string())
        for column, target in self._targets.items():
            values = [items[i - first].get(target) for i in item_indices]
            columns[column] = pa.array([None if v is None else str(v) for v in values], pa.string())
        return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def keep_history(store: RunStore) -> None:
    """Copy the current metrics.json, if any, to history/ (no result is ever lost)."""
    previous = store.read_bytes(store.metrics_path)
    if previous is None:
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    store.write_bytes(store.path("history", f"metrics-{stamp}.json"), previous)


def _score_chunk(
    plan: RunPlan,
    rows: pa.Table,
    stored: pa.Table,
    metrics: list[Metric],
    score_errors: Counter[str],
    costs: CostTally,
) -> tuple[pa.Table, list[str]]:
    """One batch's result rows (plan order, scored, priced) and each row's group label."""
    indices = pc.index_in(rows.column("item_key"), value_set=stored.column("item_key"))
    if indices.null_count:
        raise ValueError("a committed batch lacks some of its rows")  # its key says otherwise
    generation = stored.take(indices)
    columns: dict[str, Any] = {
        "item_id": rows.column("item_id"),
        "item_index": rows.column("item_index"),
        "trial": rows.column("trial"),
        "cost_usd": costs.add(generation),
    }
    for field in RESULT_BASE_FIELDS:
        if field.name not in columns:
            columns[field.name] = generation.column(field.name)
    item_indices = rows.column("item_index").to_pylist()
    first = item_indices[0]
    needs_items = bool(metrics or plan.spec.group_by)
    items = plan.dataset.items(first, item_indices[-1] + 1) if needs_items else []
    group_by = plan.spec.group_by
    groups = [
        " / ".join(str(items[i - first].get(f)) for f in group_by) if group_by else ""
        for i in item_indices
    ]
    scores: dict[str, list[float | None]] = {}
    if metrics:
        statuses = generation.column("status").to_pylist()
        responses = generation.column("response").to_pylist()
        n = len(item_indices)
        for position, (index, status, response) in enumerate(
            zip(item_indices, statuses, responses, strict=True)
        ):
            if status != "ok":
                continue
            row_scores, errors = score_row(metrics, response or "", items[index - first])
            for name, _message in errors:
                score_errors[name] += 1
            for column, value in row_scores.items():
                scores.setdefault(column, [None] * n)[position] = value
        for metric in metrics:
            # A metric returning a dict has score_<name>_<key> columns instead of its own.
            if not any(c.startswith(f"{metric.column}_") for c in scores):
                scores.setdefault(metric.column, [None] * n)
    for column, values in scores.items():
        columns[column] = pa.array(values, pa.float64())
    return pa.table(columns), groups


def metric_statistics(ok_rows: pa.Table, column: str, trials: int) -> dict[str, Any]:
    """mean, n, stderr, a seeded bootstrap 95% CI, and pass@k/agreement over trials."""
    scores = ok_rows.column(column)
    stats = summarize(scores)
    # With trials, rows of one item are not independent: resample items, not rows.
    values = scores.to_pylist() if trials > 1 else None
    bootstrap = bootstrap_ci95(
        item_means(ok_rows.column("item_id").to_pylist(), values)
        if values is not None
        else pc.fill_null(scores.cast(pa.float64()), math.nan).to_numpy()
    )
    stats["ci_method"] = "normal"
    if bootstrap is not None:
        stats["ci95"] = bootstrap
        stats["ci_method"] = "bootstrap"
    if values is not None:
        stats.update(trial_statistics(ok_rows.column("item_id").to_pylist(), values, trials))
    return stats


def _by_group(table: pa.Table, groups: list[str], score_columns: list[str]) -> dict[str, Any]:
    labels = pa.array(groups, pa.string())
    out: dict[str, Any] = {}
    for label in sorted(set(groups)):
        rows = table.filter(pc.equal(labels, label))
        ok_rows = rows.filter(pc.equal(rows.column("status"), "ok"))
        out[label] = {
            "n_rows": rows.num_rows,
            "n_ok": ok_rows.num_rows,
            "metrics": {
                c[len("score_") :]: metric_statistics(ok_rows, c, trials=1) for c in score_columns
            },
        }
    return out


def _int_sum(table: pa.Table, column: str) -> int:
    return int(pc.sum(table.column(column)).as_py() or 0)


def _summary(
    store: RunStore,
    plan: RunPlan,
    metrics: list[Metric],
    table: pa.Table,
    score_columns: list[str],
    score_errors: Counter[str],
) -> dict[str, Any]:
    status = table.column("status")
    ok_mask = pc.equal(status, "ok")
    n_ok = int(pc.sum(ok_mask).as_py() or 0)
    kinds = pc.value_counts(pc.filter(table.column("error_kind"), pc.equal(status, "error")))
    errors_by_kind = {str(k["values"]): int(k["counts"]) for k in kinds.to_pylist()}
    ok_rows = table.select(["item_id", *score_columns]).filter(ok_mask)  # not the texts
    metric_stats = {
        column[len("score_") :]: metric_statistics(ok_rows, column, plan.spec.trials)
        for column in score_columns
    }
    spec = plan.spec
    return {
        "run_id": store.run_id,
        "name": spec.name,
        "complete": True,
        "n_items": len(plan.dataset),
        "n_rows": table.num_rows,
        "n_ok": n_ok,
        "n_error": table.num_rows - n_ok,
        "trials": spec.trials,
        "metrics": metric_stats,
        "scoring_errors": dict(sorted(score_errors.items())),
        "errors_by_kind": dict(sorted(errors_by_kind.items())),
        "usage": {
            "prompt_tokens": _int_sum(table, "prompt_tokens"),
            "completion_tokens": _int_sum(table, "completion_tokens"),
        },
        "model": {
            "provider": spec.model.provider,
            "model": spec.model.model,
            "revision": spec.model.revision,
        },
        "dataset": {"path": plan.dataset.url, "fingerprint": plan.dataset.fingerprint},
        "plan_fingerprint": plan.fingerprint(),
        "metrics_fingerprint": metrics_fingerprint(metrics),
        "results": store.url_of(store.results_path),
        "shardeval_version": __version__,
    }
