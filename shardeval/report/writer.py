"""Write a run's ``report.html``: atomically, next to its results, or to a file of your choice.

The run's own copy goes through :class:`~shardeval.storage.RunStore` (temporary name and
rename on local disk, one PUT on object stores), so a reader never sees half a page.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa

from shardeval.run_reader import RunNotComplete
from shardeval.storage import RunStore, split_url

logger = logging.getLogger("shardeval.report")

REPORT_FILE = "report.html"


def report_path(store: RunStore) -> str:
    """Where a run's page lives: ``<run>/report.html``."""
    return store.path(REPORT_FILE)


def write_run_report(
    store: RunStore,
    *,
    results: Any = None,
    metrics_json: dict[str, Any] | None = None,
    spec_json: dict[str, Any] | None = None,
    comparison: dict[str, Any] | None = None,
    base_results: Any = None,
    target: str | None = None,
) -> str:
    """Build a run's page and write it; return where it went (a path or URL).

    Args:
        store: the run.
        results: results.parquet as an Arrow table or DataFrame (read from the run if None).
        metrics_json: metrics.json (read from the run if None).
        spec_json: spec.json (read from the run if None).
        comparison: a ``compare --json`` dict (plus ``flips``) to include.
        base_results: the comparison's base run's results, for broken items side by side.
        target: a local path or fsspec URL to write to instead of ``<run>/report.html``.

    Raises:
        RunNotComplete: the run has no metrics.json (and none was given).
    """
    from shardeval.report.run_page import build_run_report

    if metrics_json is None:
        metrics_json = store.read_json(store.metrics_path)
        if not isinstance(metrics_json, dict):
            raise RunNotComplete(
                f"run {store.run_id!r} is not complete: no metrics.json in {store.url()}",
                hint=f"`shardeval status {store.run_id}` shows its progress; "
                "the same `shardeval run` command finishes it",
            )
    if results is None:
        results = store.read_table(store.results_path)
        if results is None:
            raise RunNotComplete(f"run {store.run_id!r} has no results.parquet in {store.url()}")
    if spec_json is None:
        spec_json = store.read_json(store.spec_path)
    # Next to spec.json a relative link works; elsewhere only a local file can be linked.
    spec_href: str | None = "spec.json"
    if target is not None:
        spec_href = Path(store.spec_path).as_uri() if store.is_local else None
    text = build_run_report(
        results,
        metrics_json,
        spec_json,
        comparison,
        base_results=base_results,
        spec_href=spec_href,
    )
    return write_page(store, text, target)


def write_page(store: RunStore | None, text: str, target: str | None) -> str:
    """Write a page to the run's ``report.html`` (``target`` None) or to ``target``."""
    data = text.encode("utf-8")
    if target is None:
        if store is None:
            raise ValueError("write_page needs a store or a target")
        store.write_bytes(report_path(store), data)
        return store.url_of(report_path(store))
    protocol, path = split_url(target)
    if protocol == "file":
        _write_local(Path(path), data)
        return path
    fs = fsspec.filesystem(protocol)
    fs.pipe_file(path, data)  # one PUT: whole or absent
    return target


def _write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report_quietly(store: RunStore, results: pa.Table, summary: dict[str, Any]) -> str | None:
    """Finalizing's call: write the page, or log why not (a page never fails a run).

    The run's data is complete without its page, and ``shardeval report RUN_ID`` writes it
    later; so a failure here is a warning naming the run and the command, not an error.
    """
    try:
        return write_run_report(store, results=results, metrics_json=summary)
    except Exception as exc:
        logger.warning(
            "report.html of run %s not written (%s: %s); `shardeval report %s` writes it",
            store.run_id,
            type(exc).__name__,
            exc,
            store.run_id,
        )
        return None
