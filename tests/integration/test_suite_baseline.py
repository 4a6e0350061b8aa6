"""``shardeval run SUITE --baseline previous``: every cell against its own earlier run.

Two nights of one suite (one eval × models ``model-a`` and ``model-b``, each on its own test
server, so each model's answers change on their own). Night 2 edits the system prompt (a new
run for every cell; the test server answers from the user message, so the answers change only
where a server was reconfigured) and adds ``model-c``. ``model-a``'s server gets worse on
known items (``wrong_every`` 10 → 3), ``model-b``'s does not change, ``model-c`` has no earlier
run. Which items flip is computed here, independently of shardeval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardeval.testing.server import TestServer
from tests.helpers.specs import arith_items
from tests.helpers.suites import write_suite
from tests.integration.test_compare import expected_flips

pytestmark = pytest.mark.slow

N_ITEMS = 120


def said(result: Any) -> str:
    return " ".join((result.stdout + result.stderr).split())


def summary_cells(output: Path, suite_run_id: str) -> dict[str, dict[str, Any]]:
    summary = json.loads((output / "suites" / suite_run_id / "summary.json").read_text())
    return {c["model"]: c for c in summary["cells"]}


def suite_run_ids(output: Path) -> set[str]:
    return {p.name for p in (output / "suites").iterdir()}


def test_each_cell_is_compared_with_its_own_models_earlier_run(
    run_cli: Any, llm_server: TestServer, second_server: TestServer, tmp_path: Path
) -> None:
    models = [
        {"model": "model-a", "base_url": llm_server.url},
        {"model": "model-b", "base_url": second_server.url},
    ]
    suite = write_suite(tmp_path, evals=1, n_items=N_ITEMS, base_url=llm_server.url, models=models)
    output = tmp_path / "out"
    second_server.configure(wrong_every=3)  # model-b is worse than model-a on both nights

    night1 = run_cli("run", str(suite), "--baseline", "previous", "--fail-on-regression", "-q")
    assert night1.returncode == 0, said(night1)
    assert "no baseline" in night1.stdout
    (first_id,) = suite_run_ids(output)
    first = summary_cells(output, first_id)
    assert {c["verdict"] for c in first.values()} == {"no baseline"}
    assert all(c["status"] == "complete" and c["baseline"] is None for c in first.values())
    assert not any(
        (output / "runs" / c["run_id"] / "comparison.json").exists() for c in first.values()
    )

    # Night 2: a prompt edit (new runs), model-a's endpoint regresses, and a new model.
    data = yaml.safe_load(suite.read_text())
    data["evals"] = [
        {"path": data["evals"][0], "set": {"prompt": {"system": "Reply with a number."}}}
    ]
    data["models"].append({"model": "model-c", "base_url": llm_server.url})
    suite.write_text(yaml.safe_dump(data, sort_keys=False))
    llm_server.configure(wrong_every=3)
    night2 = run_cli(
        "run", str(suite), "--baseline", "previous", "--fail-on-regression", "-q", COLUMNS="200"
    )
    assert night2.returncode == 3, said(night2)
    text = said(night2)
    assert "quality gate failed: 1 of 3 cells regressed" in text and "e0 × model-a" in text, text
    for shown in ("regression", "inconclusive", "no baseline", "Δ "):
        assert shown in night2.stdout, night2.stdout
    (second_id,) = suite_run_ids(output) - {first_id}
    second = summary_cells(output, second_id)

    broken, fixed = expected_flips(arith_items(N_ITEMS, seed=0))
    a, b, c = second["model-a"], second["model-b"], second["model-c"]
    # Each cell's baseline is its own model's night-1 run, not the other model's.
    assert (a["baseline"], b["baseline"], c["baseline"]) == (
        first["model-a"]["run_id"],
        first["model-b"]["run_id"],
        None,
    )
    assert (a["verdict"], b["verdict"], c["verdict"]) == (
        "regression",
        "inconclusive",
        "no baseline",
    )
    assert a["regressed"] == ["exact_match"] and b["regressed"] == []
    assert a["delta"] == pytest.approx((len(fixed) - len(broken)) / N_ITEMS, abs=1e-6)
    assert b["delta"] == 0.0
    assert all(cell["status"] == "complete" for cell in second.values())  # no baseline ≠ failure

    stored_a = json.loads((output / "runs" / a["run_id"] / "comparison.json").read_text())
    metric = stored_a["metrics"]["exact_match"]
    assert (stored_a["base"], metric["broken"], metric["fixed"]) == (
        a["baseline"],
        len(broken),
        len(fixed),
    )
    assert {f["item_id"] for f in stored_a["flips"]["exact_match"]["broken"]} == broken
    stored_b = json.loads((output / "runs" / b["run_id"] / "comparison.json").read_text())
    assert (stored_b["base"], stored_b["metrics"]["exact_match"]["broken"]) == (b["baseline"], 0)
    assert not (output / "runs" / c["run_id"] / "comparison.json").exists()
    assert a["comparison"].endswith(f"{a['run_id']}/comparison.json")
    record = json.loads((output / "suites" / second_id / "suite.json").read_text())
    assert record["baseline"] == "previous"
    assert [cell["verdict"] for cell in record["cells"]] == [
        "regression",
        "inconclusive",
        "no baseline",
    ]
    page = (output / "suites" / second_id / "report.html").read_text()
    assert "regression" in page and "no baseline" in page

    # The same command again: every cell answered from storage (no Prefect, no model call),
    # compared again, the same verdicts and the same gate.
    llm_server.reset()
    second_server.reset()
    again = run_cli("run", str(suite), "--baseline", "previous", "--fail-on-regression", "-q")
    assert again.returncode == 3, said(again)
    assert "answered from storage" in said(again)
    assert llm_server.stats()["requests"] == 0 and second_server.stats()["requests"] == 0
    assert {k: v["verdict"] for k, v in summary_cells(output, second_id).items()} == {
        "model-a": "regression",
        "model-b": "inconclusive",
        "model-c": "no baseline",
    }
    # Without the gate the regression is reported and the run succeeds.
    ungated = run_cli("run", str(suite), "--baseline", "previous", "-q")
    assert ungated.returncode == 0, said(ungated)
    assert "regression: e0 × model-a" in said(ungated)
