"""Text-comparison metrics: ``exact_match``, ``includes`` and ``numeric``.

Each factory does all its set-up work (building normalisation steps, choosing comparison
functions) once, so that the scorer it returns only does the per-item comparison: scoring must
cost microseconds per item because it runs for every row of every (re)scoring pass.

Targets are compared as text (see :func:`~shardeval.metrics.base.target_text`), so ``7`` and
``"7"`` are the same target.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from shardeval.metrics.base import Item, Scorer, metric, target_text

Normalizer = Callable[[str], str]

# The numbers a model writes: optional sign (ASCII or Unicode minus), an integer part with or
# without thousands separators ("1,234,567"), an optional fraction, an optional exponent; or a
# bare fraction (".5"). The look-behind keeps us from starting inside another number ("1.2.3"
# yields 1.2, never .3), and a sign directly after a digit ("10-3") is an operator, not a sign.
_NUMBER = re.compile(
    r"""
    (?<![\d.])
    [-+\u2212]?
    (?:
        (?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?
      | \.\d+
    )
    (?:[eE][-+]?\d+)?
    (?!\d)
    """,
    re.VERBOSE,
)


class _PunctuationTable(dict[int, int | None]):
    """A ``str.translate`` table that deletes every Unicode punctuation character.

    Building a table over all of Unicode would cost a noticeable fraction of a second at import,
    so each character's category is looked up the first time it is seen and cached.
    """

    def __missing__(self, codepoint: int) -> int | None:
        value = None if unicodedata.category(chr(codepoint)).startswith("P") else codepoint
        self[codepoint] = value
        return value


_PUNCTUATION = _PunctuationTable()


def _strip_punctuation(text: str) -> str:
    return text.translate(_PUNCTUATION)


def _collapse_whitespace(text: str) -> str:
    # split/join is ~4x faster than a regex substitution and also strips
    return " ".join(text.split())


def _normalizer(
    *, ignore_case: bool, ignore_whitespace: bool, ignore_punctuation: bool
) -> Normalizer:
    """Compose the chosen normalisation steps into one function, once per metric.

    Punctuation goes first so that whitespace left around removed punctuation ("a , b") is
    collapsed afterwards; the result is always stripped.
    """
    steps: list[Normalizer] = []
    if ignore_punctuation:
        steps.append(_strip_punctuation)
    if ignore_case:
        steps.append(str.casefold)
    if ignore_whitespace:
        steps.append(_collapse_whitespace)

    def normalize(text: str) -> str:
        text = text.strip()
        for step in steps:
            text = step(text)
        return text.strip()

    return normalize


@metric("exact_match")
def exact_match(
    *,
    target: str,
    ignore_case: bool = False,
    ignore_whitespace: bool = False,
    ignore_punctuation: bool = False,
) -> Scorer:
    """1.0 if the response equals the target after normalisation, else 0.0.

    Leading and trailing whitespace is always ignored: models routinely end with a newline.

    Args:
        target: Dataset field holding the expected answer.
        ignore_case: Compare case-insensitively (Unicode case folding).
        ignore_whitespace: Treat any run of whitespace as a single space.
        ignore_punctuation: Delete Unicode punctuation (``.,;:!?'"()`` and friends) first.
    """
    normalize = _normalizer(
        ignore_case=ignore_case,
        ignore_whitespace=ignore_whitespace,
        ignore_punctuation=ignore_punctuation,
    )

    def score(response: str, item: Item) -> float:
        return 1.0 if normalize(response) == normalize(target_text(item, target)) else 0.0

    return score


@metric("includes")
def includes(*, target: str, ignore_case: bool = False) -> Scorer:
    """1.0 if the (stripped) target occurs anywhere in the response, else 0.0.

    An empty target is a per-row error rather than a free 1.0: every response "includes" the
    empty string, so such a score would only hide a data problem.

    Args:
        target: Dataset field holding the text to look for.
        ignore_case: Compare case-insensitively (Unicode case folding).
    """
    fold: Normalizer = str.casefold if ignore_case else str

    def score(response: str, item: Item) -> float:
        expected = target_text(item, target).strip()
        if not expected:
            raise ValueError(f"target field {target!r} is empty: every response would include it")
        return 1.0 if fold(expected) in fold(response) else 0.0

    return score


def _to_float(text: str) -> float:
    """Convert a matched number to float (thousands separators and Unicode minus removed)."""
    return float(text.replace(",", "").replace("\u2212", "-"))


def last_number(text: str) -> float | None:
    """The last number written in ``text``, or None if there is none.

    The last one, because models tend to reason first and state the answer at the end.
    """
    numbers = _NUMBER.findall(text)  # faster than finditer: no match objects
    return _to_float(numbers[-1]) if numbers else None


def parse_number(text: str) -> float:
    """Parse a target that must be exactly one finite number (``"1,234"``, ``"-2.5e3"``).

    Raises:
        ValueError: naming the value, when it is not a finite number.
    """
    stripped = text.strip()
    if _NUMBER.fullmatch(stripped):
        value = _to_float(stripped)
        if math.isfinite(value):
            return value
    raise ValueError(f"numeric target {text!r} is not a number")


@metric("numeric")
def numeric(*, target: str, tolerance: Annotated[float, Field(ge=0)] = 0.0) -> Scorer:
    """1.0 if the last number in the response is within ``tolerance`` of the target, else 0.0.

    A response without any number scores 0.0; a target that is not a number raises, so the
    row is reported as a scoring error instead of a silent 0.0.

    Args:
        target: Dataset field holding the expected number.
        tolerance: Largest accepted absolute difference (0 means exactly equal).
    """

    def score(response: str, item: Item) -> float:
        expected = parse_number(target_text(item, target))
        found = last_number(response)
        return 1.0 if found is not None and abs(found - expected) <= tolerance else 0.0

    return score
