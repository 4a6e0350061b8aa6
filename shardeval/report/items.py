"""The items table of a run's page: every row as compact JSON, filtered in the page.

Rows come failures first (error rows, then the lowest scores), so the first screen is what
needs reading. Long texts are cut to keep the page a few MB at 10,000 rows, and a run of more
than :data:`MAX_ROWS` rows embeds its first :data:`MAX_ROWS` in that order (chosen in Arrow,
so a million-row run never holds its rows as Python objects); the page says so, and
results.parquet keeps every row whole. The script is small vanilla JS: a text filter, a
status/score filter and "show more"; it only reads the embedded JSON (no network).
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

TEXT_BUDGET = 3_000_000
"""Characters of prompt/target/response text embedded in a page, in all."""
MIN_TEXT, MAX_TEXT = 160, 4000
PAGE_ROWS = 100
MAX_ROWS = 20_000
"""Rows embedded in a page at most (failures first): beyond, the page would be hundreds of
MB and its building the largest part of a million-row run's memory."""

SCRIPT = r"""
(function(){
var d=JSON.parse(document.getElementById('data').textContent),it=d.items;
if(!it)return;var rows=it.rows,cols=it.columns,ix={};cols.forEach(function(c,i){ix[c]=i;});
var body=document.getElementById('items-body'),q=document.getElementById('q'),
sel=document.getElementById('which'),more=document.getElementById('more'),
count=document.getElementById('count'),shown=0,hits=[];
function txt(v){return v===null||v===undefined?'':String(v);}
function cell(tag,text,cls){var e=document.createElement(tag);if(cls)e.className=cls;
e.textContent=text;return e;}
function pre(text){var td=document.createElement('td'),p=document.createElement('pre');
p.textContent=txt(text);td.appendChild(p);return td;}
function failing(r){if(r[ix.status]!=='ok')return true;var s=r[ix.min_score];
return s!==null&&s<1;}
function match(r,words,which){
if(which==='failures'&&!failing(r))return false;
if(which==='errors'&&r[ix.status]==='ok')return false;
if(which==='ok'&&r[ix.status]!=='ok')return false;
if(which==='passing'&&failing(r))return false;
if(!words.length)return true;var hay=(txt(r[ix.item_id])+' '+txt(r[ix.prompt])+' '+
txt(r[ix.target])+' '+txt(r[ix.response])+' '+txt(r[ix.error])).toLowerCase();
for(var i=0;i<words.length;i++){if(hay.indexOf(words[i])<0)return false;}return true;}
function render(reset){if(reset){body.textContent='';shown=0;}
var end=Math.min(hits.length,shown+%PAGE%);
for(var k=shown;k<end;k++){var r=hits[k],tr=document.createElement('tr');
tr.appendChild(cell('td',txt(r[ix.item_id])+(r[ix.trial]?' #'+r[ix.trial]:'')));
tr.appendChild(cell('td',r[ix.status]==='ok'?'ok':(r[ix.error_kind]||'error'),
r[ix.status]==='ok'?'status-ok':'status-error'));
tr.appendChild(cell('td',txt(r[ix.scores])));tr.appendChild(pre(r[ix.prompt]));
tr.appendChild(pre(r[ix.target]));
tr.appendChild(pre(r[ix.status]==='ok'?r[ix.response]:txt(r[ix.error])));
body.appendChild(tr);}
shown=end;count.textContent=hits.length+' of '+rows.length+' rows match; showing '+shown;
more.style.display=shown<hits.length?'':'none';}
function apply(){var words=q.value.toLowerCase().split(/\s+/).filter(Boolean),w=sel.value;
hits=rows.filter(function(r){return match(r,words,w);});render(true);}
q.addEventListener('input',apply);sel.addEventListener('change',apply);
more.addEventListener('click',function(){render(false);});apply();
})();
""".replace("%PAGE%", str(PAGE_ROWS))


