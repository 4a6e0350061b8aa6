"""The ``evaluate`` flow: plan → batch tasks (concurrently, in a bounded window) → aggregate.

Composition only: every step is a library call wrapped in a task. Run it from the CLI
(``shardeval run``), from a deployment (``prefect deployment run evaluate/evaluate``), or
directly (``evaluate(spec="examples/quickstart.yaml")``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.stages import run_judges, submit_batches
from shardeval import interrupt
from shardeval.engine import close_engines
from shardeval.errors import RunIncomplete
from shardeval.hashing import default_run_id
from shardeval.locking import RunLock
from shardeval.overrides import resolve_spec
from shardeval.prefect_limit import prefect_limit_mode
from shardeval.progress import progress_for
from shardeval.runner import BatchWork, RunRef
from shardeval.session import Survey, Validated, choose_run_id, record_attempt, survey
from shardeval.storage import RunStore
from shardeval.taskrunners import (
    DEFAULT_MAX_WORKERS,
    NO_SERVER_WARNING,
    check_task_runner,
    has_prefect_server,
    is_dask_runner,
    make_task_runner,
)
from tasks.aggregate import aggregate
from tasks.shard import shard_dataset

report = logging.getLogger("shardeval.run")
"""What a run found and does, for the person who started it; the CLI shows its INFO lines."""


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
    task_runner: str = "threads",
    dask_address: str | None = None,
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
        task_runner: where batch tasks run: ``threads`` (in this process) or ``dask``
            (worker processes of a local Dask cluster, or of ``dask_address``; needs the
            ``[dask]`` extra and a Prefect server). See docs/distributed.md.
        dask_address: an existing Dask scheduler, e.g. ``tcp://10.0.0.5:8786``.

    Returns:
        The run's metrics.json content.
    """
    logger = get_run_logger()
    runner_kind = check_task_runner(task_runner, dask_address)
    eval_spec = resolve_spec(spec, batch_size=batch_size, concurrency=concurrency)
    prefect_limit_mode(eval_spec.model)  # a missing model.prefect_limit fails here, not later
    validated: Validated = shard_dataset(eval_spec, limit)
    if run_id is None and not fresh and flow_run.id:
        # A deployment run: a new eval run per flow run; a retry keeps the flow run id.
        run_id = f"{default_run_id(eval_spec)}-{str(flow_run.id)[:8]}"
    run_id = choose_run_id(eval_spec, run_id, fresh=fresh)
    store = RunStore(output or eval_spec.output, run_id)
    progress = progress_for(run_id)
    started_at = datetime.now(UTC)
    lock = RunLock(store)
    with interrupt.graceful_signal(
        signal.SIGTERM, eval_spec.grace_period_s, run_id, defer=prefect_runner_signalled
    ):
        try:
            lock.acquire(wait=wait)
            # Survey first: it compares the plan with the previous attempt's plan.parquet, which
            # record_attempt then replaces.
            found = survey(store, validated.plan, retry_failed=retry_failed)
            record_attempt(store, validated, run_id)
            progress.plan(validated.plan.n_rows, len(validated.plan.batches), 0)
            found_text = describe_resume(run_id, validated, found)
            logger.info(found_text)  # the Prefect UI
            report.info(found_text)  # the CLI's console (shardeval's logger)
            run = RunRef(run_id=run_id, output=store.output, model=eval_spec.model)
            last_round = False
            while True:
                with batch_runner(runner_kind, dask_address) as runner:
                    failures = submit_batches(
                        batch_works(validated, found, run, retry_failed),
                        run,
                        progress,
                        runner=runner,
                    )
                    if not failures:
                        failures = run_judges(store, validated, progress, runner=runner)
                if failures:
                    raise RunIncomplete(
                        f"{len(failures)} of {len(validated.plan.batches)} batches could not "
                        "finish: "
                        + "; ".join(failures[:5])
                        + ("; ..." if len(failures) > 5 else ""),
                        hint="run the same command again to retry only what is missing",
                    )
                progress.set_phase("aggregating")
                try:
                    return aggregate(
                        store,
                        validated.plan,
                        validated.metrics,
                        started_at,
                        datetime.now(UTC),
                        {"sent": progress.sent, "from_cache": progress.from_cache},
                    )
                except FileNotFoundError:
                    # A batch that came back Cached was never read by its task; finalizing
                    # found its Parquet unreadable and set it aside. Recompute it, once.
                    if last_round:
                        raise
                    last_round = True
                    found = survey(store, validated.plan, retry_failed=retry_failed)
                    progress.plan(validated.plan.n_rows, len(validated.plan.batches), 0)
        finally:
            lock.release()
            close_engines(run_id)
            interrupt.forget(run_id)  # the next run of this id in this process starts clean


def prefect_runner_signalled() -> bool:
    """Whether Prefect's runner sent this SIGTERM on purpose (cancelling a deployment run).

    Such a signal keeps Prefect's own handling (the flow run ends Cancelled at once); any
    other SIGTERM (the CLI's user, ``kill``, a container stop) stops gracefully.
    """
    try:
        from prefect._internal import control_listener

        return control_listener.get_intent() is not None
    except Exception:  # an internal API: without it, every SIGTERM stops gracefully
        return False


@contextmanager
def batch_runner(kind: str, address: str | None) -> Iterator[TaskRunner[Any] | None]:
    """The task runner for batch tasks: None for the flow's own, or a Dask runner.

    A flow's task runner is fixed when it is decorated (threads here); the CLI swaps it with
    ``evaluate.with_options(task_runner=...)``. A deployment cannot, so a ``task_runner:
    dask`` parameter opens a Dask runner here, for the batch stage of this flow run.
    """
    context = FlowRunContext.get()
    current = context.task_runner if context is not None else None
    if kind == "dask" and not has_prefect_server():
        get_run_logger().warning(NO_SERVER_WARNING)
    if kind != "dask" or is_dask_runner(current):
        yield None
        return
    with make_task_runner("dask", address) as runner:
        yield runner


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
            nothing_stored=batch.key not in found.committed and batch.key not in found.with_parts,
            flush_every_s=spec.flush_every_s,
            flush_every_items=spec.flush_every_items,
        )
        stale = batch.key not in found.committed or batch.key in found.error_batches
        yield work, stale
