"""The ``evaluate`` flow: plan → batch tasks (concurrently, in a bounded window) → aggregate.

Composition only: every step is a library call wrapped in a task. Run it from the CLI
(``shardeval run``), from a deployment (``prefect deployment run evaluate/evaluate``), or
directly (``evaluate(spec="examples/quickstart.yaml")``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stages import run_judges, submit_batches
from shardeval.engine import close_engines
from shardeval.errors import RunIncomplete
from shardeval.hashing import default_run_id
from shardeval.locking import RunLock
from shardeval.overrides import resolve_spec
from shardeval.progress import progress_for
from shardeval.runner import BatchWork, RunRef
from shardeval.session import Survey, Validated, choose_run_id, record_attempt, survey
from shardeval.storage import RunStore
from tasks.aggregate import aggregate
from tasks.shard import shard_dataset

DEFAULT_MAX_WORKERS = 8


def evaluate_run_name() -> str:
    """``{name} · {model}``, so the Prefect UI says which eval a flow run is."""
    try:
        spec = resolve_spec(flow_run.parameters["spec"])
        return f"{spec.name} · {spec.model.model or spec.model.function or spec.model.provider}"
    except Exception:
        return "evaluate"


@flow(
    name="evaluate",
    flow_run_name=evaluate_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_WORKERS),  # type: ignore[arg-type]
    persist_result=False,
)
def evaluate(
    spec: str | dict[str, Any],
    output: str | None = None,
    run_id: str | None = None,
    fresh: bool = False,
    retry_failed: bool = False,
    limit: int | None = None,
    batch_size: int | None = None,
    concurrency: int | None = None,
    wait: bool = False,
) -> dict[str, Any]:
    """Evaluate a model on a dataset, resuming whatever a previous attempt finished.

    Args:
        spec: path or URL of the eval spec YAML, or the spec as a mapping.
        output: where runs are stored (any fsspec URL); defaults to the spec's ``output``.
        run_id: the run to write; by default a new run per flow run (a retry of the same
            flow run resumes it).
        fresh: with no ``run_id``, start a new run instead of resuming.
        retry_failed: send again the rows whose status is error.
        limit: evaluate only the first N items.
        batch_size: override the spec's batch size.
        concurrency: override the spec's request concurrency.
        wait: wait for another process holding the run instead of failing.

    Returns:
        The run's metrics.json content.
    """
    logger = get_run_logger()
    eval_spec = resolve_spec(spec, batch_size=batch_size, concurrency=concurrency)
    validated: Validated = shard_dataset(eval_spec, limit)
    if run_id is None and not fresh and flow_run.id:
        # A deployment run: a new eval run per flow run; a retry keeps the flow run id.
        run_id = f"{default_run_id(eval_spec)}-{str(flow_run.id)[:8]}"
    run_id = choose_run_id(eval_spec, run_id, fresh=fresh)
    store = RunStore(output or eval_spec.output, run_id)
    progress = progress_for(run_id)
    started_at = datetime.now(UTC)
    lock = RunLock(store)
    lock.acquire(wait=wait)
    try:
        record_attempt(store, validated, run_id)
        found = survey(store, validated.plan, retry_failed=retry_failed)
        progress.plan(validated.plan.n_rows, len(validated.plan.batches), 0)
        logger.info(describe_resume(run_id, validated, found))
        run = RunRef(run_id=run_id, output=store.output, model=eval_spec.model)
        failures = submit_batches(batch_works(validated, found, run, retry_failed), run, progress)
        if not failures:
            failures = run_judges(store, validated, progress)
        if failures:
            raise RunIncomplete(
                f"{len(failures)} of {len(validated.plan.batches)} batches could not finish: "
                + "; ".join(failures[:5])
                + ("; ..." if len(failures) > 5 else ""),
                hint="run the same command again to retry only what is missing",
            )
        progress.set_phase("aggregating")
        return aggregate(
            store,
            validated.plan,
            validated.metrics,
            started_at,
            datetime.now(UTC),
            {"sent": progress.sent, "from_cache": progress.from_cache},
        )
    finally:
        lock.release()
        close_engines(run_id)


def describe_resume(run_id: str, validated: Validated, found: Survey) -> str:
    """``resuming run X: 1,234 of 2,000 items done; dataset changed ...``."""
    total = validated.plan.n_rows
    if found.diff is None and not found.done_rows:
        return f"starting run {run_id}: {total:,} requests in {len(validated.plan.batches)} batches"
    text = f"resuming run {run_id}: {found.done_rows:,} of {total:,} done"
    if found.diff is not None and found.diff.changed:
        text += f"; dataset changed since the last attempt: {found.diff.describe()}"
    return text


def batch_works(
    validated: Validated, found: Survey, run: RunRef, retry_failed: bool
) -> Iterator[tuple[BatchWork, bool]]:
    """Each batch's work (rendered only when submitted) and whether its cache record is stale."""
    plan = validated.plan
    spec = plan.spec
    for batch in plan.batches:
        work = BatchWork(
            run_id=run.run_id,
            number=batch.number,
            total=batch.total,
            key=batch.key,
            requests=plan.requests(batch),
            reuse=found.reuse.get(batch.key, {}),
            retry_failed=retry_failed,
            flush_every_s=spec.flush_every_s,
            flush_every_items=spec.flush_every_items,
        )
        stale = batch.key not in found.committed or batch.key in found.error_batches
        yield work, stale
