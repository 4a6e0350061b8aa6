"""Did the candidate run get better or worse than the base run? A paired comparison.

Rows of the two ``results.parquet`` tables are aligned by (``item_id``, ``trial``); each metric
is then compared on the rows that both runs scored (see :mod:`shardeval.paired_stats` for the
statistics and docs/compare.md for the reasoning). What counts, and what is left out:

* **Items in one run only** (a dataset edited between the runs) are counted in ``only_base``
  and ``only_cand`` and left out; different datasets give a warning in ``warnings``.
* **Rows without a score in either run** (an error row, or a scoring error) are left out of
  that metric and counted in its ``n_left_out``. Counting them as 0 would turn an endpoint
  outage into a "regression" of the model; ``metrics.json`` leaves them out of the means too.
* **Higher is better** for every metric: a significant negative delta is a ``regression``.

This module imports no Prefect; :mod:`shardeval.run_reader` reads the runs.
"""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np
import pandas as pd

from shardeval.comparison import Comparison, Flip, MetricComparison, UnknownMetric
from shardeval.paired_stats import (
    BOOTSTRAP_MAX_ITEMS,
    clustered_se,
    holm,
    mcnemar_exact,
    minimum_detectable_effect,
    normal_p,
    paired_bootstrap_p,
    z_value,
)
from shardeval.run_reader import StoredRun, read_run

KEY = ["item_id", "trial"]
DECIMALS = 6
MAX_FLIPS = 1000
"""Flip lists keep at most this many rows per direction and metric (counts stay exact)."""


def compare_results(
    base_df: pd.DataFrame,
    cand_df: pd.DataFrame,
    *,
    base_id: str,
    cand_id: str,
    metrics: list[str] | None = None,
    alpha: float = 0.05,
    base_meta: dict[str, Any] | None = None,
    cand_meta: dict[str, Any] | None = None,
) -> Comparison:
    """Compare two results tables (``results.parquet`` as DataFrames) row by row.

    Args:
        base_df: The baseline's rows.
        cand_df: The candidate's rows.
        base_id: Name of the baseline in the output (its run id).
        cand_id: Name of the candidate.
        metrics: Metric names to compare (default: every ``score_<name>`` in both).
        alpha: Significance level, after Holm adjustment across the compared metrics.
        base_meta: The baseline's metrics.json, if known (to warn about different datasets).
        cand_meta: The candidate's metrics.json.

    Raises:
        UnknownMetric: a requested metric is not scored in both runs (exit 2).
    """
    if not 0.0 < alpha < 1.0:
        raise UnknownMetric(f"--alpha must be between 0 and 1, got {alpha}")
    warnings: list[str] = []
    base, cand = _keyed(base_df, base_id, warnings), _keyed(cand_df, cand_id, warnings)
    names = _metric_names(base, cand, metrics, base_id, cand_id, warnings)
    both = base.index.intersection(cand.index)
    only_base, only_cand = len(base.index) - len(both), len(cand.index) - len(both)
    _dataset_warnings(base_meta, cand_meta, base, cand, both, warnings)
    base, cand = base.loc[both], cand.loc[both]
    compared = {name: _compare_metric(name, base, cand, alpha) for name in names}
    adjusted = holm([m.p for m in compared.values()])
    for m, p_adj in zip(compared.values(), adjusted, strict=True):
        m.p_adjusted = None if p_adj is None else _significant(p_adj)
        if p_adj is not None and p_adj < alpha and m.delta:
            m.verdict = "regression" if m.delta < 0 else "improvement"
    return Comparison(
        base=base_id,
        cand=cand_id,
        n_aligned=len(both),
        only_base=only_base,
        only_cand=only_cand,
        alpha=alpha,
        metrics=compared,
        warnings=warnings,
    )


