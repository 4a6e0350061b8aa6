"""report.html pages built from data: self-contained, bounded in size, failures first."""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from shardeval.report import (
    build_comparison_report,
    build_run_report,
    build_suite_report,
    plots,
    write_run_report,
)
from shardeval.storage import RunStore
from tests.helpers.html import external_references


def results_table(n: int, *, long_text: int = 0, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {
        k: []
        for k in (
            "item_id",
            "item_index",
            "trial",
            "status",
            "error",
            "response",
            "latency_s",
            "prompt_tokens",
            "completion_tokens",
            "error_kind",
            "http_status",
            "finish_reason",
            "item_key",
            "cost_usd",
            "prompt",
            "target_exact_match",
            "score_exact_match",
        )
    }
    for i in range(n):
        error = i % 50 == 7
        rows["item_id"].append(f"q{i:05d}")
        rows["item_index"].append(i)
        rows["trial"].append(0)
        rows["status"].append("error" if error else "ok")
        rows["error"].append("HTTP 400: bad request <script>alert(1)</script>" if error else None)
        rows["response"].append(None if error else str(i) + "x" * long_text)
        rows["latency_s"].append(rng.uniform(0.01, 0.3))
        rows["prompt_tokens"].append(None if error else rng.randint(10, 40))
        rows["completion_tokens"].append(None if error else rng.randint(1, 8))
        rows["error_kind"].append("http_400" if error else None)
        rows["http_status"].append(400 if error else 200)
        rows["finish_reason"].append(None if error else "stop")
        rows["item_key"].append(f"k{i}")
        rows["cost_usd"].append(None if error else 1e-5)
        rows["prompt"].append(f"What is {i} + 1?")
        rows["target_exact_match"].append(str(i + 1))
        rows["score_exact_match"].append(None if error else float(i % 9 != 0))
    return pa.table(rows)


def metrics_json(n: int) -> dict[str, Any]:
    return {
        "run_id": "arith-0123456789",
        "name": "arith",
        "complete": True,
        "n_items": n,
        "n_rows": n,
        "n_ok": n - n // 50,
        "n_error": n // 50,
        "trials": 1,
        "metrics": {
            "exact_match": {
                "mean": 0.88,
                "n": n,
                "stderr": 0.01,
                "ci95": [0.86, 0.90],
                "ci_method": "bootstrap",
            }
        },
        "errors_by_kind": {"http_400": n // 50},
        "scoring_errors": {},
        "usage": {"prompt_tokens": 100, "completion_tokens": 10},
        "model": {"provider": "openai", "model": "gpt-4o-mini", "revision": "ckpt-7"},
        "dataset": {"path": "/data/items.jsonl", "fingerprint": "abc123"},
        "group_by": ["level"],
        "by_group": {
            "easy": {
                "n_rows": 5,
                "n_ok": 5,
                "metrics": {"exact_match": {"mean": 0.9, "ci95": [0.8, 1.0], "n": 5}},
            },
            "hard": {
                "n_rows": 5,
                "n_ok": 4,
                "metrics": {"exact_match": {"mean": 0.5, "ci95": [0.2, 0.8], "n": 4}},
            },
        },
        "cost": {
            "usd": 0.0123,
            "saved_usd": 0.004,
            "priced": True,
            "source": "spec",
            "model": "gpt-4o-mini",
            "unpriced": [],
            "parts": [],
        },
        "started_at": "2026-12-01T10:00:00+00:00",
        "finished_at": "2026-12-01T10:03:00+00:00",
        "shardeval_version": "0.1.0",
    }


def embedded_items(page: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))["items"]  # type: ignore[no-any-return]


def test_run_page_is_self_contained_and_failures_come_first() -> None:
    page = build_run_report(
        results_table(200), metrics_json(200), {"spec": {"prompt": {"user": "What is {{ a }}?"}}}
    )
    assert external_references(page) == []
    for heading in (
        "What was evaluated",
        "Metrics",
        "By group",
        "Distributions",
        "Errors",
        "Cost",
        "Items (failures first)",
    ):
        assert f"<h2>{heading}</h2>" in page
    assert "gpt-4o-mini" in page and "ckpt-7" in page and "abc123" in page
    assert "$0.01" in page and "3.0 min" in page
    assert "<script>alert(1)" not in page  # row text is data, never markup
    items = embedded_items(page)
    status = items["columns"].index("status")
    score = items["columns"].index("min_score")
    statuses = [r[status] for r in items["rows"]]
    n_error = statuses.count("error")
    assert n_error == 4 and statuses[:n_error] == ["error"] * n_error
    after = [r[score] for r in items["rows"][n_error:]]
    assert after == sorted(after)  # then the lowest scores
    assert plots.available()
    assert page.count("<svg") >= 3  # score distribution, latency, tokens


def test_same_data_gives_the_same_page() -> None:
    table, summary = results_table(300), metrics_json(300)
    assert build_run_report(table, summary, None) == build_run_report(table, summary, None)


def test_ten_thousand_rows_with_long_responses_stay_a_few_megabytes() -> None:
    table = results_table(10_000, long_text=5_000)
    started = time.perf_counter()
    page = build_run_report(table.to_pandas(), metrics_json(10_000), None)
    elapsed = time.perf_counter() - started
    size = len(page.encode("utf-8"))
    print(f"10,000 rows with 5,000-character responses: {size / 1e6:.2f} MB in {elapsed:.1f} s")
    assert size < 5_000_000
    assert "long texts are cut to" in page
    items = embedded_items(page)
    assert len(items["rows"]) == 10_000  # every row is there, only texts are cut


def test_without_matplotlib_the_page_has_bars_and_says_how_to_get_plots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    plots.available.cache_clear()
    try:
        page = build_run_report(results_table(100), metrics_json(100), None)
    finally:
        plots.available.cache_clear()
    assert "<svg" not in page
    assert "pip install &#x27;shardeval[report]&#x27;" in page
    assert 'class="bar"' in page and "latency (s)" in page
    assert external_references(page) == []


def comparison() -> dict[str, Any]:
    return {
        "base": "run-a",
        "cand": "run-b",
        "n_aligned": 200,
        "only_base": 0,
        "only_cand": 0,
        "metrics": {
            "exact_match": {
                "base": 0.91,
                "cand": 0.88,
                "delta": -0.03,
                "se": 0.009,
                "ci95": [-0.048, -0.012],
                "p": 0.0011,
                "p_adjusted": 0.0011,
                "test": "mcnemar",
                "fixed": 2,
                "broken": 3,
                "verdict": "regression",
            }
        },
        "flips": [
            {"item_id": "q00009", "trial": 0, "metric": "exact_match", "kind": "broken"},
            {"item_id": "q00001", "trial": 0, "metric": "exact_match", "kind": "fixed"},
        ],
    }


def test_comparison_page_has_deltas_flips_and_broken_items_side_by_side() -> None:
    base = results_table(200)
    cand = base.set_column(
        base.column_names.index("response"),
        "response",
        pa.array(["cand says " + str(i) for i in range(200)]),
    )
    page = build_comparison_report(comparison(), base, cand)
    assert external_references(page) == []
    assert '<span class="verdict regression">regression</span>' in page
    assert "-0.0300" in page and "[-0.0480, -0.0120]" in page and "mcnemar" in page
    assert "Broken items (1)" in page and "cand says 9" in page and "What is 9 + 1?" in page
    assert "cand pass" in page


def test_comparison_without_results_shows_the_counts_it_has() -> None:
    page = build_comparison_report(comparison())
    assert "<b>3</b> broken" in page and "<b>2</b> fixed" in page


def test_run_page_can_carry_a_comparison() -> None:
    page = build_run_report(results_table(50), metrics_json(50), None, comparison())
    assert "<h2>Comparison</h2>" in page


def test_suite_page_heat_map_and_history() -> None:
    cells = [
        {
            "eval": e,
            "model": m,
            "run_id": f"{e}-{m}",
            "status": "complete",
            "metrics": {"exact_match": {"mean": mean, "ci95": [mean - 0.05, mean + 0.05]}},
        }
        for e, m, mean in [
            ("arith", "gpt-4o-mini", 0.91),
            ("arith", "gpt-4o", 0.97),
            ("qa", "gpt-4o-mini", 0.42),
        ]
    ] + [{"eval": "qa", "model": "gpt-4o", "run_id": "qa-x", "status": "failed"}]
    history = [
        {
            "eval": "arith",
            "model": "gpt-4o",
            "metric": "exact_match",
            "points": [
                {
                    "run_id": f"r{i}",
                    "finished_at": f"2026-11-{i + 10}",
                    "mean": 0.9 + i / 100,
                    "ci95": [0.88, 0.95],
                }
                for i in range(5)
            ],
        }
    ]
    page = build_suite_report(
        {"suite": "nightly", "suite_run_id": "nightly-1", "cells": cells}, history
    )
    assert external_references(page) == []
    assert "0.910" in page and "[0.860, 0.960]" in page and "failed" in page
    assert "hsl(" in page and "<h2>History</h2>" in page and "<svg" in page
    assert build_suite_report(cells).count("<table") >= 2  # a plain list of cells works too


def test_write_run_report_through_the_store(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path), "arith-0123456789")
    table = results_table(30)
    store.write_table(store.results_path, table)
    store.write_json(store.metrics_path, metrics_json(30))
    where = write_run_report(store)
    assert where == str(tmp_path / "runs" / "arith-0123456789" / "report.html")
    assert "arith-0123456789" in Path(where).read_text()
    elsewhere = write_run_report(store, target=str(tmp_path / "out" / "page.html"))
    assert '<a href="spec.json">' in Path(where).read_text()
    copy = Path(elsewhere).read_text()
    assert f'<a href="{Path(store.spec_path).as_uri()}">' in copy  # the link still works
    assert external_references(copy) == []
    assert not list((tmp_path / "out").glob(".page.html.*"))  # no temporary left behind


