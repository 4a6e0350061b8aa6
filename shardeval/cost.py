"""What a run cost and what storage saved, for metrics.json's ``cost`` (judge calls included).

* **usd**: every row's request at the price (the run's rows and its ``llm_judge``
  judgements), whether it was sent in this attempt or an earlier one.
* **saved_usd**: the part of ``usd`` this attempt did *not* pay because the row came from
  storage. A row was sent in this attempt when its key is in ``sent_keys`` if the caller knows
  them; otherwise when its stored ``finished_at`` (stamped when the model answered) is not
  earlier than the attempt's start. On one host that is exact; across hosts (Dask workers)
  only a row finished within the clock skew of the attempt's start could be misfiled.

A part (the model, or one judge) without a price, or whose rows all lack token counts (a
provider that reports no usage), has ``usd: null``; the run's total is null as soon as one
part is (a partial sum would understate the bill), and the parts still say what is known.
Single rows without token counts (most error rows) cost null, are left out of the sums and
counted in ``rows_without_tokens``.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from shardeval.pricing import Price, model_label, price_for, row_costs
from shardeval.results import one_row_per_key
from shardeval.storage import RunStore

if TYPE_CHECKING:
    from shardeval.metrics import Metric
    from shardeval.spec import ModelSpec

JUDGE_COLUMNS = ["item_key", "status", "prompt_tokens", "completion_tokens", "finished_at"]


class CostTally:
    """Running totals of one priced part (the model under evaluation, or one judge)."""

    def __init__(
        self,
        what: str,
        model: ModelSpec,
        *,
        started_at: datetime,
        sent_keys: Collection[str] | None = None,
    ) -> None:
        self.what = what
        self.model = model_label(model)
        self.price: Price | None = price_for(model)
        self._started = started_at.timestamp()
        self._sent = sent_keys
        self.usd = 0.0
        self.saved_usd = 0.0
        self.rows = 0
        self.rows_priced = 0
        self.rows_from_storage = 0

    def add(self, generation: pa.Table) -> pa.Array:
        """Count stored rows (``item_key``, tokens, ``finished_at``); return their costs."""
        costs = row_costs(
            generation.column("prompt_tokens"), generation.column("completion_tokens"), self.price
        )
        stored = self._from_storage(generation)
        self.rows += generation.num_rows
        self.rows_from_storage += int(pc.sum(stored).as_py() or 0)
        if self.price is not None:
            self.rows_priced += generation.num_rows - costs.null_count
            self.usd += float(pc.sum(costs).as_py() or 0.0)
            self.saved_usd += float(pc.sum(pc.filter(costs, stored)).as_py() or 0.0)
        return costs

    def _from_storage(self, generation: pa.Table) -> pa.Array:
        if self._sent is not None:
            keys = generation.column("item_key")
            sent = pc.is_in(keys, value_set=pa.array(list(self._sent), pa.string()))
            return _array(pc.invert(sent))
        finished = generation.column("finished_at")
        # An old file without finished_at: the row cannot be from this attempt's requests.
        earlier = pc.fill_null(pc.less(finished, self._started), True)
        return _array(earlier)

    @property
    def known(self) -> bool:
        """Whether the spend is known: a price, and token counts for some row (or no rows)."""
        return self.price is not None and (self.rows_priced > 0 or self.rows == 0)

    def to_dict(self) -> dict[str, Any]:
        """One part of metrics.json ``cost.parts``."""
        priced = self.price is not None
        known = self.known
        return {
            "what": self.what,
            "model": self.model,
            "priced": priced,
            "source": self.price.source if self.price else None,
            "usd": _round(self.usd) if known else None,
            "saved_usd": _round(self.saved_usd) if known else None,
            "price": self.price.to_dict() if self.price else None,
            "rows": self.rows,
            "rows_priced": self.rows_priced if priced else 0,
            "rows_without_tokens": self.rows - self.rows_priced if priced else None,
            "rows_from_storage": self.rows_from_storage,
        }


class UsedJudgements(dict[str, Any]):
    """A judge scorer's book that remembers which judgements scoring looked up.

    The judge store (and a book loaded from it) may also hold judgements of an older rubric
    or of responses no longer in the run: those are not this run's cost.
    """

    def __init__(self, book: dict[str, Any]) -> None:
        super().__init__(book)
        self.used: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        """Look a judgement up, and remember that a score used it."""
        self.used.add(key)
        return super().get(key, default)


def track_judge_use(metrics: list[Metric]) -> list[Metric]:
    """``metrics`` with each judge scorer's book wrapped in :class:`UsedJudgements` (copies)."""
    from dataclasses import replace

    from shardeval.metrics.judge import JudgeScorer

    out = []
    for metric in metrics:
        scorer = metric.scorer
        if isinstance(scorer, JudgeScorer):
            book = UsedJudgements(scorer.book)
            metric = replace(metric, scorer=replace(scorer, book=book))
        out.append(metric)
    return out


