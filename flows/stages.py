"""Flow building blocks shared by ``evaluate`` and ``rescore``: composition, no logic of its own.

* :func:`submit_batches` hands batch tasks to the task runner, at most a window at a time.
* :func:`run_judges` sends an ``llm_judge`` metric's judgements through the same batch tasks
  (cached, flushed and resumed exactly like generations) and loads them into the metric.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prefect.futures import PrefectFuture

from shardeval import interrupt
from shardeval.errors import RunInterrupted
from shardeval.hashing import batch_key
from shardeval.metrics import Metric
from shardeval.metrics.judge import Judgement, JudgeScorer, judge_requests
from shardeval.planning import PlannedRequest
from shardeval.progress import RunProgress
from shardeval.results import conform
from shardeval.runner import BatchWork, RunRef
from shardeval.session import Validated
from shardeval.storage import RunStore
from tasks.batch import run_batch_task

DEFAULT_WINDOW = 16


def submit_batches(
    works: Iterable[tuple[BatchWork, bool]],
    run: RunRef,
    progress: RunProgress,
    *,
    window: int = DEFAULT_WINDOW,
) -> list[str]:
    """Run ``(work, stale)`` batches; return descriptions of the batches that failed.

    ``stale`` batches are submitted with ``refresh_cache=True``: Prefect's record only stands
    when the committed Parquet does (see tasks/batch.py). The window bounds memory (a batch's
    rendered requests exist only while it is queued or running).
    """
    batch_task = run_batch_task
    store = run.store()
    if store.is_local:
        # Cache records live with the run they describe (moved or deleted with it).
        batch_task = run_batch_task.with_options(result_storage=Path(store.prefect_dir))
    refresh = batch_task.with_options(refresh_cache=True)
    finished: queue.Queue[PrefectFuture[dict[str, Any]]] = queue.Queue()
    labels: dict[int, str] = {}
    failures: list[str] = []
    inflight = 0
    for work, stale in works:
        while inflight >= window:
            inflight -= _collect(finished.get(), labels, failures)
        if interrupt.stop_requested():
            break
        future = (refresh if stale else batch_task).submit(work, run)
        labels[id(future)] = work.label
        future.add_done_callback(finished.put)
        inflight += 1
    while inflight:
        inflight -= _collect(finished.get(), labels, failures)
    if interrupt.stop_requested():
        raise RunInterrupted(
            f"stopped: {progress.done:,} of {progress.total:,} done; run the same command to resume"
        )
    return failures


def _collect(
    future: PrefectFuture[dict[str, Any]], labels: dict[int, str], failures: list[str]
) -> int:
    future.wait()
    state = future.state
    if not state.is_completed():
        try:
            state.result()
        except RunInterrupted:
            pass
        except Exception as exc:
            failures.append(f"{labels.get(id(future), 'batch')}: {exc}")
    return 1


def judge_run_id(run_id: str, metric: Metric) -> str:
    """Judgements live inside the run: ``<run>/judges/<metric name>``."""
    return f"{run_id}/judges/{metric.name}"


def run_judges(
    store: RunStore, validated: Validated, progress: RunProgress, *, window: int = DEFAULT_WINDOW
) -> list[str]:
    """Send every ``llm_judge`` metric's judgements; load them into the metrics' scorers."""
    failures: list[str] = []
    for metric in validated.metrics:
        scorer = metric.scorer
        if not isinstance(scorer, JudgeScorer):
            continue
        progress.set_phase(f"judging ({metric.name})")
        requests = judge_requests(scorer, list(_ok_rows(store, validated)))
        judge_ref = RunRef(
            run_id=judge_run_id(store.run_id, metric), output=store.output, model=scorer.model
        )
        judge_store = judge_ref.store()
        committed = judge_store.list_batches()
        spec = validated.spec
        works = list(_judge_batches(judge_ref.run_id, requests, spec.batch_size, spec))
        progress.plan(progress.total + len(requests), progress.batches_total + len(works), 0)
        failures += submit_batches(
            ((w, w.key not in committed) for w in works), judge_ref, progress, window=window
        )
        scorer.book = _load_judgements(judge_store, [w.key for w in works])
        judge_store.tidy()
    return failures


def _ok_rows(store: RunStore, validated: Validated) -> Iterator[tuple[str, str, int, str, Any]]:
    """(item_id, item_key, item_index, response, item) of every ok row, in plan order."""
    plan = validated.plan
    for batch in plan.batches:
        stored = store.read_table(store.batch_path(batch.key))
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


def _judge_batches(
    run_id: str, requests: list[PlannedRequest], size: int, spec: Any
) -> Iterator[BatchWork]:
    total = (len(requests) + size - 1) // size
    for number, start in enumerate(range(0, len(requests), size), start=1):
        chunk = requests[start : start + size]
        yield BatchWork(
            run_id=run_id,
            number=number,
            total=total,
            key=batch_key(r.key for r in chunk),
            requests=chunk,
            flush_every_s=spec.flush_every_s,
            flush_every_items=spec.flush_every_items,
        )


def _load_judgements(store: RunStore, keys: list[str]) -> dict[str, Judgement]:
    book: dict[str, Judgement] = {}
    for key in keys:
        table = store.read_table(
            store.batch_path(key), columns=["item_key", "status", "response", "error"]
        )
        if table is None:
            continue
        for row in table.to_pylist():
            book[row["item_key"]] = Judgement(row["status"], row["response"], row["error"])
    return book
