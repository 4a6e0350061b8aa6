"""Paired comparison of two results tables: flips, McNemar, clustered SE, Holm, verdicts."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from scipy.stats import binomtest

from shardeval.catalog import RunNotFound
from shardeval.compare import compare_results
from shardeval.comparison import UnknownMetric
from shardeval.paired_stats import holm, mcnemar_exact, paired_bootstrap_p
from shardeval.run_reader import RunNotComplete, read_run
from shardeval.storage import RunStore

N = 200
BROKEN = set(range(0, 30))  # base right, candidate wrong
FIXED = set(range(150, 155))  # base wrong, candidate right


def frame(scores: dict[str, list[float | None]], *, trials: int = 1, **extra: list[object]):
    n = len(next(iter(scores.values())))
    data: dict[str, list[object]] = {
        "item_id": [f"q{i // trials:04d}" for i in range(n)],
        "trial": [i % trials for i in range(n)],
        "response": [f"r{i}" for i in range(n)],
        **{f"score_{k}": list(v) for k, v in scores.items()},
        **extra,
    }
    return pd.DataFrame(data)


def base_and_cand() -> tuple[pd.DataFrame, pd.DataFrame]:
    base = [1.0 if i < 150 else 0.0 for i in range(N)]
    cand = list(base)
    for i in BROKEN:
        cand[i] = 0.0
    for i in FIXED:
        cand[i] = 1.0
    targets = [str(i) for i in range(N)]
    prompts = [f"p{i}" for i in range(N)]
    return (
        frame({"exact_match": base}, target_exact_match=targets, prompt=prompts),
        frame({"exact_match": cand}, target_exact_match=targets),
    )


def test_known_flips_mcnemar_and_regression() -> None:
    base, cand = base_and_cand()
    result = compare_results(base, cand, base_id="a", cand_id="b")
    m = result.metrics["exact_match"]
    assert (m.fixed, m.broken) == (len(FIXED), len(BROKEN))
    assert m.test == "mcnemar"
    expected_p = binomtest(len(FIXED), len(FIXED) + len(BROKEN), 0.5).pvalue
    assert m.p == pytest.approx(expected_p, rel=1e-6, abs=1e-9)
    assert m.delta == pytest.approx((len(FIXED) - len(BROKEN)) / N)
    assert m.base == pytest.approx(150 / N)
    assert m.cand == pytest.approx((150 - 30 + 5) / N)
    assert m.verdict == "regression" and result.verdict == "regression"
    broken = result.flips["exact_match"]["broken"]
    assert {f.item_id for f in broken} == {f"q{i:04d}" for i in BROKEN}
    assert {f.item_id for f in result.flips["exact_match"]["fixed"]} == {f"q{i:04d}" for i in FIXED}
    first = broken[0]
    assert (first.base_response, first.cand_response) == ("r0", "r0")
    assert (first.target, first.prompt) == ("0", "p0")
    assert (first.base_score, first.cand_score) == (1.0, 0.0)


def test_paired_se_and_ci_match_a_direct_computation() -> None:
    base, cand = base_and_cand()
    m = compare_results(base, cand, base_id="a", cand_id="b").metrics["exact_match"]
    diffs = [c - b for b, c in zip(base.score_exact_match, cand.score_exact_match, strict=True)]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs)) / len(diffs)
    assert m.se == pytest.approx(se, abs=1e-6)
    assert m.ci95 == pytest.approx([mean - 1.959964 * se, mean + 1.959964 * se], abs=1e-5)
    assert m.mde == pytest.approx((1.959964 + 0.841621) * se, abs=1e-5)


def test_mcnemar_equals_scipy_binomtest() -> None:
    for broken, fixed in [(0, 0), (1, 0), (3, 9), (40, 12), (17, 17), (600, 540), (2, 2500)]:
        expected = 1.0 if broken + fixed == 0 else binomtest(fixed, broken + fixed, 0.5).pvalue
        assert mcnemar_exact(broken, fixed) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_identical_runs_are_inconclusive() -> None:
    base, _ = base_and_cand()
    result = compare_results(base, base.copy(), base_id="a", cand_id="b")
    m = result.metrics["exact_match"]
    assert (m.fixed, m.broken, m.delta, m.se, m.p) == (0, 0, 0.0, 0.0, 1.0)
    assert m.mde is None
    assert m.verdict == "inconclusive" and result.verdict == "inconclusive"


def test_clear_improvement() -> None:
    base, cand = base_and_cand()
    assert compare_results(cand, base, base_id="b", cand_id="a").verdict == "improvement"


def test_clustered_se_with_trials_matches_explicit_loops() -> None:
    rng = random.Random(7)
    trials, items = 3, 120
    base_scores, cand_scores = [], []
    for _ in range(items):
        skill = rng.random()
        for _ in range(trials):
            base_scores.append(float(rng.random() < skill))
            cand_scores.append(float(rng.random() < skill - 0.1))
    base = frame({"acc": base_scores}, trials=trials)
    cand = frame({"acc": cand_scores}, trials=trials)
    m = compare_results(base, cand, base_id="a", cand_id="b").metrics["acc"]

    # Independent: per item, the sum of (d - mean d) over its trials; SE = sqrt(sum sq) / n.
    rows = list(zip(base.item_id, base_scores, cand_scores, strict=True))
    n = len(rows)
    mean = sum(c - b for _, b, c in rows) / n
    per_item: dict[str, float] = defaultdict(float)
    for item, b, c in rows:
        per_item[item] += (c - b) - mean
    expected = math.sqrt(sum(s * s for s in per_item.values())) / n
    assert m.test == "bootstrap"
    assert m.n == n and m.n_items == items
    assert m.se == pytest.approx(expected, abs=1e-6)
    # Clustering matters here: trials of one item share its skill.
    naive = math.sqrt(sum(((c - b) - mean) ** 2 for _, b, c in rows)) / n
    assert m.se != pytest.approx(naive, abs=1e-6)
    assert m.fixed == sum(c > b for _, b, c in rows)
    assert m.broken == sum(c < b for _, b, c in rows)


def test_bootstrap_is_seeded_and_sensible() -> None:
    import numpy as np

    items = np.repeat(np.arange(100), 2)
    shifted = np.full(200, -0.2) + np.random.default_rng(1).normal(0, 0.1, 200)
    p = paired_bootstrap_p(shifted, items)
    assert p == paired_bootstrap_p(shifted, items)
    assert p < 0.001
    noise = np.random.default_rng(2).normal(0, 1, 200)
    assert paired_bootstrap_p(noise, items) > 0.05
    assert paired_bootstrap_p(np.zeros(10), np.arange(10)) == 1.0


def test_holm_against_step_down_by_hand() -> None:
    ps = [0.01, 0.04, 0.03, None]
    # sorted: 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone: 0.03, 0.06, 0.06
    assert holm(ps) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_holm_across_metrics_decides_the_verdict() -> None:
    base, cand = base_and_cand()
    weak_b = [1.0 if i < 100 else 0.0 for i in range(N)]
    weak_c = list(weak_b)
    for i in range(8):  # 8 broken, 0 fixed: p = 2/256 = 0.0078 alone
        weak_c[i] = 0.0
    for name in ("weak", "weak2"):
        base[f"score_{name}"] = weak_b
        cand[f"score_{name}"] = weak_c
    alone = compare_results(base, cand, base_id="a", cand_id="b", metrics=["weak"], alpha=0.01)
    assert alone.metrics["weak"].p_adjusted == pytest.approx(2 / 256)
    assert alone.metrics["weak"].verdict == "regression"
    both = compare_results(base, cand, base_id="a", cand_id="b", alpha=0.01)
    names = ["exact_match", "weak", "weak2"]
    ps = [both.metrics[k].p for k in names]
    adjusted = [both.metrics[k].p_adjusted for k in names]
    assert adjusted == pytest.approx(holm(ps), rel=1e-5)
    # exact_match (p 2e-5) is first (x3); the two weak ones tie at 2/256 x 2.
    assert both.metrics["weak"].p_adjusted == pytest.approx(2 * 2 / 256)
    assert both.metrics["weak"].verdict == "inconclusive"  # 0.0156 >= 0.01 after Holm
    assert both.metrics["exact_match"].verdict == "regression"


def test_errors_and_unaligned_items_are_left_out_and_counted() -> None:
    base, cand = base_and_cand()
    cand.loc[0:9, "score_exact_match"] = None  # ten error rows in the candidate (all broken)
    base.loc[150, "score_exact_match"] = None  # one in the base (a fixed one)
    cand = cand.drop(index=[199, 198])  # two items the candidate no longer has
    extra = pd.DataFrame({"item_id": ["new1"], "trial": [0], "score_exact_match": [1.0]})
    cand = pd.concat([cand, extra], ignore_index=True)
    result = compare_results(base, cand, base_id="a", cand_id="b")
    m = result.metrics["exact_match"]
    assert (result.n_aligned, result.only_base, result.only_cand) == (198, 2, 1)
    assert m.n_left_out == 11 and m.n == 198 - 11
    assert (m.broken, m.fixed) == (len(BROKEN) - 10, len(FIXED) - 1)
    assert any("different datasets" in w for w in result.warnings)


def test_unknown_metric_names_it_and_lists_the_available_ones() -> None:
    base, cand = base_and_cand()
    with pytest.raises(UnknownMetric) as info:
        compare_results(base, cand, base_id="a", cand_id="b", metrics=["exact_mach"])
    assert info.value.exit_code == 2
    assert "'exact_mach'" in str(info.value) and "exact_match" in str(info.value)


def test_to_dict_has_the_design_keys() -> None:
    base, cand = base_and_cand()
    out = compare_results(base, cand, base_id="a", cand_id="b").to_dict()
    json.dumps(out)  # JSON-able
    assert {"base", "cand", "n_aligned", "only_base", "only_cand", "metrics"} <= set(out)
    assert set(out["metrics"]["exact_match"]) >= {
        "base", "cand", "delta", "se", "ci95", "p", "p_adjusted", "test", "fixed", "broken",
        "verdict",
    }  # fmt: skip
    assert out["verdict"] == "regression"


def write_run(output: Path, run_id: str, df: pd.DataFrame, *, complete: bool = True) -> None:
    store = RunStore(str(output), run_id)
    store.write_json(store.spec_path, {"spec": {"name": "arith"}})
    store.write_table(store.results_path, pa.Table.from_pandas(df, preserve_index=False))
    if complete:
        store.write_json(store.metrics_path, {"run_id": run_id, "name": "arith", "complete": True})


def test_read_run_errors(tmp_path: Path) -> None:
    base, _ = base_and_cand()
    write_run(tmp_path, "arith-1234abcd", base)
    write_run(tmp_path, "arith-99", base, complete=False)
    run = read_run("arith-1234abcd", str(tmp_path))
    assert len(run.results) == N and run.metrics["name"] == "arith"
    with pytest.raises(RunNotFound) as missing:
        read_run("arith-1234abce", str(tmp_path))
    assert missing.value.exit_code == 2
    assert "arith-1234abce" in str(missing.value) and "arith-1234abcd" in str(missing.value)
    with pytest.raises(RunNotComplete) as incomplete:
        read_run("arith-99", str(tmp_path))
    assert incomplete.value.exit_code == 2 and "not complete" in str(incomplete.value)


def test_many_items_use_the_normal_test() -> None:
    from statistics import NormalDist

    from shardeval.paired_stats import BOOTSTRAP_MAX_ITEMS

    n = BOOTSTRAP_MAX_ITEMS + 1
    rng = random.Random(3)
    base = frame({"score": [rng.random() for _ in range(n)]})
    cand = frame({"score": [v - 0.01 + rng.gauss(0, 0.05) for v in base.score_score]})
    m = compare_results(base, cand, base_id="a", cand_id="b").metrics["score"]
    assert m.test == "z"
    assert m.p == pytest.approx(2 * (1 - NormalDist().cdf(abs(m.delta) / m.se)), rel=1e-3)


def metrics_json(run_id: str, finished_at: str, name: str = "arith") -> dict[str, object]:
    return {"run_id": run_id, "name": name, "complete": True, "finished_at": finished_at}


def test_find_baseline_previous_tag_and_run_id(tmp_path: Path) -> None:
    from shardeval.history import find_baseline, list_complete_runs

    for run_id, finished, name in [
        ("n1", "2026-11-01T01:00:00+00:00", "arith"),
        ("n2", "2026-11-02T01:00:00+00:00", "arith"),
        ("other", "2026-11-02T12:00:00+00:00", "qa"),
        ("n3", "2026-11-03T01:00:00+00:00", "arith"),
    ]:
        store = RunStore(str(tmp_path), run_id)
        store.write_json(store.metrics_path, metrics_json(run_id, finished, name))
    RunStore(str(tmp_path), "n4").write_json(RunStore(str(tmp_path), "n4").spec_path, {})
    tags = RunStore(str(tmp_path), "n1")
    tags.write_json(tags.path("tags.json"), ["baseline"])
    out = str(tmp_path)
    assert [m["run_id"] for m in list_complete_runs(out, "arith")] == ["n1", "n2", "n3"]
    assert find_baseline(out, "arith", "n3") == "n2"
    assert find_baseline(out, "arith", "n2") == "n1"
    assert find_baseline(out, "arith", "n1") is None
    assert find_baseline(out, "arith", "n4") == "n3"  # not finished yet: the latest complete
    assert find_baseline(out, "arith", "n3", "tag:baseline") == "n1"
    assert find_baseline(out, "arith", "n3", "tag:gold") is None
    assert find_baseline(out, "arith", "n3", "n1") == "n1"


def test_a_cells_baseline_is_its_own_models_earlier_run(tmp_path: Path) -> None:
    """With a model fingerprint, ``previous`` and ``tag:T`` skip other models' runs of the eval."""
    from shardeval.history import find_baseline

    def fingerprint(model: str, temperature: float = 0.0) -> dict[str, object]:
        params = {"temperature": temperature}
        return {"provider": "openai", "model": model, "revision": "", "params": params}

    runs = [
        ("a1", "2026-11-01T01:00:00+00:00", fingerprint("m-a")),
        ("b1", "2026-11-01T02:00:00+00:00", fingerprint("m-b")),
        ("hot", "2026-11-01T03:00:00+00:00", fingerprint("m-a", temperature=0.7)),
        ("a2", "2026-11-02T01:00:00+00:00", fingerprint("m-a")),
        ("b2", "2026-11-02T02:00:00+00:00", fingerprint("m-b")),
    ]
    for run_id, finished, model in runs:
        store = RunStore(str(tmp_path), run_id)
        named = {k: model[k] for k in ("provider", "model", "revision")}
        store.write_json(store.metrics_path, {**metrics_json(run_id, finished), "model": named})
        store.write_json(store.spec_path, {"run_id": run_id, "model_fingerprint": model})
    RunStore(str(tmp_path), "a1").write_json(
        RunStore(str(tmp_path), "a1").path("tags.json"), ["gold"]
    )
    out = str(tmp_path)
    assert find_baseline(out, "arith", "a2") == "hot"  # a single run: any model of the eval
    assert find_baseline(out, "arith", "a2", model=fingerprint("m-a")) == "a1"
    assert find_baseline(out, "arith", "b2", model=fingerprint("m-b")) == "b1"  # not a2
    assert find_baseline(out, "arith", "a1", model=fingerprint("m-a")) is None
    assert find_baseline(out, "arith", "a2", model=fingerprint("m-a", 0.7)) == "hot"
    assert find_baseline(out, "arith", "b2", "tag:gold", model=fingerprint("m-b")) is None
    assert find_baseline(out, "arith", "a2", "tag:gold", model=fingerprint("m-a")) == "a1"


def test_a_suite_refuses_a_run_id_as_every_cells_baseline(tmp_path: Path) -> None:
    from shardeval.baseline import check_suite_selector
    from shardeval.errors import EXIT_USAGE, SpecError
    from shardeval.suite_session import SuiteSession
    from tests.helpers.suites import write_suite

    assert check_suite_selector("previous") == "previous"
    assert check_suite_selector("tag:nightly") == "tag:nightly"
    with pytest.raises(SpecError, match="a suite compares every cell") as refused:
        SuiteSession.prepare(write_suite(tmp_path, evals=1, n_items=3), baseline="arith-1a2b")
    assert refused.value.exit_code == EXIT_USAGE
    assert "previous or --baseline tag:NAME" in str(refused.value.hint)
