"""Dask worker preload: a local cluster's workers handle SIGINT/SIGTERM from their start.

Dask imports this module in each worker process it starts and calls :func:`dask_setup`
(``distributed.worker.preload``, set by :func:`shardeval.taskrunners.make_task_runner`).
"""

from __future__ import annotations

from typing import Any

from shardeval import interrupt


def dask_setup(worker: Any) -> None:
    """Install the graceful-stop signal handlers (see the interrupt module)."""
    interrupt.handle_signals_in_dask_worker(worker)
