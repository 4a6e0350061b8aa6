"""The ``regex`` metric: does the response match, or does what it captures equal the target.

The pattern is compiled once, when the metric is created, so a pattern that does not compile is
reported before any model call (as a :class:`~shardeval.errors.MetricError` naming the spec
entry), and scoring an item costs one ``re.search``.
"""

from __future__ import annotations

import re

from shardeval.errors import MetricError
from shardeval.metrics.base import Item, Scorer, metric, target_text

_PATTERN_HINT = (
    "fix the pattern (Python 're' syntax); in YAML, write it in single quotes ('\\d+') so "
    "that backslashes are kept as typed"
)


def compile_pattern(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    """Compile ``pattern``, turning a syntax error into a MetricError that says where.

    Raises:
        MetricError: with the ``re`` error message and the position in the pattern.
    """
    try:
        return re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as exc:
        position = f" at position {exc.pos}" if exc.pos is not None else ""
        raise MetricError(
            f"regex pattern {pattern!r} does not compile: {exc.msg}{position}", hint=_PATTERN_HINT
        ) from None


@metric("regex")
def regex(*, pattern: str, target: str | None = None, ignore_case: bool = False) -> Scorer:
    """Score a response with a regular expression (``re.search``, anywhere in the response).

    Without ``target``: 1.0 if the pattern matches. With ``target``: the first group (or the
    whole match when the pattern has no group), stripped, must equal the target text; no match,
    or a first group that did not take part in the match, scores 0.0.

    Args:
        pattern: Python regular expression.
        target: Optional dataset field holding the expected captured text.
        ignore_case: Match, and compare with the target, case-insensitively.

    Raises:
        MetricError: if the pattern does not compile.
    """
    compiled = compile_pattern(pattern, ignore_case=ignore_case)
    if target is None:
        return _matches(compiled)
    return _captures(compiled, target, ignore_case=ignore_case)


def _matches(compiled: re.Pattern[str]) -> Scorer:
    search = compiled.search

    def score(response: str, item: Item) -> float:
        return 1.0 if search(response) is not None else 0.0

    return score


def _captures(compiled: re.Pattern[str], target: str, *, ignore_case: bool) -> Scorer:
    search = compiled.search
    group = 1 if compiled.groups else 0
    fold = str.casefold if ignore_case else str

    def score(response: str, item: Item) -> float:
        match = search(response)
        captured = match.group(group) if match is not None else None
        if captured is None:
            return 0.0
        expected = target_text(item, target).strip()
        return 1.0 if fold(captured.strip()) == fold(expected) else 0.0

    return score