def text_limit(n_rows: int) -> int:
    """Characters kept of each text field, so that all rows fit the page's text budget."""
    if n_rows <= 0:
        return MAX_TEXT
    return max(MIN_TEXT, min(MAX_TEXT, TEXT_BUDGET // (3 * n_rows)))


def _cut(text: Any, limit: int) -> tuple[str | None, bool]:
    if text is None:
        return None, False
    text = str(text)
    if len(text) <= limit:
        return text, False
    return text[:limit] + f" … [{len(text) - limit:,} more characters]", True


def items_data(results: pa.Table, max_rows: int = MAX_ROWS) -> tuple[dict[str, Any], int, int]:
    """(the items JSON, the per-field limit used, how many texts were cut)."""
    names = results.column_names
    score_cols = [c for c in names if c.startswith("score_")]
    target_cols = [c for c in names if c.startswith("target_")]
    if results.num_rows > max_rows:
        results = results.take(_first_rows(results, score_cols, max_rows))
    data = results.to_pydict()
    n = results.num_rows
    limit = text_limit(n)
    cut = 0
    rows = []
    for i in range(n):
        scores = {c[len("score_") :]: data[c][i] for c in score_cols if data[c][i] is not None}
        finite = [v for v in scores.values() if isinstance(v, float) and math.isfinite(v)]
        targets = [str(data[c][i]) for c in target_cols if data[c][i] is not None]
        texts = []
        for value in (
            data["prompt"][i] if "prompt" in data else None,
            " | ".join(dict.fromkeys(targets)) if targets else None,
            data["response"][i],
            data["error"][i],
        ):
            kept, was_cut = _cut(value, limit)
            cut += was_cut
            texts.append(kept)
        rows.append(
            [
                data["item_id"][i],
                data["trial"][i],
                data["item_index"][i],
                data["status"][i],
                data["error_kind"][i] if "error_kind" in data else None,
                min(finite) if finite else None,
                ", ".join(f"{k} {v:.3g}" for k, v in scores.items()),
                *texts,
            ]
        )
    # Failures first: errors, then the lowest scores, then dataset order.
    rows.sort(key=lambda r: (r[3] == "ok", 2.0 if r[5] is None else r[5], r[2], r[1] or 0))
    columns = [
        "item_id",
        "trial",
        "item_index",
        "status",
        "error_kind",
        "min_score",
        "scores",
        "prompt",
        "target",
        "response",
        "error",
    ]
    return {"columns": columns, "rows": rows}, limit, cut


def _first_rows(results: pa.Table, score_cols: list[str], count: int) -> pa.Array:
    """Indices of the first ``count`` rows in the page's order (see :func:`items_data`'s sort).

    The same key, computed on columns: ok rows after the others, then the lowest finite
    score (2.0 without one), then dataset order and trial.
    """
    finite = [
        pc.if_else(pc.is_finite(results.column(c)), results.column(c), None) for c in score_cols
    ]
    lowest = (
        pc.fill_null(pc.min_element_wise(*finite, skip_nulls=True), 2.0)
        if finite
        else pa.array([2.0] * results.num_rows)
    )
    trial = results.column("trial") if "trial" in results.column_names else pa.nulls(0)
    keys = pa.table(
        {
            "ok": pc.fill_null(pc.equal(results.column("status"), "ok"), False),
            "lowest": lowest,
            "index": results.column("item_index"),
            "trial": pc.fill_null(trial, 0) if len(trial) else pa.array([0] * results.num_rows),
        }
    )
    order = pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in keys.column_names])
    return order.slice(0, count)


def items_section_body(n_rows: int, limit: int, cut: int, has_prompt: bool) -> str:
    """The controls and the (script-filled) table."""
    notes = []
    if n_rows > MAX_ROWS:
        notes.append(
            f"This page holds the first {MAX_ROWS:,} of the run's {n_rows:,} rows (failures "
            "first); results.parquet holds every row."
        )
    if cut:
        notes.append(
            f"{cut:,} long texts are cut to {limit:,} characters here; "
            "results.parquet holds them whole."
        )
    if not has_prompt:
        notes.append("This run's results.parquet has no prompt column.")
    note = "".join(f'<p class="note">{n}</p>' for n in notes)
    return (
        '<div class="controls"><input id="q" type="search" placeholder="filter: words in id, '
        'prompt, target, response or error"><select id="which">'
        '<option value="all">all rows</option><option value="failures">failures '
        "(errors or score &lt; 1)</option>"
        '<option value="errors">errors</option><option value="ok">status ok</option>'
        '<option value="passing">passing</option></select>'
        '<span id="count" class="note"></span></div>'
        + note
        + '<table class="items"><thead><tr><th>item</th><th>status</th><th>scores</th>'
        "<th>prompt</th><th>target</th><th>response / error</th></tr></thead>"
        '<tbody id="items-body"></tbody></table><button id="more">show more</button>'
        '<noscript><p class="note">The items table needs JavaScript; '
        "results.parquet holds every row.</p></noscript>"
    )
