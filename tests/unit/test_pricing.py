"""Prices and costs: cent-exact arithmetic, unknown is null (never 0), what storage saved."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from shardeval.cost import CostTally, cost_summary
from shardeval.hashing import default_run_id, model_hash
from shardeval.metrics import create_metric
from shardeval.pricing import Price, price_for, row_costs, table_price
from shardeval.reporting import cost_text
from shardeval.spec import EvalSpec, MetricSpec, ModelSpec

SPEC_PRICE = {"prompt_per_mtok": 0.15, "completion_per_mtok": 0.60}
STARTED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def priced_model(**extra: object) -> ModelSpec:
    return ModelSpec(model="my-finetune", pricing=SPEC_PRICE, **extra)  # type: ignore[arg-type]


def generation(
    keys: list[str],
    prompt: list[int | None],
    completion: list[int | None],
    finished: list[float | None],
) -> pa.Table:
    return pa.table(
        {
            "item_key": pa.array(keys, pa.string()),
            "prompt_tokens": pa.array(prompt, pa.int64()),
            "completion_tokens": pa.array(completion, pa.int64()),
            "finished_at": pa.array(finished, pa.float64()),
        }
    )


def test_row_costs_to_the_cent_from_a_spec_price() -> None:
    price = price_for(priced_model())
    assert price is not None and price.source == "spec"
    costs = row_costs([1_000_000, 200_000, 0], [1_000_000, 50_000, 7], price).to_pylist()
    # 1M prompt at $0.15 + 1M completion at $0.60; 200k×0.15/1M + 50k×0.60/1M = 0.03 + 0.03
    assert costs[0] == pytest.approx(0.75, abs=1e-12)
    assert round(costs[1], 2) == 0.06
    assert costs[2] == pytest.approx(7 * 0.60 / 1e6)
    assert costs[2] > 0  # a tiny cost is still a cost


def test_unknown_tokens_or_unknown_price_give_null_never_zero() -> None:
    price = Price(1.0, 2.0, "spec")
    assert row_costs([10, None, 5], [None, 3, 5], price).to_pylist() == [None, None, 15e-6]
    unpriced = row_costs([10, 20], [1, 2], None)
    assert unpriced.to_pylist() == [None, None]
    assert unpriced.type == pa.float64()


def test_unknown_model_has_no_price_and_the_summary_says_so() -> None:
    model = ModelSpec(model="somebody-elses-model-v9")
    assert price_for(model) is None
    tally = CostTally("model", model, started_at=STARTED)
    costs = tally.add(generation(["a", "b"], [100, 200], [10, 20], [1.0, 2.0]))
    assert costs.to_pylist() == [None, None]
    cost = cost_summary([tally])
    assert cost["usd"] is None and cost["saved_usd"] is None
    assert cost["priced"] is False and cost["source"] is None
    assert cost["unpriced"] == ["somebody-elses-model-v9"]
    text = cost_text({"cost": cost})
    assert text == "cost unknown: no price for somebody-elses-model-v9"
    assert "$0" not in text


def test_a_price_without_any_token_counts_is_unknown_not_zero() -> None:
    tally = CostTally("model", priced_model(), started_at=STARTED)
    tally.add(generation(["a"], [None], [None], [1.0]))
    cost = cost_summary([tally])
    assert cost["usd"] is None
    assert cost_text({"cost": cost}) == "cost unknown: no token counts from my-finetune"


def test_table_lookup_by_name_alias_and_case() -> None:
    mini = table_price("gpt-4o-mini")
    assert mini is not None
    assert (mini.prompt_per_mtok, mini.completion_per_mtok) == (0.15, 0.6)
    assert mini.source == "table" and mini.as_of and mini.url and mini.url.startswith("https://")
    assert table_price("GPT-4o-mini-2024-07-18") == mini
    assert table_price("gpt-4o") != mini  # no prefix matching: gpt-4o is its own entry
    assert table_price("gpt-4o-mini-but-not-really") is None
    assert table_price("") is None
    via_spec = price_for(ModelSpec(model="gpt-4o-mini"))
    assert via_spec == mini


def test_spec_pricing_overrides_the_table() -> None:
    model = ModelSpec(
        model="gpt-4o-mini",
        pricing={"prompt_per_mtok": 1.0, "completion_per_mtok": 1.0},  # type: ignore[arg-type]
    )
    price = price_for(model)
    assert price is not None and price.source == "spec" and price.prompt_per_mtok == 1.0


def test_a_python_function_is_not_priced_by_the_table() -> None:
    assert price_for(ModelSpec(provider="python", model="gpt-4o", function="pkg.mod:fn")) is None


def test_every_table_entry_has_a_date_and_a_source() -> None:
    text = resources.files("shardeval.data").joinpath("prices.json").read_text("utf-8")
    table = json.loads(text)
    assert "never fetches" in table["_about"]
    for name, entry in table["models"].items():
        assert entry["as_of"], name
        assert table["sources"][entry["vendor"]].startswith("https://"), name
        assert entry["prompt_per_mtok"] > 0 and entry["completion_per_mtok"] > 0, name


def test_saved_counts_rows_finished_before_the_attempt_started() -> None:
    before, after = STARTED.timestamp() - 60, STARTED.timestamp() + 5
    tally = CostTally("model", priced_model(), started_at=STARTED)
    tally.add(
        generation(
            ["old1", "old2", "new", "legacy"],
            [1_000_000, 1_000_000, 1_000_000, 1_000_000],
            [0, 0, 0, 0],
            [before, before, after, None],  # None: a file older than finished_at
        )
    )
    cost = cost_summary([tally])
    assert cost["usd"] == pytest.approx(0.60)
    assert cost["saved_usd"] == pytest.approx(0.45)  # old1, old2 and legacy came from storage
    assert cost["parts"][0]["rows_from_storage"] == 3


def test_saved_by_the_keys_sent_when_the_caller_knows_them() -> None:
    now = STARTED.timestamp() + 5
    tally = CostTally("model", priced_model(), started_at=STARTED, sent_keys={"b"})
    tally.add(generation(["a", "b"], [1_000_000, 1_000_000], [0, 0], [now, now]))
    assert cost_summary([tally])["saved_usd"] == pytest.approx(0.15)


def test_a_rerun_that_sent_nothing_saved_everything() -> None:
    tally = CostTally("model", priced_model(), started_at=STARTED)
    tally.add(generation(["a"], [2_000_000], [1_000_000], [STARTED.timestamp() - 1]))
    cost = cost_summary([tally])
    assert cost["usd"] == cost["saved_usd"] == pytest.approx(0.90)
    assert "saved $0.90" in (cost_text({"cost": cost}) or "")


def test_a_judge_without_a_price_makes_the_total_unknown() -> None:
    main = CostTally("model", priced_model(), started_at=STARTED)
    main.add(generation(["a"], [1_000_000], [0], [0.0]))
    judge = CostTally("judge:quality", ModelSpec(model="house-judge"), started_at=STARTED)
    judge.add(generation(["j"], [10], [1], [0.0]))
    cost = cost_summary([main, judge])
    assert cost["usd"] is None and cost["priced"] is False
    assert cost["parts"][0]["usd"] == pytest.approx(0.15)
    text = cost_text({"cost": cost}) or ""
    assert text.startswith("cost unknown: no price for house-judge")
    assert "model $0.15" in text


def test_pricing_is_not_part_of_the_model_fingerprint() -> None:
    plain = ModelSpec(model="m", params={"temperature": 0})
    priced = ModelSpec(
        model="m",
        params={"temperature": 0},
        pricing={"prompt_per_mtok": 3, "completion_per_mtok": 15},  # type: ignore[arg-type]
        max_cost_usd=5,
    )
    assert model_hash(plain) == model_hash(priced)
    spec = {"name": "x", "dataset": {"path": "d.jsonl"}, "prompt": {"user": "hi"}}
    a = EvalSpec.model_validate({**spec, "model": plain.model_dump()})
    b = EvalSpec.model_validate({**spec, "model": priced.model_dump()})
    assert default_run_id(a) == default_run_id(b)


def test_pricing_fields_are_validated() -> None:
    with pytest.raises(ValidationError, match="prompt_per_mtk"):
        ModelSpec(pricing={"prompt_per_mtk": 1, "completion_per_mtok": 1})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        ModelSpec(pricing={"prompt_per_mtok": -1, "completion_per_mtok": 1})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="greater than 0"):
        ModelSpec(max_cost_usd=0)
    spec = {"name": "x", "dataset": {"path": "d.jsonl"}, "prompt": {"user": "hi"}, "model": {}}
    assert EvalSpec.model_validate(spec).report is True
    assert EvalSpec.model_validate({**spec, "report": False}).report is False


def test_the_judge_model_block_takes_pricing() -> None:
    judge = create_metric(
        MetricSpec.model_validate(
            {
                "type": "llm_judge",
                "rubric": "Grade {{ response }}",
                "model": {
                    "model": "judge",
                    "base_url": "http://127.0.0.1:1/v1",
                    "pricing": {"prompt_per_mtok": 2, "completion_per_mtok": 4},
                },
            }
        ),
        0,
    )
    price = price_for(judge.scorer.model)  # type: ignore[attr-defined]
    assert price is not None and price.prompt_per_mtok == 2


def test_import_shardeval_and_finalize_do_not_import_matplotlib() -> None:
    code = (
        "import sys, shardeval, shardeval.finalize, shardeval.cost, shardeval.commands.report\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
        "assert 'shardeval.report.run_page' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_judge_cost_counts_only_the_judgements_scoring_used(tmp_path: Path) -> None:
    from shardeval.cost import judge_tallies, track_judge_use
    from shardeval.metrics.judge import Judgement
    from shardeval.results import GENERATION_SCHEMA
    from shardeval.storage import RunStore

    metric = create_metric(
        MetricSpec.model_validate(
            {
                "type": "llm_judge",
                "name": "judge",
                "rubric": "Grade {{ response }}",
                "model": {
                    "model": "judge",
                    "base_url": "http://127.0.0.1:1/v1",
                    "pricing": {"prompt_per_mtok": 1, "completion_per_mtok": 0},
                },
            }
        ),
        0,
    )
    store = RunStore(str(tmp_path), "run-1")
    judges = RunStore(str(tmp_path), "run-1/judges/judge")
    rows: dict[str, list[object]] = {name: [] for name in GENERATION_SCHEMA.names}
    for key, tokens in (("used", 1_000_000), ("stale", 5_000_000)):  # stale: an older rubric
        for name in rows:
            rows[name].append(None)
        rows["item_key"][-1], rows["status"][-1] = key, "ok"
        rows["prompt_tokens"][-1], rows["completion_tokens"][-1] = tokens, 0
        rows["finished_at"][-1] = STARTED.timestamp() - 1
    judges.write_table(judges.batch_path("b1"), pa.Table.from_pydict(rows, GENERATION_SCHEMA))
    book = {k: Judgement("ok", "GRADE: C") for k in ("used", "stale")}
    with_book = replace(metric, scorer=replace(metric.scorer, book=book))  # type: ignore[type-var]
    tracked = track_judge_use([with_book])
    tracked[0].scorer.book.get("used")  # type: ignore[attr-defined]  # what scoring does
    (tally,) = judge_tallies(store, tracked, started_at=STARTED)
    assert tally.usd == pytest.approx(1.0)  # the stale judgement is not this run's cost
    assert tally.saved_usd == pytest.approx(1.0)