def test_a_long_run_embeds_its_first_rows_in_the_page_order() -> None:
    """Capping the embedded rows keeps exactly the first rows of the uncapped order."""
    from shardeval.report.items import items_data

    rng = random.Random(3)
    n = 600
    statuses = [rng.choice(["ok", "ok", "ok", "error"]) for _ in range(n)]
    score = [
        None if s != "ok" else rng.choice([0.0, 0.5, 1.0, float("nan"), None]) for s in statuses
    ]
    other = [None if s != "ok" else rng.choice([0.0, 1.0, float("inf")]) for s in statuses]
    results = pa.table(
        {
            "item_id": [f"q{i // 2}" for i in range(n)],
            "item_index": [i // 2 for i in range(n)],
            "trial": [i % 2 for i in range(n)],
            "status": statuses,
            "error_kind": [None if s == "ok" else "http_400" for s in statuses],
            "error": [None if s == "ok" else "bad" for s in statuses],
            "response": ["r"] * n,
            "score_a": pa.array(score, pa.float64()),
            "score_b": pa.array(other, pa.float64()),
        }
    )
    whole, _, _ = items_data(results, max_rows=n)
    capped, _, _ = items_data(results, max_rows=50)
    assert len(capped["rows"]) == 50
    assert [r[:7] for r in capped["rows"]] == [r[:7] for r in whole["rows"][:50]]
