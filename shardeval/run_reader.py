"""Read a complete run for a comparison: its results.parquet (as pandas) and metrics.json.

One small function (:func:`read_run`) on purpose: ``shardeval.open_run`` can replace it. It
reads through :class:`~shardeval.storage.RunStore` (never a Python file object) and raises
exit-2 errors for a run id that does not exist or a run that is not complete. Its one side
effect is RunStore's: a metrics.json or results.parquet that does not parse is moved to the
run's ``quarantine/`` (never deleted), and the run reads as incomplete until it is rerun.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import pandas as pd

from shardeval.catalog import open_store
from shardeval.errors import EXIT_USAGE, ShardevalError


class RunNotComplete(ShardevalError):
    """The run exists but has no metrics.json yet: it is running, stopped or failed."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class StoredRun:
    """What a comparison needs of one complete run."""

    run_id: str
    metrics: dict[str, Any]
    results: pd.DataFrame
    results_url: str
    metrics_url: str


def read_run(run_id: str, output: str, columns: list[str] | None = None) -> StoredRun:
    """A complete run's results.parquet (as pandas) and metrics.json.

    One small function on purpose: ``shardeval.open_run`` can replace it.

    Raises:
        RunNotFound: no such run under ``output`` (exit 2; the hint names the closest ones,
            see :func:`shardeval.catalog.open_store`).
        RunNotComplete: the run has no metrics.json yet, or lost its results.parquet (exit 2).
    """
    store = open_store(output, run_id)
    metrics = store.read_json(store.metrics_path)
    if not isinstance(metrics, dict):
        raise RunNotComplete(
            f"run {run_id!r} under {store.url_of(posixpath.dirname(store.root))} is not complete "
            "(it has no metrics.json): it is still running, was stopped, or failed",
            hint=f"`shardeval status {run_id}` shows what it holds; rerun it to finish it",
        )
    table = store.read_table(store.results_path, columns)
    if table is None:
        raise RunNotComplete(
            f"run {run_id!r} has metrics.json but no readable results.parquet",
            hint="rerun it (the same command) to rewrite its results from storage",
        )
    return StoredRun(
        run_id=run_id,
        metrics=metrics,
        results=table.to_pandas(),
        results_url=store.url(posixpath.basename(store.results_path)),
        metrics_url=store.url(posixpath.basename(store.metrics_path)),
    )
