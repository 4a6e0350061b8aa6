"""A suite session: every cell validated, then run (each an ordinary run), recorded as it goes.

The life of a suite (docs/suites.md)::

    SuiteSession.prepare(suite.yaml)    load + resolve cells; RunSession.prepare per cell
                                        (dataset, prompts, metrics): any problem → exit 2
    suite.start()                       suite.json: each cell complete or incomplete, decided
                                        by content (the cell's metrics.json is current for its
                                        plan and metrics), never by names or command lines
    for each pending cell (parallel):   suite.cell_started / cell_finished / cell_failed
        the ``evaluate`` flow on its prepared RunSession (with ``--baseline`` it compares
        its run with the cell's own baseline: the same eval and model)
    suite.to_compare() / cell_compared  the complete cells answered from storage, compared
    suite.finish()                      summary.json (every cell's metrics), written last

A cell's run id is its own run's id (so ``status``, ``rescore``, ``compare`` work on it); the
suite run id is ``<suite>-<short hash of the cells' run ids>``, so typing the same command
again finds the same suite. The Prefect flow (flows/suite.py) and the CLI compose these
steps; nothing here imports Prefect.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shardeval import __version__
from shardeval.endpoint_limits import EndpointKey, smallest_limits
from shardeval.errors import RunIncomplete, ShardevalError
from shardeval.hashing import digest
from shardeval.session import RunSession
from shardeval.suite import SuiteError, load_suite
from shardeval.suite_cell import CellRun, SuiteStore, main_metric

SUITE_ID_VERSION = 1
"""Part of the suite run id's hash: bump it (with a migration note) if its inputs change."""


logger = logging.getLogger("shardeval.suite")


class SuiteIncomplete(RunIncomplete):
    """Some cells of a suite failed (exit 1); the others are complete and kept."""


