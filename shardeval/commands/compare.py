"""``shardeval compare BASE CAND`` and ``shardeval history NAME``: did the model get worse?

Both only read storage (no Prefect, no lock). ``compare --fail-on-regression`` is the quality
gate of a CI script or a nightly job: exit 3 when a metric's verdict is ``regression``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from shardeval.display import err_console, out_console

if TYPE_CHECKING:
    from shardeval.comparison import Comparison, Flip
    from shardeval.history import History

SHOWN_FLIPS = 10
CELL_CHARS = 60
_VERDICT_STYLE = {"regression": "bold red", "improvement": "bold green", "inconclusive": "dim"}

OutputOpt = Annotated[
    str | None,
    typer.Option("--output", "-o", help="Where runs are stored (default: ./shardeval-runs)."),
]
MetricOpt = Annotated[
    list[str] | None,
    typer.Option("--metric", "-m", help="Metric to compare (repeatable; default: all)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
AlphaOpt = Annotated[
    float,
    typer.Option(help="Significance level, after Holm adjustment across metrics."),
]


def register(app: typer.Typer) -> None:
    """Add ``compare`` and ``history``."""
    app.command()(compare)
    app.command()(history)


def _output(output: str | None) -> str:
    from shardeval.catalog import DEFAULT_OUTPUT

    return output or DEFAULT_OUTPUT


def compare(
    base: Annotated[str, typer.Argument(help="The baseline run id.", show_default=False)],
    cand: Annotated[str, typer.Argument(help="The candidate run id.", show_default=False)],
    output: OutputOpt = None,
    metric: MetricOpt = None,
    as_json: JsonOpt = False,
    fail_on_regression: Annotated[
        bool,
        typer.Option("--fail-on-regression", help="Exit 3 if any metric's verdict is regression."),
    ] = False,
    alpha: AlphaOpt = 0.05,
) -> None:
    """Compare two runs item by item: paired deltas, CIs, p-values, flips and a verdict."""
    from shardeval.compare import compare_runs

    comparison, _, _ = compare_runs(base, cand, _output(output), metrics=metric, alpha=alpha)
    if as_json:
        print(json.dumps(comparison.to_dict(), indent=2))
    else:
        print_comparison(comparison)
    if fail_on_regression:
        gate(comparison)


def gate(comparison: Comparison | dict[str, Any]) -> None:
    """The quality gate: raise :class:`RegressionDetected` (exit 3) on any regression."""
    from shardeval.comparison import Comparison, RegressionDetected

    if isinstance(comparison, dict):
        comparison = Comparison.from_dict(comparison)
    if comparison.verdict != "regression":
        return
    regressed = [n for n, m in comparison.metrics.items() if m.verdict == "regression"]
    raise RegressionDetected(
        f"quality gate failed: {comparison.cand} regressed against {comparison.base} on "
        + ", ".join(regressed)
    )


def print_comparison_dict(data: dict[str, Any]) -> None:
    """:func:`print_comparison` of a comparison's JSON object (comparison.json)."""
    from shardeval.comparison import Comparison

    print_comparison(Comparison.from_dict(data))


def print_comparison(comparison: Comparison) -> None:
    """The metrics table, warnings, then per metric the broken rows first, then the fixed."""
    out_console.print(comparison_table(comparison))
    line = Text(
        f"rows aligned: {comparison.n_aligned:,} · only in base: {comparison.only_base:,} · "
        f"only in candidate: {comparison.only_cand:,} · overall: "
    )
    line.append(comparison.verdict, style=_VERDICT_STYLE[comparison.verdict])
    out_console.print(line)
    for warning in comparison.warnings:
        err_console.print(f"[yellow]warning[/]: {warning}", markup=True, highlight=False)
    for kind in ("broken", "fixed"):
        for name, flips in comparison.flips.items():
            if flips[kind]:
                out_console.print(flip_table(name, kind, flips[kind], comparison))


