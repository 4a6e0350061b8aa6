"""Cost of ``compare_results`` by size: how long a comparison takes, per test it picks.

For each (items, trials) it builds two results tables with pass/fail (or continuous) scores
that differ on about 10% of the rows and prints one JSON line: the test used, wall seconds
and CPU seconds (best of three; CPU is the steadier figure on a shared machine). One trial
with 0/1 scores is the exact McNemar path; trials > 1 or continuous scores take the seeded
bootstrap (resamples bounded by the items), and beyond 20,000 items the normal test.

    python benchmarks/compare.py
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd

from shardeval.compare import compare_results

CASES = [(1_000, 1), (1_000, 5), (10_000, 1), (10_000, 3), (20_000, 3), (100_000, 1), (50_000, 3)]


def tables(items: int, trials: int, *, continuous: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    n = items * trials
    base = rng.integers(0, 2, n).astype(float)
    cand = np.where(rng.random(n) < 0.1, 1.0 - base, base)
    if continuous:
        base, cand = base * rng.random(n), cand * rng.random(n)
    ids = np.repeat([f"q{i:06d}" for i in range(items)], trials)
    trial = np.tile(np.arange(trials), items)

    def frame(scores: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"item_id": ids, "trial": trial, "response": "x", "score_m": scores})

    return frame(base), frame(cand)


def main() -> None:
    for items, trials in CASES:
        for continuous in (False, True):
            base, cand = tables(items, trials, continuous=continuous)
            best, best_cpu = float("inf"), float("inf")
            for _ in range(3):
                started, cpu = time.perf_counter(), time.process_time()
                result = compare_results(base, cand, base_id="a", cand_id="b")
                best = min(best, time.perf_counter() - started)
                best_cpu = min(best_cpu, time.process_time() - cpu)
            print(
                json.dumps(
                    {
                        "items": items,
                        "trials": trials,
                        "scores": "continuous" if continuous else "0/1",
                        "test": result.metrics["m"].test,
                        "seconds": round(best, 3),
                        "cpu_seconds": round(best_cpu, 3),
                    }
                )
            )


if __name__ == "__main__":
    main()
