"""The ``evaluate-suite`` flow: every cell of a suite is the ``evaluate`` flow, as a subflow.

Composition only: which cells exist, which are complete, their run ids and the per-endpoint
limits are the suite session's (:mod:`shardeval.suite_session`). Cells run ``parallel`` at a
time: each is a ``cell`` task on a thread pool of that size, and the task calls ``evaluate``
(Prefect 3 runs a flow called inside a task as a subflow of it), so the UI shows the suite,
a task per cell, and each cell's own flow run with its batches. A cell whose run is complete
and current comes back at once, without a subflow.

A cell that fails is recorded (suite.json says why) and does not stop the others; the flow
run then fails naming the failed cells. Retrying that flow run (UI, ``prefect flow-run
retry``) keeps its id, hence every cell's run id: complete cells come back from storage and
the failed ones resume, their finished batches Cached.

With ``baseline`` (``previous`` or ``tag:T``; the nightly deployment has ``previous``) every
complete cell is compared with its own baseline, the latest complete earlier run of the same
eval and model, by the same task as a single run's (tasks/compare.py): a cell that runs
compares itself in its ``evaluate`` subflow, a cell that came back from storage is compared
by the suite flow. Each comparison publishes an artifact and an event,
``shardeval.regression.detected`` or ``shardeval.run.completed``, as a single run does.
"""

from __future__ import annotations

import signal
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.evaluate import evaluate, prefect_runner_signalled
from shardeval import endpoint_limits, interrupt
from shardeval.errors import RunInterrupted
from shardeval.suite import read_text
from shardeval.suite_cell import CellRun
from shardeval.suite_report import suite_markdown, suite_rows
from shardeval.suite_session import SuiteSession
from tasks.aggregate import artifact_key
from tasks.compare import compare_to_baseline


def suite_run_name() -> str:
    """``suite · nightly``, so the Prefect UI says which suite a flow run is."""
    given = flow_run.parameters.get("suite")
    if isinstance(given, SuiteSession):
        return f"suite · {given.name}"
    try:
        data = given if isinstance(given, dict) else yaml.safe_load(read_text(str(given)))
        return f"suite · {data['suite']}"
    except Exception:  # the flow itself reports a bad suite; the name is only a label
        return "evaluate-suite"


@task(name="cell", cache_policy=NO_CACHE, persist_result=False)
def run_cell(suite: SuiteSession, index: int, wait: bool = False) -> str:
    """Evaluate one cell as an ``evaluate`` subflow and record what became of it.

    The cell's own failure is recorded, not raised: the other cells go on.
    """
    cell: CellRun = suite.cells[index]
    if interrupt.stop_for(suite.suite_run_id).requested:  # the suite was stopped: start no cell
        return cell.status
    suite.cell_started(cell)
    try:
        summary = evaluate(
            spec=cell.session,
            output=cell.session.store.output,
            run_id=cell.run_id,
            wait=wait,
            baseline=suite.baseline,
            baseline_same_model=True,
        )
    except RunInterrupted as exc:
        suite.cell_failed(cell, exc, interrupted=True)
        interrupt.stop_run(suite.suite_run_id, "interrupted", cell.error or "stopped")
        return cell.status
    except Exception as exc:
        suite.cell_failed(cell, exc)
        get_run_logger().error("cell %s failed: %s", cell.label, cell.error)
        return cell.status
    suite.cell_finished(cell, summary)
    return cell.status


@flow(
    name="evaluate-suite",
    flow_run_name=suite_run_name,
    persist_result=False,
    validate_parameters=False,
)
def evaluate_suite(
    suite: str | dict[str, Any] | SuiteSession,
    output: str | None = None,
    retry_failed: bool = False,
    limit: int | None = None,
    wait: bool = False,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Evaluate every (eval, model) cell of a suite, resuming whatever earlier attempts did.

    Args:
        suite: path or URL of the suite YAML (or a suite the CLI prepared, which then carries
            the other options).
        output: where runs and the suite's files are stored; defaults to the suite's.
        retry_failed: send again the rows whose status is error, in every cell.
        limit: evaluate only the first N items of each eval.
        wait: wait for another process holding a cell's run instead of failing it.
        baseline: compare every complete cell with ``previous`` (the latest complete earlier
            run of the same eval and the same model) or ``tag:NAME`` (the latest such run
            with that tag); each cell's comparison is stored in its run as comparison.json,
            and a regression emits ``shardeval.regression.detected`` (docs/alerts.md).

    Returns:
        summary.json's content (every cell's metrics).
    """
    session = (
        suite
        if isinstance(suite, SuiteSession)
        else SuiteSession.prepare(
            suite,
            output=output,
            retry_failed=retry_failed,
            limit=limit,
            # Like evaluate: only a deployment run gets a run per flow run.
            flow_run_id=str(flow_run.id) if deployment.id else None,
            baseline=baseline,
        )
    )
    if baseline is not None and isinstance(suite, SuiteSession):
        from shardeval.baseline import check_suite_selector

        session.baseline = check_suite_selector(baseline)
    logger = get_run_logger()
    pending = session.start()
    logger.info(
        "suite %s: %d cells, %d complete, %d to run (%d at a time)",
        session.suite_run_id,
        len(session.cells),
        len(session.cells) - len(pending),
        len(pending),
        session.parallel,
    )
    grace = max((c.session.spec.grace_period_s for c in session.cells), default=5.0)
    with (
        interrupt.graceful_signal(
            signal.SIGTERM,
            grace,
            session.suite_run_id,
            defer=prefect_runner_signalled,
            every_run=True,
        ),
        endpoint_limits.applied(session.endpoint_limits()),
        ThreadPoolTaskRunner[Any](max_workers=session.parallel) as runner,
    ):
        futures = [
            runner.submit(
                run_cell.with_options(name=f"cell {cell.label}"),
                {"suite": session, "index": session.cells.index(cell), "wait": wait},
            )
            for cell in pending
        ]
        for future in futures:
            future.wait()
    stopping = interrupt.stop_for(session.suite_run_id).requested
    for cell in [] if stopping else session.to_compare():  # the cells from storage
        compare = compare_to_baseline.with_options(name=f"compare {cell.label}")
        comparison = compare(cell.session, cell.metrics or {}, session.baseline, same_model=True)
        session.cell_compared(cell, comparison)
    summary = session.finish()
    create_table_artifact(
        key=artifact_key(session.suite_run_id, "suite"),
        table=suite_rows(session),
        description=f"Suite {session.suite_run_id}: evals × models (main metric, 95% CI, n)",
    )
    create_markdown_artifact(
        key=artifact_key(session.suite_run_id, "suite-summary"),
        markdown=suite_markdown(session),
        description=f"Suite {session.suite_run_id}",
    )
    stopped = interrupt.stop_for(session.suite_run_id).requested
    interrupt.forget(session.suite_run_id)
    if stopped:
        raise RunInterrupted(f"suite {session.suite_run_id} stopped; run it again to resume")
    session.raise_for_failures()
    return summary
