"""The `evaluate` deployment on a real server and worker: a run, then a failed run retried.

The worker runs flow runs in subprocesses of its own; the model is the ``llm_server`` fixture
in this pytest process, on 127.0.0.1, which they reach by its URL in the spec.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.deploy.conftest import task_runs, wait_final
from tests.helpers.specs import write_spec

pytestmark = pytest.mark.slow


def test_deployment_from_prefect_yaml(deployment: Any) -> None:
    """What `prefect deploy` recorded: the entrypoint, a pull step to this clone, parameters."""
    assert deployment.entrypoint == "flows/evaluate.py:evaluate"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    assert deployment.parameters == {"spec": "examples/quickstart.yaml"}
    assert "Retrying a failed flow run resumes it" in (deployment.description or "")
    assert not deployment.schedules  # the nightly schedule is on evaluate-nightly only
    schema = deployment.parameter_openapi_schema["properties"]
    assert {"spec", "output", "run_id", "task_runner", "dask_address"} <= set(schema)


def test_run_completes_with_artifacts(
    worker: Path, client: Any, use_server: str, llm_server: Any, tmp_path: Path
) -> None:
    from prefect.client.schemas.objects import Artifact
    from prefect.deployments import run_deployment

    spec = write_spec(tmp_path / "eval", base_url=llm_server.url, n_items=40)
    output = tmp_path / "out"
    flow_run = run_deployment(
        "evaluate/evaluate",
        parameters={"spec": str(spec), "output": str(output), "run_id": "nightly-1"},
        timeout=0,
    )
    flow_run = wait_final(client, flow_run.id)
    assert flow_run.state.is_completed(), (flow_run.state, worker.read_text()[-3000:])
    assert flow_run.name == "arith · test-model"

    metrics = json.loads((output / "runs" / "nightly-1" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["n_rows"] == 40 and metrics["n_error"] == 0
    assert llm_server.stats()["completions"] == 40

    names = sorted(t.name for t in task_runs(client, flow_run.id) if t.name.startswith("batch"))
    assert names == sorted(f"batch {i}/4" for i in range(1, 5))

    # Not client.read_artifacts: it sends nulls that this server refuses (see conftest), and
    # an empty task-run filter would keep only artifacts made inside a task.
    response = client.request(
        "POST",
        "/artifacts/filter",
        json={
            "artifacts": {"flow_run_id": {"any_": [str(flow_run.id)]}},
            "limit": 50,
            "offset": 0,
            "sort": "KEY_ASC",
        },
    )
    artifacts = [Artifact.model_validate(a) for a in response.json()]
    by_type = {a.type: a for a in artifacts}
    assert {"progress", "table", "markdown"} <= set(by_type), artifacts
    assert float(by_type["progress"].data) == 100.0
    assert by_type["progress"].key == "nightly-1-progress"
    assert "4 of 4 batches" in by_type["progress"].description
    summary = by_type["markdown"].data
    for expected in (
        "**40 ok**",
        "errors by kind",
        "tokens:",
        "rows from the cache",
        "results.parquet",
        "metrics.json",
    ):
        assert expected in summary, summary


def test_failed_run_retried_through_the_api_resumes(
    worker: Path, client: Any, use_server: str, llm_server: Any, tmp_path: Path
) -> None:
    """The model goes down midway: the flow run fails naming its batches; retrying that same
    flow run (what the UI and `prefect flow-run retry` do) resumes it: the batches that had
    finished come back Cached and no finished item is sent again."""
    from prefect.deployments import run_deployment
    from prefect.states import Scheduled

    n_items = 80
    llm_server.configure(latency_min=0.04, latency_max=0.06)
    spec = write_spec(
        tmp_path / "eval",
        base_url=llm_server.url,
        n_items=n_items,
        model={"concurrency": 2, "max_retries": 0},
    )
    output = tmp_path / "out"

    # Take the model down once about a third of the items are answered.
    stop = threading.Event()

    def outage() -> None:
        while not stop.wait(0.02):
            if llm_server.stats()["completions"] >= 30:
                llm_server.configure(down=True)
                return

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    # No run_id: a deployment run gets its own run id, which a retry of it keeps.
    flow_run = run_deployment(
        "evaluate/evaluate", parameters={"spec": str(spec), "output": str(output)}, timeout=0
    )
    try:
        failed = wait_final(client, flow_run.id)
    finally:
        stop.set()
    assert failed.state.is_failed(), (failed.state, worker.read_text()[-3000:])
    message = failed.state.message or ""
    assert "batches could not finish" in message and "batch " in message, message
    first = [t for t in task_runs(client, flow_run.id) if t.name.startswith("batch")]
    finished_before = {t.name for t in first if t.state_name == "Completed"}
    assert finished_before, [(t.name, t.state_name) for t in first]
    assert any(t.state.is_failed() for t in first)
    (run_dir,) = (output / "runs").iterdir()
    assert run_dir.name.endswith(str(flow_run.id)[:8])
    assert not (run_dir / "metrics.json").exists()

    llm_server.configure(down=False)
    answered_before = llm_server.stats()["prompt_completions"]
    result = client.set_flow_run_state(
        flow_run.id, Scheduled(message="Retried via the API"), force=True
    )
    assert result.status.value == "ACCEPT", result
    retried = wait_final(client, flow_run.id, run_count=2)
    assert retried.state.is_completed(), (retried.state, worker.read_text()[-3000:])

    second = [
        t
        for t in task_runs(client, flow_run.id)
        if t.name.startswith("batch") and t.flow_run_run_count == retried.run_count
    ]
    states = {t.name: t.state_name for t in second}
    assert {states[name] for name in finished_before} == {"Cached"}, states
    assert len(states) == n_items // 10

    stats = llm_server.stats()
    assert len(stats["prompt_completions"]) == n_items
    assert max(stats["prompt_completions"].values()) == 1  # no finished item was re-sent
    assert not set(answered_before) - set(stats["prompt_completions"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_rows"] == n_items and metrics["n_error"] == 0


def test_nightly_runs_compare_with_the_night_before_and_emit_the_regression(
    worker: Path, client: Any, use_server: str, llm_server: Any, tmp_path: Path
) -> None:
    """Two deployment runs with ``baseline: previous`` (as evaluate-nightly has): the second,
    against a model that got worse on known items, emits shardeval.regression.detected."""
    import time

    from prefect.deployments import run_deployment

    spec = write_spec(tmp_path / "eval", base_url=llm_server.url, n_items=120, name="nightly")
    output = tmp_path / "out"
    params = {"spec": str(spec), "output": str(output), "baseline": "previous"}
    runs = []
    for wrong_every in (10, 3):
        llm_server.configure(wrong_every=wrong_every)
        flow_run = run_deployment("evaluate/evaluate", parameters=params, timeout=0)
        done = wait_final(client, flow_run.id)
        assert done.state.is_completed(), (done.state, worker.read_text()[-3000:])
        runs.append(done)
    run_dirs = sorted((output / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(run_dirs) == 2
    first, second = (p.name for p in run_dirs)
    comparison = json.loads((run_dirs[1] / "comparison.json").read_text())
    assert comparison["base"] == first and comparison["verdict"] == "regression"

    def events(name: str) -> list[dict[str, Any]]:
        body = {"filter": {"event": {"name": [name]}}, "limit": 50}
        return list(client.request("POST", "/events/filter", json=body).json()["events"])

    deadline = time.monotonic() + 60
    found: list[dict[str, Any]] = []
    while not found:
        assert time.monotonic() < deadline, "no regression event reached the server"
        found = [
            e
            for e in events("shardeval.regression.detected")
            if e["resource"]["prefect.resource.name"] == second
        ]
        time.sleep(0.5)
    payload = found[0]["payload"]
    assert payload["eval"] == "nightly" and payload["metric"] == "exact_match"
    assert payload["base"] == first and payload["delta"] < 0
    completed = [
        e
        for e in events("shardeval.run.completed")
        if e["resource"]["prefect.resource.name"] == first
    ]
    assert completed, "the first night (no baseline yet) emits shardeval.run.completed"
