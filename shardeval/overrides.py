"""Command-line and flow-parameter overrides applied to a spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from shardeval.errors import SpecError
from shardeval.spec import EvalSpec, load_spec


def resolve_spec(
    spec: str | Mapping[str, Any] | EvalSpec,
    *,
    batch_size: int | None = None,
    concurrency: int | None = None,
) -> EvalSpec:
    """Load a spec (path, URL, mapping or object) and apply overrides, validating them."""
    loaded = spec if isinstance(spec, EvalSpec) else load_spec(spec)
    changes: dict[str, Any] = {}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if concurrency is not None:
        changes["model"] = {**loaded.model.model_dump(), "concurrency": concurrency}
    if not changes:
        return loaded
    try:
        updated = EvalSpec.model_validate({**loaded.model_dump(), **changes})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"invalid option: {problems}") from None
    updated._source = loaded.source
    return updated
