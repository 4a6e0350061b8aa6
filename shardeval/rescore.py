"""Re-score a finished run's stored responses with (possibly new) metrics: no model call.

The spec defaults to the run's own (from ``spec.json``). A given spec may change ``metrics``
and ``group_by`` freely; its model, prompt, dataset and trials must produce requests that the
run already answered, otherwise there is nothing to score without calling the model, and
:func:`prepare_rescore` says so (run ``shardeval run`` for that). The run's batch size is kept,
so the stored batch files line up with the plan.
"""

from __future__ import annotations

from shardeval.catalog import open_store
from shardeval.errors import SpecError
from shardeval.overrides import resolve_spec
from shardeval.session import RunSession
from shardeval.spec import EvalSpec
from shardeval.storage import RunStore
from shardeval.validation import validate


def run_spec(store: RunStore) -> EvalSpec:
    """The spec a run was made with, as recorded in its spec.json."""
    record = store.read_json(store.spec_path)
    if not isinstance(record, dict) or "spec" not in record:
        raise SpecError(
            f"no run {store.run_id!r} under {store.output} (no readable spec.json)",
            hint="check the run id (`ls <output>/runs`) and --output",
        )
    spec = EvalSpec.model_validate(record["spec"])
    spec._source = record.get("spec_source")
    return spec


def prepare_rescore(run_id: str, output: str, spec_source: str | None = None) -> RunSession:
    """A session scoring run ``run_id`` with ``spec_source``'s metrics (default: its own).

    Raises SpecError if the spec needs model calls (its requests are not all stored).
    """
    store = open_store(output, run_id)
    recorded = run_spec(store)
    spec = resolve_spec(spec_source) if spec_source else recorded
    if spec.batch_size != recorded.batch_size:
        spec = resolve_spec(spec, batch_size=recorded.batch_size)
    validated = validate(spec)
    committed = store.list_batches()
    missing = [b for b in validated.plan.batches if b.key not in committed]
    if missing:
        rows = sum(b.stop - b.start for b in missing)
        raise SpecError(
            f"{rows:,} of {validated.plan.n_rows:,} requests of this spec have no stored "
            f"response in run {run_id!r}: its model, prompt, dataset or trials differ from "
            "the run's, or the run is not finished",
            hint=f"`shardeval run` computes them; rescore only re-scores what {run_id} holds",
        )
    return RunSession(validated, run_id, store)
