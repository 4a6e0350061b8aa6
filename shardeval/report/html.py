"""The building blocks of a report page: one HTML document with its CSS, data and script inline.

Nothing here refers to another file or host: a page opens from disk, from an S3 console
download or as a mail attachment with no network. Bars and tables are plain HTML and CSS,
so a page without matplotlib (and its plots) still shows every number.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
:root{--fg:#1d2330;--muted:#5f6b7a;--line:#dde2e8;--bg:#fff;--soft:#f5f7fa;--ok:#2e8540;
--bad:#c0392b;--bar:#4c78a8;--ci:#1d2330;--warn:#b7791f}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg);margin:0;padding:24px 32px;max-width:1280px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px;padding-top:8px;
border-top:1px solid var(--line)}h3{font-size:14px;margin:16px 0 6px}
.sub{color:var(--muted);margin:0 0 16px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}
dl.facts dt{color:var(--muted)}dl.facts dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:6px 0 10px}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600}td.num,th.num{text-align:right;white-space:nowrap;
font-variant-numeric:tabular-nums}
.bar{position:relative;width:260px;height:14px;background:var(--soft);border-radius:2px}
.bar .fill{position:absolute;top:2px;bottom:2px;left:0;background:var(--bar);border-radius:2px}
.bar .ci{position:absolute;top:6px;height:2px;background:var(--ci)}
.bar .ci:before,.bar .ci:after{content:"";position:absolute;top:-4px;height:10px;width:2px;
background:var(--ci)}.bar .ci:before{left:0}.bar .ci:after{right:0}
.bar .zero{position:absolute;top:0;bottom:0;left:50%;width:1px;background:var(--muted)}
.bar .fill.neg{background:var(--bad)}.bar .fill.pos{background:var(--ok)}
.note{color:var(--muted);font-size:13px}.warn{color:var(--warn)}
.grid{display:flex;flex-wrap:wrap;gap:12px 28px;align-items:flex-start}
.plot svg{max-width:100%;height:auto}
.verdict{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:600;
background:var(--soft)}.verdict.regression{background:#fbe3e0;color:var(--bad)}
.verdict.improvement{background:#e1f3e5;color:var(--ok)}
.status-error{color:var(--bad);font-weight:600}.status-ok{color:var(--ok)}
table.items{width:100%}.items td{max-width:420px}
.items pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;
font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;max-height:180px;
overflow:auto}.controls{display:flex;gap:10px;align-items:center;margin:8px 0}
.controls input{padding:4px 8px;width:320px}.controls select,.controls button{padding:3px 6px}
.heat td.cell{text-align:center;min-width:120px}
.heat td.cell small{display:block;color:#33404d}
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value (None shows as a dash)."""
    return "-" if value is None else html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: fixed digits for floats, thousands separators for ints."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def embed_json(value: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` at all.

    Escaping ``</`` alone is not enough: ``<!--`` followed by ``<script`` switches the HTML
    parser into a state where the real ``</script>`` no longer ends the block.
    """
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "") -> str:
    """A table of pre-rendered cells; headers starting with ``#`` are right-aligned numbers."""
    head = "".join(
        f'<th class="num">{esc(h[1:])}</th>' if h.startswith("#") else f"<th>{esc(h)}</th>"
        for h in headers
    )
    numeric = [h.startswith("#") for h in headers]
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if n else f"<td>{c}</td>"
            for c, n in zip(row, numeric, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(value: float, lo: float, hi: float) -> float:
    if hi <= lo:
        return 0.0
    return max(0.0, min(100.0, (value - lo) / (hi - lo) * 100.0))


def score_bar(
    mean: float | None, ci95: Sequence[float] | None, *, lo: float = 0.0, hi: float = 1.0
) -> str:
    """A horizontal bar for a mean in [lo, hi] with its 95% CI as a whisker."""
    if mean is None:
        return '<div class="bar"></div>'
    width = _pct(mean, lo, hi)
    out = f'<div class="bar" title="{fmt(mean)}"><div class="fill" style="width:{width:.2f}%">'
    out += "</div>"
    if ci95 and ci95[0] is not None and ci95[1] is not None:
        left = _pct(ci95[0], lo, hi)
        span = _pct(ci95[1], lo, hi) - left
        out += f'<div class="ci" style="left:{left:.2f}%;width:{span:.2f}%"></div>'
    return out + "</div>"


def delta_bar(delta: float | None, ci95: Sequence[float] | None, *, scale: float) -> str:
    """A bar centred on zero for a difference, with its CI; ``scale`` is the half width."""
    if delta is None:
        return '<div class="bar"></div>'
    scale = scale or 1.0
    lo, hi = -scale, scale
    zero = 50.0
    end = _pct(delta, lo, hi)
    left, width = (end, zero - end) if delta < 0 else (zero, end - zero)
    klass = "neg" if delta < 0 else "pos"
    out = (
        f'<div class="bar" title="{fmt(delta)}"><div class="zero"></div>'
        f'<div class="fill {klass}" style="left:{left:.2f}%;width:{width:.2f}%"></div>'
    )
    if ci95 and ci95[0] is not None and ci95[1] is not None:
        a, b = _pct(ci95[0], lo, hi), _pct(ci95[1], lo, hi)
        out += f'<div class="ci" style="left:{a:.2f}%;width:{b - a:.2f}%"></div>'
    return out + "</div>"


def count_bars(counts: Sequence[tuple[str, int]]) -> str:
    """A table of labelled counts with proportional bars (a histogram without plotting)."""
    top = max((c for _, c in counts), default=0) or 1
    rows = [(esc(label), fmt(count), score_bar(count / top, None)) for label, count in counts]
    return table(["", "#n", ""], rows)


def section(title: str, body: str, *, anchor: str = "") -> str:
    """A titled part of the page."""
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{body}</section>"


def facts(pairs: Iterable[tuple[str, str]]) -> str:
    """A definition list of (label, pre-rendered value)."""
    return (
        '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"
    )


def page(title: str, body: str, *, script: str = "", data: dict[str, Any] | None = None) -> str:
    """The whole document: CSS in ``<style>``, data in a JSON script tag, then the script."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        body,
    ]
    if data is not None:
        parts.append(f'<script type="application/json" id="data">{embed_json(data)}</script>')
    if script:
        parts.append(f"<script>{script}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)
