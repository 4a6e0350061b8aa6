"""The comparison task: the run against its baseline, an artifact, and a Prefect event.

``shardeval.regression.detected`` on a regression, ``shardeval.run.completed`` otherwise (also
when there is no baseline yet), so an Automation can notify someone (docs/alerts.md).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from shardeval.alerts import publish_comparison, publish_completed, run_info
from shardeval.baseline import compare_with_baseline
from shardeval.session import RunSession


@task(name="compare-baseline", cache_policy=NO_CACHE, persist_result=False)
def compare_to_baseline(
    session: RunSession, summary: dict[str, Any], selector: str | None
) -> dict[str, Any] | None:
    """The comparison's JSON object (None without a baseline); publishes what it found."""
    store = session.store
    info = run_info(
        summary,
        results_url=store.url_of(store.results_path),
        metrics_url=store.url_of(store.metrics_path),
    )
    comparison = compare_with_baseline(store, session.spec.name, selector) if selector else None
    if comparison is None:
        publish_completed(info)
        return None
    publish_comparison(comparison, info)
    return comparison.to_dict()
