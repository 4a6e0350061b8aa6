"""A suite's cells against their own baselines: compared without Prefect, and the quality gate.

``shardeval run SUITE --baseline previous|tag:T`` compares every complete cell with the latest
complete earlier run of the same eval *and the same model* (its fingerprint: provider,
model, revision, params), so that a cell is never measured against another model's run of
its eval. Cells that run are compared inside their ``evaluate`` subflow (which publishes the
artifact and the Prefect event, as a single run's flow does); cells answered from storage
are compared by the suite flow's comparison task, or here when the whole suite is answered
from storage and Prefect is not started (no event then, like a single run answered from
storage). Each comparison is stored in the cell's run as ``comparison.json``.
"""

from __future__ import annotations

from shardeval.comparison import RegressionDetected
from shardeval.suite_cell import CellRun
from shardeval.suite_session import SuiteSession


def compare_stored_cells(suite: SuiteSession) -> None:
    """Compare every complete cell not compared yet with its baseline (library, no Prefect)."""
    from shardeval.baseline import compare_with_baseline
    from shardeval.hashing import model_fingerprint

    if suite.baseline is None:
        return
    for cell in suite.to_compare():
        session = cell.session
        found = compare_with_baseline(
            session.store,
            session.spec.name,
            suite.baseline,
            model=model_fingerprint(session.spec.model),
        )
        suite.cell_compared(cell, found.to_dict() if found is not None else None)


def regression_summary(cell: CellRun) -> str:
    """``e0 × m (e0-1a2b) regressed against e0-9f8e on exact_match -0.0333 (12 broken)``."""
    against = cell.against_baseline()
    metrics = (cell.comparison or {}).get("metrics") or {}
    shown = []
    for name in against["regressed"]:
        m = metrics.get(name) or {}
        delta = m.get("delta")
        shown.append(
            f"{name} {'-' if delta is None else f'{delta:+.4f}'} ({m.get('broken', 0)} broken)"
        )
    return f"{cell.label} ({cell.run_id}) regressed against {against['baseline']} on " + ", ".join(
        shown
    )


def gate(suite: SuiteSession) -> None:
    """``--fail-on-regression``: raise :class:`RegressionDetected` (exit 3) naming the cells."""
    regressed = suite.regressed()
    if not regressed:
        return
    raise RegressionDetected(
        f"quality gate failed: {len(regressed)} of {len(suite.cells)} cells regressed: "
        + "; ".join(regression_summary(c) for c in regressed)
    )
