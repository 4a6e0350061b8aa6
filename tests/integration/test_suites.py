"""Suites end to end: the CLI against the project's test server and a real Prefect server.

Each test counts what the server answered: a complete cell sends nothing, an edited eval
sends only its changed items, a cell whose endpoint is down fails alone and its rerun sends
only what it misses, and two cells on one endpoint never exceed the smaller limit together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from shardeval.testing.server import TestServer
from shardeval.testing.server_stats import prompt_key
from tests.helpers.specs import arith_items, write_jsonl
from tests.helpers.suites import write_suite

pytestmark = pytest.mark.slow

IGNORED_COLUMNS = {"latency_s"}


def suite_record(output: Path) -> dict[str, Any]:
    (suite_dir,) = (output / "suites").iterdir()
    return dict(json.loads((suite_dir / "suite.json").read_text()))


def results(output: Path, run_id: str) -> list[dict[str, Any]]:
    table = pq.read_table(output / "runs" / run_id / "results.parquet")
    keep = [c for c in table.column_names if c not in IGNORED_COLUMNS]
    return list(table.select(keep).to_pylist())


def said(result: Any) -> str:
    return " ".join((result.stdout + result.stderr).split())


def test_every_cell_equals_its_spec_run_alone(
    run_cli: Any, llm_server: TestServer, tmp_path: Path
) -> None:
    models = [{"model": "model-a"}, {"model": "model-b", "concurrency": 4}]
    suite = write_suite(tmp_path / "s", evals=3, n_items=30, base_url=llm_server.url, models=models)
    result = run_cli("run", str(suite), "--quiet")
    assert result.returncode == 0, said(result)
    record = suite_record(tmp_path / "s" / "out")
    assert [c["status"] for c in record["cells"]] == ["complete"] * 6
    assert llm_server.stats()["completions"] == 6 * 30
    text = said(result)
    for label in ("e0", "e1", "e2", "model-a", "model-b", "exact_match", "n=30", "errors 0"):
        assert label in text, text
    summary = json.loads(
        (tmp_path / "s" / "out" / "suites" / record["suite_run_id"] / "summary.json").read_text()
    )
    assert summary["complete"] and len(summary["cells"]) == 6

    # Each cell alone: its spec with the model entry applied, run by `shardeval run`.
    for cell, stored in zip(record["cells"], summary["cells"], strict=True):
        spec_path = tmp_path / "s" / cell["spec"]
        spec = yaml.safe_load(spec_path.read_text())
        spec["model"].update(models[0] if cell["model"] == "model-a" else models[1])
        spec["output"] = str(tmp_path / "alone")
        alone = spec_path.with_name(f"alone-{cell['model']}.yaml")
        alone.write_text(yaml.safe_dump(spec))
        solo = run_cli("run", str(alone), "--quiet")
        assert solo.returncode == 0, said(solo)
        assert cell["run_id"] in said(solo)  # the same run id as the cell's
        assert results(tmp_path / "alone", cell["run_id"]) == results(
            tmp_path / "s" / "out", cell["run_id"]
        )
        metrics = json.loads(
            (tmp_path / "alone" / "runs" / cell["run_id"] / "metrics.json").read_text()
        )
        assert metrics["metrics"] == stored["metrics"]["metrics"]

    # The same suite again: answered from storage, no model call, no Prefect.
    llm_server.reset()
    again = run_cli("run", str(suite), "--quiet")
    assert again.returncode == 0, said(again)
    assert "answered from storage" in said(again)
    assert llm_server.stats()["requests"] == 0
    # Cells are ordinary runs: `status` works on them.
    status = run_cli(
        "status", record["cells"][0]["run_id"], "--output", str(tmp_path / "s" / "out"), "--json"
    )
    assert status.returncode == 0 and json.loads(status.stdout)["complete"], said(status)


def test_an_edited_spec_sends_only_its_changed_items(
    run_cli: Any, llm_server: TestServer, tmp_path: Path
) -> None:
    suite = write_suite(
        tmp_path,
        evals=2,
        n_items=20,
        base_url=llm_server.url,
        models=[{"model": "model-a"}, {"model": "model-b"}],
    )
    first = run_cli("run", str(suite), "--quiet")
    assert first.returncode == 0, said(first)

    items = arith_items(20, seed=1)
    for item in items[:3]:
        item["b"] += 1000
        item["answer"] = item["a"] + item["b"]
    write_jsonl(tmp_path / "evals" / "e1" / "items.jsonl", items)
    llm_server.reset()
    second = run_cli("run", str(suite), "--quiet")
    assert second.returncode == 0, said(second)

    stats = llm_server.stats()
    assert stats["requests"] == 2 * 3  # e1's three edited items, for each of the two models
    expected = {
        prompt_key(
            [
                {"role": "system", "content": "Answer with the number only."},
                {"role": "user", "content": f"What is {item['a']} + {item['b']}?"},
            ]
        )
        for item in items[:3]
    }
    assert set(stats["prompts"]) == expected
    assert all(c["status"] == "complete" for c in suite_record(tmp_path / "out")["cells"])


def test_a_cell_whose_endpoint_is_down_fails_alone_and_its_rerun_sends_only_it(
    run_cli: Any, llm_server: TestServer, second_server: TestServer, tmp_path: Path
) -> None:
    suite = write_suite(tmp_path, evals=3, n_items=20, base_url=llm_server.url)
    data = yaml.safe_load(suite.read_text())
    data["evals"][1] = {
        "path": data["evals"][1],
        "set": {"model": {"base_url": second_server.url, "max_retries": 0}},
    }
    suite.write_text(yaml.safe_dump(data, sort_keys=False))
    second_server.configure(down=True)

    first = run_cli("run", str(suite), "--quiet", SHARDEVAL_BATCH_RETRY_DELAYS="0.1")
    assert first.returncode == 1, said(first)
    message = said(first)
    assert "1 of 3 cells did not complete" in message and "e1 × test-model" in message, message
    cells = suite_record(tmp_path / "out")["cells"]
    assert [c["status"] for c in cells] == ["complete", "failed", "complete"]
    assert "could not finish" in cells[1]["error"]
    assert llm_server.stats()["completions"] == 2 * 20
    assert second_server.stats()["completions"] == 0

    second_server.configure(down=False)
    second_server.reset()
    llm_server.reset()
    rerun = run_cli("run", str(suite), "--quiet")
    assert rerun.returncode == 0, said(rerun)
    assert llm_server.stats()["requests"] == 0  # the complete cells sent nothing
    stats = second_server.stats()
    assert stats["completions"] == 20 and max(stats["prompt_completions"].values()) == 1
    assert [c["status"] for c in suite_record(tmp_path / "out")["cells"]] == ["complete"] * 3


def test_two_cells_on_one_endpoint_never_exceed_the_smaller_limit(
    run_cli: Any, llm_server: TestServer, tmp_path: Path
) -> None:
    """The limit is installed for the whole suite, so it holds whether or not the two cells
    overlap (a cell's Prefect start-up takes seconds on a loaded machine): model-b alone would
    send 8 at a time. Two engines truly overlapping are tested in test_endpoint_limits.py."""
    llm_server.configure(latency_min=0.05, latency_max=0.06)
    suite = write_suite(
        tmp_path,
        evals=1,
        n_items=200,
        base_url=llm_server.url,
        models=[{"model": "model-a", "concurrency": 4}, {"model": "model-b", "concurrency": 8}],
        parallel=2,
        spec_overrides={"batch_size": 20},
    )
    result = run_cli("run", str(suite), "--quiet")
    assert result.returncode == 0, said(result)
    stats = llm_server.stats()
    assert stats["completions"] == 400
    # model-b alone would have 8 in flight: the endpoint's limit held it to model-a's 4.
    assert stats["max_in_flight"] == 4, stats["max_in_flight"]
