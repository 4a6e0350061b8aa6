"""A run's page: what was evaluated, metrics with CIs, groups, distributions, errors, items."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardeval.report import plots
from shardeval.report.html import (
    count_bars,
    esc,
    facts,
    fmt,
    page,
    score_bar,
    section,
    table,
)
from shardeval.report.items import SCRIPT, items_data, items_section_body
from shardeval.reporting import cost_text, usd


def as_table(results: Any) -> pa.Table:
    """results.parquet as an Arrow table, from a table or a pandas DataFrame."""
    if isinstance(results, pa.Table):
        return results
    return pa.Table.from_pandas(results, preserve_index=False)


def build_run_report(
    results_df: Any,
    metrics_json: dict[str, Any],
    spec_json: dict[str, Any] | None,
    comparison: dict[str, Any] | None = None,
    *,
    base_results: Any = None,
    spec_href: str | None = "spec.json",
) -> str:
    """The HTML page of one run.

    Args:
        results_df: results.parquet (a pandas DataFrame or an Arrow table).
        metrics_json: the run's metrics.json content.
        spec_json: the run's spec.json content (its ``spec`` key is the resolved spec), or None.
        comparison: a ``compare --json`` dict (plus ``flips``) to show against a base run.
        base_results: that base run's results (for broken items side by side), if any.
        spec_href: the link to the run's spec.json: relative (the page is in the run
            directory), a ``file://`` URL, or None to show no link.
    """
    results = as_table(results_df)
    summary = metrics_json
    title = f"{summary.get('name', 'run')} · {summary.get('run_id', '')}"
    parts = [
        f"<h1>{esc(summary.get('name'))}</h1>",
        f'<p class="sub">run <code>{esc(summary.get("run_id"))}</code></p>',
        section("What was evaluated", _what(summary, spec_json, spec_href), anchor="what"),
        section("Metrics", _metrics(summary), anchor="metrics"),
    ]
    if summary.get("by_group"):
        parts.append(section("By group", _groups(summary), anchor="groups"))
    parts.append(section("Distributions", _distributions(results), anchor="distributions"))
    parts.append(section("Errors", _errors(summary, results), anchor="errors"))
    if isinstance(summary.get("cost"), dict):
        parts.append(section("Cost", _cost(summary["cost"]), anchor="cost"))
    if comparison is not None:
        from shardeval.report.compare_page import comparison_body

        parts.append(
            section(
                "Comparison",
                comparison_body(comparison, base_results, results),
                anchor="comparison",
            )
        )
    data, limit, cut = items_data(results)
    body = items_section_body(results.num_rows, limit, cut, "prompt" in results.column_names)
    parts.append(section("Items (failures first)", body, anchor="items"))
    if not plots.available():
        parts.insert(
            2,
            f'<p class="note warn">Plots need matplotlib: <code>{esc(plots.INSTALL_HINT)}</code>. '
            "The numbers below are complete without it.</p>",
        )
    parts.append(
        f'<p class="note">shardeval {esc(summary.get("shardeval_version"))} · '
        "this page is self-contained: it needs no network.</p>"
    )
    return page(title, "\n".join(parts), script=SCRIPT, data={"items": data})


def _wall(summary: dict[str, Any]) -> str:
    try:
        start = datetime.fromisoformat(summary["started_at"])
        end = datetime.fromisoformat(summary["finished_at"])
    except (KeyError, TypeError, ValueError):
        return "-"
    seconds = (end - start).total_seconds()
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.1f} min"


def _what(summary: dict[str, Any], spec_json: dict[str, Any] | None, href: str | None) -> str:
    model = summary.get("model") or {}
    spec = (spec_json or {}).get("spec") or {}
    spec_model = spec.get("model") or {}
    name = model.get("model") or spec_model.get("function") or model.get("provider")
    label = f"{esc(name)} <span class=note>({esc(model.get('provider'))})</span>"
    if model.get("revision"):
        label += f" · revision <code>{esc(model['revision'])}</code>"
    dataset = summary.get("dataset") or {}
    rows = [
        ("eval", esc(summary.get("name"))),
        ("model", label),
        ("dataset", f"<code>{esc(dataset.get('path'))}</code>"),
        ("dataset fingerprint", f"<code>{esc(dataset.get('fingerprint'))}</code>"),
        ("spec", _spec_link(href, summary)),
        ("started", esc(summary.get("started_at"))),
        ("finished", esc(summary.get("finished_at"))),
        ("wall time (this attempt)", _wall(summary)),
        (
            "rows",
            f"{fmt(summary.get('n_rows'))} ({fmt(summary.get('n_items'))} items × "
            f"{fmt(summary.get('trials', 1))} trial(s)): "
            f'<span class="status-ok">{fmt(summary.get("n_ok"))} ok</span>, '
            f'<span class="{"status-error" if summary.get("n_error") else ""}">'
            f"{fmt(summary.get('n_error'))} error</span>",
        ),
        ("cost", esc((cost_text(summary) or "not recorded").removeprefix("cost: "))),
    ]
    if spec.get("prompt"):
        prompt = spec["prompt"]
        text = (f"system: {prompt['system']}\n" if prompt.get("system") else "") + (
            f"user: {prompt.get('user')}"
        )
        rows.append(("prompt template", f"<pre>{esc(text)}</pre>"))
    return facts(rows)


def _spec_link(href: str | None, summary: dict[str, Any]) -> str:
    if href == "spec.json":
        return '<a href="spec.json">spec.json</a> (next to this page in the run directory)'
    if href:
        return f'<a href="{esc(href)}">spec.json</a>'
    results = str(summary.get("results") or "")
    where = results.rsplit("/", 1)[0] + "/spec.json" if "/" in results else "spec.json"
    return f"<code>{esc(where)}</code>"


def _metrics(summary: dict[str, Any]) -> str:
    metrics = summary.get("metrics") or {}
    if not metrics:
        return '<p class="note">This run has no metrics.</p>'
    rows = []
    for name, stats in metrics.items():
        ci = stats.get("ci95") or [None, None]
        rows.append(
            (
                esc(name),
                fmt(stats.get("mean")),
                f"[{fmt(ci[0])}, {fmt(ci[1])}]",
                fmt(stats.get("n")),
                score_bar(stats.get("mean"), ci),
            )
        )
    errors = summary.get("scoring_errors") or {}
    note = (
        '<p class="note">Bars: mean on a 0-1 axis; whiskers: 95% CI '
        f"({esc(next(iter(metrics.values())).get('ci_method', 'normal'))}).</p>"
    )
    if errors:
        note += (
            '<p class="note warn">Rows that could not be scored: '
            + ", ".join(f"{esc(k)} {fmt(v)}" for k, v in errors.items())
            + "</p>"
        )
    return table(["metric", "#mean", "#95% CI", "#n", ""], rows) + note


def _groups(summary: dict[str, Any]) -> str:
    groups: dict[str, Any] = summary["by_group"]
    names = sorted({m for g in groups.values() for m in g.get("metrics", {})})
    out = f'<p class="note">Grouped by {esc(", ".join(summary.get("group_by", [])))}.</p>'
    for metric in names:
        rows = []
        for label, group in groups.items():
            stats = group.get("metrics", {}).get(metric, {})
            ci = stats.get("ci95") or [None, None]
            rows.append(
                (
                    esc(label),
                    fmt(stats.get("mean")),
                    f"[{fmt(ci[0])}, {fmt(ci[1])}]",
                    fmt(group.get("n_ok")),
                    score_bar(stats.get("mean"), ci),
                )
            )
        out += f"<h3>{esc(metric)}</h3>" + table(["group", "#mean", "#95% CI", "#n", ""], rows)
    return out


def _values(results: pa.Table, column: str, *, ok_only: bool = True) -> list[float]:
    if column not in results.column_names:
        return []
    values = results.column(column)
    if ok_only:  # filter the one column, not a copy of the whole table
        values = values.filter(pc.equal(results.column("status"), "ok"))
    return [float(v) for v in values.drop_null().to_pylist()]


def _binned(values: list[float], bins: int = 10) -> list[tuple[str, int]]:
    """CSS fallback of a histogram: ``bins`` equal-width ranges and their counts."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    counts = Counter(min(bins - 1, int((v - lo) / width)) for v in values)
    return [
        (f"{lo + i * width:.3g} - {lo + (i + 1) * width:.3g}", counts.get(i, 0))
        for i in range(bins)
    ]


