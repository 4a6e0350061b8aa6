"""What a model's tokens cost: the spec's ``model.pricing``, else a pinned table, else unknown.

The table (``shardeval/data/prices.json``) ships with the package and carries the date and
source of every price; it is never fetched at run time, so a run's cost never depends on a
network call, and a stale price is visible (its ``as_of``) rather than silently refreshed.
A spec's pricing always wins, so a wrong or missing table entry is fixed in the spec.

An unknown price, or a row whose token counts are unknown, has cost ``None`` (null in
Parquet and JSON), never 0: a total of $0 for an unpriced model would read as "free".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from shardeval.spec import ModelSpec

TABLE_RESOURCE = "prices.json"
PER_TOKENS = 1_000_000


@dataclass(frozen=True)
class Price:
    """USD per million prompt and completion tokens, and where the numbers came from."""

    prompt_per_mtok: float
    completion_per_mtok: float
    source: Literal["spec", "table"]
    """``spec`` (the spec's ``model.pricing``) or ``table`` (the pinned price table)."""
    as_of: str | None = None
    """Date of a table price (``YYYY-MM-DD``); None for a spec price."""
    url: str | None = None
    """Where a table price was published."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (metrics.json ``cost.price``)."""
        return {
            "prompt_per_mtok": self.prompt_per_mtok,
            "completion_per_mtok": self.completion_per_mtok,
            "source": self.source,
            "as_of": self.as_of,
            "url": self.url,
        }


@cache
def price_table() -> dict[str, Any]:
    """The pinned price table (read once from the package data)."""
    text = resources.files("shardeval.data").joinpath(TABLE_RESOURCE).read_text("utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


@cache
def _by_name() -> dict[str, Price]:
    table = price_table()
    sources: dict[str, str] = table.get("sources", {})
    out: dict[str, Price] = {}
    for name, entry in table["models"].items():
        price = Price(
            prompt_per_mtok=float(entry["prompt_per_mtok"]),
            completion_per_mtok=float(entry["completion_per_mtok"]),
            source="table",
            as_of=entry.get("as_of") or table.get("as_of"),
            url=sources.get(entry.get("vendor", "")),
        )
        for key in (name, *entry.get("aliases", ())):
            out[key.lower()] = price
    return out


def table_price(model_name: str) -> Price | None:
    """The table's price of a model name (exact name or a listed alias, any case)."""
    return _by_name().get(model_name.strip().lower()) if model_name else None


def price_for(model: ModelSpec) -> Price | None:
    """The spec's ``pricing`` if set, else the table's price of ``model.model``, else None."""
    if model.pricing is not None:
        return Price(
            prompt_per_mtok=model.pricing.prompt_per_mtok,
            completion_per_mtok=model.pricing.completion_per_mtok,
            source="spec",
        )
    if model.provider == "python":
        return None  # a local function is not a priced API, whatever it is named
    return table_price(model.model)


def model_label(model: ModelSpec) -> str:
    """How a summary names a model: its name, else its function, else its provider."""
    return model.model or model.function or model.provider


def row_costs(prompt_tokens: Any, completion_tokens: Any, price: Price | None) -> pa.Array:
    """USD cost of each row: null where the price or either token count is unknown.

    Args:
        prompt_tokens: an Arrow array (or chunked array, or list) of prompt token counts.
        completion_tokens: the same for completion tokens, aligned with ``prompt_tokens``.
        price: the model's price; None gives all-null costs (never zeros).
    """
    prompt = _as_float_array(prompt_tokens)
    completion = _as_float_array(completion_tokens)
    if len(prompt) != len(completion):
        raise ValueError(f"{len(prompt)} prompt token counts but {len(completion)} completion")
    if price is None:
        return pa.nulls(len(prompt), pa.float64())
    # tokens × price first, then / 1e6: fewer rounding steps than multiplying by price / 1e6.
    spent = pc.divide(
        pc.add(
            pc.multiply(prompt, price.prompt_per_mtok),
            pc.multiply(completion, price.completion_per_mtok),
        ),  # null + x is null: an unknown count gives an unknown cost
        float(PER_TOKENS),
    )
    return spent.combine_chunks() if isinstance(spent, pa.ChunkedArray) else spent


def _as_float_array(values: Any) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(values, pa.float64())
    return values.cast(pa.float64())
