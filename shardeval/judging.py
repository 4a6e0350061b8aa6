"""``llm_judge`` judgements as a run stage: what to send, and what is already judged.

Judgements are requests like generations (see :mod:`shardeval.metrics.judge`): they live inside
the run, under ``<run>/judges/<metric name>/``, and go through the same batch tasks, so they
are cached, flushed and resumed exactly like the run's own responses. This module builds a
judge metric's batches from the run's ok rows and reads the stored judgements back for
finalizing; it decides nothing about Prefect.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from shardeval.metrics import Metric
from shardeval.metrics.judge import Judgement, JudgeScorer, judge_requests
from shardeval.planning import RunPlan, cut_batches
from shardeval.results import conform
from shardeval.runner import BatchWork, RunRef
from shardeval.storage import RunStore
from shardeval.survey import reuse_map, stored_elsewhere

Judgements = dict[str, Judgement]
"""Judgement key → stored judgement, for one metric."""


def judge_run_id(run_id: str, metric: Metric) -> str:
    """Judgements live inside the run: ``<run>/judges/<metric name>``."""
    return f"{run_id}/judges/{metric.name}"


def judge_metrics(metrics: list[Metric]) -> list[Metric]:
    """The metrics graded by a judge model, in spec order."""
    return [m for m in metrics if isinstance(m.scorer, JudgeScorer)]


@dataclass(frozen=True)
class JudgePlan:
    """One judge metric's batches, with what is stored for each."""

    metric: Metric
    run: RunRef
    works: list[tuple[BatchWork, bool]]
    """``(work, stale)`` per batch: stale batches are re-checked, never trusted to a cache."""
    n_requests: int


def plan_judgements(store: RunStore, plan: RunPlan, metric: Metric, progress_id: str) -> JudgePlan:
    """The judge requests for every ok row of the run, cut and surveyed like a run's batches."""
    scorer = metric.scorer
    assert isinstance(scorer, JudgeScorer)
    requests = judge_requests(scorer, list(_ok_rows(store, plan)))
    run = RunRef(
        run_id=judge_run_id(store.run_id, metric),
        output=store.output,
        model=scorer.model,
        progress_id=progress_id,
    )
    judge_store = run.store()
    committed = judge_store.list_batches()
    parts = judge_store.list_parts()
    spec = plan.spec
    works = [
        BatchWork(
            run_id=run.run_id,
            number=batch.number,
            total=batch.total,
            key=batch.key,
            requests=requests[batch.start : batch.stop],
            flush_every_s=spec.flush_every_s,
            flush_every_items=spec.flush_every_items,
        )
        for batch in cut_batches([r.key for r in requests], spec.batch_size)
    ]
    # Judgements stored under another batching (a batch size or dataset edit) are reused
    # item by item, exactly like the run's own responses.
    index = stored_elsewhere(judge_store, {w.key for w in works}, committed, parts)
    surveyed = [
        (
            w
            if w.key in committed
            else replace(
                w,
                reuse=reuse_map([r.key for r in w.requests], index),
                nothing_stored=w.key not in parts,
            ),
            w.key not in committed,
        )
        for w in works
    ]
    return JudgePlan(metric=metric, run=run, works=surveyed, n_requests=len(requests))


def load_judgements(store: RunStore, metric: Metric) -> Judgements:
    """Every stored judgement of ``metric`` in run ``store`` (committed batches)."""
    judge_store = RunStore(store.output, judge_run_id(store.run_id, metric))
    keys = sorted(judge_store.list_batches())
    paths = [judge_store.batch_path(key) for key in keys]
    book: Judgements = {}
    for table in judge_store.read_tables(
        paths, columns=["item_key", "status", "response", "error"]
    ):
        if table is None:
            continue
        for row in table.to_pylist():
            book[row["item_key"]] = Judgement(row["status"], row["response"], row["error"])
    return book


def with_judgements(metrics: list[Metric], judgements: dict[str, Judgements]) -> list[Metric]:
    """``metrics`` with each judge metric's scorer holding its judgements (copies; no mutation)."""
    out = []
    for metric in metrics:
        scorer = metric.scorer
        if isinstance(scorer, JudgeScorer):
            metric = replace(metric, scorer=replace(scorer, book=judgements.get(metric.name, {})))
        out.append(metric)
    return out


def tidy_judges(store: RunStore, metric: Metric) -> None:
    """Remove a judge store's empty leftovers once its batches are committed."""
    RunStore(store.output, judge_run_id(store.run_id, metric)).tidy()


def _ok_rows(store: RunStore, plan: RunPlan) -> Iterator[tuple[str, str, int, str, Any]]:
    """(item_id, item_key, item_index, response, item) of every ok row, in plan order."""
    paths = [store.batch_path(batch.key) for batch in plan.batches]
    for batch, stored in zip(plan.batches, store.read_tables(paths), strict=True):
        if stored is None:
            continue
        stored = conform(stored)
        by_key = {
            k: (s, r)
            for k, s, r in zip(
                stored.column("item_key").to_pylist(),
                stored.column("status").to_pylist(),
                stored.column("response").to_pylist(),
                strict=True,
            )
        }
        rows = plan.rows.slice(batch.start, batch.stop - batch.start).to_pydict()
        first = rows["item_index"][0]
        items = plan.dataset.items(first, rows["item_index"][-1] + 1)
        for item_id, key, index in zip(
            rows["item_id"], rows["item_key"], rows["item_index"], strict=True
        ):
            status, response = by_key.get(key, (None, None))
            if status == "ok":
                yield item_id, key, index, response or "", items[index - first]
