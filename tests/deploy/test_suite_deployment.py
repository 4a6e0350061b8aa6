"""The `evaluate-suite-nightly` deployment on a real server and process worker.

A run completes with every cell as an `evaluate` subflow; a run whose one cell's endpoint is
down fails naming that cell, and retrying that same flow run through the API resumes it: the
complete cell comes back from storage (nothing sent), the failed one sends each item once.
Two nights with the deployment's ``baseline: previous``: each cell is compared with its own
model's night before, and only the regressed cell emits ``shardeval.regression.detected``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardeval.testing.server import TestServer
from tests.conftest import ROOT, cli_env
from tests.deploy.conftest import wait_final
from tests.helpers.suites import write_suite

pytestmark = pytest.mark.slow

DEPLOYMENT = "evaluate-suite/evaluate-suite-nightly"


@pytest.fixture(scope="session")
def suite_deployment(prefect_api: str, client: Any, work_pool: str) -> Any:
    """``prefect deploy`` of the nightly suite deployment from prefect.yaml."""
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name",
         "evaluate-suite-nightly", "--pool", work_pool],
        cwd=ROOT,
        env=cli_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "successfully created" in output, output[-3000:]
    return client.read_deployment_by_name(DEPLOYMENT)


def subflow_runs(client: Any, flow_run_id: Any) -> list[dict[str, Any]]:
    """The flow runs under a suite flow run (raw API: see tests/deploy/conftest.py)."""
    response = client.request(
        "POST",
        "/flow_runs/filter",
        json={
            "flow_runs": {"parent_flow_run_id": {"any_": [str(flow_run_id)]}},
            "limit": 50,
            "offset": 0,
            "sort": "ID_DESC",
        },
    )
    return list(response.json())


def event_runs(client: Any, name: str, run_ids: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The ``name`` events on the server about runs among ``run_ids``: (run id, payload)."""
    resources = [f"shardeval.run.{run_id}" for run_id in run_ids]
    body = {"filter": {"event": {"name": [name]}, "resource": {"id": resources}}, "limit": 50}
    found = client.request("POST", "/events/filter", json=body).json()["events"]
    return [(e["resource"]["prefect.resource.name"], e["payload"]) for e in found]


def suite_cells(output: Path) -> list[dict[str, Any]]:
    (suite_dir,) = (output / "suites").iterdir()
    return suite_cells_of(suite_dir)


def suite_cells_of(suite_dir: Path) -> list[dict[str, Any]]:
    return list(json.loads((suite_dir / "suite.json").read_text())["cells"])


def test_nightly_suite_deployment(suite_deployment: Any) -> None:
    assert suite_deployment.entrypoint == "flows/suite.py:evaluate_suite"
    assert suite_deployment.parameters == {"suite": "examples/suite.yaml", "baseline": "previous"}
    (schedule,) = suite_deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"


def test_a_suite_run_completes_with_cells_as_subflows(
    worker: Path,
    suite_deployment: Any,
    client: Any,
    use_server: str,
    llm_server: TestServer,
    tmp_path: Path,
) -> None:
    from prefect.deployments import run_deployment

    suite = write_suite(
        tmp_path, evals=2, n_items=20, base_url=llm_server.url,
        models=[{"model": "model-a"}, {"model": "model-b"}],
    )  # fmt: skip
    output = tmp_path / "out"
    flow_run = run_deployment(
        DEPLOYMENT, parameters={"suite": str(suite), "output": str(output)}, timeout=0
    )
    flow_run = wait_final(client, flow_run.id)
    assert flow_run.state.is_completed(), (flow_run.state, worker.read_text()[-3000:])
    assert flow_run.name == "suite · nightly"

    cells = suite_cells(output)
    assert [c["status"] for c in cells] == ["complete"] * 4
    # A deployment run: each cell's run id carries the flow run's id (a new run per night).
    assert all(c["run_id"].endswith(str(flow_run.id)[:8]) for c in cells)
    subflows = subflow_runs(client, flow_run.id)
    assert sorted(f["name"] for f in subflows) == sorted(
        f"{e} · {m}" for e in ("e0", "e1") for m in ("model-a", "model-b")
    )
    assert {f["state"]["type"] for f in subflows} == {"COMPLETED"}
    assert llm_server.stats()["completions"] == 4 * 20


