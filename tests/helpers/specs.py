"""Build eval specs and datasets on disk for tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml


def arith_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` items ``{"id", "a", "b", "answer"}`` with unique ids."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(-99, 999), rng.randint(0, 999)
        items.append({"id": f"q{i:05d}", "a": a, "b": b, "answer": a + b})
    return items


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def write_spec(
    directory: Path,
    *,
    base_url: str | None = None,
    items: list[dict[str, Any]] | None = None,
    n_items: int = 40,
    name: str = "arith",
    **overrides: Any,
) -> Path:
    """Write ``items.jsonl`` and ``spec.yaml`` in ``directory``; return the spec path.

    With ``base_url`` the model is the test server (openai provider); without it, the bundled
    offline python model. ``overrides`` replace top-level keys; ``model`` is merged.
    """
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "items.jsonl", items if items is not None else arith_items(n_items))
    if base_url:
        model: dict[str, Any] = {
            "provider": "openai",
            "model": "test-model",
            "base_url": base_url,
            "params": {"temperature": 0},
            "concurrency": 8,
            "max_retries": 1,
            "timeout_s": 10,
        }
    else:
        model = {
            "provider": "python",
            "function": "shardeval.testing.models:arith",
            "concurrency": 8,
        }
    model.update(overrides.pop("model", {}))
    spec: dict[str, Any] = {
        "name": name,
        "dataset": {"path": "items.jsonl", "id_field": "id"},
        "prompt": {"system": "Answer with the number only.", "user": "What is {{ a }} + {{ b }}?"},
        "model": model,
        "metrics": [{"type": "exact_match", "target": "answer"}],
        "batch_size": 10,
        "output": str(directory / "runs"),
    }
    spec.update(overrides)
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def first_work(validated: Any, store: Any) -> Any:
    """The first batch's work, as the evaluate flow gets it from a fresh attempt's survey."""
    from shardeval.session import RunSession

    session = RunSession(validated, store.run_id, store)
    with session.attempt():
        stage = next(session.stages())
        work, _stale = next(iter(stage.works))
    return work
