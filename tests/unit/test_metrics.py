"""Built-in metrics, metric configuration errors, per-row scoring and score summaries."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pyarrow as pa
import pytest

from shardeval.errors import MetricError
from shardeval.metrics import (
    METRICS,
    Metric,
    create_metric,
    create_metrics,
    score_row,
    summarize,
    summarize_column,
    target_text,
)
from shardeval.metrics.match import last_number, parse_number
from shardeval.spec import MetricSpec

FUNCS = "tests.unit.metric_functions"


def build(config: dict[str, Any], index: int = 0) -> Metric:
    return create_metric(MetricSpec.model_validate(config), index)


def score(config: dict[str, Any], response: str, **item: Any) -> Any:
    return build(config).score(response, item)


def config_error(config: dict[str, Any]) -> str:
    with pytest.raises(MetricError) as info:
        build(config)
    return str(info.value)


# --- registry -----------------------------------------------------------------------------


def test_builtins_are_registered() -> None:
    assert {"exact_match", "includes", "numeric", "regex", "python"} <= set(METRICS.names)


def test_target_text_compares_numbers_as_text() -> None:
    assert target_text({"a": 7}, "a") == "7"
    assert target_text({"a": 7.0}, "a") == "7"
    assert target_text({"a": 7.5}, "a") == "7.5"
    assert target_text({"a": None}, "a") == ""


# --- exact_match --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "response", "answer", "expected"),
    [
        ({}, "Paris", "Paris", 1.0),
        ({}, "  Paris\n", "Paris", 1.0),
        ({}, "paris", "Paris", 0.0),
        ({}, "Paris.", "Paris", 0.0),
        ({}, "New  York", "New York", 0.0),
        ({}, "7", 7, 1.0),
        ({}, "7", 7.0, 1.0),
        ({"ignore_case": True}, "PARIS", "paris", 1.0),
        ({"ignore_case": True}, "Straße", "STRASSE", 1.0),
        ({"ignore_whitespace": True}, "New \t York\n", "New York", 1.0),
        ({"ignore_whitespace": True}, "NewYork", "New York", 0.0),
        ({"ignore_punctuation": True}, "Paris.", "Paris", 1.0),
        ({"ignore_punctuation": True}, "«Paris»!", "Paris", 1.0),
        ({"ignore_punctuation": True}, "(Paris)", "Paris", 1.0),
        ({"ignore_punctuation": True}, "Paris", "London", 0.0),
        (
            {"ignore_case": True, "ignore_whitespace": True, "ignore_punctuation": True},
            "  new york , ny ",
            "New York NY",
            1.0,
        ),
    ],
)
def test_exact_match(options: dict[str, Any], response: str, answer: Any, expected: float) -> None:
    config = {"type": "exact_match", "target": "answer", **options}
    assert score(config, response, answer=answer) == expected


# --- includes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "response", "answer", "expected"),
    [
        ({}, "The capital is Paris.", "Paris", 1.0),
        ({}, "The capital is paris.", "Paris", 0.0),
        ({"ignore_case": True}, "The capital is PARIS.", "paris", 1.0),
        ({}, "It is 42.", 42, 1.0),
        ({}, "It is London.", "Paris", 0.0),
        ({}, "Paris!", " Paris ", 1.0),
    ],
)
def test_includes(options: dict[str, Any], response: str, answer: Any, expected: float) -> None:
    config = {"type": "includes", "target": "answer", **options}
    assert score(config, response, answer=answer) == expected


def test_includes_empty_target_is_a_row_error() -> None:
    with pytest.raises(ValueError, match="'answer' is empty"):
        score({"type": "includes", "target": "answer"}, "anything", answer="")


# --- numeric ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("The answer is 42.", 42.0),
        ("First 3, then 4, so 7", 7.0),
        ("-5", -5.0),
        ("x = -2.5", -2.5),
        ("+3", 3.0),
        ("\u22124", -4.0),
        ("10-3", 3.0),
        ("1,234", 1234.0),
        ("$1,234,567.89 total", 1234567.89),
        ("1,23", 23.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("1.5e3", 1500.0),
        ("2E-2", 0.02),
        ("3 eggs", 3.0),
        ("version 1.2.3", 1.2),
        ("50%", 50.0),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text: str, expected: float | None) -> None:
    found = last_number(text)
    if expected is None:
        assert found is None
    else:
        assert found == pytest.approx(expected)


@pytest.mark.parametrize(
    ("options", "response", "answer", "expected"),
    [
        ({}, "So the answer is 12", 12, 1.0),
        ({}, "So the answer is 12.0", "12", 1.0),
        ({}, "So the answer is 12,000", "12000", 1.0),
        ({}, "So the answer is 12000", "12,000", 1.0),
        ({}, "So the answer is 13", 12, 0.0),
        ({}, "I do not know", 12, 0.0),
        ({"tolerance": 0.5}, "about 12.4", 12, 1.0),
        ({"tolerance": 0.5}, "about 12.5", 12, 1.0),
        ({"tolerance": 0.5}, "about 12.6", 12, 0.0),
        ({"tolerance": 0.01}, "0.333", "1e-2", 0.0),
        ({}, "It is -3", -3, 1.0),
        ({}, "It is 0.25", 0.25, 1.0),
    ],
)
def test_numeric(options: dict[str, Any], response: str, answer: Any, expected: float) -> None:
    config = {"type": "numeric", "target": "answer", **options}
    assert score(config, response, answer=answer) == expected


@pytest.mark.parametrize("bad", ["twelve", "", "12 apples", "nan", "inf"])
def test_numeric_target_that_is_not_a_number_is_a_row_error(bad: str) -> None:
    with pytest.raises(ValueError, match=f"numeric target {bad!r} is not a number"):
        score({"type": "numeric", "target": "answer"}, "12", answer=bad)


def test_parse_number_accepts_number_forms() -> None:
    assert parse_number(" 1,234.5 ") == 1234.5
    assert parse_number("-2.5e3") == -2500.0


def test_numeric_negative_tolerance_is_a_config_error() -> None:
    message = config_error({"type": "numeric", "target": "answer", "tolerance": -1})
    assert message.startswith("metrics[0] (numeric): tolerance:")


# --- regex --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "response", "item", "expected"),
    [
        ({"pattern": r"\bParis\b"}, "It is Paris.", {}, 1.0),
        ({"pattern": r"\bParis\b"}, "It is Parisian.", {}, 0.0),
        ({"pattern": r"paris"}, "It is Paris.", {}, 0.0),
        ({"pattern": r"paris", "ignore_case": True}, "It is Paris.", {}, 1.0),
        ({"pattern": r"Answer:\s*(\w+)", "target": "a"}, "Answer:  B\n", {"a": "B"}, 1.0),
        ({"pattern": r"Answer:\s*(\w+)", "target": "a"}, "Answer: C", {"a": "B"}, 0.0),
        ({"pattern": r"Answer:\s*(\w+)", "target": "a"}, "I think B", {"a": "B"}, 0.0),
        (
            {"pattern": r"answer:\s*(\w+)", "target": "a", "ignore_case": True},
            "ANSWER: b",
            {"a": "B"},
            1.0,
        ),
        ({"pattern": r"\d+", "target": "a"}, "x 42 y", {"a": 42}, 1.0),
        ({"pattern": r"(x)?\d+", "target": "a"}, "42", {"a": "42"}, 0.0),
        ({"pattern": r"=(.*)$", "target": "a"}, "sum = 12  ", {"a": "12"}, 1.0),
    ],
)
def test_regex(
    options: dict[str, Any], response: str, item: dict[str, Any], expected: float
) -> None:
    metric = build({"type": "regex", **options})
    assert metric.score(response, item) == expected


def test_regex_that_does_not_compile() -> None:
    message = config_error({"type": "regex", "name": "answer_re", "pattern": r"Answer: (\w+"})
    assert message.startswith("metrics[0] (answer_re): regex pattern")
    assert "does not compile: missing ), unterminated subpattern at position 8" in message
    assert "to resolve this:" in message


def test_regex_requires_a_pattern() -> None:
    message = config_error({"type": "regex"})
    assert message.startswith("metrics[0] (regex): pattern: ")


# --- python -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "response", "expected"),
    [
        ("length_ratio", "abcd", 2.0),
        ("is_yes", " Yes ", 1.0),
        ("is_yes", "no", 0.0),
        ("word_count", "one two three", 3.0),
        ("maybe_none", "", None),
        ("maybe_none", "x", 1.0),
    ],
)
def test_python_metric_values(function: str, response: str, expected: float | None) -> None:
    value = score({"type": "python", "function": f"{FUNCS}:{function}"}, response, answer="ab")
    assert value == expected
    assert value is None or type(value) is float


def test_python_metric_returning_a_dict() -> None:
    metric = build({"type": "python", "name": "pr", "function": f"{FUNCS}:precision_recall"})
    value = metric.score("a b c d", {"answer": "a b"})
    assert value == {"precision": 0.5, "recall": 1.0}


def test_python_metric_async_function() -> None:
    metric = build({"type": "python", "function": f"{FUNCS}:async_exact"})
    assert metric.score(" 7 ", {"answer": 7}) == 1.0
    assert metric.score("8", {"answer": 7}) == 0.0


def test_python_metric_async_function_inside_a_running_loop() -> None:
    metric = build({"type": "python", "function": f"{FUNCS}:async_exact"})

    async def main() -> Any:
        return metric.score("7", {"answer": 7})

    assert asyncio.run(main()) == 1.0


@pytest.mark.parametrize(
    ("function", "fragment"),
    [
        ("returns_string", "returned str"),
        ("returns_bad_dict", "'bad': str"),
    ],
)
def test_python_metric_bad_return_is_a_row_error(function: str, fragment: str) -> None:
    metric = build({"type": "python", "function": f"{FUNCS}:{function}"})
    with pytest.raises(TypeError, match=f"'{FUNCS}:{function}'") as info:
        metric.score("x", {})
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("function", "fragment"),
    [
        ("no_such_module_xyz:fn", "cannot be imported: ModuleNotFoundError"),
        (f"{FUNCS}:no_such_function", "cannot be imported: AttributeError"),
        (f"{FUNCS}:NOT_CALLABLE", "is not callable (it is a int)"),
    ],
)
def test_python_metric_function_that_cannot_be_used(function: str, fragment: str) -> None:
    message = config_error({"type": "python", "name": "custom", "function": function})
    assert message.startswith(f"metrics[0] (custom): function {function!r}")
    assert fragment in message


def test_python_metric_import_error_hints_at_pythonpath() -> None:
    message = config_error({"type": "python", "function": "no_such_module_xyz:fn"})
    assert "PYTHONPATH" in message


# --- configuration errors -----------------------------------------------------------------


def test_unknown_metric_type_suggests_the_close_one() -> None:
    message = config_error({"type": "exact_mach", "target": "answer"})
    assert message.startswith("metrics[0] (exact_mach): unknown metric 'exact_mach'")
    assert "did you mean 'exact_match'?" in message


def test_unknown_parameter() -> None:
    message = config_error({"type": "exact_match", "target": "answer", "ignore_cas": True})
    assert message == "metrics[0] (exact_match): ignore_cas: unknown parameter"


@pytest.mark.parametrize("metric_type", ["exact_match", "includes", "numeric"])
def test_missing_target(metric_type: str) -> None:
    message = config_error({"type": metric_type, "name": "acc"})
    assert message.startswith("metrics[0] (acc): target: ")
    assert "required" in message


def test_wrongly_typed_parameter() -> None:
    message = config_error({"type": "exact_match", "target": "answer", "ignore_case": "maybe"})
    assert message.startswith("metrics[0] (exact_match): ignore_case: ")


def test_create_metrics_reports_the_first_bad_entry_by_index() -> None:
    specs = [
        MetricSpec.model_validate({"type": "exact_match", "target": "answer"}),
        MetricSpec.model_validate({"type": "regex", "name": "bad", "pattern": "("}),
        MetricSpec.model_validate({"type": "nope"}),
    ]
    with pytest.raises(MetricError, match=r"^metrics\[1\] \(bad\): regex pattern"):
        create_metrics(specs)


def test_create_metrics_builds_all_in_order() -> None:
    specs = [
        MetricSpec.model_validate({"type": "exact_match", "target": "answer"}),
        MetricSpec.model_validate({"type": "includes", "name": "inc", "target": "answer"}),
    ]
    metrics = create_metrics(specs)
    assert [m.name for m in metrics] == ["exact_match", "inc"]
    assert [m.column for m in metrics] == ["score_exact_match", "score_inc"]
    assert [m.target_field for m in metrics] == ["answer", "answer"]


# --- fingerprint --------------------------------------------------------------------------


def test_fingerprint_is_stable_and_changes_with_parameters() -> None:
    base = {"type": "numeric", "target": "answer", "tolerance": 0.5}
    first = build(base).fingerprint_hash()
    assert build(dict(base)).fingerprint_hash() == first
    assert build({**base, "tolerance": 0.25}).fingerprint_hash() != first
    assert build({**base, "target": "other"}).fingerprint_hash() != first
    assert build({**base, "name": "num"}).fingerprint_hash() != first


def test_fingerprint_does_not_depend_on_spelling_a_default() -> None:
    implicit = build({"type": "numeric", "target": "answer"})
    explicit = build({"type": "numeric", "target": "answer", "tolerance": 0})
    assert implicit.fingerprint_hash() == explicit.fingerprint_hash()
    assert implicit.fingerprint()["params"] == {"target": "answer", "tolerance": 0.0}


def test_fingerprint_content() -> None:
    metric = build({"type": "regex", "pattern": "x"})
    assert metric.fingerprint() == {
        "type": "regex",
        "name": "regex",
        "params": {"pattern": "x", "target": None, "ignore_case": False},
        "version": "1",
    }


# --- score_row ----------------------------------------------------------------------------


def test_score_row_columns_and_per_row_errors() -> None:
    metrics = create_metrics(
        [
            MetricSpec.model_validate({"type": "exact_match", "target": "answer"}),
            MetricSpec.model_validate({"type": "numeric", "target": "answer"}),
            MetricSpec.model_validate(
                {"type": "python", "name": "pr", "function": f"{FUNCS}:precision_recall"}
            ),
            MetricSpec.model_validate(
                {"type": "python", "name": "boom", "function": f"{FUNCS}:raises"}
            ),
        ]
    )
    scores, errors = score_row(metrics, "12", {"answer": "12"})
    assert scores == {
        "score_exact_match": 1.0,
        "score_numeric": 1.0,
        "score_pr_precision": 1.0,
        "score_pr_recall": 1.0,
        "score_boom": None,
    }
    assert errors == [("boom", "RuntimeError: scorer exploded")]

    scores, errors = score_row(metrics, "12", {"answer": "twelve"})
    assert scores["score_numeric"] is None
    assert scores["score_exact_match"] == 0.0
    assert ("numeric", "ValueError: numeric target 'twelve' is not a number") in errors


def test_scoring_is_fast() -> None:
    metrics = create_metrics(
        [
            MetricSpec.model_validate(config)
            for config in (
                {
                    "type": "exact_match",
                    "target": "a",
                    "ignore_case": True,
                    "ignore_whitespace": True,
                    "ignore_punctuation": True,
                },
                {"type": "includes", "target": "a", "ignore_case": True},
                {"type": "numeric", "target": "a", "tolerance": 0.1},
                {"type": "regex", "pattern": r"answer is (\d+)", "target": "a"},
                {"type": "python", "function": f"{FUNCS}:word_count"},
            )
        ]
    )
    response = "Let me think step by step. 3 + 4 = 7, so the answer is 7. " * 5
    item = {"a": 7}
    rounds = 500
    start = time.perf_counter()
    for _ in range(rounds):
        score_row(metrics, response, item)
    per_metric_ms = (time.perf_counter() - start) / rounds / len(metrics) * 1000
    assert per_metric_ms < 0.2


# --- summarize ----------------------------------------------------------------------------


def test_summarize_accuracy_like_scores() -> None:
    values = [1.0, 0.0, 1.0, 1.0, None]
    # by hand: n=4, mean=0.75, deviations 0.25,-0.75,0.25,0.25 -> squares sum 0.75,
    # sample variance 0.75/3 = 0.25, sd 0.5, stderr 0.5/sqrt(4) = 0.25,
    # ci 0.75 ± 0.49 = [0.26, 1.24], clipped to [0, 1] because every value lies in [0, 1]
    assert summarize(values) == {"mean": 0.75, "n": 4, "stderr": 0.25, "ci95": [0.26, 1.0]}


def test_summarize_unbounded_scores_are_not_clipped() -> None:
    summary = summarize([2.0, 4.0, 6.0])
    stderr = 2.0 / math.sqrt(3)  # sample sd of 2, 4, 6 is 2
    assert summary["mean"] == 4.0
    assert summary["n"] == 3
    assert summary["stderr"] == round(stderr, 6)
    assert summary["ci95"] == [round(4 - 1.96 * stderr, 6), round(4 + 1.96 * stderr, 6)]


def test_summarize_edge_cases() -> None:
    assert summarize([]) == {"mean": None, "n": 0, "stderr": None, "ci95": None}
    assert summarize([None, float("nan")]) == {"mean": None, "n": 0, "stderr": None, "ci95": None}
    assert summarize([0.5]) == {"mean": 0.5, "n": 1, "stderr": 0.0, "ci95": [0.5, 0.5]}
    assert summarize([0.0, 0.0]) == {"mean": 0.0, "n": 2, "stderr": 0.0, "ci95": [0.0, 0.0]}
    assert summarize([1.0, float("nan"), 0.0])["n"] == 2


def test_summarize_rounds_to_six_decimals() -> None:
    summary = summarize([1.0, 0.0, 0.0])
    assert summary["mean"] == 0.333333
    assert json.dumps(summary) == json.dumps(summarize([0.0, 1.0, 0.0]))


def test_summarize_does_not_depend_on_chunking() -> None:
    values = [i / 7 for i in range(1000)]
    chunked = pa.chunked_array([values[:3], values[3:500], values[500:]])
    assert summarize(chunked) == summarize(values) == summarize(pa.array(values))


def test_summarize_column_with_ok_mask() -> None:
    table = pa.table(
        {
            "status": ["ok", "ok", "error", "ok"],
            "score_x": [1.0, 0.0, None, 1.0],
        }
    )
    ok = [status == "ok" for status in table.column("status").to_pylist()]
    assert summarize_column(table, "score_x", ok) == summarize([1.0, 0.0, 1.0])
    assert summarize_column(table, "score_x", [True, False, False, False])["n"] == 1
    assert summarize_column(table, "score_x")["n"] == 3
