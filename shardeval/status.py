"""What a run holds, read from its storage alone: ``shardeval status RUN_ID``.

Meant for another terminal while a run is going on, or after it died: it never writes, never
takes the lock and never sets a damaged file aside (that is the lock holder's job), and it
does not import Prefect. The cost is bounded and independent of how long the run has been
going on:

* three listings: ``parts/`` (recursive), ``batches/`` and ``quarantine/``;
* small reads: ``spec.json``, ``plan.parquet`` (one column), ``lock.json``, ``metrics.json``;
* one read per committed batch file and per part, decoding only the columns it counts
  (``item_key``, ``status``, ``error_kind`` and the two token counts, never the responses).
  On object stores these reads go out in one concurrent ``cat`` call.

Parts are listed *before* batches: a batch that commits in between deletes its parts only
after its file is written, so it is seen either way. A part that vanished between the listing
and the read makes us list ``batches/`` once more.

:mod:`shardeval.commands.status` renders a :class:`RunStatus` as a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardeval.catalog import not_found
from shardeval.finalize import is_current
from shardeval.hashing import digest
from shardeval.journal import is_journal, read_journal, with_journals
from shardeval.locking import RunLock
from shardeval.planning import cut_batches
from shardeval.pricing import Price, price_for, row_costs
from shardeval.results import conform_to, one_row_per_key
from shardeval.spec import ModelSpec
from shardeval.storage import RunStore
from shardeval.storage.backend import parse_parquet

COUNT_COLUMNS = ["item_key", "status", "error_kind", "prompt_tokens", "completion_tokens"]


@dataclass
class RunStatus:
    """A snapshot of one run's storage."""

    run_id: str
    url: str
    name: str | None = None
    total: int | None = None
    """Rows (items × trials) of the latest attempt's plan; None before the plan is written."""
    done: int = 0
    """Plan rows with a stored final result (ok or error)."""
    ok: int = 0
    error: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    """What the stored rows cost at the run's price (None: no price, or no token counts)."""
    price_source: str | None = None
    batches_total: int | None = None
    batches_committed: int = 0
    batches_in_progress: int = 0
    """Plan batches with flushed parts and no committed file yet."""
    parts: int = 0
    stored_outside_plan: int = 0
    """Rows stored for items the latest plan no longer has (older dataset or prompt)."""
    unreadable: list[str] = field(default_factory=list)
    """Files that did not parse; the next run sets them aside and recomputes their items."""
    quarantined: int = 0
    holder: dict[str, Any] | None = None
    """The lock.json record when a process holds (or held) the run."""
    holder_stale: bool | None = None
    """Whether that holder is gone (dead pid on this host, or lease expired)."""
    complete: bool = False
    """metrics.json exists: the run finished."""
    current: bool = False
    """...and it was written for the latest plan."""
    metrics: dict[str, Any] | None = None
    list_calls: int = 0

    @property
    def held(self) -> bool:
        """Whether a live process holds the run right now."""
        return self.holder is not None and not self.holder_stale

    @property
    def state(self) -> str:
        """``running``, ``complete``, ``stopped`` (unfinished, nobody holds it) or ``empty``."""
        if self.held:
            return "running"
        if self.complete and self.current:
            return "complete"
        if self.complete:
            return "complete (older plan)"
        if self.total is None and not self.done:
            return "empty"
        return "stopped"

    @property
    def projected_cost_usd(self) -> float | None:
        """The whole run's cost if the rest costs what the done rows did on average."""
        if self.cost_usd is None or not self.done or not self.total:
            return None
        return round(self.cost_usd * self.total / self.done, 6)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``shardeval status --json``)."""
        return {
            "run_id": self.run_id,
            "url": self.url,
            "name": self.name,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "ok": self.ok,
            "error": self.error,
            "errors_by_kind": self.errors_by_kind,
            "cost_usd": self.cost_usd,
            "projected_cost_usd": self.projected_cost_usd,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
            "batches": {
                "total": self.batches_total,
                "committed": self.batches_committed,
                "in_progress": self.batches_in_progress,
                "parts": self.parts,
            },
            "stored_outside_plan": self.stored_outside_plan,
            "unreadable": self.unreadable,
            "quarantined": self.quarantined,
            "holder": self.holder,
            "holder_stale": self.holder_stale,
            "held": self.held,
            "complete": self.complete,
            "current": self.current,
        }


def read_status(
    output: str, run_id: str, storage_options: dict[str, Any] | None = None
) -> RunStatus:
    """Read what ``<output>/runs/<run_id>`` holds (see the module docstring for the cost)."""
    store = RunStore(output, run_id, storage_options)
    if not store.exists(store.root):
        raise not_found(output, run_id)
    status = RunStatus(run_id=run_id, url=store.url())

    parts = with_journals(store, store.list_parts())  # journals: local disk's parts
    committed = store.list_batches()
    quarantined = store._list(store.path("quarantine"))
    status.list_calls = 3
    status.quarantined = len(quarantined)

    spec = store.peek_json(store.spec_path)
    plan_keys = _plan_keys(store)
    metrics = store.peek_json(store.metrics_path)
    lock = RunLock(store)
    status.holder = lock.holder()
    if status.holder is not None:
        status.holder_stale = lock.is_stale(status.holder)

    if isinstance(spec, dict):
        status.name = (spec.get("spec") or {}).get("name")
    if isinstance(metrics, dict) and metrics.get("complete"):
        status.complete = True
        status.metrics = metrics
        status.name = status.name or metrics.get("name")
        status.current = isinstance(spec, dict) and is_current(
            metrics, plan_fingerprint=spec.get("plan_fingerprint")
        )

    plan_batches = _plan_batches(plan_keys, spec)
    if plan_keys is not None:
        status.total = len(plan_keys)
    if plan_batches is not None:
        status.batches_total = len(plan_batches)
        status.batches_committed = len(plan_batches & committed)
        status.batches_in_progress = len((plan_batches & set(parts)) - committed)
    else:
        status.batches_committed = len(committed)
    part_paths = [path for paths in parts.values() for path in paths]
    status.parts = len(part_paths)

    batch_paths = [store.batch_path(key) for key in sorted(committed)]
    tables, missing_parts = _read_tables(store, batch_paths + part_paths, status)
    if missing_parts:  # some batch committed (and removed its parts) while we were reading
        again = store.list_batches() - committed
        status.list_calls += 1
        more, _ = _read_tables(store, [store.batch_path(k) for k in sorted(again)], status)
        tables += more
        if plan_batches is not None:
            status.batches_committed += len(plan_batches & again)
            status.batches_in_progress -= len(plan_batches & again)
    _count(status, tables, plan_keys, _run_price(spec))
    return status


def _run_price(record: Any) -> Price | None:
    """The price of the run's model, from its spec.json (spec pricing or the pinned table)."""
    if not isinstance(record, dict):
        return None
    try:
        model = ModelSpec.model_validate((record.get("spec") or {}).get("model") or {})
    except Exception:
        return None
    return price_for(model)


