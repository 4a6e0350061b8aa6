"""The batch task: one Prefect task run per batch, cached by run id + batch key.

Prefect's default cache policy includes the flow run id, so nothing would be reused across
runs; the explicit key here makes a rerun show committed batches as Cached. Prefect's cache is
only the fast path: a missing or unreadable record is a silent miss (the task body then finds
the committed Parquet and returns at once), and the flow submits with ``refresh_cache=True``
any batch whose Parquet is gone, so a record never stands for data that is not there.
The result is a small JSON pointer, never the rows.

:func:`batch_task_for` gives the task as a run uses it:

* for a run on local disk, cache records live in the run's ``prefect/`` directory, and the
  task runs with Prefect's ``SERIALIZABLE`` isolation and a lock manager there
  (:class:`tasks.locks.BatchLockManager`), so two task runs racing on one batch pay once:
  the second waits and then hits the first one's record. Object stores have no lock manager
  in Prefect's core (``prefect-redis`` has one): there the default isolation applies, and the
  run's lease (``lock.json``) is what keeps two flow runs off one run;
* task retries (for :class:`BatchIncomplete` only) wait ``SHARDEVAL_BATCH_RETRY_DELAYS``
  seconds, comma-separated (default ``10,30``, each with 50% jitter; ``""`` or ``0`` turns
  task retries off; requests are retried by the engine before that).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.runtime import task_run

from shardeval.engines import close_engines, engine_for, run_stopped
from shardeval.errors import SpecError
from shardeval.progress import forget
from shardeval.runner import BatchIncomplete, BatchWork, RunRef, run_batch
from tasks.locks import BatchLockManager

TASK_RETRY_DELAYS_S = [10.0, 30.0]
RETRY_DELAYS_ENV = "SHARDEVAL_BATCH_RETRY_DELAYS"
LOCKS_ENV = "SHARDEVAL_BATCH_LOCKS"
"""``0`` turns the SERIALIZABLE isolation off (for measuring its cost; not for normal use)."""
IDLE_ENGINE_S = 15 * 60.0
"""A long-lived process (a Dask worker) closes a run's engine after this long without a batch."""

PROCESS = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
"""This process, in every pointer it returns: the flow counts the progress of batches that
ran elsewhere (Dask workers) from their pointers, and of the others from its own counters."""


def batch_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """``<run id>/<batch key>``: the same batch of the same run is the same result."""
    work: BatchWork = parameters["work"]
    return f"shardeval-{work.run_id.replace('/', '.')}-{work.key}"


def batch_run_name() -> str:
    """``batch 12/40``, so the Prefect UI says which batch a task run is."""
    work = task_run.parameters.get("work")
    return work.label if isinstance(work, BatchWork) else "batch"


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a batch only for transient failures; permanent ones are already error rows.

    Never once the run has stopped sending (its endpoint is unreachable or rejected the key):
    a retry would only knock on a dead endpoint again.
    """
    try:
        state.result()
    except BatchIncomplete as exc:
        return not run_stopped(getattr(exc, "run_id", None) or None)
    except Exception:
        return False
    return False


BATCH_CACHE_POLICY = CacheKeyFnPolicy(cache_key_fn=batch_cache_key)


def run_batch_fn(work: BatchWork, run: RunRef) -> dict[str, Any]:
    """Run one batch to its committed Parquet file; return a pointer to it.

    A module-level function (the task below wraps it), so that Dask pickles it by reference.
    """
    if work.nothing_stored and task_run.run_count > 1:
        # A retry: the earlier attempt may have flushed parts (or even committed).
        work = replace(work, nothing_stored=False)
    _active.enter(run.run_id)
    try:
        pointer = run_batch(run.store(), work, engine_for(run.run_id, run.model), run.progress())
    finally:
        _active.leave(run.run_id)
    return {**pointer.to_dict(), "process": PROCESS}


run_batch_task: Task[..., dict[str, Any]] = task(
    name="run-batch",
    task_run_name=batch_run_name,
    cache_policy=BATCH_CACHE_POLICY,
    persist_result=True,
    result_serializer="json",
    cache_result_in_memory=False,
    retries=len(TASK_RETRY_DELAYS_S),
    retry_delay_seconds=TASK_RETRY_DELAYS_S,
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
)(run_batch_fn)


def retry_delays() -> list[float]:
    """Task retry delays from ``SHARDEVAL_BATCH_RETRY_DELAYS`` (default 10, 30 seconds)."""
    raw = os.environ.get(RETRY_DELAYS_ENV)
    if raw is None:
        return list(TASK_RETRY_DELAYS_S)
    raw = raw.strip()
    if raw in ("", "0", "none"):
        return []
    try:
        delays = [float(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise SpecError(
            f"{RETRY_DELAYS_ENV}={raw!r}: expected seconds separated by commas, e.g. 10,30"
        ) from None
    if any(delay < 0 for delay in delays):
        raise SpecError(f"{RETRY_DELAYS_ENV}={raw!r}: delays cannot be negative")
    return delays


def batch_task_for(run: RunRef) -> Task[..., dict[str, Any]]:
    """The batch task as ``run`` uses it (result storage, isolation, retries; see above)."""
    delays = retry_delays()
    options: dict[str, Any] = {
        "retries": len(delays),
        "retry_delay_seconds": delays or 0,
    }
    store = run.store()
    if store.is_local:
        # Cache records live with the run they describe (moved or deleted with it).
        prefect_dir = Path(store.prefect_dir)
        options["result_storage"] = prefect_dir
        if os.environ.get(LOCKS_ENV, "1") != "0":
            options["cache_policy"] = BATCH_CACHE_POLICY.configure(
                isolation_level="SERIALIZABLE",
                lock_manager=BatchLockManager(prefect_dir / "locks"),
            )
    return run_batch_task.with_options(**options)


class _ActiveRuns:
    """Batches running per run in this process, to close engines left idle.

    In the flow's own process the flow closes its run's engine at the end. A long-lived
    process that only runs batches (a worker of an existing Dask cluster) never learns that a
    run ended, so it closes a run's engine (a thread and an HTTP session) once no batch of that
    run has run in it for ``IDLE_ENGINE_S``; a later batch would simply open a new one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()
        self._last: dict[str, float] = {}

    def enter(self, run_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._running[run_id] += 1
            self._last[run_id] = now
            # close_engines(r) also closes r's judges (r/judges/...): only when they idle too.
            idle = [
                r
                for r, last in self._last.items()
                if now - last > IDLE_ENGINE_S
                and not any(
                    n and (o == r or o.startswith(r + "/")) for o, n in self._running.items()
                )
            ]
            for r in idle:
                del self._last[r]
                del self._running[r]
        for r in idle:
            close_engines(r)
            forget(r)

    def leave(self, run_id: str) -> None:
        with self._lock:
            self._running[run_id] -= 1
            self._last[run_id] = time.monotonic()


_active = _ActiveRuns()
