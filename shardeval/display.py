"""What the CLI shows: a spinner while Prefect starts, a progress bar, a summary table.

Output goes to stderr (the progress) and stdout (the summary), so ``shardeval run ... > log``
keeps the result and drops the animation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from shardeval.progress import RunProgress
from shardeval.reporting import cost_text, metrics_rows

err_console = Console(stderr=True)
# soft_wrap: a path printed to a pipe stays on one line (scripts read it).
out_console = Console(soft_wrap=True)


def progress_bar(*, eta: bool, refresh_per_second: int) -> Progress:
    """The bar runs and suites share: spinner, phase, bar, n/m, detail, elapsed (and ETA)."""
    columns: list[Any] = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    ]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(
        *columns, console=err_console, transient=False, refresh_per_second=refresh_per_second
    )


@contextmanager
def live_progress(progress: RunProgress, *, enabled: bool = True) -> Iterator[None]:
    """Show the run's counters until the block ends (polled; batches never block on it)."""
    if not enabled:
        yield
        return
    bar = progress_bar(eta=True, refresh_per_second=8)
    task = bar.add_task(progress.phase, total=None, detail="")
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.125):
            _update(bar, task, progress)

    with bar:
        thread = threading.Thread(target=poll, name="shardeval-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            _update(bar, task, progress)


def _update(bar: Progress, task: Any, progress: RunProgress) -> None:
    if progress.total:
        detail = f"ok {progress.ok:,} · errors {progress.errors:,} · cached {progress.from_cache:,}"
        if progress.transient:
            detail += f" · [yellow]transient {progress.transient:,}[/]"
        bar.update(
            task,
            description="evaluating" if progress.phase == "starting" else progress.phase,
            total=progress.total,
            completed=progress.done,
            detail=detail,
        )
    else:
        bar.update(task, description=progress.phase)


def summary_table(summary: dict[str, Any]) -> Table:
    """Metrics with 95% CI and n."""
    table = Table(title=f"{summary['name']} · {summary['run_id']}", title_justify="left")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("n", justify="right")
    for row in metrics_rows(summary):
        mean = "-" if row["mean"] is None else f"{row['mean']:.4f}"
        ci = "-" if row["ci95_low"] is None else f"[{row['ci95_low']:.4f}, {row['ci95_high']:.4f}]"
        table.add_row(row["metric"], mean, ci, str(row["n"]))
    return table


def print_summary(
    summary: dict[str, Any], *, wall_s: float, sent: int, from_cache: int, results_dir: str
) -> None:
    """The end-of-run report: metrics, counts, tokens, time, cache use, where the files are."""
    out_console.print(summary_table(summary))
    usage = summary.get("usage", {})
    out_console.print(
        f"items: {summary['n_items']:,} · rows: {summary['n_rows']:,} · "
        f"[green]ok {summary['n_ok']:,}[/] · "
        + (f"[red]error {summary['n_error']:,}[/]" if summary["n_error"] else "error 0")
    )
    errors = summary.get("errors_by_kind") or {}
    if errors:
        out_console.print("errors by kind: " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    out_console.print(
        f"tokens: {usage.get('prompt_tokens', 0):,} prompt · "
        f"{usage.get('completion_tokens', 0):,} completion"
    )
    cost = cost_text(summary, all_from_storage=sent == 0)
    if cost:
        out_console.print(cost if summary["cost"].get("priced") else f"[yellow]{cost}[/]")
    if sent == 0:
        out_console.print(
            f"cache: all {summary['n_rows']:,} rows came from the cache; no model call was made"
        )
    else:
        out_console.print(f"cache: {from_cache:,} rows from the cache · {sent:,} model calls made")
    out_console.print(f"wall time: {wall_s:.1f}s")
    out_console.print(f"results: {results_dir}")


@contextmanager
def spinner(message: str, *, enabled: bool = True) -> Iterator[None]:
    """A spinner with a message while something slow happens (Prefect start-up)."""
    if not enabled:
        yield
        return
    started = time.monotonic()
    with err_console.status(message):
        yield
    err_console.print(f"[dim]{message.rstrip('.')} - done in {time.monotonic() - started:.1f}s[/]")
