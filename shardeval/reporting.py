"""Human-readable views of a run's metrics.json, shared by the CLI and the Prefect artifacts."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def usd(value: float) -> str:
    """``$1.23``, or ``$0.0042`` for amounts below a cent (still visibly not zero)."""
    if value == 0 or abs(value) >= 0.01:
        return f"${value:,.2f}"
    return f"${value:.2g}" if abs(value) < 0.0001 else f"${value:.4f}"


def cost_text(summary: dict[str, Any], *, all_from_storage: bool = False) -> str | None:
    """``cost: $1.23 (saved $0.40 by rows from storage); price from spec`` or ``cost unknown``.

    None for a metrics.json written before costs existed. An unpriced model is never shown
    as $0: the line names the model(s) without a price. ``all_from_storage``: this attempt
    answered every row from storage (a rerun of a complete run), so it saved the whole cost,
    whatever the stored metrics.json says its own attempt saved.
    """
    cost = summary.get("cost")
    if not isinstance(cost, dict):
        return None
    if not cost.get("priced"):
        missing = ", ".join(cost.get("unpriced") or [cost.get("model") or "the model"])
        known = [p for p in cost.get("parts", []) if p.get("usd") is not None]
        extra = "; priced part: " + ", ".join(f"{p['what']} {usd(p['usd'])}" for p in known)
        return f"cost unknown: no price for {missing}" + (extra if known else "")
    if cost.get("usd") is None:
        missing = ", ".join(cost.get("without_tokens") or [cost.get("model") or "the model"])
        return f"cost unknown: no token counts from {missing}"
    text = f"cost: {usd(cost['usd'])}"
    saved = cost["usd"] if all_from_storage else cost.get("saved_usd")
    if saved:
        text += f" (saved {usd(saved)} by rows from storage)"
    text += f"; price from {cost.get('source')}"
    if cost.get("rows_without_tokens"):
        text += f"; {cost['rows_without_tokens']:,} rows without token counts not included"
    return text


def metrics_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: name, mean, 95% CI, n (the Prefect table artifact)."""
    rows = []
    for name, stats in summary.get("metrics", {}).items():
        ci = stats.get("ci95") or [None, None]
        rows.append(
            {
                "metric": name,
                "mean": stats.get("mean"),
                "ci95_low": ci[0],
                "ci95_high": ci[1],
                "stderr": stats.get("stderr"),
                "n": stats.get("n"),
            }
        )
    return rows


def summary_markdown(
    summary: dict[str, Any], run_stats: dict[str, Any], results_uri: str, metrics_uri: str
) -> str:
    """The markdown summary artifact: counts, errors by kind, tokens, cache hits, paths."""
    lines = [
        f"# {summary['name']} · {summary['model'].get('model') or summary['model']['provider']}",
        "",
        f"Run `{summary['run_id']}`: {summary['n_rows']:,} rows "
        f"({summary['n_items']:,} items × {summary.get('trials', 1)} trial(s)), "
        f"**{summary['n_ok']:,} ok**, **{summary['n_error']:,} error**.",
        "",
        "| metric | mean | 95% CI | n |",
        "|---|---|---|---|",
    ]
    for row in metrics_rows(summary):
        lines.append(
            f"| {row['metric']} | {_fmt(row['mean'])} | "
            f"[{_fmt(row['ci95_low'])}, {_fmt(row['ci95_high'])}] | {row['n']} |"
        )
    usage = summary.get("usage", {})
    lines += [
        "",
        f"- tokens: {usage.get('prompt_tokens', 0):,} prompt, "
        f"{usage.get('completion_tokens', 0):,} completion",
        f"- requests sent this attempt: {run_stats.get('sent', 0):,}; "
        f"rows from the cache: {run_stats.get('from_cache', 0):,}",
    ]
    cost = cost_text(summary)
    if cost:
        lines.append(f"- {cost}")
    groups = summary.get("by_group") or {}
    if groups:
        names = sorted({m for g in groups.values() for m in g.get("metrics", {})})
        lines += [
            "",
            f"## By {', '.join(summary.get('group_by', []))}",
            "",
            "| group | rows | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for label, group in groups.items():
            cells = [_fmt(group["metrics"].get(m, {}).get("mean")) for m in names]
            lines.append(f"| {label} | {group['n_rows']} | " + " | ".join(cells) + " |")
    errors = summary.get("errors_by_kind") or {}
    if errors:
        lines.append("- errors by kind: " + ", ".join(f"{k}: {v}" for k, v in errors.items()))
    lines += ["", f"- results: `{results_uri}`", f"- metrics: `{metrics_uri}`"]
    if summary.get("report"):
        lines.append(f"- report: `{summary['report']}` (one self-contained page)")
    return "\n".join(lines) + "\n"
