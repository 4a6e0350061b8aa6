"""The batch task: one Prefect task run per batch, cached by run id + batch key.

Prefect's default cache policy includes the flow run id, so nothing would be reused across
runs; the explicit key here makes a rerun show committed batches as Cached. Prefect's cache is
only the fast path: a missing or unreadable record is a silent miss (the task body then finds
the committed Parquet and returns at once), and the flow submits with ``refresh_cache=True``
any batch whose Parquet is gone, so a record never stands for data that is not there.
The result is a small JSON pointer, never the rows.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.runtime import task_run

from shardeval.engine import engine_for
from shardeval.progress import progress_for
from shardeval.runner import BatchIncomplete, BatchWork, RunRef, run_batch

TASK_RETRY_DELAYS_S: list[float] = [10.0, 30.0]


def batch_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """``<run id>/<batch key>``: the same batch of the same run is the same result."""
    work: BatchWork = parameters["work"]
    return f"shardeval-{work.run_id.replace('/', '.')}-{work.key}"


def batch_run_name() -> str:
    """``batch 12/40``, so the Prefect UI says which batch a task run is."""
    work = task_run.parameters.get("work")
    return work.label if isinstance(work, BatchWork) else "batch"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a batch only for transient failures; permanent ones are already error rows."""
    try:
        state.result()
    except BatchIncomplete:
        return True
    except Exception:
        return False
    return False


@task(
    name="run-batch",
    task_run_name=batch_run_name,
    cache_key_fn=batch_cache_key,
    persist_result=True,
    result_serializer="json",
    cache_result_in_memory=False,
    retries=len(TASK_RETRY_DELAYS_S),
    retry_delay_seconds=TASK_RETRY_DELAYS_S,
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
)
def run_batch_task(work: BatchWork, run: RunRef) -> dict[str, Any]:
    """Run one batch to its committed Parquet file; return a pointer to it."""
    pointer = run_batch(
        run.store(), work, engine_for(run.run_id, run.model), progress_for(run.run_id)
    )
    return pointer.to_dict()