def _plan_keys(store: RunStore) -> list[str] | None:
    data = store.read_bytes(store.plan_path)
    if data is None:
        return None
    try:
        table = parse_parquet(data, ["item_key"])
    except (pa.ArrowException, OSError, ValueError):
        return None
    return [str(k) for k in table.column("item_key").to_pylist()]


def _plan_batches(plan_keys: list[str] | None, spec: Any) -> set[str] | None:
    """The batch keys of the latest plan, as spec.json records them.

    Runs written before spec.json held ``batch_keys`` have their plan cut again by its batch
    size, with planning's own cutter.
    """
    if not isinstance(spec, dict):
        return None
    recorded = spec.get("batch_keys")
    if isinstance(recorded, list):
        return {str(k) for k in recorded}
    size = (spec.get("spec") or {}).get("batch_size")
    if plan_keys is None or not isinstance(size, int) or size <= 0:
        return None
    keys = [b.key for b in cut_batches(plan_keys, size)]
    if spec.get("plan_fingerprint") not in (None, digest(keys)):
        return None  # spec.json and plan.parquet are from different attempts (a kill between)
    return set(keys)


def _read_tables(
    store: RunStore, paths: list[str], status: RunStatus
) -> tuple[list[pa.Table], bool]:
    """Decode the counted columns of every file; (tables, whether a listed file vanished)."""
    tables = []
    vanished = False
    for path in [p for p in paths if is_journal(p)]:
        journal = read_journal(path, COUNT_COLUMNS)
        if journal is None:
            vanished = True
        else:
            tables.append(_counted(journal))
    paths = [p for p in paths if not is_journal(p)]
    if not paths:
        return tables, vanished
    try:
        blobs = store.fs.cat(paths, on_error="return")
    except FileNotFoundError:
        blobs = {}
    if not isinstance(blobs, dict):  # a single path comes back as bytes
        blobs = {paths[0]: blobs}
    for path in paths:
        data = blobs.get(path) if path in blobs else blobs.get(store.url_of(path))
        if data is None or isinstance(data, FileNotFoundError):
            vanished = True
            continue
        if isinstance(data, BaseException):
            status.unreadable.append(store.url_of(path))
            continue
        try:
            table = parse_parquet(data, COUNT_COLUMNS, missing_ok=True)
        except (pa.ArrowException, OSError, ValueError):
            status.unreadable.append(store.url_of(path))
            continue
        tables.append(_counted(table))
    return tables, vanished


COUNT_SCHEMA = pa.schema(
    [(name, pa.int64() if name.endswith("_tokens") else pa.string()) for name in COUNT_COLUMNS]
)


def _counted(table: pa.Table) -> pa.Table:
    """The counted columns, typed alike across files (older files may lack some)."""
    return conform_to(table, COUNT_SCHEMA)


def _count(
    status: RunStatus,
    tables: list[pa.Table],
    plan_keys: list[str] | None,
    price: Price | None = None,
) -> None:
    """One row per stored key (an ok row wins), then totals over the plan's keys."""
    if not tables:
        return
    rows = pa.concat_tables(tables)
    rows = rows.filter(pc.is_in(rows.column("status"), value_set=pa.array(["ok", "error"])))
    best = one_row_per_key(rows)
    if plan_keys is not None:
        in_plan = pc.is_in(best.column("item_key"), value_set=pa.array(plan_keys, pa.string()))
        status.stored_outside_plan = best.num_rows - int(pc.sum(in_plan).as_py() or 0)
        best = best.filter(in_plan)
    status.done = best.num_rows
    ok = pc.equal(best.column("status"), "ok")
    status.ok = int(pc.sum(ok).as_py() or 0)
    status.error = status.done - status.ok
    kinds = pc.value_counts(pc.filter(best.column("error_kind"), pc.invert(ok)))
    status.errors_by_kind = {
        str(k["values"] or "error"): int(k["counts"]) for k in kinds.to_pylist()
    }
    status.prompt_tokens = int(pc.sum(best.column("prompt_tokens")).as_py() or 0)
    status.completion_tokens = int(pc.sum(best.column("completion_tokens")).as_py() or 0)
    if price is not None and best.num_rows:
        costs = row_costs(best.column("prompt_tokens"), best.column("completion_tokens"), price)
        priced = pc.sum(costs).as_py()
        status.cost_usd = None if priced is None else round(float(priced), 6)
        status.price_source = price.source
