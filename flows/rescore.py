"""The ``rescore`` flow: apply metrics to a run's stored responses, with zero model calls."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.stages import submit_batches
from shardeval.flow_failure import fail_with_reason
from shardeval.rescore import prepare_rescore
from tasks.aggregate import aggregate


@flow(name="rescore", flow_run_name="rescore {run_id}", persist_result=False)
@fail_with_reason  # the state message is the error's text (shardeval.flow_failure)
def rescore(
    run_id: str,
    spec: str | None = None,
    output: str = "./shardeval-runs",
    wait: bool = False,
) -> dict[str, Any]:
    """Re-score run ``run_id`` with the metrics of ``spec`` (default: the run's own spec).

    Writes a new results.parquet and metrics.json; the previous metrics.json is kept under
    ``history/``. Only ``llm_judge`` metrics send requests (to their judge model).
    """
    session = prepare_rescore(run_id, output, spec)
    with session.lease(wait=wait):
        for stage in session.judge_stages():
            session.require(stage, submit_batches(stage, session.progress))
        return aggregate(session)
