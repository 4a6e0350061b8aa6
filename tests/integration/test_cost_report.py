"""Cost and report.html end to end: the real CLI, the real HTTP test model, headless Chromium.

The expected cost is computed here from the token counts the test server reported (as
stored in results.parquet and the judge's batch files) times the spec's prices.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from shardeval.reporting import usd
from shardeval.testing.server import ServerConfig, TestServer
from tests.conftest import cli_env
from tests.helpers.html import chromium, console_problems, external_references, open_offline
from tests.helpers.specs import arith_items, write_spec

PRICE = {"prompt_per_mtok": 1500.0, "completion_per_mtok": 6000.0}  # big: cents mean something
JUDGE_PRICE = {"prompt_per_mtok": 500.0, "completion_per_mtok": 2000.0}
N_ITEMS = 60
BAD = (5, 23)  # answered with HTTP 400: error rows without token counts


@dataclass
class PricedRun:
    spec: Path
    output: Path
    run: Path
    server: TestServer
    first: subprocess.CompletedProcess[str]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``shardeval`` in a subprocess, in Prefect's default (temporary server) mode."""
    result = subprocess.run(
        [sys.executable, "-m", "shardeval", *args],
        env=cli_env(None, COLUMNS="250"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def edit_spec(spec: Path, change: Any) -> None:
    data = yaml.safe_load(spec.read_text())
    change(data)
    spec.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def priced_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PricedRun]:
    server = TestServer.start_in_thread(ServerConfig(latency_min=0.005, latency_max=0.01))
    try:
        directory = tmp_path_factory.mktemp("priced")
        items = arith_items(N_ITEMS, seed=3)
        for item in items:
            item["size"] = "small" if item["a"] < 300 else "large"
        for index in BAD:
            items[index]["a"] = f"[[status:400]] {items[index]['a']}"
        judge = {
            "type": "llm_judge",
            "name": "judge",
            "model": {
                "provider": "openai",
                "model": "judge-model",
                "base_url": server.url,
                "concurrency": 4,
                "max_retries": 1,
                "timeout_s": 10,
                "pricing": JUDGE_PRICE,
            },
            # The arith test model answers the sum it is asked for: a number as the "grade".
            "rubric": "Is {{ response }} right? What is {{ a }} + {{ b }}?",
            "grade_pattern": r"(-?\d+)",
            "max_grade": 2000,
        }
        spec = write_spec(
            directory,
            base_url=server.url,
            items=items,
            batch_size=20,
            model={"pricing": PRICE},
            metrics=[{"type": "exact_match", "target": "answer"}, judge],
            group_by=["size"],
        )
        output = directory / "runs"
        first = cli("run", str(spec), "--quiet")
        (run,) = sorted((output / "runs").iterdir())
        yield PricedRun(spec, output, run, server, first)
    finally:
        server.stop()


def expected_cost(table: pa.Table, price: dict[str, float]) -> float:
    """Σ tokens × price over the rows with token counts (by hand, not by shardeval)."""
    total = 0.0
    for row in table.select(["prompt_tokens", "completion_tokens"]).to_pylist():
        if row["prompt_tokens"] is None or row["completion_tokens"] is None:
            continue
        total += row["prompt_tokens"] * price["prompt_per_mtok"] / 1e6
        total += row["completion_tokens"] * price["completion_per_mtok"] / 1e6
    return total


def judge_rows(run: Path) -> pa.Table:
    tables = [pq.read_table(p) for p in sorted((run / "judges" / "judge" / "batches").glob("*"))]
    table = pa.concat_tables(tables)
    unique = pc.unique(table.column("item_key"))
    return table.take(pc.index_in(unique, value_set=table.column("item_key")))


@pytest.mark.slow
def test_report_opens_offline_in_chromium_without_console_errors(
    priced_run: PricedRun, tmp_path: Path
) -> None:
    page_path = priced_run.run / "report.html"
    page = page_path.read_text()
    assert external_references(page) == []
    assert len(page.encode()) < 1_000_000
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    opened = open_offline(page_path, shot, tmp_path / "profile")
    assert opened.returncode == 0, opened.stderr[-2000:]
    assert console_problems(opened.stderr) == []
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    keep = Path(__file__).resolve().parents[2] / ".report-screenshots"
    if keep.is_dir():  # `mkdir .report-screenshots` to look at the pictures yourself
        shutil.copy(shot, keep / "report-run.png")
    # The script ran: the items table was filled from the embedded data, failures first.
    dom = subprocess.run(
        [
            str(chromium()),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--dump-dom",
            page_path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = dom.split('<tbody id="items-body">', 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr>") == N_ITEMS  # fewer than one page: every row shown
    assert body.index("http_400") < body.index('class="status-ok"')


@pytest.mark.slow
def test_cost_is_tokens_times_price_and_a_rerun_saved_all_of_it(priced_run: PricedRun) -> None:
    run, spec, server = priced_run.run, priced_run.spec, priced_run.server
    metrics = json.loads((run / "metrics.json").read_text())
    results = pq.read_table(run / "results.parquet")
    cost = metrics["cost"]

    # Every row: its tokens × the spec's price; null (never 0) where tokens are unknown.
    for row in results.to_pylist():
        if row["prompt_tokens"] is None:
            assert row["status"] == "error" and row["cost_usd"] is None
        else:
            expected = (row["prompt_tokens"] * 1500 + row["completion_tokens"] * 6000) / 1e6
            assert row["cost_usd"] == pytest.approx(expected, abs=1e-12)
    model_usd = expected_cost(results, PRICE)
    judges = judge_rows(run)
    assert judges.num_rows == N_ITEMS - len(BAD)  # one judgement per ok row
    judge_usd = expected_cost(judges, JUDGE_PRICE)
    assert judge_usd > 0
    assert round(cost["usd"], 2) == round(model_usd + judge_usd, 2)
    assert cost["usd"] == pytest.approx(model_usd + judge_usd, abs=1e-6)
    assert cost["saved_usd"] == 0  # the first attempt sent everything
    assert (cost["priced"], cost["source"], cost["rows_without_tokens"]) == (True, "spec", 2)
    assert [p["what"] for p in cost["parts"]] == ["model", "judge:judge"]
    assert cost["parts"][0]["usd"] == pytest.approx(model_usd, abs=1e-6)
    assert cost["parts"][1]["usd"] == pytest.approx(judge_usd, abs=1e-6)
    assert f"cost: {usd(cost['usd'])}; price from spec" in priced_run.first.stdout
    assert metrics["report"] == str(run / "report.html")
    requests = server.stats()["requests"]

    # The same command again: answered from storage, the same cost, all of it saved.
    again = cli("run", str(spec))
    text = " ".join(again.stdout.split())
    assert f"cost: {usd(cost['usd'])} (saved {usd(cost['usd'])} by rows from storage)" in text

    # A new metric re-aggregates (no model call): metrics.json says the whole cost was saved.
    edit_spec(spec, lambda d: d["metrics"].append({"type": "includes", "target": "answer"}))
    cli("run", str(spec), "--quiet")
    rescored = json.loads((run / "metrics.json").read_text())["cost"]
    assert server.stats()["requests"] == requests
    assert rescored["usd"] == pytest.approx(cost["usd"], abs=1e-9)
    assert rescored["saved_usd"] == pytest.approx(rescored["usd"], abs=1e-9)

    # Without prices the test model is unknown: cost null everywhere, never $0.
    def unpriced(data: dict[str, Any]) -> None:
        data["model"].pop("pricing")
        data["metrics"] = data["metrics"][:1]  # drop the (priced) judge too

    edit_spec(spec, unpriced)
    plain = cli("run", str(spec))
    assert server.stats()["requests"] == requests
    after = json.loads((run / "metrics.json").read_text())["cost"]
    assert (after["usd"], after["saved_usd"], after["priced"]) == (None, None, False)
    assert pq.read_table(run / "results.parquet").column("cost_usd").null_count == N_ITEMS
    assert "cost unknown: no price for test-model" in " ".join(plain.stdout.split())
    assert "$0.00" not in plain.stdout


@pytest.mark.slow
def test_a_price_edit_alone_recomputes_the_cost_from_stored_tokens(
    run_cli: Any, llm_server: TestServer, tmp_path: Path
) -> None:
    """Prices are in no key: the same run, no request, and a cost at the new price."""
    spec = write_spec(tmp_path, base_url=llm_server.url, n_items=30, model={"pricing": PRICE})
    first = run_cli("run", str(spec), "-q")
    assert first.returncode == 0, first.stdout + first.stderr
    (run,) = (tmp_path / "runs" / "runs").iterdir()
    old = json.loads((run / "metrics.json").read_text())["cost"]
    assert old["usd"] == pytest.approx(expected_cost(pq.read_table(run / "results.parquet"), PRICE))

    new_price = {"prompt_per_mtok": 2500.0, "completion_per_mtok": 100.0}
    edit_spec(spec, lambda d: d["model"].update(pricing=new_price))
    llm_server.reset()
    again = run_cli("run", str(spec), "-q")
    assert again.returncode == 0, again.stdout + again.stderr
    assert llm_server.stats()["requests"] == 0  # nothing sent: every answer is stored
    assert [p.name for p in (tmp_path / "runs" / "runs").iterdir()] == [run.name]  # same run
    cost = json.loads((run / "metrics.json").read_text())["cost"]
    results = pq.read_table(run / "results.parquet")
    expected = expected_cost(results, new_price)  # the stored tokens × the new price
    assert round(expected, 2) != round(old["usd"], 2)
    assert round(cost["usd"], 2) == round(expected, 2)
    assert cost["usd"] == pytest.approx(expected, abs=1e-6)
    assert cost["saved_usd"] == pytest.approx(cost["usd"], abs=1e-9)  # all from storage
    assert cost["parts"][0]["price"]["prompt_per_mtok"] == new_price["prompt_per_mtok"]
    for row in results.select(["prompt_tokens", "completion_tokens", "cost_usd"]).to_pylist():
        by_hand = (row["prompt_tokens"] * 2500 + row["completion_tokens"] * 100) / 1e6
        assert row["cost_usd"] == pytest.approx(by_hand, abs=1e-12)

    # Now current: the next run is answered from storage.
    third = run_cli("run", str(spec), "-q")
    assert third.returncode == 0 and "answered from storage" in third.stderr, third.stderr
