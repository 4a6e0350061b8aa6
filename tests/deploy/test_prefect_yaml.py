"""prefect.yaml: the deployments users get from `prefect deploy --all` (no server needed)."""

from __future__ import annotations

from typing import Any

import yaml

from tests.conftest import ROOT


def load() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "prefect.yaml").read_text()))


def test_deployments_share_definitions() -> None:
    config = load()
    assert "definitions" in config
    by_name = {d["name"]: d for d in config["deployments"]}
    assert set(by_name) == {"evaluate", "evaluate-nightly", "evaluate-suite-nightly"}
    suite = by_name.pop("evaluate-suite-nightly")
    assert suite["entrypoint"] == "flows/suite.py:evaluate_suite"
    assert (ROOT / suite["parameters"]["suite"]).exists()
    assert suite["parameters"]["baseline"] == "previous"  # each cell against its night before
    (nightly,) = suite["schedules"]
    assert nightly["cron"] == "0 3 * * *" and nightly["timezone"] == "UTC"
    for deployment in by_name.values():
        assert deployment["entrypoint"] == "flows/evaluate.py:evaluate"
        assert deployment["work_pool"]["name"] == "shardeval"
        assert len(deployment["description"]) > 40
        assert deployment["parameters"]["spec"] == "examples/quickstart.yaml"
        assert (ROOT / deployment["parameters"]["spec"]).exists()
    assert "schedules" not in by_name["evaluate"]
    (schedule,) = by_name["evaluate-nightly"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "UTC"


def test_pull_step_returns_to_the_clone_without_environment_variables() -> None:
    config = load()
    (build,) = config["build"]
    step = build["prefect.deployments.steps.run_shell_script"]
    assert step["script"] == "pwd"
    (pull,) = config["pull"]
    directory = pull["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "{{ " + step["id"] + ".stdout }}"
    assert "$" not in str(config["pull"])  # an unset {{ $VAR }} would be an empty path
