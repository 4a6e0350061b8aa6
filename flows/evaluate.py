"""The ``evaluate`` flow: prepare → attempt → batch stages → aggregate.

Composition only: every decision is the run session's (:mod:`shardeval.session`). Run it from
the CLI (``shardeval run``), from Python (``shardeval.run``), from a deployment (``prefect
deployment run evaluate/evaluate``), or directly (``evaluate(spec="examples/quickstart.yaml")``).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import deployment, flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.stages import submit_batches
from shardeval import interrupt
from shardeval.flow_failure import fail_with_reason
from shardeval.overrides import resolve_spec
from shardeval.prefect_limit import prefect_limit_mode
from shardeval.session import RunSession
from shardeval.taskrunners import (
    DEFAULT_MAX_WORKERS,
    NO_SERVER_WARNING,
    check_task_runner,
    has_prefect_server,
    is_dask_runner,
    make_task_runner,
)
from tasks.aggregate import aggregate
from tasks.compare import compare_to_baseline
from tasks.shard import prepare_run


def evaluate_run_name() -> str:
    """``{name} · {model}``, so the Prefect UI says which eval a flow run is."""
    try:
        given = flow_run.parameters["spec"]
        overrides = flow_run.parameters.get("overrides") or ()
        spec = (
            given.spec
            if isinstance(given, RunSession)
            else resolve_spec(given, overrides=overrides)
        )
        return f"{spec.name} · {spec.model.model or spec.model.function or spec.model.provider}"
    except Exception:
        return "evaluate"


@flow(
    name="evaluate",
    flow_run_name=evaluate_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_WORKERS),  # type: ignore[arg-type]
    persist_result=False,
    validate_parameters=False,
)
@fail_with_reason  # the state message is the error's text (shardeval.flow_failure)
def evaluate(
    spec: str | dict[str, Any] | RunSession,
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
    overrides: list[str] | None = None,
    baseline: str | None = None,
    baseline_same_model: bool = False,
) -> dict[str, Any]:
    """Evaluate a model on a dataset, resuming whatever a previous attempt finished.

    Args:
        spec: path or URL of the eval spec YAML, or the spec as a mapping (or a session the
            CLI or ``shardeval.run`` prepared, which then carries every other option).
        output: where runs are stored (any fsspec URL); defaults to the spec's ``output``.
        run_id: the run to write; by default the CLI's derived id, and for a deployment run
            a new run per flow run (a retry of the same flow run resumes it).
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
        overrides: ``FIELD=VALUE`` spec overrides (the CLI's ``--set``/``--model``), e.g.
            ``["model.model=gpt-4o", "model.params.temperature=0.7"]``.
        baseline: compare the complete run with ``previous`` (the latest complete earlier run
            of the same eval), ``tag:NAME`` or a run id; the comparison is stored as
            comparison.json, published as an artifact, and a regression emits the event
            ``shardeval.regression.detected`` (docs/alerts.md).
        baseline_same_model: only earlier runs of the same model (its fingerprint) count as
            the baseline; the suite flow sets it, so that each cell is compared with its own
            earlier run and not with another model's run of the same eval.

    Returns:
        The run's metrics.json content (with ``comparison`` when compared).
    """
    runner_kind = check_task_runner(task_runner, dask_address)
    session = prepare_run(
        spec,
        output=output,
        run_id=run_id,
        fresh=fresh,
        retry_failed=retry_failed,
        limit=limit,
        batch_size=batch_size,
        concurrency=concurrency,
        # Only a deployment run gets a run per flow run; a direct call resumes like the CLI.
        flow_run_id=str(flow_run.id) if deployment.id else None,
        overrides=overrides or (),
    )
    prefect_limit_mode(session.spec.model)  # a missing model.prefect_limit fails here
    progress = session.progress
    with (
        interrupt.graceful_signal(
            signal.SIGTERM,
            session.spec.grace_period_s,
            session.run_id,
            defer=prefect_runner_signalled,
        ),
        session.attempt(wait=wait) as found,
    ):
        get_run_logger().info(found)  # the Prefect UI
        with batch_runner(runner_kind, dask_address) as runner:
            for stage in session.stages():
                progress.set_phase(stage.phase)
                session.require(stage, submit_batches(stage, progress, runner=runner))
        progress.set_phase("aggregating")
        summary = aggregate(session)
    comparison = compare_to_baseline(session, summary, baseline, same_model=baseline_same_model)
    return {**summary, "comparison": comparison} if comparison else summary


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
    dask`` parameter opens a Dask runner here, for the batch stages of this flow run.
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
