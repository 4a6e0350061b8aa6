"""Statistics over repeated trials and groups: pass@k, agreement, bootstrap intervals.

* **pass@k** uses the unbiased estimator of Chen et al. (2021): for an item with ``n`` trials
  of which ``c`` passed, ``pass@k = 1 - C(n-c, k) / C(n, k)``, averaged over items. It is
  reported for binary metrics (every score 0 or 1) and k in {1, 2, 4, ..., n}.
* **agreement** is the share of items whose trials all got the same score.
* **bootstrap** 95% intervals resample items with replacement (seeded, so a rerun prints the
  same interval); with trials, the resampled unit is the item's mean over its trials. For 0/1
  scores a resampled mean is exactly a binomial draw, which makes the
  bootstrap cheap at any size; for other scores it resamples up to ``BOOTSTRAP_MAX_N`` values
  and falls back to the normal approximation beyond that, where the two agree.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240607
BOOTSTRAP_MAX_N = 100_000
DECIMALS = 6


def _round(value: float) -> float:
    return round(float(value), DECIMALS) + 0.0


def is_binary(values: Sequence[float | None]) -> bool:
    """Whether every non-null score is exactly 0 or 1."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return bool(present) and all(v in (0.0, 1.0) for v in present)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one item with ``n`` trials and ``c`` passes."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def trial_statistics(
    item_ids: Sequence[str], values: Sequence[float | None], trials: int
) -> dict[str, Any]:
    """pass@k (binary metrics) and agreement over items that have every trial scored."""
    per_item: dict[str, list[float]] = defaultdict(list)
    for item_id, value in zip(item_ids, values, strict=True):
        if value is not None and not math.isnan(value):
            per_item[item_id].append(value)
    complete = {k: v for k, v in per_item.items() if len(v) == trials}
    out: dict[str, Any] = {"items_with_all_trials": len(complete)}
    if not complete:
        return out
    out["agreement"] = _round(sum(len(set(v)) == 1 for v in complete.values()) / len(complete))
    if is_binary(values):
        ks = sorted({1, trials, *(2**i for i in range(1, 20) if 2**i < trials)})
        out["pass_at_k"] = {
            str(k): _round(
                sum(pass_at_k(trials, int(sum(v)), k) for v in complete.values()) / len(complete)
            )
            for k in ks
        }
    return out


def item_means(item_ids: Sequence[str], values: Sequence[float | None]) -> list[float]:
    """The mean score of each item over its scored trials (for a clustered bootstrap)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for item_id, value in zip(item_ids, values, strict=True):
        if value is not None and not math.isnan(value):
            sums[item_id][0] += value
            sums[item_id][1] += 1
    return [total / count for total, count in sums.values()]


def bootstrap_ci95(values: Sequence[float | None] | np.ndarray) -> list[float] | None:
    """Seeded bootstrap 95% interval of the mean (see the module docstring).

    None and NaN values are left out; a numpy array is filtered without Python objects.
    """
    array = np.asarray(values, dtype=float)  # None becomes NaN
    array = array[~np.isnan(array)]
    n = array.size
    if n < 2:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    if np.all((array == 0.0) | (array == 1.0)):
        means = rng.binomial(n, array.mean(), size=BOOTSTRAP_RESAMPLES) / n
    elif n <= BOOTSTRAP_MAX_N:
        chunk = max(1, 5_000_000 // n)
        parts = []
        for start in range(0, BOOTSTRAP_RESAMPLES, chunk):
            size = min(chunk, BOOTSTRAP_RESAMPLES - start)
            parts.append(array[rng.integers(0, n, size=(size, n))].mean(axis=1))
        means = np.concatenate(parts)
    else:
        return None
    low, high = np.percentile(means, [2.5, 97.5])
    return [_round(low), _round(high)]
