"""The aggregation task: results.parquet, metrics.json, and the Prefect artifacts.

Artifacts are created here, in a task that is never cached, because artifacts made inside a
cached task do not reappear on a cache hit.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from shardeval.reporting import metrics_rows, summary_markdown
from shardeval.session import RunSession


def artifact_key(run_id: str, suffix: str) -> str:
    """A valid artifact key for a run: lowercase letters, digits and dashes only."""
    safe = "".join(c if c.isalnum() else "-" for c in run_id.lower()).strip("-")
    return f"{safe[:50]}-{suffix}"


@task(name="aggregate", cache_policy=NO_CACHE, persist_result=False)
def aggregate(session: RunSession) -> dict[str, Any]:
    """Write the run's results and publish its metrics table and summary in the Prefect UI."""
    done = session.finalize()
    summary = done.metrics_json
    store = session.store
    progress = session.progress
    run_stats = {"sent": progress.sent, "from_cache": progress.from_cache}
    create_table_artifact(
        key=artifact_key(store.run_id, "metrics"),
        table=metrics_rows(summary),
        description=f"Metrics of {store.run_id} (mean, 95% CI, n)",
    )
    markdown = summary_markdown(summary, run_stats, done.results_uri, done.metrics_uri)
    if "errors by kind" not in markdown:
        # Say so when there were none, rather than leave the reader wondering.
        markdown = markdown.replace("\n\n- results:", "\n- errors by kind: none\n\n- results:", 1)
    create_markdown_artifact(
        key=artifact_key(store.run_id, "summary"),
        markdown=markdown,
        description=f"Summary of {store.run_id}",
    )
    return summary
