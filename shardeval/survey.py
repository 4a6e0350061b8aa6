"""What the run directory holds for a plan: the one answer to "is this already stored?".

:func:`survey` compares the plan with the run directory: which batches are committed, which
items are stored under an older batching or dataset version (and where), which batches hold
error rows, and what changed since the previous attempt. Listing costs a bounded number of
calls (batches/, parts/), and only files that the current plan does not name are opened.
Every later step (the batch tasks, the judges, finalizing) acts on this answer instead of
asking storage again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardeval.finality import drop_auth_rows, has_auth_rows, is_final, summary_has_auth_errors
from shardeval.planning import PlanDiff, RunPlan, diff_plans
from shardeval.storage import RunStore


@dataclass
class Survey:
    """What the run directory holds for this plan."""

    committed: set[str] = field(default_factory=set)
    """Plan batch keys whose committed file exists."""
    with_parts: set[str] = field(default_factory=set)
    """Plan batch keys, not committed, with parts of an earlier attempt."""
    reuse: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """For uncommitted batches: other stored files (path → keys) holding some of their items."""
    done_rows: int = 0
    """Plan rows with a stored result before this attempt."""
    diff: PlanDiff | None = None
    """Dataset changes since the previous attempt (None on the first attempt)."""
    error_batches: set[str] = field(default_factory=set)
    """Committed batches holding error rows (re-run by --retry-failed)."""


def survey(store: RunStore, plan: RunPlan, *, retry_failed: bool = False) -> Survey:
    """Compare the plan with what is stored (see the module docstring)."""
    result = Survey()
    committed_files, parts, previous, summary, attempt = store.gather(
        store.list_batches,
        store.list_parts,
        lambda: store.read_table(store.plan_path, columns=["item_id", "item_key"]),
        lambda: store.read_json(store.metrics_path),
        lambda: store.read_json(store.spec_path),
    )
    plan_keys = {b.key for b in plan.batches}
    result.committed = plan_keys & committed_files
    if summary_has_auth_errors(summary):
        _reopen_auth_batches(store, result)

    elsewhere = stored_elsewhere(store, plan_keys, committed_files, parts)
    own_parts = {
        path: key
        for key, paths in parts.items()
        if key in plan_keys and key not in result.committed
        for path in paths
    }
    result.with_parts = set(own_parts.values())
    own_part_keys: dict[str, set[str]] = {key: set() for key in result.with_parts}
    for path, stored in _index(store, list(own_parts)).items():
        own_part_keys[own_parts[path]].update(stored)

    row_keys = plan.rows.column("item_key")
    for batch in plan.batches:
        if batch.key in result.committed:
            result.done_rows += batch.stop - batch.start
            continue
        keys = row_keys.slice(batch.start, batch.stop - batch.start).to_pylist()
        reuse: dict[str, list[str]] = result.reuse.get(batch.key, {})
        result.done_rows += sum(len(found) for found in reuse.values())
        own = own_part_keys.get(batch.key, set())
        for key in keys:
            if key in own:
                result.done_rows += 1
            elif key in elsewhere:
                result.done_rows += 1
                reuse.setdefault(elsewhere[key], []).append(key)
        if reuse:
            result.reuse[batch.key] = reuse

    if retry_failed:
        keys = sorted(result.committed)
        paths = [store.batch_path(key) for key in keys]
        for key, table in zip(keys, store.read_tables(paths, columns=["status"]), strict=True):
            if table is not None and "error" in table.column("status").to_pylist():
                result.error_batches.add(key)

    if previous is not None:
        previous_limit = attempt.get("limit") if isinstance(attempt, dict) else None
        result.diff = diff_plans(
            previous,
            plan.rows,
            previous_limit=previous_limit if isinstance(previous_limit, int) else None,
            limit=plan.limit,
        )
    return result


def _reopen_auth_batches(store: RunStore, result: Survey) -> None:
    """Committed batches holding 401/403 rows (an earlier version stored them) run again.

    Their other rows are reused from the committed file, so only the rejected items are sent.
    Only looked for when metrics.json counted such errors (a resume reads no batch otherwise).
    """
    keys = sorted(result.committed)
    paths = [store.batch_path(key) for key in keys]
    tables = store.read_tables(paths, columns=["item_key", "status", "http_status"])
    for key, path, table in zip(keys, paths, tables, strict=True):
        if table is not None and has_auth_rows(table):
            result.committed.discard(key)
            result.reuse[key] = {path: drop_auth_rows(table).column("item_key").to_pylist()}


def stored_elsewhere(
    store: RunStore,
    own_batches: set[str],
    committed_files: set[str] | None = None,
    parts: dict[str, list[str]] | None = None,
) -> dict[str, str]:
    """Item key → file, for results stored outside ``own_batches``.

    Those are results of an older batching or dataset version; only their files are opened,
    column-pruned to key and status.
    """
    committed_files = store.list_batches() if committed_files is None else committed_files
    parts = store.list_parts() if parts is None else parts
    paths = [store.batch_path(key) for key in sorted(committed_files - own_batches)]
    paths += [p for key, names in parts.items() if key not in own_batches for p in names]
    index: dict[str, str] = {}
    for path, stored in _index(store, paths).items():
        for key, status in stored.items():
            if key not in index or status == "ok":
                index[key] = path
    return index


def reuse_map(keys: list[str], index: dict[str, str]) -> dict[str, list[str]]:
    """Group the ``keys`` found in ``index`` by the file holding them."""
    reuse: dict[str, list[str]] = {}
    for key in keys:
        if key in index:
            reuse.setdefault(index[key], []).append(key)
    return reuse


def _index(store: RunStore, paths: list[str]) -> dict[str, dict[str, str]]:
    """Path → {item key: status} of the final rows (ok, error) each readable file holds.

    Only the two columns are decoded, and on object stores the files are fetched many at a
    time (a resume with hundreds of parts is a few round trips, not hundreds).
    """
    found: dict[str, dict[str, str]] = {}
    columns = ["item_key", "status", "http_status"]
    for path, table in zip(paths, store.read_tables(paths, columns=columns), strict=True):
        if table is None:
            continue
        final: dict[str, str] = {}
        for key, status, http_status in zip(
            table.column("item_key").to_pylist(),
            table.column("status").to_pylist(),
            table.column("http_status").to_pylist(),
            strict=True,
        ):
            if is_final(status, http_status) and final.get(key) != "ok":
                final[key] = status
        found[path] = final
    return found
