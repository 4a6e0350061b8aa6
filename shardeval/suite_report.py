"""A suite's results as tables: evals × models, main metric, 95% CI, n, errors, time, cost.

With ``--baseline`` each cell also shows the main metric's change against the cell's own
baseline and the comparison's verdict (``no baseline`` for a cell without an earlier run).

Shared by the CLI's end-of-suite table, the Prefect table and markdown artifacts. The main
metric of a cell is its spec's first metric.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from shardeval.suite_cell import CellRun, main_metric
from shardeval.suite_session import SuiteSession


def suite_rows(suite: SuiteSession) -> list[dict[str, Any]]:
    """One row per cell (the Prefect table artifact, ``--json``-like consumers)."""
    rows = []
    for cell in suite.cells:
        main = main_metric(cell.metrics) or {}
        ci = main.get("ci95") or [None, None]
        against = cell.against_baseline()
        rows.append(
            {
                "eval": cell.cell.eval_label,
                "model": cell.cell.model_label,
                "status": cell.status,
                "metric": main.get("metric"),
                "mean": main.get("mean"),
                "ci95_low": ci[0],
                "ci95_high": ci[1],
                "n": main.get("n"),
                "errors": main.get("n_error"),
                "wall_s": None if cell.wall_s is None else round(cell.wall_s, 1),
                "cost_usd": cell_cost(cell),
                "baseline": against["baseline"],
                "delta": against["delta"],
                "verdict": against["verdict"],
                "run_id": cell.run_id,
                "error": cell.error,
            }
        )
    return rows


def cell_text(cell: CellRun, *, markup: bool = True) -> str:
    """``exact_match 0.9000 [0.810, 0.950]`` / ``n=40 · errors 0 · 3.2s`` (or why it failed)."""
    if cell.status != "complete":
        what = "failed" if cell.status == "failed" else "incomplete"
        text = f"{what}: {cell.error}" if cell.error else what
        return f"[red]{_escape(text)}[/]" if markup and cell.status == "failed" else text
    main = main_metric(cell.metrics) or {}
    head = ""
    if main.get("metric"):
        mean, ci = main.get("mean"), main.get("ci95") or [None, None]
        head = f"{main['metric']} " + ("-" if mean is None else f"{mean:.4f}")
        if ci[0] is not None:
            head += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    time_s = "stored" if cell.wall_s is None else f"{cell.wall_s:.1f}s"
    usd = cell_cost(cell)
    cost = "cost unknown" if usd is None else f"${usd:,.4f}"
    tail = f"n={main.get('n')} · errors {main.get('n_error') or 0} · {time_s} · {cost}"
    lines = [head, tail, baseline_text(cell, markup=markup)]
    return "\n".join(line for line in lines if line)


_VERDICT_STYLE = {"regression": "bold red", "improvement": "bold green"}


def baseline_text(cell: CellRun, *, markup: bool = True) -> str:
    """``Δ -0.0333 [-0.051, -0.016] regression`` (or ``no baseline``); empty if not compared."""
    against = cell.against_baseline()
    verdict = against["verdict"]
    if verdict is None:
        return ""
    style = _VERDICT_STYLE.get(verdict)
    shown = f"[{style}]{verdict}[/]" if markup and style else verdict
    if against["baseline"] is None:
        return shown
    delta, ci = against["delta"], against["delta_ci95"]
    text = "Δ " + ("-" if delta is None else f"{delta:+.4f}")
    if ci:
        text += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return f"{_escape(text) if markup else text} {shown}"


def cell_cost(cell: CellRun) -> float | None:
    """What the cell's run cost (metrics.json ``cost.usd``); None when unpriced, never 0."""
    cost = (cell.metrics or {}).get("cost")
    usd = cost.get("usd") if isinstance(cost, dict) else None
    return float(usd) if isinstance(usd, int | float) else None


def _grid(suite: SuiteSession) -> tuple[list[str], list[str], dict[tuple[str, str], CellRun]]:
    evals = list(dict.fromkeys(c.cell.eval_label for c in suite.cells))
    models = list(dict.fromkeys(c.cell.model_label for c in suite.cells))
    return evals, models, {(c.cell.eval_label, c.cell.model_label): c for c in suite.cells}


def suite_table(suite: SuiteSession) -> Table:
    """The CLI's end-of-suite table: a row per eval, a column per model."""
    evals, models, cells = _grid(suite)
    table = Table(title=f"suite {suite.suite_run_id}", title_justify="left", show_lines=True)
    table.add_column("eval")
    for model in models:
        table.add_column(model)
    for name in evals:
        table.add_row(
            name, *(cell_text(cells[name, m]) if (name, m) in cells else "" for m in models)
        )
    return table


def suite_markdown(suite: SuiteSession) -> str:
    """The suite as a markdown table (the Prefect markdown artifact)."""
    evals, models, cells = _grid(suite)
    done = sum(c.status == "complete" for c in suite.cells)
    lines = [
        f"# Suite {suite.name}",
        "",
        f"Suite run `{suite.suite_run_id}`: {done} of {len(suite.cells)} cells complete.",
        "",
        "| eval | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for name in evals:
        row = [
            cell_text(cells[name, m], markup=False).replace("|", "/").replace("\n", "<br>")
            if (name, m) in cells
            else ""
            for m in models
        ]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "Cells (run ids work with `shardeval status`, `compare`, `rescore`):", ""]
    lines += [f"- {c.label}: `{c.run_id}` ({c.status})" for c in suite.cells]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
