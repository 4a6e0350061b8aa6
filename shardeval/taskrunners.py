"""Where batch tasks run: threads in the flow's process (default), or Dask worker processes.

``threads``: Prefect's ``ThreadPoolTaskRunner`` with a bounded pool; every batch shares the
process's one request engine (one connection pool, one ``model.concurrency`` limit).

``dask``: prefect-dask's ``DaskTaskRunner`` (the ``[dask]`` extra), on a local cluster of
``SHARDEVAL_DASK_WORKERS`` worker processes (default: one per CPU) or on an existing
scheduler (``--dask-address tcp://host:8786``). Each worker process has its own engine, so
``model.concurrency`` applies *per worker process*; ``model.prefect_limit`` caps requests
across all of them. Results, cache keys and resume are the same as with threads, provided
every worker sees the run's output (a local path on one machine, or S3/GCS/...).

Dask needs a Prefect server (``PREFECT_API_URL``): without one, every Dask worker starts its
own temporary API server (tens of seconds each, and the task runs do not reach the flow's).

This module imports Prefect and Dask only inside functions, so the CLI can check its options
before paying for either.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Literal

from shardeval.envvars import env_number
from shardeval.errors import SpecError

TaskRunnerKind = Literal["threads", "dask"]
TASK_RUNNERS: tuple[str, ...] = ("threads", "dask")
DEFAULT_MAX_WORKERS = 8
"""Batch tasks running at once in one process (their requests share one engine)."""
DASK_WORKERS_ENV = "SHARDEVAL_DASK_WORKERS"
DASK_THREADS_ENV = "SHARDEVAL_DASK_THREADS"

NO_SERVER_WARNING = (
    "--task-runner dask without a Prefect server (PREFECT_API_URL is not set): every Dask "
    "worker will start its own temporary Prefect API server (tens of seconds each, and their "
    "task runs will not appear with this flow run). Start one with `prefect server start` "
    "and export PREFECT_API_URL=http://127.0.0.1:4200/api; see docs/distributed.md"
)


def check_task_runner(kind: str, address: str | None = None) -> TaskRunnerKind:
    """Validate a task runner choice without importing Prefect or Dask.

    Raises:
        SpecError: unknown kind, an address without Dask, or the ``[dask]`` extra missing.
    """
    if kind not in TASK_RUNNERS:
        raise SpecError(
            f"task runner {kind!r} is not one of: {', '.join(TASK_RUNNERS)}",
        )
    if kind == "threads":
        if address:
            raise SpecError("--dask-address needs --task-runner dask")
        return "threads"
    missing = [m for m in ("prefect_dask", "distributed") if importlib.util.find_spec(m) is None]
    if missing:
        raise SpecError(
            f"--task-runner dask needs {' and '.join(missing)}, which are not installed",
            hint="pip install 'shardeval[dask]'",
        )
    if address is not None and not _looks_like_address(address):
        raise SpecError(
            f"--dask-address {address!r}: expected a scheduler address such as tcp://10.0.0.5:8786"
        )
    dask_workers()  # validates the environment variables
    dask_threads(1)
    return "dask"


def _looks_like_address(address: str) -> bool:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    return bool(host) and port.isdigit()


def has_prefect_server() -> bool:
    """Whether Prefect is configured with an API URL (environment or profile)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _positive_env(name: str, default: int) -> int:
    return env_number(name, int, minimum=1, default=default)


def dask_workers() -> int:
    """Worker processes of a local Dask cluster (``SHARDEVAL_DASK_WORKERS``, default CPUs)."""
    return _positive_env(DASK_WORKERS_ENV, os.cpu_count() or 1)


def dask_threads(workers: int) -> int:
    """Batch tasks at once per Dask worker (``SHARDEVAL_DASK_THREADS``).

    Batches mostly wait on the network, so a worker runs several; by default the cluster
    runs as many at once as the thread runner would (at least 2 per worker).
    """
    return _positive_env(DASK_THREADS_ENV, max(2, DEFAULT_MAX_WORKERS // max(workers, 1)))


def make_task_runner(kind: str = "threads", address: str | None = None) -> Any:
    """A new (not yet started) Prefect task runner for batch tasks.

    Raises:
        SpecError: see :func:`check_task_runner`.
    """
    kind = check_task_runner(kind, address)
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_WORKERS)
    from prefect_dask.task_runners import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    # Dask workers sample every thread's stack every 10 ms (sys._current_frames). On CPython
    # before 3.11.9 / 3.12.3 that can deadlock a worker holding the GIL when a garbage
    # collection frees a threading.local meanwhile (python/cpython#106883): observed here as
    # runs that hang for minutes until the scheduler drops the worker and reruns its batches.
    # The local cluster's workers inherit this process's Dask config (through their nannies).
    import dask

    dask.config.set({"distributed.worker.profile.enabled": False})
    # Signal handlers from the worker's start, not from its first batch: a Ctrl-C to the
    # group otherwise kills a worker that has not run one yet with a traceback.
    dask.config.set({"distributed.worker.preload": ["shardeval.dask_preload"]})
    workers = dask_workers()
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": dask_threads(workers),
            "processes": True,
            "dashboard_address": None,
        }
    )


def is_dask_runner(runner: Any) -> bool:
    """Whether ``runner`` is a ``DaskTaskRunner`` (False if prefect-dask is not installed)."""
    if importlib.util.find_spec("prefect_dask") is None:
        return False
    from prefect_dask.task_runners import DaskTaskRunner

    return isinstance(runner, DaskTaskRunner)