def _plot_or_bars(svg: str | None, values: list[float], title: str) -> str:
    if svg is not None:
        return f'<div class="plot">{svg}</div>'
    if not values:
        return f'<div><h3>{esc(title)}</h3><p class="note">no values</p></div>'
    return f"<div><h3>{esc(title)}</h3>{count_bars(_binned(values))}</div>"


def _distributions(results: pa.Table) -> str:
    blocks = []
    for column in (c for c in results.column_names if c.startswith("score_")):
        values = _values(results, column)
        name = column[len("score_") :]
        svg = plots.histogram(
            values,
            title=f"score: {name}",
            xlabel="score",
            prefix=f"s-{name}",
            bins=[i / 10 for i in range(11)],
        )
        blocks.append(_plot_or_bars(svg, values, f"score: {name}"))
    latency = _values(results, "latency_s")
    blocks.append(
        _plot_or_bars(
            plots.histogram(latency, title="latency", xlabel="seconds", prefix="lat"),
            latency,
            "latency (s)",
        )
    )
    prompt, completion = _values(results, "prompt_tokens"), _values(results, "completion_tokens")
    svg = plots.two_histograms(
        prompt,
        completion,
        labels=("prompt", "completion"),
        title="tokens per row",
        xlabel="tokens",
        prefix="tok",
    )
    if svg is not None:
        blocks.append(f'<div class="plot">{svg}</div>')
    else:
        blocks.append(_plot_or_bars(None, completion, "completion tokens"))
    stats = [
        (
            esc(label),
            fmt(len(v)),
            fmt(sum(v) / len(v) if v else None, 3),
            fmt(_pctl(v, 0.5), 3),
            fmt(_pctl(v, 0.95), 3),
            fmt(max(v) if v else None, 3),
        )
        for label, v in (
            ("latency (s)", latency),
            ("prompt tokens", prompt),
            ("completion tokens", completion),
        )
    ]
    summary = table(["", "#n", "#mean", "#median", "#p95", "#max"], stats)
    return f'<div class="grid">{"".join(blocks)}</div>{summary}'


