"""shardeval: resumable, content-addressed LLM evaluation pipelines on Prefect.

The library never imports Prefect at import time: ``shardeval validate`` and a fully cached
``shardeval run`` answer without Prefect's start-up cost. The Python API (``run``,
``resume``, ``open_run``, ``rescore``, ``Run``) is loaded on first use, so
``import shardeval`` stays light.
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
from shardeval.spec import EvalSpec, load_spec

if TYPE_CHECKING:
    from shardeval.api import Run, compare, open_run, rescore, resume, run

_API = ("Run", "compare", "open_run", "rescore", "resume", "run")

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
    """The Python API, imported when first used (it pulls in storage and pandas)."""
    if name in _API:
        from shardeval import api

        return getattr(api, name)
    raise AttributeError(f"module 'shardeval' has no attribute {name!r}")
