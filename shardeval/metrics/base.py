"""What a metric is, how one is registered, and how a spec entry becomes one.

A metric type is **one factory function**: its keyword-only parameters are the parameters a
spec may give (validated by pydantic, unknown ones rejected), and it returns a *scorer*, a
function ``(response, item) -> float | dict[str, float] | None``::

    @metric("includes")
    def includes(*, target: str, ignore_case: bool = False) -> Scorer:
        def score(response: str, item: Item) -> float:
            expected = target_text(item, target)
            ...
        return score

A parameter named ``target`` is the name of a dataset field; the run checks before any model
call that every item has it. Bump ``version`` when a metric's code changes what it returns: the
version is part of the metric fingerprint, so stored scores are recomputed.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ConfigDict, ValidationError, create_model

from shardeval.errors import MetricError
from shardeval.hashing import digest
from shardeval.registry import Registry
from shardeval.spec import MetricSpec, validation_problems

Item = Mapping[str, Any]
ScoreValue = float | dict[str, float] | None


class Scorer(Protocol):
    """Scores one response against one item."""

    def __call__(self, response: str, item: Item, /) -> ScoreValue:
        """Return the score(s), or None when this row has none; raise to report a row error."""
        ...


MetricFactory = Callable[..., Scorer]


@dataclass(frozen=True)
class RegisteredMetric:
    """A factory plus the code version that goes into the metric fingerprint."""

    factory: MetricFactory
    version: str


METRICS: Registry[RegisteredMetric] = Registry("metric", MetricError)

_REGISTERED_ATTR = "__shardeval_metric__"


def metric(name: str, *, version: str = "1") -> Callable[[MetricFactory], MetricFactory]:
    """Register a metric factory under ``name`` (see the module docstring)."""

    def decorator(factory: MetricFactory) -> MetricFactory:
        registered = RegisteredMetric(factory=factory, version=version)
        METRICS.register(name)(registered)
        # A lazy or entry-point registration imports the *function*; this lets
        # create_metric find its version (see _as_registered).
        setattr(factory, _REGISTERED_ATTR, registered)
        return factory

    return decorator


def _as_registered(entry: object, type_name: str) -> RegisteredMetric:
    """The RegisteredMetric behind a registry entry, whichever way it was registered.

    ``@metric`` stores a RegisteredMetric, but ``Registry.register_lazy`` and entry points
    store whatever their dotted path imports: usually the decorated factory function itself.
    """
    if isinstance(entry, RegisteredMetric):
        return entry
    attached = getattr(entry, _REGISTERED_ATTR, None)
    if isinstance(attached, RegisteredMetric):
        return attached
    if callable(entry):
        return RegisteredMetric(factory=entry, version="1")
    raise MetricError(f"metric {type_name!r} is registered as {entry!r}, not a metric factory")


@dataclass(frozen=True)
class Metric:
    """A configured metric, ready to score."""

    name: str
    type: str
    params: dict[str, Any]
    version: str
    scorer: Scorer = field(repr=False, compare=False)

    @property
    def target_field(self) -> str | None:
        """The dataset field this metric compares against, if any."""
        target = self.params.get("target")
        return target if isinstance(target, str) else None

    @property
    def column(self) -> str:
        """The results column: ``score_<name>``."""
        return f"score_{self.name}"

    def fingerprint(self) -> dict[str, Any]:
        """Type, name, parameters and code version: what makes a stored score reusable."""
        return {
            "type": self.type,
            "name": self.name,
            "params": self.params,
            "version": self.version,
        }

    def fingerprint_hash(self) -> str:
        """Digest of :meth:`fingerprint`."""
        return digest(self.fingerprint())

    def score(self, response: str, item: Item) -> ScoreValue:
        """Score one response; a metric that raises is reported by the caller, per row."""
        return self.scorer(response, item)


def target_text(item: Item, field_name: str) -> str:
    """The target as text (targets are compared as text: ``7`` and ``"7"`` are the same)."""
    value = item[field_name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value)


def create_metric(spec: MetricSpec, index: int) -> Metric:
    """Build the metric that ``metrics[index]`` of a spec describes.

    Raises:
        MetricError: naming the metric and the parameter at fault.
    """
    where = f"metrics[{index}] ({spec.metric_name})"
    try:
        registered = _as_registered(METRICS.get(spec.type), spec.type)
    except MetricError as exc:
        raise MetricError(f"{where}: {exc.message}") from None
    params_model = _params_model(spec.type, registered.factory)
    try:
        params = params_model.model_validate(spec.params).model_dump()
    except ValidationError as exc:
        problems = validation_problems(exc, unknown="unknown parameter")
        raise MetricError(f"{where}: {problems}") from None
    try:
        scorer = registered.factory(**params)
    except MetricError as exc:
        raise MetricError(f"{where}: {exc.message}", hint=exc.hint) from None
    except Exception as exc:
        raise MetricError(f"{where}: {type(exc).__name__}: {exc}") from exc
    return Metric(
        name=spec.metric_name,
        type=spec.type,
        params=params,
        version=registered.version,
        scorer=scorer,
    )


def _params_model(type_name: str, factory: MetricFactory) -> Any:
    """A pydantic model of the factory's keyword-only parameters (extra keys forbidden)."""
    # include_extras keeps Annotated[..., Field(ge=0)] constraints, which would otherwise be lost
    hints = typing.get_type_hints(factory, include_extras=True)
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(factory).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        annotation = hints.get(parameter.name, Any)
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    return create_model(f"{type_name}_params", __config__=ConfigDict(extra="forbid"), **fields)