def comparison_table(comparison: Comparison) -> Table:
    """One row per metric: base, cand, delta, 95% CI, adjusted p, test, flips, MDE, verdict."""
    table = Table(title=f"{comparison.base} → {comparison.cand}", title_justify="left")
    for header in ("metric", "base", "cand", "delta", "95% CI", "p (adj)", "test"):
        table.add_column(header, justify="left" if header in ("metric", "test") else "right")
    table.add_column("fixed/broken", justify="right")
    table.add_column("MDE", justify="right")
    table.add_column("verdict")
    for name, m in comparison.metrics.items():
        ci = "-" if m.ci95 is None else f"[{m.ci95[0]:+.4f}, {m.ci95[1]:+.4f}]"
        table.add_row(
            name,
            _num(m.base),
            _num(m.cand),
            "-" if m.delta is None else f"{m.delta:+.4f}",
            ci,
            "-" if m.p_adjusted is None else f"{m.p_adjusted:.3g}",
            m.test,
            f"{m.fixed:,}/{m.broken:,}",
            _num(m.mde),
            Text(m.verdict, style=_VERDICT_STYLE[m.verdict]),
        )
    return table


def flip_table(name: str, kind: str, rows: list[Flip], comparison: Comparison) -> Table:
    """The first flipped rows of one metric: id, target, both responses (truncated)."""
    total = getattr(comparison.metrics[name], kind)
    change = "1→0 or lower" if kind == "broken" else "0→1 or higher"
    title = f"{name}: {kind} ({change} in {comparison.cand}), {total:,} row(s)"
    if total > SHOWN_FLIPS:
        title += f", first {SHOWN_FLIPS} shown (--json lists up to 1,000)"
    table = Table(title=title, title_justify="left")
    for header in ("item", "target", comparison.base, comparison.cand):
        table.add_column(header, overflow="fold")
    for flip in rows[:SHOWN_FLIPS]:
        item = flip.item_id if flip.trial == 0 else f"{flip.item_id} #{flip.trial}"
        table.add_row(item, _cut(flip.target), _cut(flip.base_response), _cut(flip.cand_response))
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _cut(text: str | None) -> str:
    if text is None:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= CELL_CHARS else flat[: CELL_CHARS - 1] + "…"


def history(
    name: Annotated[str, typer.Argument(help="The eval name.", show_default=False)],
    output: OutputOpt = None,
    metric: Annotated[
        str | None, typer.Option("--metric", "-m", help="Metric (default: the first).")
    ] = None,
    last: Annotated[int, typer.Option(min=2, help="How many of the latest runs.")] = 30,
    as_json: JsonOpt = False,
    alpha: AlphaOpt = 0.05,
) -> None:
    """A metric over the complete runs of one eval, newest last, with significant changes."""
    from shardeval.history import history as read_history

    found = read_history(_output(output), name, metric, last=last, alpha=alpha)
    if as_json:
        print(json.dumps(found.to_dict(), indent=2))
    else:
        out_console.print(history_table(found))


def history_table(found: History) -> Table:
    """One row per run: when, model, mean, 95% CI, paired change from the previous run."""
    table = Table(title=f"{found.name} · {found.metric}", title_justify="left")
    for header in ("finished", "run", "model", "mean", "95% CI", "n", "change", "p", "verdict"):
        right = header in ("mean", "95% CI", "n", "change", "p")
        table.add_column(header, justify="right" if right else "left")
    for point in found.points:
        ci = "-" if not point.ci95 else f"[{point.ci95[0]:.4f}, {point.ci95[1]:.4f}]"
        verdict = point.verdict or ""
        table.add_row(
            point.finished_at or "-",
            point.run_id,
            point.model or "-",
            _num(point.mean),
            ci,
            "-" if point.n is None else f"{point.n:,}",
            "" if point.delta is None else f"{point.delta:+.4f}",
            "" if point.p is None else f"{point.p:.3g}",
            Text(verdict, style=_VERDICT_STYLE.get(verdict, "")),
        )
    return table
