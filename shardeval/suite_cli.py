"""``shardeval run SUITE.yaml`` and ``shardeval validate SUITE.yaml``.

:mod:`shardeval.cli` hands a file with a top-level ``suite:`` key over to these functions.
Exit codes are the CLI's: 0 every cell complete, 1 a cell failed (the others are complete
and kept), 2 the suite or one of its specs is invalid (found before any model call), 3
``--fail-on-regression`` and a cell regressed against its baseline, 130 interrupted. A
suite whose cells are all complete and current is answered from storage without starting
Prefect.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from shardeval.display import err_console, out_console, progress_bar, spinner
from shardeval.errors import ShardevalError, SpecError
from shardeval.suite_report import suite_table
from shardeval.suite_session import SuiteSession


def run_suite(
    source: str,
    *,
    output: str | None,
    retry_failed: bool,
    limit: int | None,
    wait: bool,
    quiet: bool,
    verbose: bool,
    unsupported: Mapping[str, object],
    baseline: str | None = None,
    fail_on_regression: bool = False,
) -> None:
    """Run (or resume) every cell of a suite; print the evals × models table.

    With ``baseline`` every complete cell is compared with its own baseline
    (:mod:`shardeval.suite_baseline`); ``fail_on_regression`` then exits 3 if any regressed
    (after the table; a failed cell's exit 1 comes first).
    """
    from shardeval.run_console import (
        configure_logging,
        install_signal_handlers,
        route_prefect_logs,
    )

    given = [option for option, value in unsupported.items() if value not in (None, False)]
    if given:
        raise SpecError(
            f"{', '.join(given)} cannot be used with a suite ({source})",
            hint="set such fields per eval in the suite file (`set:`) or per model (`models:`)",
        )
    if fail_on_regression and not baseline:
        raise SpecError("--fail-on-regression needs --baseline", hint="add --baseline previous")
    started = time.monotonic()
    configure_logging(verbose)
    suite = SuiteSession.prepare(
        source, output=output, retry_failed=retry_failed, limit=limit, baseline=baseline
    )
    for cell in suite.cells:
        if cell.session.new_run_reason:
            err_console.print(f"[yellow]{cell.label}: {_escape(cell.session.new_run_reason)}[/]")
    if not suite.start():
        if suite.baseline is not None:
            from shardeval.suite_baseline import compare_stored_cells

            compare_stored_cells(suite)
        suite.finish()
        err_console.print(
            f"[dim]suite {suite.suite_run_id}: all {len(suite.cells)} cells are complete and "
            "current: answered from storage[/]"
        )
        _print_result(suite, time.monotonic() - started)
        _gate(suite, fail_on_regression)
        return
    show = not quiet and sys.stderr.isatty()
    grace = max(c.session.spec.grace_period_s for c in suite.cells)
    # The CLI's handler stops the suite (no new cell) and every active cell's run.
    install_signal_handlers(suite.suite_run_id, grace)
    with spinner("Loading Prefect...", enabled=show):
        from flows.suite import evaluate_suite
    route_prefect_logs(suite.store, verbose)
    from shardeval.launch import prefect_for_flows

    with prefect_for_flows(show):
        try:
            with suite_progress(suite, enabled=not quiet):
                evaluate_suite(suite=suite, wait=wait)
        except ShardevalError:
            _print_result(suite, time.monotonic() - started)
            raise
    _print_result(suite, time.monotonic() - started)
    _gate(suite, fail_on_regression)


def _gate(suite: SuiteSession, fail_on_regression: bool) -> None:
    """Name the regressed cells; with ``--fail-on-regression`` exit 3 if there are any."""
    if suite.baseline is None:
        return
    from shardeval.suite_baseline import gate, regression_summary

    if fail_on_regression:
        gate(suite)  # its message names the regressed cells
        return
    for cell in suite.regressed():
        err_console.print(f"[red]regression[/]: {_escape(regression_summary(cell))}")


def validate_suite(source: str, *, limit: int | None) -> None:
    """Check every cell of a suite (spec, dataset, prompts, metrics) without a model call."""
    suite = SuiteSession.prepare(source, limit=limit)
    out_console.print(f"[green]ok[/]: {source}")
    out_console.print(
        f"  suite: {suite.name} · {len(suite.cells)} cells · {suite.parallel} at a time"
    )
    for cell in suite.cells:
        plan = cell.session.plan
        out_console.print(
            f"  {cell.label}: {plan.n_rows:,} requests in {len(plan.batches):,} batches · "
            f"run id {cell.run_id}"
        )
    out_console.print(f"  suite run id: {suite.suite_run_id}")
    out_console.print(f"  suite files: {suite.store.url()}")


def _print_result(suite: SuiteSession, wall_s: float) -> None:
    out_console.print(suite_table(suite))
    counts = suite.counts()
    out_console.print(
        f"cells: {counts['done']} complete · "
        + (f"[red]{counts['failed']} failed[/]" if counts["failed"] else "0 failed")
        + (f" · {counts['waiting']} not finished" if counts["waiting"] else "")
    )
    out_console.print(f"wall time: {wall_s:.1f}s")
    if suite.baseline is not None:
        verdicts = [c.against_baseline()["verdict"] for c in suite.cells]
        shown = ", ".join(
            f"{verdicts.count(v)} {v}"
            for v in ("regression", "improvement", "inconclusive", "no baseline")
            if v in verdicts
        )
        out_console.print(f"against baseline {suite.baseline}: {shown or 'nothing compared'}")
    out_console.print(f"suite: {suite.store.url()}")


@contextmanager
def suite_progress(suite: SuiteSession, *, enabled: bool = True) -> Iterator[None]:
    """One live display for the suite: cells done/running/failed, items across all cells."""
    if not enabled:
        yield
        return
    bar = progress_bar(eta=False, refresh_per_second=4)
    task = bar.add_task(f"suite {suite.name}", total=None, detail="")
    stop = threading.Event()

    def update() -> None:
        counts = suite.counts()
        detail = (
            f"cells {counts['done']}/{len(suite.cells)} done · {counts['running']} running · "
            + (f"[red]{counts['failed']} failed[/]" if counts["failed"] else "0 failed")
        )
        bar.update(task, total=counts["items"], completed=counts["items_done"], detail=detail)

    def poll() -> None:
        while not stop.wait(0.25):
            update()

    with bar:
        thread = threading.Thread(target=poll, name="shardeval-suite-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            update()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
