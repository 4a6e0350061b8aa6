"""Summary statistics of a score column: mean, count, standard error, 95% interval.

The interval uses the **normal approximation**: ``mean ± 1.96 · stderr`` with
``stderr = s / sqrt(n)`` and ``s`` the sample standard deviation (``ddof=1``). When every value
lies in ``[0, 1]`` (accuracy-like scores) the interval is clipped to ``[0, 1]``, because a
proportion cannot leave that range. With few items or a mean near 0 or 1 this interval is
rough; it is meant to show the scale of the noise, not to be an exact test.

Null and NaN values are left out (they are rows without a score). Computation runs in
pyarrow's C++ kernels over one contiguous array, so it takes milliseconds for a million rows
and gives the same numbers however the data was chunked. Floats are rounded to 6 decimals so
that ``metrics.json`` is byte-stable across reruns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

Z_95 = 1.96
DECIMALS = 6

Summary = dict[str, Any]


def summarize(values: Sequence[float | None] | pa.Array | pa.ChunkedArray) -> Summary:
    """Summarise scores as ``{"mean", "n", "stderr", "ci95": [lo, hi]}`` (see module docs).

    Args:
        values: Scores; None (and NaN) entries are ignored.

    Returns:
        With no values: ``mean``, ``stderr`` and ``ci95`` are None and ``n`` is 0. With one
        value: ``stderr`` is 0.0 and ``ci95`` is ``[mean, mean]``.
    """
    array = _clean(_as_float_array(values))
    n = len(array)
    if n == 0:
        return {"mean": None, "n": 0, "stderr": None, "ci95": None}
    mean = pc.mean(array).as_py()
    stderr = 0.0 if n == 1 else pc.stddev(array, ddof=1).as_py() / math.sqrt(n)
    low, high = mean - Z_95 * stderr, mean + Z_95 * stderr
    bounds = pc.min_max(array)
    if bounds["min"].as_py() >= 0.0 and bounds["max"].as_py() <= 1.0:
        low, high = max(low, 0.0), min(high, 1.0)
    return {
        "mean": _round(mean),
        "n": n,
        "stderr": _round(stderr),
        "ci95": [_round(low), _round(high)],
    }


def summarize_column(table: pa.Table, column: str, ok_mask: Any = None) -> Summary:
    """Summarise one score column of a results table.

    Args:
        table: Results table (for instance ``results.parquet``).
        column: Column name, such as ``score_exact_match``.
        ok_mask: Optional booleans (one per row; pyarrow array or sequence) selecting the rows
            to include, typically ``status == "ok"``; rows where it is false or null are left
            out.
    """
    values = table.column(column)
    if ok_mask is not None:
        values = pc.filter(values, _as_bool_array(ok_mask))
    return summarize(values)


def _as_float_array(values: Sequence[float | None] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous float64 array, so results do not depend on how the data was chunked."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if values.type == pa.float64() else values.cast(pa.float64())
    return pa.array(values, type=pa.float64())


def _as_bool_array(mask: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(mask, pa.Array | pa.ChunkedArray):
        return mask
    return pa.array(mask, type=pa.bool_())


def _clean(array: pa.Array) -> pa.Array:
    """Drop nulls and NaNs (a null filter entry drops the row too)."""
    return pc.filter(array, pc.invert(pc.is_nan(array)))


def _round(value: float) -> float:
    """Round for byte-stable JSON; ``+ 0.0`` turns ``-0.0`` into ``0.0``."""
    return round(value, DECIMALS) + 0.0