def _keyed(df: pd.DataFrame, run_id: str, warnings: list[str]) -> pd.DataFrame:
    """The rows indexed by (item_id, trial); a duplicated key keeps its first row."""
    frame = df.copy()
    if "trial" not in frame.columns:
        frame["trial"] = 0
    frame["item_id"] = frame["item_id"].astype(str)
    frame["trial"] = frame["trial"].fillna(0).astype(int)
    frame = frame.set_index(KEY)
    duplicated = frame.index.duplicated(keep="first")
    if duplicated.any():
        warnings.append(
            f"{run_id}: {int(duplicated.sum())} row(s) repeat an (item_id, trial) pair; "
            "the first of each was compared"
        )
        frame = frame[~duplicated]
    return frame


def _metric_names(
    base: pd.DataFrame,
    cand: pd.DataFrame,
    wanted: list[str] | None,
    base_id: str,
    cand_id: str,
    warnings: list[str],
) -> list[str]:
    def scored(frame: pd.DataFrame) -> list[str]:
        return [str(c)[len("score_") :] for c in frame.columns if str(c).startswith("score_")]

    in_base, in_cand = scored(base), scored(cand)
    common = [n for n in in_base if n in in_cand]
    if wanted:
        for name in wanted:
            if name not in common:
                where = (
                    f"only in {base_id}"
                    if name in in_base
                    else f"only in {cand_id}"
                    if name in in_cand
                    else "in neither run"
                )
                close = difflib.get_close_matches(name, common, n=1)
                raise UnknownMetric(
                    f"metric {name!r} is {where}; metrics of both runs: "
                    + (", ".join(common) or "none"),
                    hint=f"did you mean {close[0]!r}?" if close else None,
                )
        return list(dict.fromkeys(wanted))
    for name in sorted(set(in_base) ^ set(in_cand)):
        run = base_id if name in in_base else cand_id
        warnings.append(f"metric {name!r} is scored only in {run}; not compared")
    return common


def _dataset_warnings(
    base_meta: dict[str, Any] | None,
    cand_meta: dict[str, Any] | None,
    base: pd.DataFrame,
    cand: pd.DataFrame,
    both: pd.MultiIndex,
    warnings: list[str],
) -> None:
    only_base, only_cand, common = len(base) - len(both), len(cand) - len(both), len(both)

    def fingerprint(meta: dict[str, Any] | None) -> Any:
        return ((meta or {}).get("dataset") or {}).get("fingerprint")

    fb, fc = fingerprint(base_meta), fingerprint(cand_meta)
    items_b = base.index.get_level_values("item_id").nunique()
    items_c = cand.index.get_level_values("item_id").nunique()
    same_items = items_b == items_c == both.get_level_values("item_id").nunique()
    if (fb and fc and fb != fc) or not same_items:
        warnings.append(
            f"the runs are over different datasets: compared on their {common:,} common rows "
            f"({only_base:,} only in the base, {only_cand:,} only in the candidate, left out)"
        )
    trials_b = base.index.get_level_values("trial").nunique()
    trials_c = cand.index.get_level_values("trial").nunique()
    if trials_b != trials_c:
        warnings.append(
            f"the runs have different trials ({trials_b} and {trials_c}); "
            "only the trials in both were compared"
        )


