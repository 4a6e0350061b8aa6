"""The eval spec: a YAML file validated by pydantic, with errors that say where.

Unknown keys are errors everywhere (``extra="forbid"``), so a typo such as ``batch_sise`` is
reported instead of silently ignored. :func:`load_spec` reports problems as
``spec.yaml:12: model.concurrency: Input should be greater than 0``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from shardeval.errors import ShardevalError, SpecError

NAME_PATTERN = r"^[A-Za-z0-9._-]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DatasetSpec(_Strict):
    """Where the items come from."""

    path: str
    """Relative to the spec file, or any fsspec URL (``s3://``, ``gs://``, ``memory://``)."""
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    """File format; ``auto`` decides from the file extension."""
    id_field: str | None = None
    """Field holding a unique item id; without it an item's id is the hash of its content."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to fsspec when opening the dataset. Never written to spec.json."""


class PromptSpec(_Strict):
    """How an item becomes chat messages (Jinja2 with StrictUndefined)."""

    system: str | None = None
    """Optional system message template."""
    user: str
    """User message template; ``{{ field }}`` refers to the item's fields."""


class PricingSpec(_Strict):
    """USD per million tokens, as the provider bills them (overrides the pinned price table)."""

    prompt_per_mtok: float = Field(ge=0)
    """USD per million prompt (input) tokens."""
    completion_per_mtok: float = Field(ge=0)
    """USD per million completion (output) tokens."""


class ModelSpec(_Strict):
    """The model under evaluation and how to reach it."""

    provider: str = "openai"
    """``openai`` (any OpenAI-compatible chat-completions endpoint) or ``python``."""
    model: str = ""
    """Model name sent to the endpoint (part of the model fingerprint)."""
    base_url: str | None = None
    """Endpoint root such as ``http://127.0.0.1:8000/v1``. Not part of the fingerprint."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the key; the key itself is never stored."""
    revision: str = ""
    """Tells checkpoints of one model name apart (part of the fingerprint)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Sampling parameters sent with every request (part of the fingerprint)."""
    concurrency: int = Field(default=16, gt=0, le=4096)
    """Requests in flight at once, across all batches of the run."""
    function: str | None = None
    """``package.module:callable`` for the ``python`` provider (part of the fingerprint)."""
    timeout_s: float = Field(default=120.0, gt=0)
    """Timeout of one request, in seconds."""
    max_retries: int = Field(default=6, ge=0, le=100)
    """Retries of a transient failure (timeout, 429, 5xx, connection) before giving up."""
    prefect_limit: str | None = None
    """Optional Prefect global concurrency limit that throttles requests across processes."""
    unreachable_after_s: float = Field(default=30.0, gt=0)
    """Stop the run (exit 1, resumable) when every request has failed to connect for this long.

    Not part of the fingerprint (it says how long to wait for an endpoint, not which model).
    """
    pricing: PricingSpec | None = None
    """Price of this model's tokens; without it the pinned table may price a known model name,
    otherwise cost is unknown (null, never 0). Not part of the fingerprint: a price change
    re-prices stored rows, it never re-sends them."""
    max_cost_usd: float | None = Field(default=None, gt=0)
    """Stop sending once what the run has spent reaches this many USD (exit 1, resumable).
    Needs a price (``pricing`` or a table entry). Not part of the fingerprint."""

    @field_validator("function")
    @classmethod
    def _function_is_dotted(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[\w.]+:[\w.]+$", value):
            raise ValueError("must look like 'package.module:callable'")
        return value


class MetricSpec(BaseModel):
    """One metric; its parameters are validated by the metric's own factory."""

    model_config = ConfigDict(extra="allow")

    type: str
    """Registered metric type (``exact_match``, ``includes``, ``regex``, ``numeric``, ...)."""
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    """Column ``score_<name>``; defaults to the type."""

    @property
    def metric_name(self) -> str:
        """The name the metric is reported under."""
        return self.name or self.type

    @property
    def params(self) -> dict[str, Any]:
        """Parameters other than ``type`` and ``name``."""
        return dict(self.model_extra or {})


class EvalSpec(_Strict):
    """A whole evaluation: dataset × prompt × model × metrics."""

    name: str = Field(pattern=NAME_PATTERN)
    """Eval name; the start of the default run id."""
    dataset: DatasetSpec
    prompt: PromptSpec
    model: ModelSpec
    metrics: list[MetricSpec] = Field(default_factory=list)
    group_by: list[str] = Field(default_factory=list)
    """Dataset fields to break metrics down by (``metrics.json`` gains ``by_group``)."""
    batch_size: int = Field(default=100, gt=0, le=1_000_000)
    """Items per Prefect batch task (hundreds keep Prefect's ~20 ms per task negligible)."""
    trials: int = Field(default=1, gt=0, le=1000)
    """Times each item is sent; the trial number is part of the item key."""
    output: str = "./shardeval-runs"
    """Any fsspec URL; ``--output`` overrides it."""
    flush_every_s: float = Field(default=2.0, gt=0)
    """Finished items of a running batch become durable at least this often."""
    flush_every_items: int = Field(default=16, gt=0)
    """...or after this many finished items, whichever comes first."""
    grace_period_s: float = Field(default=5.0, ge=0)
    """On Ctrl-C/SIGTERM, how long requests in flight may finish before the run stops."""
    report: bool = True
    """Write ``report.html`` (one self-contained page) when the run completes."""

    _source: str | None = PrivateAttr(default=None)

    @field_validator("metrics")
    @classmethod
    def _unique_metric_names(cls, metrics: list[MetricSpec]) -> list[MetricSpec]:
        seen: set[str] = set()
        for metric in metrics:
            if metric.metric_name in seen:
                raise ValueError(f"two metrics are named {metric.metric_name!r}; set 'name'")
            seen.add(metric.metric_name)
        return metrics

    @property
    def source(self) -> str | None:
        """URL or path of the file this spec was loaded from, if any."""
        return self._source

    def dataset_url(self) -> str:
        """The dataset location, with a relative path resolved against the spec file."""
        return resolve_relative(self.dataset.path, self._source)

    def public_dict(self) -> dict[str, Any]:
        """The spec as JSON-able data without secrets (storage options are dropped)."""
        data = self.model_dump(mode="json")
        data["dataset"].pop("storage_options", None)
        return data


def resolve_relative(path: str, source: str | None) -> str:
    """Resolve ``path`` against the directory of ``source`` unless it is absolute or a URL."""
    if "://" in path or path.startswith("/") or source is None:
        return path if "://" in path else str(Path(path).expanduser().resolve())
    if "://" in source:
        protocol, rest = source.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), path))}"
    return str((Path(source).expanduser().resolve().parent / path).resolve())


