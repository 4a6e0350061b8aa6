"""A comparison page: deltas with CIs, flip matrices, broken items side by side, the verdict.

It takes the ``shardeval compare --json`` dict (design.md, "Comparison") plus a ``flips``
list, not a class, so that it depends on the data contract only. A flip is a dict with
``item_id``, ``metric``, ``kind`` (``fixed`` | ``broken``; ``flip`` is read too) and
optionally ``trial``, ``base`` / ``cand`` (scores) and ``base_response`` / ``cand_response``.
With both runs' results tables, the page also fills in prompts, targets and responses and
draws the full 2×2 flip matrix (pass = score ≥ 0.5).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from shardeval.report.html import delta_bar, esc, fmt, page, section, table
from shardeval.report.run_page import as_table

BROKEN_SHOWN = 200
PASS = 0.5


def overall_verdict(comparison: dict[str, Any]) -> str:
    """``regression`` if any metric regressed, else ``improvement`` if any improved."""
    verdicts = {m.get("verdict") for m in (comparison.get("metrics") or {}).values()}
    if comparison.get("verdict") in ("regression", "improvement", "inconclusive"):
        return str(comparison["verdict"])
    if "regression" in verdicts:
        return "regression"
    if "improvement" in verdicts:
        return "improvement"
    return "inconclusive"


def _verdict(verdict: Any) -> str:
    return f'<span class="verdict {esc(verdict)}">{esc(verdict)}</span>'


def _rows_by_key(results: pa.Table | None) -> dict[tuple[str, int], dict[str, Any]]:
    if results is None:
        return {}
    return {(str(r["item_id"]), int(r.get("trial") or 0)): r for r in results.to_pylist()}


def _flip_matrix(
    metric: str,
    stats: dict[str, Any],
    base: dict[tuple[str, int], dict[str, Any]],
    cand: dict[tuple[str, int], dict[str, Any]],
) -> str:
    column = f"score_{metric}"
    cells = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    counted = False
    for key, row in base.items():
        other = cand.get(key)
        if other is None or row.get(column) is None or other.get(column) is None:
            continue
        counted = True
        cells[(row[column] >= PASS, other[column] >= PASS)] += 1
    if counted:
        values = {k: fmt(v) for k, v in cells.items()}
    else:  # only the compare dict: the off-diagonal counts
        values = {k: "-" for k in cells}
        values[(False, True)] = fmt(stats.get("fixed"))
        values[(True, False)] = fmt(stats.get("broken"))
    rows = [
        ("<b>base pass</b>", values[(True, True)], f"<b>{values[(True, False)]}</b> broken"),
        ("<b>base fail</b>", f"<b>{values[(False, True)]}</b> fixed", values[(False, False)]),
    ]
    return f"<div><h3>{esc(metric)}</h3>" + table(["", "cand pass", "cand fail"], rows) + "</div>"


def comparison_body(
    comparison: dict[str, Any],
    base_results: Any = None,
    cand_results: Any = None,
) -> str:
    """The comparison's sections (also embedded in a run's page)."""
    metrics: dict[str, Any] = comparison.get("metrics") or {}
    verdict = overall_verdict(comparison)
    out = (
        f'<p><span class="verdict {esc(verdict)}">{esc(verdict)}</span> '
        f"base <code>{esc(comparison.get('base'))}</code> → candidate "
        f"<code>{esc(comparison.get('cand'))}</code>: {fmt(comparison.get('n_aligned'))} rows "
        f"aligned, {fmt(comparison.get('only_base', 0))} only in base, "
        f"{fmt(comparison.get('only_cand', 0))} only in candidate.</p>"
    )
    scale = max(
        [
            abs(v)
            for s in metrics.values()
            for v in [s.get("delta"), *(s.get("ci95") or [])]
            if isinstance(v, int | float)
        ]
        or [0.1]
    )
    rows = []
    for name, stats in metrics.items():
        ci = stats.get("ci95") or [None, None]
        rows.append(
            (
                esc(name),
                fmt(stats.get("base")),
                fmt(stats.get("cand")),
                fmt(stats.get("delta")),
                f"[{fmt(ci[0])}, {fmt(ci[1])}]",
                delta_bar(stats.get("delta"), ci, scale=scale * 1.1),
                fmt(stats.get("p")),
                fmt(stats.get("p_adjusted")),
                esc(stats.get("test")),
                fmt(stats.get("fixed")),
                fmt(stats.get("broken")),
                _verdict(stats.get("verdict")),
            )
        )
    headers = [
        "metric",
        "#base",
        "#cand",
        "#delta",
        "#95% CI",
        "",
        "#p",
        "#p (Holm)",
        "test",
        "#fixed",
        "#broken",
        "verdict",
    ]
    out += table(headers, rows)
    base = _rows_by_key(as_table(base_results) if base_results is not None else None)
    cand = _rows_by_key(as_table(cand_results) if cand_results is not None else None)
    matrices = "".join(_flip_matrix(n, s, base, cand) for n, s in metrics.items())
    out += f'<h3>Flips</h3><div class="grid">{matrices}</div>'
    out += _broken(comparison.get("flips") or [], base, cand)
    return out


def _broken(
    flips: list[dict[str, Any]],
    base: dict[tuple[str, int], dict[str, Any]],
    cand: dict[tuple[str, int], dict[str, Any]],
) -> str:
    broken = [f for f in flips if (f.get("kind") or f.get("flip")) == "broken"]
    if not broken:
        return '<p class="note">No broken items.</p>'
    rows = []
    for flip in broken[:BROKEN_SHOWN]:
        key = (str(flip.get("item_id")), int(flip.get("trial") or 0))
        b, c = base.get(key, {}), cand.get(key, {})
        targets = [str(v) for k, v in b.items() if k.startswith("target_") and v is not None]
        target = flip.get("target") or " | ".join(dict.fromkeys(targets)) or None
        left = flip.get("base_response", b.get("response"))
        right = flip.get("cand_response", c.get("response") or c.get("error"))
        rows.append(
            (
                esc(key[0]) + (f" #{key[1]}" if key[1] else ""),
                esc(flip.get("metric")),
                f"<pre>{esc(flip.get('prompt') or b.get('prompt'))}</pre>",
                f"<pre>{esc(target)}</pre>",
                f"<pre>{esc(left)}</pre>",
                f"<pre>{esc(right)}</pre>",
            )
        )
    note = (
        f'<p class="note">{len(broken) - BROKEN_SHOWN:,} more broken items are not shown.</p>'
        if len(broken) > BROKEN_SHOWN
        else ""
    )
    return (
        f"<h3>Broken items ({len(broken):,}), side by side</h3>"
        + table(
            ["item", "metric", "prompt", "target", "base response", "candidate response"],
            rows,
            cls="items",
        )
        + note
    )


def build_comparison_report(
    comparison: dict[str, Any],
    base_results: Any = None,
    cand_results: Any = None,
) -> str:
    """The HTML page of a comparison (see the module docstring for the inputs)."""
    title = f"{comparison.get('base')} vs {comparison.get('cand')}"
    body = (
        f'<h1>Comparison</h1><p class="sub">{esc(title)}</p>'
        + section("Verdict and deltas", comparison_body(comparison, base_results, cand_results))
        + '<p class="note">This page is self-contained: it needs no network.</p>'
    )
    return page(title, body)
