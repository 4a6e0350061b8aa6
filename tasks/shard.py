"""The planning task: validate the spec, read the dataset, key every request, cut batches."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from shardeval.session import Validated, validate_cached
from shardeval.spec import EvalSpec


@task(name="shard-dataset", cache_policy=NO_CACHE, persist_result=False)
def shard_dataset(spec: EvalSpec, limit: int | None = None) -> Validated:
    """Everything checked before any model call; the plan holds keys, not messages."""
    return validate_cached(spec, limit=limit)
