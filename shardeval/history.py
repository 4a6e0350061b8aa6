"""The complete runs of one eval under an output: their history, and the baseline of a new run.

Cost on an object store is bounded by the number of runs, never by their size: one listing of
``runs/``, then every run's small ``metrics.json`` in one concurrent ``cat``. ``history`` also
reads the score column (and ids) of the last ``--last`` runs' ``results.parquet``, each once,
to compare consecutive runs on their common items.

Like :mod:`shardeval.status` it only reads: a damaged ``metrics.json`` is skipped here, never
set aside (that is the run's own job when it resumes).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shardeval.catalog import list_run_ids, runs_dir
from shardeval.compare import compare_results
from shardeval.comparison import UnknownMetric
from shardeval.hashing import canonical_json
from shardeval.run_reader import read_run
from shardeval.storage import RunStore

TAG_PREFIX = "tag:"


def list_complete_runs(output: str, name: str | None = None) -> list[dict[str, Any]]:
    """metrics.json of every complete run under ``output`` (of eval ``name``), oldest first.

    Sorted by ``finished_at`` (ISO 8601 UTC, so text order is time order), then run id.
    """
    store = runs_dir(output)
    parent = posixpath.dirname(store.root)
    paths = [posixpath.join(parent, run_id, "metrics.json") for run_id in list_run_ids(output)]
    found = []
    for data in _cat(store, paths):
        try:
            metrics = json.loads(data) if data is not None else None
        except ValueError:
            continue
        if not isinstance(metrics, dict) or not metrics.get("complete"):
            continue
        if name is not None and metrics.get("name") != name:
            continue
        found.append(metrics)
    found.sort(key=lambda m: (str(m.get("finished_at") or ""), str(m.get("run_id"))))
    return found


def _cat(store: RunStore, paths: list[str]) -> list[bytes | None]:
    """The bytes of each path (None where missing or unreadable), in one concurrent call."""
    if not paths:
        return []
    blobs = store._guard("read", paths[0], lambda: store.fs.cat(paths, on_error="return"))
    if not isinstance(blobs, dict):  # fsspec returns bare bytes for a single path
        blobs = {paths[0]: blobs}
    out: list[bytes | None] = []
    for path in paths:
        data = blobs.get(path, blobs.get(store.url_of(path)))
        out.append(data if isinstance(data, bytes) else None)
    return out


def find_baseline(
    output: str,
    name: str,
    before_run_id: str,
    spec_selector: str = "previous",
    *,
    model: Mapping[str, Any] | None = None,
) -> str | None:
    """The run to compare ``before_run_id`` with, or None if there is none yet.

    Args:
        output: Where the runs are stored.
        name: The eval name (metrics.json ``name``).
        before_run_id: The new run; only runs that finished before it count (all other
            complete runs, if it has not finished).
        spec_selector: ``previous`` (the latest such run), ``tag:T`` (the latest such run
            tagged ``T``: its ``tags.json`` lists T) or a run id (returned as given; reading it
            reports a missing or incomplete run).
        model: A model fingerprint (:func:`shardeval.hashing.model_fingerprint`): only runs of
            that model count (a suite's cell against its own earlier run, not another model's
            run of the same eval). None: any model, as a single ``run --baseline`` does.
    """
    if spec_selector != "previous" and not spec_selector.startswith(TAG_PREFIX):
        return spec_selector
    runs = list_complete_runs(output, name)
    mine = next((m for m in runs if m.get("run_id") == before_run_id), None)
    cutoff = str(mine.get("finished_at") or "") if mine else None
    earlier = [
        m
        for m in runs
        if m.get("run_id") != before_run_id
        and (cutoff is None or str(m.get("finished_at") or "") < cutoff)
    ]
    tag = spec_selector[len(TAG_PREFIX) :] if spec_selector.startswith(TAG_PREFIX) else None
    for metrics in reversed(earlier):  # newest first: the files of older runs are not read
        run_id = str(metrics.get("run_id"))
        if tag is not None and tag not in _tags(output, run_id):
            continue
        if model is not None and not _same_model(output, metrics, model):
            continue
        return run_id
    return None


def _same_model(output: str, metrics: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> bool:
    """Whether a complete run was made by the model of ``fingerprint``.

    metrics.json names the provider, model and revision (enough to skip other models without
    reading more); the run's spec.json holds its whole fingerprint (params, function).
    """
    named = metrics.get("model")
    if not isinstance(named, Mapping):
        return False
    if any(named.get(k) != fingerprint.get(k) for k in ("provider", "model", "revision")):
        return False
    store = RunStore(output, str(metrics.get("run_id")))
    record = store.read_bytes(store.spec_path)
    try:
        recorded = json.loads(record).get("model_fingerprint") if record else None
    except (ValueError, AttributeError):
        return False
    return recorded is not None and canonical_json(recorded) == canonical_json(fingerprint)


def _tags(output: str, run_id: str) -> list[str]:
    """A run's tags: the JSON list in ``<run>/tags.json`` (empty when there is none)."""
    store = RunStore(output, run_id)
    data = store.read_bytes(store.path("tags.json"))
    try:
        tags = json.loads(data) if data else []
    except ValueError:
        return []
    return [str(t) for t in tags] if isinstance(tags, list) else []


