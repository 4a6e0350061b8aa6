"""``llm_judge``: a metric graded by another model, cached and resumed like generations.

A judgement is a request like any other: its key is the judge model's fingerprint plus the
rendered judge prompt, and it is stored under ``<run>/judges/<metric name>/`` with the same
batches, parts and crash-safety as the run's own generations. So a crash while judging
re-sends no finished judgement, and changing the rubric re-judges, while changing anything
else about the run does not.

The flow sends the judgements (:func:`judge_requests`) before scoring and loads them into the
scorer (:attr:`JudgeScorer.book`); scoring then only parses grades. A judgement that failed
permanently, or whose grade cannot be parsed, is a per-row score error, not a failed run.

Grades: ``grade_pattern`` (a regex with one group) extracts the grade from the judge's answer.
A grade found in ``grades`` maps to its value (default ``C`` = 1, ``P`` = 0.5, ``I`` = 0);
a number is divided by ``max_grade`` (use ``max_grade: 10`` for a 0-10 scale) and clipped to
[0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.sandbox
from pydantic import ValidationError

from shardeval.errors import MetricError, ShardevalError
from shardeval.hashing import item_key, model_hash
from shardeval.metrics.base import Item, metric, target_text
from shardeval.planning import PlannedRequest
from shardeval.providers import check_provider
from shardeval.spec import ModelSpec, validation_problems

DEFAULT_GRADE_PATTERN = r"GRADE:\s*([A-Za-z]+|\d+(?:\.\d+)?)"
DEFAULT_GRADES = {"C": 1.0, "P": 0.5, "I": 0.0}


@dataclass(frozen=True)
class Judgement:
    """A stored judge answer."""

    status: str
    text: str | None
    error: str | None = None


@dataclass
class JudgeScorer:
    """Renders judge prompts, and scores a row from its stored judgement."""

    model: ModelSpec
    rubric: jinja2.Template
    system: str | None
    pattern: re.Pattern[str]
    grades: dict[str, float]
    max_grade: float
    target: str | None
    book: dict[str, Judgement] = field(default_factory=dict)

    @property
    def model_digest(self) -> str:
        """The judge model's fingerprint digest (part of every judgement key)."""
        return model_hash(self.model)

    def messages(self, response: str, item: Item) -> list[dict[str, str]]:
        """The judge prompt for one response."""
        context: dict[str, Any] = {**item, "item": item, "response": response}
        context["target"] = target_text(item, self.target) if self.target else None
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": self.rubric.render(context)})
        return messages

    def key(self, response: str, item: Item) -> str:
        """The judgement's key."""
        return item_key(self.model_digest, self.messages(response, item), 0)

    def __call__(self, response: str, item: Item, /) -> float:
        """Score one response from its stored judgement."""
        judgement = self.book.get(self.key(response, item))
        if judgement is None:
            raise LookupError("no judgement stored for this response")
        if judgement.status != "ok" or judgement.text is None:
            raise RuntimeError(f"the judge failed: {judgement.error}")
        return self.parse(judgement.text)

    def parse(self, text: str) -> float:
        """The grade in [0, 1] from the judge's answer."""
        match = self.pattern.search(text)
        if match is None:
            raise ValueError(f"no grade found in the judge's answer: {text[:120]!r}")
        grade = match.group(1) if match.groups() else match.group(0)
        if grade in self.grades:
            return self.grades[grade]
        try:
            value = float(grade) / self.max_grade
        except ValueError:
            raise ValueError(f"unknown grade {grade!r} (known: {sorted(self.grades)})") from None
        return min(1.0, max(0.0, value))


@metric("llm_judge")
def llm_judge(
    *,
    model: dict[str, Any],
    rubric: str,
    system: str | None = None,
    target: str | None = None,
    grade_pattern: str = DEFAULT_GRADE_PATTERN,
    grades: dict[str, float] | None = None,
    max_grade: float = 1.0,
) -> JudgeScorer:
    """Grade responses with a judge model (see the module docstring)."""
    try:
        judge_model = ModelSpec.model_validate(model)
    except ValidationError as exc:
        raise MetricError(validation_problems(exc, prefix="model.")) from None
    try:
        check_provider(judge_model)
    except ShardevalError as exc:
        raise MetricError(f"judge model: {exc.message}", hint=exc.hint) from None
    env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        template = env.from_string(rubric)
        pattern = re.compile(grade_pattern)
    except jinja2.TemplateSyntaxError as exc:
        raise MetricError(
            f"rubric: template syntax error on line {exc.lineno}: {exc.message}"
        ) from None
    except re.error as exc:
        raise MetricError(f"grade_pattern does not compile: {exc}") from None
    if max_grade <= 0:
        raise MetricError("max_grade must be positive")
    return JudgeScorer(
        model=judge_model,
        rubric=template,
        system=system,
        pattern=pattern,
        grades=dict(DEFAULT_GRADES if grades is None else grades),
        max_grade=max_grade,
        target=target,
    )


def judge_requests(
    scorer: JudgeScorer, rows: list[tuple[str, str, int, str, Mapping[str, Any]]]
) -> list[PlannedRequest]:
    """Judge requests for ``(item_id, item_key, item_index, response, item)`` rows of ok status.

    Identical judge prompts (the same response to the same item) share one request.
    """
    seen: set[str] = set()
    out = []
    for item_id, _key, index, response, item in rows:
        try:
            messages = scorer.messages(response, item)
        except Exception:  # the same error becomes this row's score error when scoring
            continue
        key = item_key(scorer.model_digest, messages, 0)
        if key in seen:
            continue
        seen.add(key)
        out.append(PlannedRequest(key, item_id, index, 0, messages, dict(item)))
    return out
