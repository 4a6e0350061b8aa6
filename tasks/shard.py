"""The planning task: validate the spec, read the dataset, key every request, choose the run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from shardeval.session import RunSession


@task(name="shard-dataset", cache_policy=NO_CACHE, persist_result=False)
def prepare_run(spec: str | Mapping[str, Any] | RunSession, **options: Any) -> RunSession:
    """Everything checked before any model call; the plan holds keys, not messages.

    A session prepared by the CLI or ``shardeval.run`` (which validate before Prefect starts,
    so bad input fails in a second, and check the endpoint) is used as it is: the dataset is
    read once.
    """
    if isinstance(spec, RunSession):
        return spec
    session = RunSession.prepare(spec, **options)
    if session.answer_from_storage() is None:
        session.preflight()  # a deployment run: a wrong endpoint or key fails here, not per item
    return session