@dataclass
class HistoryPoint:
    """One complete run in the history of a metric."""

    run_id: str
    finished_at: str | None
    model: str | None
    mean: float | None
    ci95: list[float] | None
    n: int | None
    delta: float | None = None
    """Paired change from the previous run, on their common rows."""
    p: float | None = None
    verdict: str | None = None
    """``regression`` / ``improvement`` / ``inconclusive`` against the previous run."""

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return dict(self.__dict__)


@dataclass
class History:
    """A metric over the complete runs of one eval, newest last."""

    name: str
    metric: str
    alpha: float
    points: list[HistoryPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "name": self.name,
            "metric": self.metric,
            "alpha": self.alpha,
            "runs": [p.to_dict() for p in self.points],
        }


def history(
    output: str, name: str, metric: str | None = None, *, last: int = 30, alpha: float = 0.05
) -> History:
    """The metric over the last ``last`` complete runs of ``name``, each change tested.

    Raises:
        UnknownMetric: no such eval under ``output``, or no run of it has the metric (exit 2).
    """
    runs = list_complete_runs(output, name)
    if not runs:
        names = sorted({str(m.get("name")) for m in list_complete_runs(output)})
        raise UnknownMetric(
            f"no complete run of eval {name!r} under {output}",
            hint=f"evals with complete runs there: {', '.join(names)}" if names else None,
        )
    runs = runs[-last:]
    available = sorted({k for m in runs for k in (m.get("metrics") or {})})
    metric = metric or next(iter(runs[-1].get("metrics") or {}), None)
    if metric is None or metric not in available:
        raise UnknownMetric(
            f"metric {metric!r} is in no complete run of {name!r}; metrics there: "
            + (", ".join(available) or "none")
        )
    result = History(name=name, metric=metric, alpha=alpha)
    previous = None
    for metrics in runs:
        stats = (metrics.get("metrics") or {}).get(metric)
        point = HistoryPoint(
            run_id=str(metrics.get("run_id")),
            finished_at=metrics.get("finished_at"),
            model=(metrics.get("model") or {}).get("model"),
            mean=stats.get("mean") if stats else None,
            ci95=stats.get("ci95") if stats else None,
            n=stats.get("n") if stats else None,
        )
        result.points.append(point)
        if stats is None:
            previous = None
            continue
        current = read_run(point.run_id, output, ["item_id", "trial", f"score_{metric}"])
        if previous is not None:
            change = compare_results(
                previous.results,
                current.results,
                base_id=previous.run_id,
                cand_id=current.run_id,
                metrics=[metric],
                alpha=alpha,
            ).metrics[metric]
            point.delta, point.p, point.verdict = change.delta, change.p, change.verdict
        previous = current
    return result
