"""shardeval: resumable, content-addressed LLM evaluation pipelines on Prefect.

The library never imports Prefect at import time: ``shardeval validate`` and a fully cached
``shardeval run`` answer in about a second, without Prefect's start-up cost.
"""

from __future__ import annotations

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

__all__ = [
    "DatasetError",
    "EvalSpec",
    "MetricError",
    "PermanentProviderError",
    "PromptError",
    "ProviderError",
    "RunInterrupted",
    "RunLockedError",
    "ShardevalError",
    "SpecError",
    "StorageError",
    "TransientProviderError",
    "__version__",
    "load_spec",
]
