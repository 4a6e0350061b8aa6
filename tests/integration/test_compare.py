"""``shardeval compare`` and ``history`` over real runs of the test server.

Three runs of one eval against one server: ``night-1`` with the server's default wrong answers
(sha256(prompt) % 10 == 0), ``night-2`` with ``wrong_every=3`` (a regression on known items),
``night-3`` back to the default (the same answers as ``night-1``). Which items flip is computed
here from the same rule, independently of shardeval.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from scipy.stats import binomtest

from shardeval.history import find_baseline
from shardeval.testing.answers import arith_is_wrong
from shardeval.testing.server import TestServer
from tests.helpers.specs import arith_items, write_spec

pytestmark = pytest.mark.slow

N_ITEMS = 120
DESIGN_KEYS = {"base", "cand", "n_aligned", "only_base", "only_cand", "metrics"}
METRIC_KEYS = {
    "base", "cand", "delta", "se", "ci95", "p", "p_adjusted", "test", "fixed", "broken",
    "verdict",
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> dict[str, Any]:
    """Three complete runs under one output (made once for the module's tests)."""
    import subprocess
    import sys

    from shardeval.testing.server import ServerConfig
    from tests.conftest import cli_env

    directory = tmp_path_factory.mktemp("compare")
    items = arith_items(N_ITEMS, seed=3)
    server = TestServer.start_in_thread(ServerConfig())
    try:
        spec = write_spec(directory / "eval", base_url=server.url, items=items, name="arith")
        output = directory / "eval" / "runs"
        for run_id, wrong_every in [("night-1", 10), ("night-2", 3), ("night-3", 10)]:
            server.configure(wrong_every=wrong_every)
            done = subprocess.run(
                [sys.executable, "-m", "shardeval", "run", str(spec), "--run-id", run_id, "-q"],
                env=cli_env(prefect_api),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        server.stop()
    return {"output": output, "items": items}


def expected_flips(items: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(broken, fixed) item ids from night-1 (wrong_every 10) to night-2 (wrong_every 3)."""
    broken, fixed = set(), set()
    for item in items:
        text = f"What is {item['a']} + {item['b']}?"
        before, after = arith_is_wrong(text, 10), arith_is_wrong(text, 3)
        if after and not before:
            broken.add(item["id"])
        if before and not after:
            fixed.add(item["id"])
    return broken, fixed


def test_regression_is_found_exactly_and_fails_the_gate(runs: dict[str, Any], run_cli) -> None:
    output = str(runs["output"])
    broken, fixed = expected_flips(runs["items"])
    assert len(broken) > 2 * len(fixed) + 10  # the setup really is a regression

    as_json = run_cli("compare", "night-1", "night-2", "--output", output, "--json")
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert set(out) >= DESIGN_KEYS and set(out["metrics"]["exact_match"]) >= METRIC_KEYS
    m = out["metrics"]["exact_match"]
    assert (out["n_aligned"], out["only_base"], out["only_cand"]) == (N_ITEMS, 0, 0)
    assert (m["broken"], m["fixed"]) == (len(broken), len(fixed))
    assert m["test"] == "mcnemar" and m["verdict"] == "regression"
    expected_p = binomtest(len(fixed), len(fixed) + len(broken), 0.5).pvalue
    assert m["p"] == pytest.approx(expected_p, rel=1e-5)
    assert m["delta"] == pytest.approx((len(fixed) - len(broken)) / N_ITEMS, abs=1e-6)

    gate = run_cli(
        "compare", "night-1", "night-2", "--output", output, "--fail-on-regression",
        COLUMNS="200",
    )  # fmt: skip
    assert gate.returncode == 3, gate.stdout + gate.stderr
    assert "regression" in gate.stdout and "quality gate failed" in gate.stderr
    broken_section = gate.stdout[gate.stdout.index("broken (") :]
    assert sorted(broken)[0] in broken_section  # the broken items are listed, with answers


def test_no_change_passes_the_gate(runs: dict[str, Any], run_cli) -> None:
    output = str(runs["output"])
    same = run_cli(
        "compare", "night-1", "night-3", "--output", output, "--fail-on-regression", "--json"
    )
    assert same.returncode == 0, same.stderr
    m = json.loads(same.stdout)["metrics"]["exact_match"]
    assert (m["broken"], m["fixed"], m["delta"], m["verdict"]) == (0, 0, 0.0, "inconclusive")


def test_unknown_run_and_metric_exit_2(runs: dict[str, Any], run_cli) -> None:
    output = str(runs["output"])
    missing = run_cli("compare", "night-1", "night-9", "--output", output)
    assert missing.returncode == 2
    assert "night-9" in missing.stderr and "night-1" in missing.stderr
    metric = run_cli("compare", "night-1", "night-2", "--output", output, "--metric", "accuracy")
    assert metric.returncode == 2
    assert "'accuracy'" in metric.stderr and "exact_match" in metric.stderr


def test_history_and_baseline(runs: dict[str, Any], run_cli) -> None:
    output = str(runs["output"])
    result = run_cli("history", "arith", "--output", output, "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert [p["run_id"] for p in found["runs"]] == ["night-1", "night-2", "night-3"]
    assert [p["verdict"] for p in found["runs"]] == [None, "regression", "improvement"]
    assert all(p["ci95"] and p["mean"] is not None for p in found["runs"])
    table = run_cli("history", "arith", "--output", output, COLUMNS="200")
    assert table.returncode == 0 and "night-2" in table.stdout

    assert find_baseline(output, "arith", "night-3") == "night-2"
    assert find_baseline(output, "arith", "night-1") is None
    assert find_baseline(output, "other", "night-3") is None
    assert find_baseline(output, "arith", "night-3", "night-1") == "night-1"


def test_run_with_a_baseline_stores_the_comparison_and_gates(
    tmp_path, prefect_api, run_cli
) -> None:
    """``run --baseline previous``: compared with the latest complete earlier run of the eval."""
    from shardeval.testing.server import ServerConfig

    items = arith_items(N_ITEMS, seed=3)
    server = TestServer.start_in_thread(ServerConfig())
    try:
        spec = write_spec(tmp_path / "eval", base_url=server.url, items=items, name="arith")
        output = tmp_path / "eval" / "runs"
        first = run_cli("run", str(spec), "--run-id", "n1", "--baseline", "previous", "-q")
        assert first.returncode == 0, first.stderr
        assert "no baseline yet" in first.stderr
        server.configure(wrong_every=3)
        gated = run_cli(
            "run", str(spec), "--run-id", "n2", "--baseline", "previous",
            "--fail-on-regression", "-q", COLUMNS="200",
        )  # fmt: skip
        assert gated.returncode == 3, gated.stdout + gated.stderr
        assert "n1 → n2" in gated.stdout and "quality gate failed" in gated.stderr
        stored = json.loads((output / "runs" / "n2" / "comparison.json").read_text())
        broken, fixed = expected_flips(items)
        metric = stored["metrics"]["exact_match"]
        assert (stored["base"], metric["broken"], metric["fixed"]) == (
            "n1",
            len(broken),
            len(fixed),
        )
        assert {f["item_id"] for f in stored["flips"]["exact_match"]["broken"]} == broken
        # Answered from storage, the comparison is made again without Prefect; same gate.
        again = run_cli(
            "run", str(spec), "--run-id", "n2", "--baseline", "n1", "--fail-on-regression", "-q"
        )
        assert again.returncode == 3, again.stdout + again.stderr
        assert "answered from storage" in again.stderr
        bad = run_cli("run", str(spec), "--fail-on-regression")
        assert bad.returncode == 2 and "--baseline" in bad.stderr
    finally:
        server.stop()
