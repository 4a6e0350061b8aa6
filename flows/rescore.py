"""The ``rescore`` flow: apply metrics to a run's stored responses, with zero model calls."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow

from flows.stages import run_judges
from shardeval import interrupt
from shardeval.engine import close_engines
from shardeval.errors import RunIncomplete
from shardeval.locking import RunLock
from shardeval.progress import progress_for
from shardeval.rescore import prepare_rescore
from tasks.aggregate import aggregate


@flow(name="rescore", flow_run_name="rescore {run_id}", persist_result=False)
def rescore(
    run_id: str,
    spec: str | None = None,
    output: str = "./shardeval-runs",
    wait: bool = False,
) -> dict[str, Any]:
    """Re-score run ``run_id`` with the metrics of ``spec`` (default: the run's own spec).

    Writes a new results.parquet and metrics.json; the previous metrics.json is kept under
    ``history/``.
    """
    started_at = datetime.now(UTC)
    job = prepare_rescore(run_id, output, spec)
    lock = RunLock(job.store)
    lock.acquire(wait=wait)
    try:
        progress = progress_for(run_id)
        failures = run_judges(job.store, job.validated, progress)
        if failures:
            raise RunIncomplete(
                f"{len(failures)} judge batches could not finish: " + "; ".join(failures[:5]),
                hint="run the same command again to retry only what is missing",
            )
        return aggregate(
            job.store,
            job.validated.plan,
            job.validated.metrics,
            started_at,
            datetime.now(UTC),
            {"sent": 0, "from_cache": job.validated.plan.n_rows},
        )
    finally:
        lock.release()
        close_engines(run_id)
        interrupt.forget(run_id)  # a stop of this attempt does not outlive it