def load_spec(source: str | Path | Mapping[str, Any]) -> EvalSpec:
    """Load and validate a spec from a YAML path/URL or from a mapping.

    Raises:
        SpecError: naming the file, the line and the field path of each problem.
    """
    if isinstance(source, Mapping):
        return _validate(dict(source), text=None, origin="<spec>", source=None)
    origin = str(source)
    try:
        with fsspec.open(origin, "r", encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError as exc:
        raise SpecError(f"spec file not found: {origin}") from exc
    except OSError as exc:
        raise SpecError(f"cannot read spec file {origin}: {exc}") from exc
    data = yaml_mapping(text, origin, what="the spec", error=SpecError)
    return _validate(data, text=text, origin=origin, source=origin)


def yaml_mapping(
    text: str, origin: str, *, what: str, error: type[ShardevalError] = SpecError
) -> dict[str, Any]:
    """Parse YAML that must be a mapping (a spec, a suite); errors say ``file:line``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark is not None else origin
        raise error(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise error(f"{origin}: {what} must be a YAML mapping, got {type(data).__name__}")
    return data


def _validate(
    data: dict[str, Any], *, text: str | None, origin: str, source: str | None
) -> EvalSpec:
    try:
        spec = EvalSpec.model_validate(data)
    except ValidationError as exc:
        raise invalid_file(exc, text, origin, what="spec") from None
    spec._source = source
    return spec


def invalid_file(
    exc: ValidationError,
    text: str | None,
    origin: str,
    *,
    what: str,
    error: type[ShardevalError] = SpecError,
    location: Callable[[tuple[Any, ...]], tuple[Any, ...]] = tuple,
) -> ShardevalError:
    """A YAML file's pydantic errors as one error, a ``file:line: field: problem`` line each.

    Specs and suites report alike, so a user reads one format. ``location`` maps pydantic's
    location of a problem to the YAML path where it is found (a suite drops the names pydantic
    gives a union's branches); the line is that node's, or its nearest parent's.
    """
    lines = []
    for err in exc.errors():
        loc = location(tuple(err["loc"]))
        line = line_of(text, loc)
        where = f"{origin}:{line}: " if line else ""
        lines.append(f"{where}{describe_problem({**err, 'loc': loc})}")
    return error(
        f"{origin}: invalid {what} ({len(lines)} problem{'s' if len(lines) > 1 else ''}):\n"
        + "\n".join(f"  {line}" for line in lines)
    )


def describe_problem(error: Any, *, prefix: str = "", unknown: str = "unknown field") -> str:
    """One pydantic error as ``prefix.metrics[0].target: required field is missing``."""
    path = field_path(tuple(error["loc"]))
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = unknown
    elif error["type"] == "missing":
        message = "required field is missing"
    return f"{prefix}{path}: {message}"


def validation_problems(exc: ValidationError, **options: Any) -> str:
    """Every problem of a pydantic error, ``; ``-separated (see :func:`describe_problem`)."""
    return "; ".join(describe_problem(err, **options) for err in exc.errors())


def field_path(loc: tuple[Any, ...]) -> str:
    """Render a pydantic location as ``metrics[0].target``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def line_of(text: str | None, loc: tuple[Any, ...]) -> int | None:
    """Line number (1-based) of the YAML node at ``loc``, or of its nearest existing parent."""
    if text is None:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == part), None)
            if found is None:
                break
            line = found[0].start_mark.line + 1
            node = found[1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
