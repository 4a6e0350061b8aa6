"""shardeval: resumable, content-addressed LLM evaluation pipelines on Prefect.

The library never imports Prefect at import time: ``shardeval validate`` and a fully cached
``shardeval run`` answer without Prefect's start-up cost. The Python API (``run``,
``resume``, ``open_run``, ``rescore``, ``Run``) and the spec model (``EvalSpec``,
``load_spec``: pydantic, fsspec) are loaded on first use, so ``import shardeval`` stays light
(a complete run's rerun answers from its record without either, see
:mod:`shardeval.answer_record`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from shardeval.errors import (
    DatasetError,
    MetricError,
    PermanentProviderError,
    PromptError,
    ProviderError,
    RunInterrupted,
    RunLockedError,
    ShardevalError,
    SpecError,
    StorageError,
    TransientProviderError,
)

if TYPE_CHECKING:
    from shardeval.api import Run, compare, open_run, rescore, resume, run
    from shardeval.spec import EvalSpec, load_spec

_API = ("Run", "compare", "open_run", "rescore", "resume", "run")
_SPEC = ("EvalSpec", "load_spec")

__all__ = [
    "DatasetError",
    "EvalSpec",
    "MetricError",
    "PermanentProviderError",
    "PromptError",
    "ProviderError",
    "Run",
    "RunInterrupted",
    "RunLockedError",
    "ShardevalError",
    "SpecError",
    "StorageError",
    "TransientProviderError",
    "__version__",
    "compare",
    "load_spec",
    "open_run",
    "rescore",
    "resume",
    "run",
]


def __getattr__(name: str) -> Any:
    """The Python API and the spec model, imported when first used (pandas, pydantic)."""
    if name in _API:
        from shardeval import api

        return getattr(api, name)
    if name in _SPEC:
        from shardeval import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'shardeval' has no attribute {name!r}")
