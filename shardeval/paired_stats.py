"""The statistics of a paired comparison of two runs (Miller, "Adding Error Bars to Evals").

Two runs of the same eval answer the *same* questions, so the noise that matters is the noise
of the per-row difference ``d = cand - base``, not of each mean on its own: a question both
models find hard cancels out. Everything here works on those differences.

* **Clustered standard error.** With several trials per item the rows of one item are not
  independent, so the item is the unit of sampling. The CR0 ("sandwich") estimator of
  arXiv:2411.00640 sums the centred differences per item first::

      SE = sqrt( sum over items c of ( sum over rows i of c of (d_i - mean(d)) )^2 ) / n

  with ``n`` the number of paired rows. With one row per item it is the standard deviation
  of ``d`` (ddof 0) over sqrt(n): the usual paired standard error, without the small-sample
  correction, for trials or not, so that one formula gives every figure.
* **Exact McNemar test** for 0/1 scores with one trial per item: under "no difference" each of
  the ``b + c`` discordant pairs (``b`` broken 1→0, ``c`` fixed 0→1) is a fair coin, so the
  two-sided p-value is ``min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``. Summed in log
  space, so it is exact to floating point for any n.
* **Paired bootstrap** otherwise: resample items with replacement (seeded), recompute the mean
  difference, and count how often the resampled difference lies at least ``|delta|`` from
  ``delta`` (the distribution shifted to the null, Hall & Wilson 1991).
  Beyond ``BOOTSTRAP_MAX_ITEMS`` items, where the central limit theorem has long taken over,
  the p-value is the normal one, ``2 * (1 - Phi(|delta| / SE))`` (test ``z``).
* **Holm** adjustment across the metrics of one comparison (step-down Bonferroni): controls
  the chance of *any* false alarm without Bonferroni's loss of power.
* **Minimum detectable effect** at 80% power: ``(z_{1-alpha/2} + z_{0.8}) * SE``, the smallest
  true difference this comparison would flag four times out of five.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
"""Resamples for up to 2,000 items; fewer beyond (never under 1,000), see resamples_for."""
BOOTSTRAP_MAX_ITEMS = 20_000
"""Beyond this many items the p-value is the normal one (``z = delta / SE``): the bootstrap
would cost seconds and agree with it to the printed digits."""
_RESAMPLE_CELLS = 20_000_000
BOOTSTRAP_SEED = 20240607
"""Same seed as the per-run bootstrap intervals: a rerun prints the same p-value."""
POWER = 0.8
_CHUNK_CELLS = 4_000_000  # resamples x items drawn at once (bounds memory to ~32 MB)


def z_value(alpha: float) -> float:
    """The two-sided normal critical value for ``alpha`` (1.96 for 0.05)."""
    return NormalDist().inv_cdf(1.0 - alpha / 2.0)


def clustered_se(diffs: np.ndarray, clusters: np.ndarray) -> float:
    """CR0 standard error of ``mean(diffs)`` with rows grouped by ``clusters`` (item ids).

    Args:
        diffs: Per-row differences ``cand - base``.
        clusters: One label per row (the item id); rows of one label are one cluster.

    Returns:
        The standard error; 0.0 for fewer than two rows.
    """
    n = diffs.size
    if n < 2:
        return 0.0
    centred = diffs - diffs.mean()
    _, codes = np.unique(clusters, return_inverse=True)
    sums = np.bincount(codes.ravel(), weights=centred)
    return float(math.sqrt(float(np.sum(sums * sums))) / n)


def mcnemar_exact(broken: int, fixed: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts (see module docs)."""
    k = broken + fixed
    if k == 0:
        return 1.0
    low = min(broken, fixed)
    log_half = k * math.log(0.5)
    logs = [_log_comb(k, i) + log_half for i in range(low + 1)]
    top = max(logs)
    tail = math.exp(top) * math.fsum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def resamples_for(groups: int) -> int:
    """10,000 resamples up to 2,000 items, then as many as 20 M draws allow (>= 1,000)."""
    return max(1_000, min(BOOTSTRAP_RESAMPLES, _RESAMPLE_CELLS // max(groups, 1)))


def normal_p(delta: float, se: float) -> float:
    """Two-sided p-value of ``delta`` under a normal null with standard error ``se``."""
    if se <= 0.0:
        return 1.0 if delta == 0.0 else 0.0
    return 2.0 * (1.0 - NormalDist().cdf(abs(delta) / se))


def paired_bootstrap_p(
    diffs: np.ndarray,
    clusters: np.ndarray,
    *,
    resamples: int | None = None,
    seed: int = BOOTSTRAP_SEED,
) -> float:
    """Two-sided bootstrap p-value of ``mean(diffs) == 0``, resampling whole clusters.

    Each resample draws as many items as there are, with replacement, and takes the mean
    difference over the rows of the drawn items. ``p = (1 + #{|d* - d| >= |d|}) / (B + 1)``,
    so it is never 0 (its resolution is ``1 / (B + 1)``); ``B`` is :func:`resamples_for`.
    """
    n = diffs.size
    if n == 0:
        return 1.0
    delta = float(diffs.mean())
    if delta == 0.0:
        return 1.0
    _, codes = np.unique(clusters, return_inverse=True)
    codes = codes.ravel()
    sums = np.bincount(codes, weights=diffs)
    sizes = np.bincount(codes).astype(float)
    groups = sums.size
    resamples = resamples or resamples_for(groups)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // groups)
    extreme = 0
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = rng.integers(0, groups, size=(size, groups))
        means = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
        extreme += int(np.count_nonzero(np.abs(means - delta) >= abs(delta)))
    return (1 + extreme) / (resamples + 1)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values, in the input order (None stays None, not counted)."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def minimum_detectable_effect(se: float, alpha: float, power: float = POWER) -> float | None:
    """The true difference detected with probability ``power`` at level ``alpha``.

    None when the standard error is 0 (the runs agree on every row, so the data say nothing
    about how large a difference would have to be to show).
    """
    if se <= 0.0:
        return None
    return (z_value(alpha) + NormalDist().inv_cdf(power)) * se
