"""Everything that can be wrong with the input is found here, before the first model call.

Spec, dataset, prompts, metrics and provider settings are checked, every request keyed and
the batches cut (:func:`shardeval.planning.build_plan`). Problems are raised as exit-2 errors
naming the field, item or metric.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardeval.datasets import Dataset, read_dataset
from shardeval.errors import MetricError, SpecError
from shardeval.metrics import Metric, create_metrics
from shardeval.planning import RunPlan, build_plan
from shardeval.providers import check_provider
from shardeval.spec import EvalSpec


@dataclass
class Validated:
    """A spec whose dataset, prompts, metrics and provider settings all check out."""

    spec: EvalSpec
    dataset: Dataset
    metrics: list[Metric]
    plan: RunPlan


def validate(spec: EvalSpec, *, limit: int | None = None) -> Validated:
    """Read the dataset, render every prompt, build the metrics: raise on the first problem."""
    check_provider(spec.model)
    metrics = create_metrics(spec.metrics)
    dataset = read_dataset(spec.dataset, spec.dataset_url(), limit=limit)
    for index, metric in enumerate(metrics):
        target = metric.target_field
        if target is None:
            continue
        missing = dataset.missing_field(target)
        if missing is not None:
            item_id, item_index = missing
            raise MetricError(
                f"metrics[{index}] ({metric.name}): target field {target!r} is missing in "
                f"item {item_id!r} (row {item_index}) of {dataset.url}",
                hint=f"fields in the dataset: {', '.join(sorted(dataset.fields))}",
            )
    for field_name in spec.group_by:
        missing = dataset.missing_field(field_name)
        if missing is not None:
            raise SpecError(
                f"group_by: field {field_name!r} is missing in item {missing[0]!r} "
                f"(row {missing[1]}) of {dataset.url}",
                hint=f"fields in the dataset: {', '.join(sorted(dataset.fields))}",
            )
    plan = build_plan(spec, dataset)
    plan.limit = limit
    return Validated(spec=spec, dataset=dataset, metrics=metrics, plan=plan)
