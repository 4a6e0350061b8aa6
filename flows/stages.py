"""Running a stage's batch tasks, shared by ``evaluate`` and ``rescore``.

:func:`submit_batches` hands a stage's batch tasks to the task runner, at most a window at a
time, and keeps the flow run's progress artifact current as they finish. What the batches are,
and whether a Prefect cache record may be trusted, is the run session's answer.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner

from shardeval import interrupt
from shardeval.errors import RunInterrupted, StorageError
from shardeval.progress import RunProgress
from shardeval.session_stages import Stage
from tasks.aggregate import artifact_key
from tasks.batch import PROCESS, batch_task_for

DEFAULT_WINDOW = 16
PROGRESS_UPDATE_S = 1.0
"""The progress artifact is updated at most this often (one API call each)."""

logger = logging.getLogger("shardeval.flows")


def submit_batches(
    stage: Stage,
    progress: RunProgress,
    *,
    window: int = DEFAULT_WINDOW,
    runner: TaskRunner[Any] | None = None,
) -> list[str]:
    """Run a stage's ``(work, stale)`` batches; return descriptions of those that failed.

    ``stale`` batches are submitted with ``refresh_cache=True``: Prefect's record only stands
    when the committed Parquet does (see tasks/batch.py). The window bounds memory (a batch's
    rendered requests exist only while it is queued or running). Batches go to ``runner``
    when given (a Dask runner opened by the flow for a ``task_runner: dask`` parameter), else
    to the flow's own task runner.
    """
    run = stage.run
    batch_task = batch_task_for(run)
    refresh = batch_task.with_options(refresh_cache=True)
    report = _progress_artifact(progress)
    finished: queue.Queue[PrefectFuture[dict[str, Any]]] = queue.Queue()
    labels: dict[int, str] = {}
    failures: list[str] = []
    inflight = 0
    stop = interrupt.stop_for(run.run_id)
    for work, stale in stage.works:
        while inflight >= window:
            inflight -= _collect(finished.get(), labels, failures, progress)
            report.update(len(failures))
        if stop.requested:
            break
        task = refresh if stale else batch_task
        if runner is None:
            future = task.submit(work, run)
        else:
            future = runner.submit(task, {"work": work, "run": run})
        labels[id(future)] = work.label
        future.add_done_callback(finished.put)
        inflight += 1
    while inflight:
        inflight -= _collect(finished.get(), labels, failures, progress)
        report.update(len(failures))
    report.update(len(failures), final=True)
    if stop.requested:  # a signal, a lost lease, a failing store, ...: its own error and exit code
        raise stop.error(f"{progress.done:,} of {progress.total:,} done")
    return failures


def _collect(
    future: PrefectFuture[dict[str, Any]],
    labels: dict[int, str],
    failures: list[str],
    progress: RunProgress | None = None,
) -> int:
    future.wait()
    state = future.state
    if not state.is_completed():
        try:
            state.result()
        except RunInterrupted:
            pass
        except (StorageError, OSError) as exc:
            # A write failed in another process (Dask), or Prefect's own record could not be
            # written: every further answer could be lost too, so the run stops sending.
            if progress is not None:
                text = exc.message if isinstance(exc, StorageError) else f"{exc}"
                interrupt.stop_run(progress.run_id, "storage_failed", text)
            label, text = labels.get(id(future), "batch"), str(exc)
            failures.append(text if text.startswith(label) else f"{label}: {text}")
        except Exception as exc:
            label, text = labels.get(id(future), "batch"), str(exc)
            failures.append(text if text.startswith(label) else f"{label}: {text}")
    elif progress is not None:
        _count_elsewhere(state, progress)
    return 1


def _count_elsewhere(state: Any, progress: RunProgress) -> None:
    """Count a batch whose body did not report to this process's counters.

    That is a batch that came back Cached (its body did not run at all) or that ran in
    another process (a Dask worker): its pointer says how many rows it holds and how many
    requests it sent. Batches that ran in this process's threads counted themselves.
    """
    cached = state.name == "Cached"
    try:
        pointer = state.result()
    except Exception:  # an unreadable record: the rows are still in the committed Parquet
        return
    if not isinstance(pointer, dict) or (not cached and pointer.get("process") == PROCESS):
        return
    rows = int(pointer.get("rows") or 0)
    sent = 0 if cached else min(int(pointer.get("sent") or 0), rows)
    errors = min(int(pointer.get("errors") or 0), sent)
    batch = str(pointer.get("batch") or "")
    progress.batch_started(batch, rows - sent)
    for _ in range(sent - errors):
        progress.finished("ok", batch=batch)
    for _ in range(errors):
        progress.finished("error", "error", batch)
    progress.batch_finished()


class _ProgressArtifact:
    """The flow run's progress artifact (one per flow run and eval run).

    Updated as batches finish: at most every ``PROGRESS_UPDATE_S``, and when a batch stage
    ends. An artifact the API refuses is logged and given up on: it never fails the run.
    """

    def __init__(self, progress: RunProgress) -> None:
        self.progress = progress
        self.artifact_id: Any = None
        self.last = 0.0
        self.broken = False

    def update(self, failed: int = 0, *, final: bool = False) -> None:
        now = time.monotonic()
        if self.broken or (not final and now - self.last < PROGRESS_UPDATE_S):
            return
        self.last = now
        p = self.progress
        percent = min(100.0, 100.0 * p.done / p.total) if p.total else 100.0
        description = (
            f"{p.run_id}: {p.batches_done:,} of {p.batches_total:,} batches, "
            f"{p.done:,} of {p.total:,} rows ({p.from_cache:,} from the cache, "
            f"{p.sent:,} requests sent, {p.errors:,} error rows)"
            + (f"; {failed} batch(es) failed" if failed else "")
        )
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    progress=percent,
                    key=artifact_key(p.run_id, "progress"),
                    description=description,
                )
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:
            self.broken = True
            _run_logger().warning("could not publish the progress artifact: %r", exc)


def _run_logger() -> Any:
    """The flow run's logger (its lines reach the Prefect UI), or this module's outside one."""
    try:
        return get_run_logger()
    except Exception:
        return logger


_artifacts: dict[tuple[str, str], _ProgressArtifact] = {}


def _progress_artifact(progress: RunProgress) -> _ProgressArtifact:
    """The progress artifact of this flow run for ``progress``'s run (judges share it)."""
    key = (str(flow_run.id or ""), progress.run_id)
    if key not in _artifacts:
        _artifacts[key] = _ProgressArtifact(progress)
    return _artifacts[key]
