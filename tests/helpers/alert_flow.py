"""A flow that publishes a comparison with an injected regression (run as a subprocess).

``python -m tests.helpers.alert_flow BASE CAND`` prints publish_comparison's result as JSON.
Two results tables with known flips (30 broken, 2 fixed of 100 items) stand in for last
night's and tonight's runs; the statistics are the real ones.
"""

from __future__ import annotations

import json
import sys

import pandas as pd
from prefect import flow

from shardeval.alerts import publish_comparison, run_info
from shardeval.compare import compare_results

N, BROKEN, FIXED = 100, 30, 2


def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    base = [1.0] * (N - FIXED) + [0.0] * FIXED
    cand = [0.0] * BROKEN + [1.0] * (N - FIXED - BROKEN) + [1.0] * FIXED
    ids = [f"q{i:03d}" for i in range(N)]

    def frame(scores: list[float], answer: str) -> pd.DataFrame:
        return pd.DataFrame(
            {"item_id": ids, "trial": 0, "response": answer, "score_exact_match": scores}
        )

    return frame(base, "42"), frame(cand, "41")


@flow(name="shardeval-alert-test")
def nightly_check(base_id: str, cand_id: str) -> dict[str, object]:
    base, cand = tables()
    comparison = compare_results(base, cand, base_id=base_id, cand_id=cand_id)
    info = run_info(
        {"run_id": cand_id, "name": "arith-nightly", "model": {"model": "test-model"}},
        results_url=f"/tmp/runs/{cand_id}/results.parquet",
        metrics_url=f"/tmp/runs/{cand_id}/metrics.json",
    )
    return publish_comparison(comparison, info)


if __name__ == "__main__":
    print(json.dumps(nightly_check(sys.argv[1], sys.argv[2])))
