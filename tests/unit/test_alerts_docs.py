"""docs/alerts.md's YAML Automation is the one ``shardeval alerts install`` creates."""

from __future__ import annotations

import re
from pathlib import Path
from uuid import UUID

import yaml

from shardeval.alerts import build_automation, comparison_markdown, event_payload, run_info
from shardeval.compare import compare_results
from tests.unit.test_compare import base_and_cand

DOC = Path(__file__).resolve().parents[2] / "docs" / "alerts.md"


def test_documented_yaml_matches_the_installed_automation() -> None:
    from prefect.automations import AutomationCore

    block = re.search(r"```yaml\n# shardeval-regression.yaml\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    documented = AutomationCore.model_validate(yaml.safe_load(block.group(1)))
    installed = build_automation(UUID(int=0))
    assert documented.model_dump(mode="json") == installed.model_dump(mode="json")


def test_payload_and_markdown_name_the_regression() -> None:
    base, cand = base_and_cand()
    comparison = compare_results(base, cand, base_id="n1", cand_id="n2")
    info = run_info(
        {"run_id": "n2", "name": "arith", "model": {"model": "m"}, "api_key": "sk-secret"},
        results_url="/r/results.parquet",
        metrics_url="/r/metrics.json",
    )
    payload = event_payload(comparison, info)
    assert payload["metric"] == "exact_match" and payload["broken"] == 30
    assert payload["regressed"] == ["exact_match"] and payload["model"] == "m"
    assert "sk-secret" not in repr(payload)
    markdown = comparison_markdown(comparison, info)
    assert "| exact_match |" in markdown and "**regression**" in markdown
    assert "broken items (first 10 of 30)" in markdown
