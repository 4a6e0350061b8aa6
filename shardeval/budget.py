"""``model.max_cost_usd``: stop a run gracefully once what it has spent reaches the limit.

What counts is every request the run has paid for: the rows stored by earlier attempts (priced
at the run's price when the attempt starts) plus every answer of this attempt as it arrives,
its judges' included (at the judge model's price). Reaching the limit stops the run through
the run-wide stop (:func:`shardeval.interrupt.stop_run`, reason ``budget_reached``): no new
request, those in flight finish and are saved, exit 1; raising the limit and typing the same
command continues. A model without a price cannot be held to a budget: the run says so at
the start instead of pretending it spent $0.

The budget is kept per process: with ``--task-runner dask`` each worker counts only what it
sent (docs/cost.md).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pyarrow.compute as pc

from shardeval import interrupt
from shardeval.errors import SpecError
from shardeval.pricing import PER_TOKENS, price_for, row_costs
from shardeval.spec import ModelSpec
from shardeval.storage import RunStore


@dataclass
class Budget:
    """One run's limit and what it has spent so far (USD)."""

    limit_usd: float
    spent_usd: float


_budgets: dict[str, Budget] = {}
_lock = threading.Lock()


def open_budget(run_id: str, model: ModelSpec, stored_usd: float) -> None:
    """Start counting for ``run_id`` (when its model has ``max_cost_usd``)."""
    if model.max_cost_usd is None:
        return
    if price_for(model) is None:
        raise SpecError(
            f"model.max_cost_usd is set but there is no price for {model.model!r}",
            hint="add model.pricing (USD per million prompt/completion tokens) to the spec",
        )
    with _lock:
        _budgets[run_id] = Budget(model.max_cost_usd, stored_usd)
    if stored_usd >= model.max_cost_usd:
        _stop(run_id, _budgets[run_id])


def stored_spend(store: RunStore, model: ModelSpec) -> float:
    """What the rows stored by earlier attempts cost at ``model``'s price (0 if unpriced)."""
    price = price_for(model)
    if price is None:
        return 0.0
    paths = [store.batch_path(key) for key in sorted(store.list_batches())]
    paths += [p for names in store.list_parts().values() for p in names]
    spent = 0.0
    for table in store.read_tables(paths, columns=["prompt_tokens", "completion_tokens"]):
        if table is not None:
            costs = row_costs(
                table.column("prompt_tokens"), table.column("completion_tokens"), price
            )
            spent += float(pc.sum(costs).as_py() or 0.0)
    return spent


def close_budget(run_id: str) -> None:
    """Stop counting for ``run_id`` (its attempt ended)."""
    with _lock:
        _budgets.pop(run_id, None)


def charge(
    run_id: str, model: ModelSpec, prompt_tokens: int | None, completion_tokens: int | None
) -> None:
    """Count one answer's cost against its run's budget; stop the run once it is reached."""
    root = interrupt.root_run(run_id)
    with _lock:
        budget = _budgets.get(root)
    if budget is None:
        return
    price = price_for(model)
    if price is None:
        return
    usd = (
        (prompt_tokens or 0) * price.prompt_per_mtok
        + (completion_tokens or 0) * price.completion_per_mtok
    ) / PER_TOKENS
    with _lock:
        budget.spent_usd += usd
        reached = budget.spent_usd >= budget.limit_usd
    if reached:
        _stop(root, budget)


def _stop(run_id: str, budget: Budget) -> None:
    interrupt.stop_run(
        run_id,
        "budget_reached",
        f"budget reached: ${budget.spent_usd:,.4f} spent of model.max_cost_usd "
        f"${budget.limit_usd:,.4f}; stopped sending, what finished is saved",
    )
