"""A suite's page: an evals × models heat map per metric, with CIs, and metric histories.

Input is plain data, so it works with the suite's ``summary.json`` (design.md, "Suites")
however that is produced: a list of cells ``{"eval", "model", "run_id", "status",
"metrics": {name: {"mean", "ci95", "n"}}}`` (with ``baseline``, ``delta``, ``delta_ci95`` and
``verdict`` when the suite ran with ``--baseline``), and optionally histories
``[{"eval", "model", "metric", "points": [{"run_id", "finished_at", "mean", "ci95"}]}]``
(oldest first).
"""

from __future__ import annotations

from typing import Any

from shardeval.report import plots
from shardeval.report.html import esc, fmt, page, section, table


def _colour(mean: float | None) -> str:
    """Red (0) through yellow to green (1); grey without a value."""
    if mean is None:
        return "#eeeeee"
    x = max(0.0, min(1.0, float(mean)))
    hue = 120 * x  # hsl: 0 red, 60 yellow, 120 green
    return f"hsl({hue:.0f},55%,78%)"


def heat_map(cells: list[dict[str, Any]], metric: str) -> str:
    """One metric's evals × models table, each cell coloured by its mean."""
    evals = list(dict.fromkeys(str(c.get("eval")) for c in cells))
    models = list(dict.fromkeys(str(c.get("model")) for c in cells))
    by = {(str(c.get("eval")), str(c.get("model"))): c for c in cells}
    rows = []
    for ev in evals:
        row = [f"<b>{esc(ev)}</b>"]
        for model in models:
            cell = by.get((ev, model))
            if cell is None:
                row.append("-")
                continue
            stats = (cell.get("metrics") or {}).get(metric)
            status = cell.get("status", "complete")
            if not stats:
                row.append(
                    f'<span class="note">{esc(status if status != "complete" else "n/a")}</span>'
                )
                continue
            ci = stats.get("ci95") or [None, None]
            row.append(
                f'<div style="background:{_colour(stats.get("mean"))};padding:4px">'
                f"{fmt(stats.get('mean'), 3)}<small>[{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]"
                f"{' · ' + esc(status) if status != 'complete' else ''}</small></div>"
            )
        rows.append(row)
    html = table(["eval \\ model", *models], rows, cls="heat")
    return html.replace("<td><div", '<td class="cell"><div')


def build_suite_report(
    suite: dict[str, Any] | list[dict[str, Any]],
    history: list[dict[str, Any]] | None = None,
) -> str:
    """The HTML page of a suite: ``suite`` is summary.json or just its list of cells."""
    info = suite if isinstance(suite, dict) else {"cells": suite}
    cells: list[dict[str, Any]] = list(info.get("cells") or [])
    name = info.get("suite", "suite")
    metrics = list(dict.fromkeys(m for c in cells for m in (c.get("metrics") or {})))
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.get("status", "complete")] = counts.get(cell.get("status", "complete"), 0) + 1
    parts = [
        f"<h1>{esc(name)}</h1>",
        f'<p class="sub">suite run <code>{esc(info.get("suite_run_id"))}</code> · '
        + ", ".join(f"{n} {esc(s)}" for s, n in sorted(counts.items()))
        + " cell(s)</p>",
    ]
    if not metrics:
        parts.append('<p class="note">No cell has metrics yet.</p>')
    for metric in metrics:
        parts.append(
            section(f"{metric}: mean [95% CI]", heat_map(cells, metric), anchor=f"m-{metric}")
        )
    compared = any(c.get("verdict") for c in cells)
    runs = [
        (
            esc(c.get("eval")),
            esc(c.get("model")),
            f"<code>{esc(c.get('run_id'))}</code>",
            esc(c.get("status")),
            *((_against_baseline(c),) if compared else ()),
        )
        for c in cells
    ]
    headers = ["eval", "model", "run", "status", *(["against baseline"] if compared else [])]
    parts.append(section("Cells", table(headers, runs)))
    if history:
        parts.append(section("History", _history(history), anchor="history"))
    parts.append('<p class="note">This page is self-contained: it needs no network.</p>')
    return page(f"suite {name}", "\n".join(parts))


def _against_baseline(cell: dict[str, Any]) -> str:
    """``Δ -0.0333 [-0.051, -0.016] regression vs <run>``, ``no baseline``, or empty."""
    verdict = cell.get("verdict")
    if not verdict or not cell.get("baseline"):
        return esc(verdict or "")
    delta, ci = cell.get("delta"), cell.get("delta_ci95") or [None, None]
    text = f"Δ {'-' if delta is None else f'{delta:+.4f}'} [{fmt(ci[0], 3)}, {fmt(ci[1], 3)}]"
    tag = f"<b>{esc(verdict)}</b>" if verdict == "regression" else esc(verdict)
    return f"{esc(text)} {tag} <small>vs <code>{esc(cell.get('baseline'))}</code></small>"


def _history(history: list[dict[str, Any]]) -> str:
    blocks = []
    for number, series in enumerate(history):
        points = series.get("points") or []
        label = f"{series.get('eval')} · {series.get('model')} · {series.get('metric')}"
        data = [
            (
                str(p.get("finished_at") or p.get("run_id") or i)[:10],
                float(p["mean"]),
                (p.get("ci95") or [None, None])[0],
                (p.get("ci95") or [None, None])[1],
            )
            for i, p in enumerate(points)
            if p.get("mean") is not None
        ]
        svg = plots.history(data, title=label, prefix=f"h{number}")
        if svg is not None:
            blocks.append(f'<div class="plot">{svg}</div>')
            continue
        rows = [(esc(d[0]), fmt(d[1], 3), f"[{fmt(d[2], 3)}, {fmt(d[3], 3)}]") for d in data]
        blocks.append(f"<div><h3>{esc(label)}</h3>{table(['run', '#mean', '#95% CI'], rows)}</div>")
    return f'<div class="grid">{"".join(blocks)}</div>'