@dataclass
class SuiteSession:
    """One attempt of one suite (see the module docstring for the steps)."""

    name: str
    suite_run_id: str
    source: str | None
    parallel: int
    cells: list[CellRun]
    store: SuiteStore
    baseline: str | None = None
    """``--baseline``: ``previous`` or ``tag:T``, for every cell against its own earlier run."""
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _lock: Any = field(default_factory=threading.Lock, repr=False)  # Any: Prefect's schemas

    # ------------------------------------------------------------------ prepare
    @classmethod
    def prepare(
        cls,
        source: str | Path | Mapping[str, Any],
        *,
        output: str | None = None,
        retry_failed: bool = False,
        limit: int | None = None,
        flow_run_id: str | None = None,
        baseline: str | None = None,
    ) -> SuiteSession:
        """Load the suite and validate every cell before any model call (raises exit 2).

        ``flow_run_id`` (a deployment): each cell's run id gets the flow run's id, like the
        ``evaluate`` deployment's, so each flow run is a new suite run and a retry of the
        same flow run (which keeps its id) resumes every cell. ``baseline``: ``previous`` or
        ``tag:T`` (a run id is refused: it cannot be every cell's baseline).
        """
        if baseline is not None:
            from shardeval.baseline import check_suite_selector

            check_suite_selector(baseline)
        loaded = load_suite(source)
        out = output or loaded.spec.output
        cells = []
        for cell in loaded.cells:
            try:
                session = RunSession.prepare(
                    cell.spec,
                    output=out,
                    retry_failed=retry_failed,
                    limit=limit,
                    flow_run_id=flow_run_id,
                )
            except ShardevalError as exc:
                if exc.exit_code != SuiteError.exit_code:
                    raise
                raise SuiteError(f"{cell.where}: {exc.message}", hint=exc.hint) from None
            cells.append(CellRun(cell, session))
        _no_duplicates(cells)
        suite_run_id = suite_run_id_of(loaded.spec.suite, [c.run_id for c in cells])
        suite_output = out or cells[0].session.store.output
        return cls(
            name=loaded.spec.suite,
            suite_run_id=suite_run_id,
            source=loaded.source,
            parallel=loaded.spec.parallel,
            cells=cells,
            store=SuiteStore(suite_output, suite_run_id),
            baseline=baseline,
        )

    def endpoint_limits(self) -> dict[EndpointKey, int]:
        """Per endpoint, the smallest ``concurrency`` among the cells using it."""
        return smallest_limits([c.session.spec.model for c in self.cells])

    # ------------------------------------------------------------------- start
    def start(self) -> list[CellRun]:
        """Answer every cell it can from storage, write suite.json; return the cells to run.

        A cell is complete when its run's metrics.json is current for its plan and metrics
        (:meth:`RunSession.answer_from_storage`): the same test a single ``shardeval run``
        makes, so an edited spec re-runs exactly its cell, and only what changed in it.
        """
        self.started_at = datetime.now(UTC)
        pending = []
        for cell in self.cells:
            stored = cell.session.answer_from_storage()
            cell.running, cell.wall_s, cell.error = False, None, None
            cell.compared, cell.comparison = False, None
            if stored is not None:
                cell.status, cell.metrics, cell.from_storage = "complete", stored, True
            else:
                cell.status, cell.metrics, cell.from_storage = "incomplete", None, False
                pending.append(cell)
        self._write_suite()
        return pending

    def cell_started(self, cell: CellRun) -> None:
        """A cell's run starts (the display counts it as running)."""
        with self._lock:
            cell.running, cell._started = True, time.monotonic()

    def cell_finished(self, cell: CellRun, metrics: dict[str, Any]) -> None:
        """A cell's run completed: record it in suite.json.

        ``metrics`` is what the ``evaluate`` flow returned: metrics.json, with ``comparison``
        when its run was compared with a baseline (the flow compares with ``--baseline``).
        """
        metrics = dict(metrics)
        comparison = metrics.pop("comparison", None)
        with self._lock:
            cell.status, cell.metrics, cell.error = "complete", metrics, None
            if self.baseline is not None:
                cell.compared, cell.comparison = True, comparison
            self._stop_clock(cell)
            self._write_suite()

    def cell_failed(self, cell: CellRun, exc: BaseException, *, interrupted: bool = False) -> None:
        """A cell could not finish (recorded with why); an interrupted one stays incomplete."""
        reason = exc.message if isinstance(exc, ShardevalError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            cell.status = "incomplete" if interrupted else "failed"
            cell.error = reason.splitlines()[0] if reason else type(exc).__name__
            self._stop_clock(cell)
            self._write_suite()

    def to_compare(self) -> list[CellRun]:
        """With ``--baseline``: the complete cells not compared yet (answered from storage)."""
        if self.baseline is None:
            return []
        return [c for c in self.cells if c.status == "complete" and not c.compared]

    def cell_compared(self, cell: CellRun, comparison: dict[str, Any] | None) -> None:
        """A cell was compared with its baseline (None: it has none yet)."""
        with self._lock:
            cell.compared, cell.comparison = True, comparison
            self._write_suite()

    def regressed(self) -> list[CellRun]:
        """The cells whose comparison with their baseline is a regression."""
        return [c for c in self.cells if c.against_baseline()["verdict"] == "regression"]

    def _stop_clock(self, cell: CellRun) -> None:
        if cell.running:
            cell.wall_s = time.monotonic() - cell._started
        cell.running = False

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict[str, Any]:
        """Write report.html, then summary.json (every cell's metrics), last; return it."""
        with self._lock:
            self._write_suite()
            summary = {
                **self._header(),
                "complete": all(c.status == "complete" for c in self.cells),
                "finished_at": _now(),
                "cells": [
                    {**c.record(), "metrics": c.metrics, "main": main_metric(c.metrics)}
                    for c in self.cells
                ],
            }
            self._write_report(summary)
            self.store.write_json(self.store.summary_path, summary)
        return summary

    def _history(self) -> list[dict[str, Any]]:
        """Each complete cell's main metric over the runs of the same cell, when there are any."""
        from shardeval.hashing import default_run_id
        from shardeval.history import history

        series = []
        for cell in self.cells:
            main, metrics = main_metric(cell.metrics), cell.metrics or {}
            if cell.status != "complete" or not main or not main.get("metric"):
                continue
            # The same cell on other nights: runs of the same identity (deployment runs add a
            # flow-run suffix to it); a model name alone would mix python-provider models.
            identity = default_run_id(cell.session.spec)
            try:
                found = history(cell.session.store.output, str(metrics.get("name")), main["metric"])
            except Exception:  # no history to show is not an error
                continue
            points = [p.to_dict() for p in found.points if p.run_id.startswith(identity)]
            if len(points) >= 2:
                series.append(
                    {
                        "eval": cell.cell.eval_label,
                        "model": cell.cell.model_label,
                        "metric": main["metric"],
                        "points": points,
                    }
                )
        return series

    def _write_report(self, summary: dict[str, Any]) -> None:
        """The suite's page (evals × models with CIs); a failure is a warning, never fatal."""
        try:
            from shardeval.report.suite_page import build_suite_report

            # The page wants each cell's metric statistics (metrics.json's "metrics").
            cells = [
                {**cell, "metrics": (cell.get("metrics") or {}).get("metrics") or {}}
                for cell in summary["cells"]
            ]
            page = build_suite_report({**summary, "cells": cells}, self._history())
            self.store.write_bytes(self.store.report_path, page.encode("utf-8"))
            summary["report"] = self.store.url_of(self.store.report_path)
        except Exception as exc:  # the report is a view; the suite's results stand without it
            logger.warning("could not write the suite's report.html: %r", exc)

    def raise_for_failures(self) -> None:
        """Raise :class:`SuiteIncomplete` naming the failed cells and why (exit 1)."""
        failed = [c for c in self.cells if c.status != "complete"]
        if not failed:
            return
        shown = "; ".join(f"{c.label} ({c.run_id}): {c.error or 'not finished'}" for c in failed)
        raise SuiteIncomplete(
            f"suite {self.suite_run_id}: {len(failed)} of {len(self.cells)} cells did not "
            f"complete: {shown}",
            hint="run the same command again: complete cells are answered from storage, "
            "the others resume item by item",
        )

    # ----------------------------------------------------------------- records
    def _header(self) -> dict[str, Any]:
        return {
            "suite": self.name,
            "suite_run_id": self.suite_run_id,
            "source": self.source,
            "parallel": self.parallel,
            "baseline": self.baseline,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "shardeval_version": __version__,
        }

    def _write_suite(self) -> None:
        record = {**self._header(), "updated_at": _now(), "cells": [c.record() for c in self.cells]}
        self.store.write_json(self.store.suite_path, record)

    def counts(self) -> dict[str, int]:
        """Cells done, running, failed and waiting; items done and total across cells."""
        out = {"done": 0, "running": 0, "failed": 0, "waiting": 0, "items_done": 0, "items": 0}
        for cell in self.cells:
            progress = cell.session.progress
            total = max(progress.total, cell.session.plan.n_rows)
            out["items"] += total
            if cell.status == "complete":
                out["done"] += 1
                out["items_done"] += total
                continue
            out["items_done"] += min(progress.done, total)
            if cell.status == "failed":
                out["failed"] += 1
            elif cell.running:
                out["running"] += 1
            else:
                out["waiting"] += 1
        return out

    def __iter__(self) -> Iterator[CellRun]:
        return iter(self.cells)


def suite_run_id_of(name: str, run_ids: list[str]) -> str:
    """``<suite>-<short hash of the cells' run ids>`` (order of the suite file irrelevant)."""
    return f"{name}-{digest({'v': SUITE_ID_VERSION, 'cells': sorted(run_ids)}, length=10)}"


def _no_duplicates(cells: list[CellRun]) -> None:
    seen: dict[tuple[str, str], CellRun] = {}
    for cell in cells:
        key = (cell.session.store.output, cell.run_id)
        if key in seen:
            raise SuiteError(
                f"{cell.cell.where} and {seen[key].cell.where} are the same run "
                f"({cell.run_id}): nothing that changes the run id differs between them",
                hint="drop one, or tell them apart (model, prompt, dataset or trials)",
            )
        seen[key] = cell


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