def _compare_metric(
    name: str, base: pd.DataFrame, cand: pd.DataFrame, alpha: float
) -> MetricComparison:
    column = f"score_{name}"
    b = pd.to_numeric(base[column], errors="coerce").to_numpy(dtype=float)
    c = pd.to_numeric(cand[column], errors="coerce").to_numpy(dtype=float)
    scored = ~(np.isnan(b) | np.isnan(c))
    items = base.index.get_level_values("item_id").to_numpy()[scored]
    b, c = b[scored], c[scored]
    n = int(b.size)
    n_items = len(set(items.tolist()))
    d = c - b
    binary = bool(n) and bool(np.all(np.isin(b, (0.0, 1.0)) & np.isin(c, (0.0, 1.0))))
    up, down = d > 0, d < 0
    fixed, broken = int(up.sum()), int(down.sum())
    if binary and n_items == n:
        test = "mcnemar"
    else:
        test = "bootstrap" if n_items <= BOOTSTRAP_MAX_ITEMS else "z"
    if n == 0:
        return MetricComparison(
            name, 0, 0, len(scored), None, None, None, None, None, None, test, 0, 0, None
        )
    delta = float(d.mean())
    se = clustered_se(d, items)
    if test == "mcnemar":
        p = mcnemar_exact(broken, fixed)
    elif test == "bootstrap":
        p = paired_bootstrap_p(d, items)
    else:
        p = normal_p(delta, se)
    half = z_value(alpha) * se
    mde = minimum_detectable_effect(se, alpha)
    positions = np.flatnonzero(scored)
    return MetricComparison(
        name=name,
        n=n,
        n_items=n_items,
        n_left_out=int(len(scored) - n),
        base=_round(b.mean()),
        cand=_round(c.mean()),
        delta=_round(delta),
        se=_round(se),
        ci95=[_round(delta - half), _round(delta + half)],
        p=_significant(p),
        test=test,
        fixed=fixed,
        broken=broken,
        mde=None if mde is None else _round(mde),
        broken_rows=_flips(name, base, cand, positions[down][:MAX_FLIPS]),
        fixed_rows=_flips(name, base, cand, positions[up][:MAX_FLIPS]),
    )


def _flips(name: str, base: pd.DataFrame, cand: pd.DataFrame, rows: np.ndarray) -> list[Flip]:
    """The flipped rows as :class:`Flip` records (each column is read once, for these rows)."""
    if rows.size == 0:
        return []

    def texts(frame: pd.DataFrame, column: str) -> list[str | None]:
        if column not in frame.columns:
            return [None] * rows.size
        values = frame[column].iloc[rows].tolist()
        return [None if v is None or v != v else str(v) for v in values]  # v != v: NaN

    def first(a: list[str | None], b: list[str | None]) -> list[str | None]:
        return [x if x is not None else y for x, y in zip(a, b, strict=True)]

    keys = base.index[rows].tolist()
    targets = first(texts(cand, f"target_{name}"), texts(base, f"target_{name}"))
    prompts = first(texts(cand, "prompt"), texts(base, "prompt"))
    return [
        Flip(
            item_id=str(item_id),
            trial=int(trial),
            base_score=float(b),
            cand_score=float(c),
            base_response=br,
            cand_response=cr,
            target=target,
            prompt=prompt,
        )
        for (item_id, trial), b, c, br, cr, target, prompt in zip(
            keys,
            base[f"score_{name}"].iloc[rows].tolist(),
            cand[f"score_{name}"].iloc[rows].tolist(),
            texts(base, "response"),
            texts(cand, "response"),
            targets,
            prompts,
            strict=True,
        )
    ]


def _round(value: float) -> float:
    return round(float(value), DECIMALS) + 0.0


def _significant(value: float) -> float:
    """P-values keep 6 significant digits: a small one must not round to 0."""
    return float(f"{value:.6g}")


def compare_runs(
    base_id: str,
    cand_id: str,
    output: str,
    *,
    metrics: list[str] | None = None,
    alpha: float = 0.05,
) -> tuple[Comparison, StoredRun, StoredRun]:
    """Read two complete runs under ``output`` and compare them (``shardeval compare``)."""
    base, cand = read_run(base_id, output), read_run(cand_id, output)
    comparison = compare_results(
        base.results,
        cand.results,
        base_id=base_id,
        cand_id=cand_id,
        metrics=metrics,
        alpha=alpha,
        base_meta=base.metrics,
        cand_meta=cand.metrics,
    )
    if base.metrics.get("name") != cand.metrics.get("name"):
        comparison.warnings.append(
            f"the runs are of different evals ({base.metrics.get('name')!r} and "
            f"{cand.metrics.get('name')!r})"
        )
    return comparison, base, cand
