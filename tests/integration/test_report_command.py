"""``shardeval report``: writes the run's page or another file; clear errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from shardeval.storage import RunStore
from tests.conftest import cli_env
from tests.helpers.html import external_references
from tests.unit.test_report import embedded_items, metrics_json, results_table

RUN_ID = "arith-0123456789"


def report_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardeval", "report", *args],
        env=cli_env(None, COLUMNS="250"),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def stored_run(tmp_path: Path) -> RunStore:
    """A finished run's files, written through the store (as finalizing writes them)."""
    store = RunStore(str(tmp_path / "out"), RUN_ID)
    store.write_table(store.results_path, results_table(40))
    store.write_json(store.spec_path, {"spec": {"prompt": {"user": "What is {{ a }}?"}}})
    store.write_json(store.metrics_path, metrics_json(40))
    return store


@pytest.mark.slow
def test_report_writes_the_runs_page_and_prints_where(stored_run: RunStore, tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    result = report_cli(RUN_ID, "--output", output)
    assert result.returncode == 0, result.stderr
    page = Path(stored_run.path("report.html"))
    assert result.stdout.strip() == str(page)
    assert external_references(page.read_text()) == []
    elsewhere = tmp_path / "mail" / "arith.html"
    result = report_cli(RUN_ID, "--output", output, "-o", str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(elsewhere)
    copy = elsewhere.read_text()
    assert embedded_items(copy) == embedded_items(page.read_text())  # the same run's page
    assert f'<a href="{Path(stored_run.spec_path).as_uri()}">spec.json</a>' in copy


@pytest.mark.slow
def test_unknown_run_exits_2_listing_the_runs_there(stored_run: RunStore, tmp_path: Path) -> None:
    result = report_cli("arith-012345678", "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    text = " ".join(result.stderr.split())
    assert "no run 'arith-012345678' under" in text
    assert f"closest runs stored there: {RUN_ID}" in text
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_unfinished_run_exits_2_saying_how_to_finish_it(
    stored_run: RunStore, tmp_path: Path
) -> None:
    Path(stored_run.metrics_path).unlink()
    result = report_cli(RUN_ID, "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    text = " ".join(result.stderr.split())
    assert f"run '{RUN_ID}' is not complete: no metrics.json" in text
    assert f"shardeval status {RUN_ID}" in text
    assert not Path(stored_run.path("report.html")).exists()


@pytest.mark.slow
def test_compare_adds_deltas_and_broken_items_side_by_side(
    stored_run: RunStore, tmp_path: Path
) -> None:
    output = str(tmp_path / "out")
    cand = RunStore(output, "arith-candidate")
    table = results_table(40)
    scores = table.column("score_exact_match").to_pylist()
    responses = table.column("response").to_pylist()
    for i in (1, 2, 3, 4):  # right in the base run, wrong in the candidate
        scores[i], responses[i] = 0.0, f"candidate's wrong answer {i}"
    table = table.set_column(
        table.column_names.index("score_exact_match"), "score_exact_match", pa.array(scores)
    ).set_column(table.column_names.index("response"), "response", pa.array(responses))
    cand.write_table(cand.results_path, table)
    cand.write_json(cand.spec_path, {"spec": {}})
    cand.write_json(cand.metrics_path, {**metrics_json(40), "run_id": "arith-candidate"})
    result = report_cli("arith-candidate", "--output", output, "--compare", RUN_ID)
    assert result.returncode == 0, result.stderr
    page = Path(cand.path("report.html")).read_text()
    assert "<h2>Comparison</h2>" in page
    assert f"base <code>{RUN_ID}</code>" in page and "Broken items (4)" in page
    assert "candidate&#x27;s wrong answer 3" in page and "What is 3 + 1?" in page
    assert external_references(page) == []
