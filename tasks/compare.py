"""The comparison task: the run against its baseline, an artifact, and a Prefect event.

``shardeval.regression.detected`` on a regression, ``shardeval.run.completed`` otherwise (also
when there is no baseline yet), so an Automation can notify someone (docs/alerts.md). The
``evaluate`` flow runs it after aggregating; the suite flow runs it for each cell that came
back from storage (the cells it ran compared themselves, in their own ``evaluate`` subflow).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from shardeval.alerts import artifact_key, publish_comparison, publish_completed, run_info
from shardeval.baseline import compare_with_baseline
from shardeval.hashing import model_fingerprint
from shardeval.pricing import model_label
from shardeval.session import RunSession


@task(name="compare-baseline", cache_policy=NO_CACHE, persist_result=False)
def compare_to_baseline(
    session: RunSession,
    summary: dict[str, Any],
    selector: str | None,
    same_model: bool = False,
) -> dict[str, Any] | None:
    """The comparison's JSON object (None without a baseline); publishes what it found.

    ``same_model`` (a suite's cell): only earlier runs of this run's model count as its
    baseline, and the artifact is keyed by eval and model (one history per cell in the UI).
    """
    store = session.store
    info = run_info(
        summary,
        results_url=store.url_of(store.results_path),
        metrics_url=store.url_of(store.metrics_path),
    )
    model = model_fingerprint(session.spec.model) if same_model else None
    comparison = (
        compare_with_baseline(store, session.spec.name, selector, model=model) if selector else None
    )
    if comparison is None:
        publish_completed(info)
        return None
    key = (
        artifact_key(f"{session.spec.name}-{model_label(session.spec.model)}")
        if same_model
        else None
    )
    publish_comparison(comparison, info, key=key)
    return comparison.to_dict()