def test_a_failed_suite_run_retried_through_the_api_resumes(
    worker: Path,
    suite_deployment: Any,
    client: Any,
    use_server: str,
    llm_server: TestServer,
    second_server: TestServer,
    tmp_path: Path,
) -> None:
    from prefect.deployments import run_deployment
    from prefect.states import Scheduled

    suite = write_suite(tmp_path, evals=2, n_items=20, base_url=llm_server.url)
    data = yaml.safe_load(suite.read_text())
    data["evals"][1] = {
        "path": data["evals"][1],
        "set": {"model": {"base_url": second_server.url, "max_retries": 0}},
    }
    suite.write_text(yaml.safe_dump(data, sort_keys=False))
    output = tmp_path / "out"
    second_server.configure(down=True)

    flow_run = run_deployment(
        DEPLOYMENT, parameters={"suite": str(suite), "output": str(output)}, timeout=0
    )
    failed = wait_final(client, flow_run.id)
    assert failed.state.is_failed(), (failed.state, worker.read_text()[-3000:])
    message = failed.state.message or ""
    assert "1 of 2 cells did not complete" in message and "e1 × test-model" in message, message
    before = suite_cells(output)
    assert [c["status"] for c in before] == ["complete", "failed"]
    assert llm_server.stats()["completions"] == 20

    second_server.configure(down=False)
    second_server.reset()
    llm_server.reset()
    result = client.set_flow_run_state(
        flow_run.id, Scheduled(message="Retried via the API"), force=True
    )
    assert result.status.value == "ACCEPT", result
    retried = wait_final(client, flow_run.id, run_count=2)
    assert retried.state.is_completed(), (retried.state, worker.read_text()[-3000:])

    after = suite_cells(output)  # the same suite run: one suite directory, same run ids
    assert [c["run_id"] for c in after] == [c["run_id"] for c in before]
    assert [c["status"] for c in after] == ["complete", "complete"]
    assert llm_server.stats()["requests"] == 0  # the complete cell came back from storage
    stats = second_server.stats()
    assert stats["completions"] == 20 and max(stats["prompt_completions"].values()) == 1


def test_nightly_suite_runs_compare_each_cell_with_its_own_night_before(
    worker: Path,
    suite_deployment: Any,
    client: Any,
    use_server: str,
    llm_server: TestServer,
    second_server: TestServer,
    tmp_path: Path,
) -> None:
    """model-a's endpoint regresses on known items on night 2, model-b's does not."""
    import time

    from prefect.deployments import run_deployment

    models = [
        {"model": "model-a", "base_url": llm_server.url},
        {"model": "model-b", "base_url": second_server.url},
    ]
    suite = write_suite(tmp_path, evals=1, n_items=120, base_url=llm_server.url, models=models)
    output = tmp_path / "out"
    nights: list[dict[str, dict[str, Any]]] = []
    for wrong_every in (10, 3):
        llm_server.configure(wrong_every=wrong_every)
        flow_run = run_deployment(  # baseline: previous, from the deployment's parameters
            DEPLOYMENT, parameters={"suite": str(suite), "output": str(output)}, timeout=0
        )
        done = wait_final(client, flow_run.id)
        assert done.state.is_completed(), (done.state, worker.read_text()[-3000:])
        suffix = str(flow_run.id)[:8]
        (suite_dir,) = [
            d
            for d in (output / "suites").iterdir()
            if all(c["run_id"].endswith(suffix) for c in suite_cells_of(d))
        ]
        summary = json.loads((suite_dir / "summary.json").read_text())
        nights.append({c["model"]: c for c in summary["cells"]})
    first, second = nights
    assert {c["verdict"] for c in first.values()} == {"no baseline"}
    a, b = second["model-a"], second["model-b"]
    assert (a["baseline"], a["verdict"]) == (first["model-a"]["run_id"], "regression")
    assert (b["baseline"], b["verdict"]) == (first["model-b"]["run_id"], "inconclusive")
    for cell in (a, b):
        stored = json.loads((output / "runs" / cell["run_id"] / "comparison.json").read_text())
        assert stored["base"] == cell["baseline"]

    night_runs = [c["run_id"] for night in nights for c in night.values()]
    deadline = time.monotonic() + 60
    while True:  # events reach the server asynchronously: wait for all four
        regressed = event_runs(client, "shardeval.regression.detected", night_runs)
        completed = event_runs(client, "shardeval.run.completed", night_runs)
        if len(regressed) + len(completed) >= len(night_runs):
            break
        assert time.monotonic() < deadline, (regressed, completed)
        time.sleep(0.5)
    # One event per cell: the regression for model-a's second night, completed otherwise
    # (the first night has no baseline yet).
    assert [run_id for run_id, _ in regressed] == [a["run_id"]]
    expected = [b["run_id"], *(c["run_id"] for c in first.values())]
    assert sorted(run_id for run_id, _ in completed) == sorted(expected)
    ((_, payload),) = regressed
    assert (payload["eval"], payload["model"], payload["metric"]) == (
        "e0",
        "model-a",
        "exact_match",
    )
    assert payload["base"] == a["baseline"] and payload["delta"] < 0
    assert dict(completed)[b["run_id"]]["verdict"] == "inconclusive"