def _pctl(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _errors(summary: dict[str, Any], results: pa.Table) -> str:
    kinds = summary.get("errors_by_kind") or {}
    if not kinds:
        return '<p class="note">No error rows.</p>'
    out = count_bars(sorted(kinds.items(), key=lambda kv: -kv[1]))
    errors = results.filter(pc.equal(results.column("status"), "error"))
    messages = Counter(str(m)[:200] for m in errors.column("error").to_pylist() if m)
    if messages:
        rows = [(f"<code>{esc(m)}</code>", fmt(c)) for m, c in messages.most_common(10)]
        out += "<h3>most frequent messages</h3>" + table(["message", "#rows"], rows)
    return out


def _price_text(price: dict[str, Any]) -> str:
    if not price:
        return "-"
    return f"{fmt(price.get('prompt_per_mtok'), 3)} / {fmt(price.get('completion_per_mtok'), 3)}"


def _cost(cost: dict[str, Any]) -> str:
    rows = []
    for part in cost.get("parts", []):
        price = part.get("price") or {}
        where = esc(price.get("source")) if price else '<span class="warn">no price</span>'
        if price.get("as_of"):
            where += f" (as of {esc(price['as_of'])})"
        rows.append(
            (
                esc(part.get("what")),
                esc(part.get("model")),
                usd(part["usd"]) if part.get("usd") is not None else "unknown",
                usd(part["saved_usd"]) if part.get("saved_usd") is not None else "unknown",
                fmt(part.get("rows")),
                fmt(part.get("rows_from_storage")),
                _price_text(price),
                where,
            )
        )
    note = (
        '<p class="note">spent: every row\'s request at the price; saved: rows this attempt '
        "read from storage instead of asking the model. USD per million tokens "
        "(prompt / completion).</p>"
    )
    headers = ["part", "model", "#spent", "#saved", "#rows", "#from storage", "#price", "source"]
    return table(headers, rows) + note