def judge_tallies(
    store: RunStore,
    metrics: list[Metric],
    *,
    started_at: datetime,
    sent_keys: Collection[str] | None = None,
) -> list[CostTally]:
    """A tally per ``llm_judge`` metric over the judgements its scores used.

    With books wrapped by :func:`track_judge_use` before scoring, that is exactly the
    judgements scoring looked up; otherwise every judgement in the scorer's book.
    """
    from shardeval.metrics.judge import JudgeScorer

    tallies = []
    for metric in metrics:
        scorer = metric.scorer
        if not isinstance(scorer, JudgeScorer):
            continue
        tally = CostTally(
            f"judge:{metric.name}", scorer.model, started_at=started_at, sent_keys=sent_keys
        )
        tallies.append(tally)
        book = scorer.book
        used = book.used & set(book) if isinstance(book, UsedJudgements) else set(book)
        if not used:
            continue
        judge_store = RunStore(store.output, f"{store.run_id}/judges/{metric.name}")
        paths = [judge_store.batch_path(key) for key in sorted(judge_store.list_batches())]
        tables = [t for t in judge_store.read_tables(paths, columns=JUDGE_COLUMNS) if t]
        if tables:
            tally.add(
                _one_row_per_key(pa.concat_tables(tables, promote_options="permissive"), used)
            )
    return tallies


def _one_row_per_key(table: pa.Table, keys: set[str]) -> pa.Table:
    """The used judgements, each once (a judgement can be stored in two batch files)."""
    table = table.filter(pc.is_in(table.column("item_key"), value_set=pa.array(sorted(keys))))
    return one_row_per_key(table)


def cost_summary(parts: list[CostTally]) -> dict[str, Any]:
    """metrics.json ``cost``: totals when every part is priced, null otherwise, and the parts."""
    priced = all(p.price is not None for p in parts)
    known = all(p.known for p in parts)
    main = parts[0] if parts else None
    sources = sorted({p.price.source for p in parts if p.price is not None})
    return {
        "usd": _round(sum(p.usd for p in parts)) if known else None,
        "saved_usd": _round(sum(p.saved_usd for p in parts)) if known else None,
        "priced": priced,
        "source": sources[0] if len(sources) == 1 else ("mixed" if sources else None),
        "currency": "USD",
        "model": main.model if main else None,
        "unpriced": [p.model for p in parts if p.price is None],
        "without_tokens": [p.model for p in parts if p.price is not None and not p.known],
        "rows_without_tokens": sum(p.rows - p.rows_priced for p in parts if p.price is not None),
        "parts": [p.to_dict() for p in parts],
    }


def part_prices(model: ModelSpec, metrics: list[Metric]) -> list[dict[str, Any] | None]:
    """The price of each part metrics.json ``cost.parts`` lists, in its order (model, judges).

    Prices are in no run id or cache key (they change what a run cost, not what it answered),
    so a price edit alone keeps the run and every stored answer; :func:`priced_as` then tells
    that the stored ``cost`` is stale and the run is finalized again from the stored tokens.
    """
    from shardeval.metrics.judge import JudgeScorer

    models = [model, *(m.scorer.model for m in metrics if isinstance(m.scorer, JudgeScorer))]
    return [price.to_dict() if (price := price_for(m)) else None for m in models]


def priced_as(summary: dict[str, Any], prices: list[dict[str, Any] | None]) -> bool:
    """Whether metrics.json's ``cost`` was computed with ``prices`` (:func:`part_prices`).

    A metrics.json from before costs were recorded has no ``cost``: it is current as long as
    nothing is priced now (its cost would be null anyway).
    """
    from shardeval.hashing import canonical_json

    cost = summary.get("cost")
    if not isinstance(cost, dict):
        return all(price is None for price in prices)
    parts = cost.get("parts")
    stored = (
        [p.get("price") for p in parts if isinstance(p, dict)] if isinstance(parts, list) else None
    )
    return canonical_json(stored) == canonical_json(prices)


def _round(usd: float) -> float:
    """Micro-dollars: enough for a cent-exact total, without float noise in the JSON."""
    return round(usd, 6)


def _array(values: Any) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
