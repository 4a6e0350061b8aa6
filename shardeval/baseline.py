"""``--baseline``: after a run completes, compare it with an earlier run of the same eval.

The baseline is found by :func:`shardeval.history.find_baseline` (``previous``: the latest
complete earlier run of the same eval name under the output; ``tag:T``; or a run id; a
suite's cell asks for runs of its own model only, see :func:`check_suite_selector`), the
comparison is stored in the run as ``comparison.json`` (a whole-file write), and the caller
decides what a regression means (the CLI's ``--fail-on-regression`` exits 3; a flow publishes
a Prefect event).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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


def check_suite_selector(selector: str) -> str:
    """``previous`` or ``tag:T``: each cell of a suite finds its own baseline (exit 2 otherwise).

    A run id names one run, of one eval and one model: it cannot be every cell's baseline.
    """
    check_selector(selector)
    if selector != "previous" and not selector.startswith(TAG_PREFIX):
        raise SpecError(
            f"--baseline {selector!r}: a suite compares every cell with its own baseline, "
            "and a run id names a single run",
            hint="use --baseline previous or --baseline tag:NAME with a suite; compare one "
            "cell with a given run by `shardeval compare RUN_ID CELL_RUN_ID`",
        )
    return selector


def compare_with_baseline(
    store: RunStore,
    name: str,
    selector: str,
    *,
    alpha: float = 0.05,
    model: Mapping[str, Any] | None = None,
) -> Comparison | None:
    """Compare the complete run in ``store`` with its baseline; None if there is none yet.

    ``model`` (a model fingerprint) restricts ``previous`` and ``tag:T`` to runs of that model:
    a suite's cells are compared with their own earlier runs.
    """
    from shardeval.compare import compare_runs

    base_id = find_baseline(store.output, name, store.run_id, check_selector(selector), model=model)
    if base_id is None or base_id == store.run_id:
        return None
    comparison, _base, _cand = compare_runs(base_id, store.run_id, store.output, alpha=alpha)
    store.write_json(store.path(COMPARISON_FILE), comparison.to_dict())
    return comparison
