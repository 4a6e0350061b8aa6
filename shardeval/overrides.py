"""Command-line and flow-parameter overrides applied to a spec.

``--model NAME`` and ``--set FIELD=VALUE`` (``--set model.params.temperature=0.7``,
``--set batch_size=50``, ``--set metrics[0].ignore_case=true``) change a loaded spec before
anything is derived from it (the run id included), so a sweep over models or parameters
needs no copies of the spec file. Values are YAML scalars (``0.7`` is a float, ``true`` a
bool, ``"7"`` a string); the model name of ``--model`` is always a string. The result is
validated like the file itself, and an error names the field path and the option it came from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from shardeval.errors import SpecError
from shardeval.spec import EvalSpec, field_path, load_spec

_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def resolve_spec(
    spec: str | Mapping[str, Any] | EvalSpec,
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
    model: str | None = None,
    overrides: Sequence[str] = (),
) -> EvalSpec:
    """Load a spec (path, URL, mapping or object) and apply overrides, validating them.

    Args:
        spec: the spec, or where to load it from.
        batch_size: ``--batch-size``.
        concurrency: ``--concurrency``.
        model: ``--model``: the model name (``model.model``).
        overrides: ``--set FIELD=VALUE`` strings, applied in order.

    Raises:
        SpecError: (exit 2) naming the field path and the option that set it.
    """
    loaded = spec if isinstance(spec, EvalSpec) else load_spec(spec)
    changes: list[tuple[list[str | int], Any, str]] = []
    for text in overrides:
        path, value = parse_override(text)
        changes.append((path, value, f"--set {text}"))
    if model is not None:
        changes.append((["model", "model"], model, f"--model {model}"))
    if batch_size is not None:
        changes.append((["batch_size"], batch_size, f"--batch-size {batch_size}"))
    if concurrency is not None:
        changes.append((["model", "concurrency"], concurrency, f"--concurrency {concurrency}"))
    if not changes:
        return loaded
    data = loaded.model_dump()
    origins: dict[str, str] = {}
    for path, value, origin in changes:
        _assign(data, path, value, origin)
        origins[field_path(tuple(path))] = origin
    try:
        updated = EvalSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_describe(exc, origins)) from None
    updated._source = loaded.source
    return updated


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``model.params.temperature=0.7`` → (``["model", "params", "temperature"]``, ``0.7``)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise SpecError(
            f"--set {text}: expected FIELD=VALUE, e.g. --set model.params.temperature=0.7"
        )
    path: list[str | int] = []
    for part in name.split("."):
        match = _PART.match(part)
        if match is None:
            raise SpecError(
                f"--set {text}: {name!r} is not a field path (fields separated by dots, list "
                "items as [0], e.g. metrics[0].target)"
            )
        path.append(match.group(1))
        path.extend(int(index) for index in re.findall(r"\[(\d+)\]", match.group(2)))
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {text}: the value is not valid YAML: {exc}") from None
    return path, value


def _assign(data: Any, path: list[str | int], value: Any, origin: str) -> None:
    """Set ``data[path] = value``, creating mappings on the way (e.g. a new model.params key)."""
    node = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = field_path(tuple(path[: depth + 1]))
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise SpecError(
                    f"{origin}: {where}: no such list item "
                    f"({field_path(tuple(path[:depth]))} has {size})"
                )
        elif not isinstance(node, dict):
            raise SpecError(
                f"{origin}: {where}: {field_path(tuple(path[:depth]))} is not a mapping"
            )
        if last:
            node[part] = value
            return
        if isinstance(part, str) and node.get(part) is None:
            node[part] = {}
        node = node[part]


def _describe(exc: ValidationError, origins: dict[str, str]) -> str:
    problems = []
    for error in exc.errors():
        path = field_path(tuple(error["loc"]))
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        origin = next(
            (o for p, o in origins.items() if path == p or path.startswith(p + ".")), None
        )
        problems.append(f"{path}: {message}" + (f" (from {origin})" if origin else ""))
    return "invalid option: " + "; ".join(problems)
