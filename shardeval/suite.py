"""The suite file: many evals × many models in one YAML, and the cells it resolves to.

A suite names spec files (``evals:``), optionally a matrix of model overrides (``models:``)
and per-eval overrides (``set:``). Every (eval, model) pair is a **cell**, resolved here to an
ordinary :class:`~shardeval.spec.EvalSpec`: the spec as written, then the model entry merged
into its ``model`` block, then the eval's ``set`` (the most specific, so it wins), each step
re-validated by pydantic. Problems are reported like a spec's, with the suite file's line::

    nightly.yaml:9: evals[1].set.batch_size: Input should be greater than 0
    nightly.yaml:4: evals[0] (evals/arith.yaml): evals/arith.yaml:3: dataset.path: ...

Running cells (one run session each) is :mod:`shardeval.suite_session`'s. Nothing here
imports Prefect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shardeval.errors import SpecError
from shardeval.spec import (
    NAME_PATTERN,
    EvalSpec,
    ModelSpec,
    describe_problem,
    invalid_file,
    line_of,
    load_spec,
    resolve_relative,
    yaml_mapping,
)


class SuiteError(SpecError):
    """The suite file, or one of its specs as the suite resolves it, is invalid (exit 2)."""


class EvalEntry(BaseModel):
    """One eval of the suite: a spec and overrides of its fields."""

    model_config = ConfigDict(extra="forbid")

    path: str
    """Spec path (relative to the suite file) or URL."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Overrides of that spec's fields, merged into it (``{batch_size: 200, trials: 3}``)."""


class SuiteSpec(BaseModel):
    """A suite file (see docs/suites.md)."""

    model_config = ConfigDict(extra="forbid")

    suite: str = Field(pattern=NAME_PATTERN)
    """Suite name; the start of the suite run id."""
    output: str | None = None
    """Overrides every spec's ``output`` (any fsspec URL); ``--output`` overrides this."""
    models: list[dict[str, Any]] | None = None
    """Optional matrix: each entry overrides fields of every spec's ``model`` block."""
    evals: list[str | EvalEntry] = Field(min_length=1)
    """Spec paths/URLs, or ``{path, set}`` entries."""
    parallel: int = Field(default=2, gt=0, le=64)
    """Cells evaluated at once in one process."""

    @field_validator("models")
    @classmethod
    def _model_fields_exist(cls, models: list[dict[str, Any]] | None) -> Any:
        if models is not None and not models:
            raise ValueError("must list at least one model, or be left out")
        for index, entry in enumerate(models or []):
            unknown = sorted(set(entry) - set(ModelSpec.model_fields))
            if unknown:
                raise ValueError(
                    f"models[{index}]: unknown model field(s) {', '.join(unknown)}; "
                    f"known: {', '.join(ModelSpec.model_fields)}"
                )
        return models


@dataclass(frozen=True)
class Cell:
    """One (eval, model) pair of a suite, resolved to the spec its run evaluates."""

    eval_index: int
    model_index: int | None
    eval_label: str
    """The spec's name (made unique within the suite)."""
    model_label: str
    """The model's name (or function), made unique within the suite."""
    spec: EvalSpec
    spec_path: str
    """Where the spec was loaded from (as written in the suite file)."""
    where: str
    """``suite.yaml:7: evals[1] (evals/qa.yaml) × models[0]``: for error messages."""


@dataclass(frozen=True)
class LoadedSuite:
    """A validated suite file and its cells (not yet validated against their datasets)."""

    spec: SuiteSpec
    source: str | None
    cells: list[Cell]


