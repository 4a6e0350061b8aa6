"""Metrics: built-in types, building them from a spec, scoring a row, and summarising scores.

Importing this package registers the built-in metric types (``exact_match``, ``includes``,
``numeric``, ``regex``, ``python``). :func:`create_metrics` turns the ``metrics`` list of a
spec into ready :class:`Metric` objects, failing fast on the first misconfiguration;
:func:`score_row` applies them to one response and never lets one metric's failure on one row
stop the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shardeval.metrics import judge, match, python, regex  # noqa: F401  (register the built-ins)
from shardeval.metrics.aggregate import summarize, summarize_column
from shardeval.metrics.base import (
    METRICS,
    Item,
    Metric,
    Scorer,
    ScoreValue,
    create_metric,
    metric,
    target_text,
)
from shardeval.spec import MetricSpec

__all__ = [
    "METRICS",
    "Metric",
    "ScoreValue",
    "Scorer",
    "create_metric",
    "create_metrics",
    "metric",
    "score_row",
    "summarize",
    "summarize_column",
    "target_text",
]

RowScores = dict[str, float | None]
RowErrors = list[tuple[str, str]]


def create_metrics(specs: Sequence[MetricSpec]) -> list[Metric]:
    """Build every metric of a spec, in order, before any model call.

    Raises:
        MetricError: for the first misconfigured entry, naming ``metrics[i]`` and the metric.
    """
    return [create_metric(spec, index) for index, spec in enumerate(specs)]


def score_row(metrics: Iterable[Metric], response: str, item: Item) -> tuple[RowScores, RowErrors]:
    """Score one response with every metric; a metric that fails costs only its own column.

    Returns:
        ``(scores, errors)``. ``scores`` maps ``score_<name>`` to the value, or, for a metric
        that returns a dict, ``score_<name>_<key>`` to each value. A metric that raises, or
        returns None, gets ``score_<name>: None``; for a dict metric the caller fills the
        missing ``score_<name>_<key>`` columns with null when it builds the table. ``errors``
        lists ``(metric name, "ExceptionType: message")`` for every metric that raised.
    """
    scores: RowScores = {}
    errors: RowErrors = []
    for m in metrics:
        try:
            value = m.score(response, item)
        except Exception as exc:  # one bad row must not stop the run: report it, per row
            scores[m.column] = None
            errors.append((m.name, f"{type(exc).__name__}: {exc}"))
            continue
        if isinstance(value, dict):
            prefix = m.column
            for key, sub_value in value.items():
                scores[f"{prefix}_{key}"] = sub_value
        else:
            scores[m.column] = value
    return scores, errors
