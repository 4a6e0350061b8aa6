"""One cell of a suite (an eval × a model, an ordinary run) and the suite's own directory."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shardeval.session import RunSession
from shardeval.storage import RunStore
from shardeval.suite import Cell

CellStatus = Literal["complete", "incomplete", "failed"]
NO_BASELINE = "no baseline"
"""A compared cell's verdict when it has no earlier complete run of its eval and model."""


class SuiteStore(RunStore):
    """``<output>/suites/<suite run id>/``: a run store rooted at the suite's directory.

    The same filesystem, atomic whole-file writes and JSON reading as a run's files.
    """

    def __init__(self, output: str, suite_run_id: str) -> None:
        super().__init__(output, suite_run_id)
        base = posixpath.dirname(posixpath.dirname(self.root))  # <base>/runs/<id> → <base>
        self.root = posixpath.join(base, "suites", suite_run_id)

    @property
    def suite_path(self) -> str:  # noqa: D102
        return self.path("suite.json")

    @property
    def summary_path(self) -> str:  # noqa: D102
        return self.path("summary.json")

    @property
    def report_path(self) -> str:  # noqa: D102
        return self.path("report.html")


@dataclass
class CellRun:
    """One cell: its resolved spec, its prepared run session, what became of it."""

    cell: Cell
    session: RunSession
    status: CellStatus = "incomplete"
    error: str | None = None
    metrics: dict[str, Any] | None = None
    running: bool = False
    wall_s: float | None = None
    """Wall time of this attempt's work on the cell (None when answered from storage)."""
    from_storage: bool = False
    compared: bool = False
    """Whether the cell was compared with its baseline (``--baseline``): found or not."""
    comparison: dict[str, Any] | None = None
    """The comparison's JSON object (comparison.json); None without a baseline."""
    _started: float = 0.0

    @property
    def run_id(self) -> str:  # noqa: D102
        return self.session.run_id

    @property
    def label(self) -> str:
        """``arith × gpt-4o``: how the display, the UI and errors name the cell."""
        return f"{self.cell.eval_label} × {self.cell.model_label}"

    def record(self) -> dict[str, Any]:
        """The cell's entry of suite.json."""
        return {
            "eval": self.cell.eval_label,
            "model": self.cell.model_label,
            "spec": self.cell.spec_path,
            "run_id": self.run_id,
            "output": self.session.store.output,
            "status": self.status,
            "error": self.error,
            "wall_s": None if self.wall_s is None else round(self.wall_s, 3),
            **self.against_baseline(),
        }

    def against_baseline(self) -> dict[str, Any]:
        """The cell against its baseline: the main metric's delta and the verdict.

        ``verdict`` is the comparison's (``regression`` when any metric regressed, the one
        ``--fail-on-regression`` reads), ``no baseline`` when the cell has no earlier run of
        its eval and model, null when it was not compared (no ``--baseline``, not complete).
        """
        out: dict[str, Any] = dict.fromkeys(("baseline", "delta", "delta_ci95", "verdict"))
        out |= {"regressed": [], "comparison": None}
        if not self.compared:
            return out
        if self.comparison is None:
            return out | {"verdict": NO_BASELINE}
        from shardeval.baseline import COMPARISON_FILE  # loaded by the comparison already

        main = (main_metric(self.metrics) or {}).get("metric")
        found = self.comparison.get("metrics") or {}
        stats = found.get(main) or {}
        store = self.session.store
        return out | {
            "baseline": self.comparison.get("base"),
            "delta": stats.get("delta"),
            "delta_ci95": stats.get("ci95"),
            "verdict": self.comparison.get("verdict"),
            "regressed": [n for n, m in found.items() if m.get("verdict") == "regression"],
            "comparison": store.url_of(store.path(COMPARISON_FILE)),
        }


def main_metric(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The cell's headline: its first metric's mean, 95% CI and n; errors; rows."""
    if not metrics:
        return None
    found = metrics.get("metrics") or {}
    name = next(iter(found), None)
    stats = found.get(name, {}) if name else {}
    return {
        "metric": name,
        "mean": stats.get("mean"),
        "ci95": stats.get("ci95"),
        "n": stats.get("n"),
        "n_error": metrics.get("n_error"),
        "n_rows": metrics.get("n_rows"),
    }