def is_suite_file(source: str) -> bool:
    """Whether the YAML at ``source`` is a suite (a top-level ``suite:`` key).

    Anything unreadable is "not a suite": loading it as a spec then reports the problem.
    """
    try:
        data = yaml.safe_load(read_text(source))
    except (SpecError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "suite" in data


def load_suite(source: str | Path | Mapping[str, Any]) -> LoadedSuite:
    """Load and validate a suite file and resolve every cell's spec (raises :class:`SuiteError`)."""
    if isinstance(source, Mapping):
        text, origin, path = None, "<suite>", None
        data: Any = dict(source)
    else:
        origin = path = str(source)
        text = read_text(origin)
        data = yaml_mapping(text, origin, what="a suite", error=SuiteError)
    if not isinstance(data, dict):
        raise SuiteError(f"{origin}: a suite must be a YAML mapping, got {type(data).__name__}")
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        raise invalid_file(
            exc, text, origin, what="suite", error=SuiteError, location=_without_branch
        ) from None
    return LoadedSuite(spec=spec, source=path, cells=_resolve(spec, text, origin, path))


def _resolve(spec: SuiteSpec, text: str | None, origin: str, source: str | None) -> list[Cell]:
    models: list[dict[str, Any] | None] = list(spec.models) if spec.models else [None]
    cells: list[Cell] = []
    for e, entry in enumerate(spec.evals):
        entry = entry if isinstance(entry, EvalEntry) else EvalEntry(path=entry)
        where = f"{_at(text, origin, ('evals', e))}evals[{e}] ({entry.path})"
        try:
            base = load_spec(resolve_relative(entry.path, source))
        except SpecError as exc:
            raise SuiteError(f"{where}: {exc.message}", hint=exc.hint) from None
        for m, overrides in enumerate(models):
            resolved = base
            if overrides is not None:
                resolved = _merged(resolved, {"model": overrides}, text, origin, ("models", m))
            if entry.set:
                resolved = _merged(resolved, entry.set, text, origin, ("evals", e, "set"))
            model_index = m if overrides is not None else None
            cell_where = where + (f" × models[{m}]" if overrides is not None else "")
            cells.append(Cell(e, model_index, "", "", resolved, entry.path, cell_where))
    return _labelled(cells)


def with_overrides(spec: EvalSpec, overrides: Mapping[str, Any]) -> EvalSpec:
    """``spec`` with ``overrides`` deep-merged into its fields, re-validated by pydantic.

    Mappings merge key by key (``{model: {concurrency: 4}}`` keeps the other model fields);
    anything else (lists such as ``metrics``, scalars) is replaced. The spec keeps its source,
    so a relative dataset path still resolves against the spec file.
    """
    updated = EvalSpec.model_validate(deep_merge(spec.model_dump(), overrides))
    updated._source = spec.source
    return updated


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in (mappings recursively)."""
    merged = dict(base)
    for key, value in overrides.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(old, value)
        else:
            merged[key] = value
    return merged


def _merged(
    spec: EvalSpec,
    overrides: Mapping[str, Any],
    text: str | None,
    origin: str,
    loc: tuple[Any, ...],
) -> EvalSpec:
    """Apply overrides; a problem names the suite line of the override that caused it."""
    try:
        return with_overrides(spec, overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field_loc = tuple(err["loc"])
            if loc[0] == "models" and field_loc[:1] == ("model",):
                field_loc = field_loc[1:]  # models[0].concurrency, not models[0].model.concurrency
            full = (*loc, *field_loc)
            problems.append(
                _at(text, origin, full)
                + describe_problem({**err, "loc": full})
                + f" (in {spec.source or spec.name})"
            )
        raise SuiteError("\n".join(problems)) from None


def _labelled(cells: list[Cell]) -> list[Cell]:
    """Give cells eval and model labels, unique within the suite (they head the table)."""
    eval_names = _unique({c.eval_index: c.spec.name for c in cells})
    model_names = _unique(
        {
            c.model_index if c.model_index is not None else -1 - c.eval_index: (
                c.spec.model.model
                or (c.spec.model.function or "").rsplit(":", 1)[-1]
                or c.spec.model.provider
            )
            for c in cells
        }
    )
    out = []
    for c in cells:
        key = c.model_index if c.model_index is not None else -1 - c.eval_index
        out.append(
            Cell(
                c.eval_index,
                c.model_index,
                eval_names[c.eval_index],
                model_names[key],
                c.spec,
                c.spec_path,
                c.where,
            )
        )
    return out


def _unique(names: dict[int, str]) -> dict[int, str]:
    """``{index: name}`` with repeated names told apart as ``name#2``, ``name#3``...

    Several evals without a ``models:`` matrix may share one model: same name, same label.
    """
    seen: dict[str, int] = {}
    by_name: dict[str, str] = {}
    out: dict[int, str] = {}
    for index in sorted(names, key=lambda i: (i < 0, abs(i))):
        name = names[index]
        if index < 0:  # a spec's own model (no matrix): same name, same column
            out[index] = by_name.setdefault(name, name)
            continue
        seen[name] = seen.get(name, 0) + 1
        out[index] = name if seen[name] == 1 else f"{name}#{seen[name]}"
    return out


def _at(text: str | None, origin: str, loc: tuple[Any, ...]) -> str:
    line = line_of(text, loc)
    return f"{origin}:{line}: " if line else f"{origin}: "


def _without_branch(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``evals[0].EvalEntry.set`` as ``evals[0].set``: a union branch's name is no field."""
    if loc and loc[0] == "evals" and len(loc) > 2 and loc[2] in ("str", "EvalEntry"):
        return (loc[0], loc[1], *loc[3:])
    return loc


def read_text(origin: str) -> str:
    """The text of a suite file (path or fsspec URL), as a :class:`SuiteError` if unreadable."""
    try:
        with fsspec.open(origin, "r", encoding="utf-8") as handle:
            return str(handle.read())
    except FileNotFoundError as exc:
        raise SuiteError(f"suite file not found: {origin}") from exc
    except (OSError, ValueError) as exc:
        raise SuiteError(f"cannot read suite file {origin}: {exc}") from exc


__all__ = [
    "Cell",
    "EvalEntry",
    "LoadedSuite",
    "SuiteError",
    "SuiteSpec",
    "deep_merge",
    "is_suite_file",
    "load_suite",
    "read_text",
    "with_overrides",
]
