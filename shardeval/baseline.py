"""``--baseline``: after a run completes, compare it with an earlier run of the same eval.

The baseline is found by :func:`shardeval.history.find_baseline` (``previous``: the latest
complete earlier run of the same eval name under the output; ``tag:T``; or a run id), the
comparison is stored in the run as ``comparison.json`` (a whole-file write), and the caller
decides what a regression means (the CLI's ``--fail-on-regression`` exits 3; a flow publishes
a Prefect event).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardeval.errors import SpecError
from shardeval.history import TAG_PREFIX, find_baseline
from shardeval.storage import RunStore

if TYPE_CHECKING:
    from shardeval.comparison import Comparison

COMPARISON_FILE = "comparison.json"


def check_selector(selector: str) -> str:
    """``previous``, ``tag:T`` or a run id; anything else is an option error (exit 2)."""
    if (
        not selector
        or selector.strip() != selector
        or (selector.startswith(TAG_PREFIX) and not selector[len(TAG_PREFIX) :])
    ):
        raise SpecError(
            f"--baseline {selector!r}: expected previous, tag:NAME or a run id",
            hint="e.g. --baseline previous, --baseline tag:baseline",
        )
    return selector


def compare_with_baseline(
    store: RunStore, name: str, selector: str, *, alpha: float = 0.05
) -> Comparison | None:
    """Compare the complete run in ``store`` with its baseline; None if there is none yet."""
    from shardeval.compare import compare_runs

    base_id = find_baseline(store.output, name, store.run_id, check_selector(selector))
    if base_id is None or base_id == store.run_id:
        return None
    comparison, _base, _cand = compare_runs(base_id, store.run_id, store.output, alpha=alpha)
    store.write_json(store.path(COMPARISON_FILE), comparison.to_dict())
    return comparison
