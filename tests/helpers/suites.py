"""Build suites on disk for tests: several eval specs and a suite file naming them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.helpers.specs import arith_items, write_spec


def write_suite(
    directory: Path,
    *,
    evals: int = 2,
    n_items: int = 20,
    base_url: str | None = None,
    models: list[dict[str, Any]] | None = None,
    spec_overrides: dict[str, Any] | None = None,
    **fields: Any,
) -> Path:
    """``directory/evals/e<i>/spec.yaml`` (eval ``e<i>``, its own items) and ``suite.yaml``.

    Each eval has different items (seeded by its index). ``fields`` become top-level keys of
    the suite file (``output`` defaults to ``directory/out``).
    """
    paths = []
    for i in range(evals):
        spec = write_spec(
            directory / "evals" / f"e{i}",
            base_url=base_url,
            items=arith_items(n_items, seed=i),
            name=f"e{i}",
            **(spec_overrides or {}),
        )
        paths.append(str(spec.relative_to(directory)))
    suite: dict[str, Any] = {"suite": "nightly", "output": str(directory / "out")}
    if models is not None:
        suite["models"] = models
    suite["evals"] = paths
    suite.update(fields)
    path = directory / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path
