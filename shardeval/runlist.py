"""The runs under an output, as ``shardeval runs`` lists them: from their cards, newest first.

Cost: one LIST of ``<output>/runs/`` and one GET per run (its ``run.json``; on an object store
the GETs go out concurrently, :data:`~shardeval.storage.READ_CONCURRENCY` at a time). A run
without a card (written by an older shardeval) is described from spec.json, metrics.json,
lock.json and tags.json: four GETs instead of one. So is a ``running`` card whose heartbeat
stopped (a killed process) because metrics.json may have been written just before the kill:
one more GET for it.

The status of a run, decided in :func:`decide_status`:

* ``complete``: the card says so (it is written after metrics.json, and ``rm`` deletes it
  first), or, without a card, metrics.json says so;
* ``running``: the card says so and its heartbeat is fresh (and, when the holder is on this
  host, its pid is alive); without a card, lock.json is held by a live process;
* ``incomplete``: anything else (stopped, killed, failed, or not started yet).
"""

from __future__ import annotations

import fnmatch
import functools
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shardeval.catalog import list_run_ids
from shardeval.errors import SpecError
from shardeval.locking import RunLock
from shardeval.processes import pid_alive
from shardeval.runcard import (
    CARD_FILE,
    STALE_S,
    TAGS_FILE,
    first_metric_name,
    main_metric,
    model_label,
    parse_card,
    parse_tags,
    public_url,
)
from shardeval.storage import RunStore

STATUSES = ("complete", "incomplete", "running")

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str, *, option: str = "--since", now: datetime | None = None) -> datetime:
    """The moment ``text`` names: an age (``30m``, ``12h``, ``7d``, ``2w``) or an ISO date.

    ``--since 7d`` means "started in the last 7 days"; ``--older-than 30d`` "started more than
    30 days ago". Raises SpecError (exit 2) naming the option for anything else.
    """
    now = now or datetime.now(UTC)
    match = _AGE.match(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SpecError(
            f"{option} {text!r}: not an age or a date",
            hint="an age is a number and a unit: 45s, 30m, 12h, 7d, 2w; "
            "or give an ISO date such as 2026-11-01",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_time(value: Any) -> datetime | None:
    """An ISO timestamp from a card or metrics.json, as an aware datetime (None if absent)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def decide_status(
    card: dict[str, Any],
    *,
    now: datetime | None = None,
    host: str | None = None,
    alive: Callable[[int], bool] = pid_alive,
    stale_s: float = STALE_S,
) -> str:
    """``complete``, ``running`` or ``incomplete`` for a card (see the module docstring)."""
    status = card.get("status")
    if status == "complete":
        return "complete"
    if status != "running":
        return "incomplete"
    beat = parse_time(card.get("heartbeat_at"))
    now = now or datetime.now(UTC)
    if beat is None or (now - beat).total_seconds() > stale_s:
        return "incomplete"
    holder = card.get("holder") or {}
    pid = holder.get("pid")
    if holder.get("host") == (host or socket.gethostname()) and isinstance(pid, int):
        return "running" if alive(pid) else "incomplete"
    return "running"


@dataclass
class RunEntry:
    """One run as ``runs`` shows it: its card (or one built from older files), and its status."""

    card: dict[str, Any]
    status: str
    url: str
    legacy: bool = False
    """No run.json: described from spec.json, metrics.json, lock.json (an older shardeval)."""

    @property
    def run_id(self) -> str:  # noqa: D102
        return str(self.card.get("run_id"))

    @property
    def tags(self) -> list[str]:  # noqa: D102
        return list(self.card.get("tags") or [])

    @property
    def started(self) -> datetime | None:  # noqa: D102
        return parse_time(self.card.get("started_at"))

    def to_dict(self) -> dict[str, Any]:
        """``runs --json``: the card's fields, with the decided status and the run's URL."""
        out = {k: v for k, v in self.card.items() if k != "card_version"}
        out["status"] = self.status
        out["card_status"] = self.card.get("status")
        out["url"] = self.url
        out["legacy"] = self.legacy
        return out


@dataclass
class RunFilter:
    """What ``runs`` (and ``rm``) select: every given condition must hold."""

    name: str | None = None
    """Eval name, or a glob (``arith*``)."""
    model: str | None = None
    """Model name, or a glob."""
    status: str | None = None
    tags: list[str] = field(default_factory=list)
    """Every one of these tags."""
    since: datetime | None = None
    """Started at or after this moment."""
    before: datetime | None = None
    """Started before this moment (``rm --older-than``)."""

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise SpecError(
                f"--status {self.status!r}: not a run status",
                hint=f"one of: {', '.join(STATUSES)}",
            )

    def matches(self, entry: RunEntry) -> bool:
        """Whether ``entry`` passes every condition."""
        card = entry.card
        if self.name and not fnmatch.fnmatchcase(str(card.get("name") or ""), self.name):
            return False
        if self.model and not fnmatch.fnmatchcase(str(card.get("model") or ""), self.model):
            return False
        if self.status and entry.status != self.status:
            return False
        if any(tag not in entry.tags for tag in self.tags):
            return False
        started = entry.started
        if self.since is not None and (started is None or started < self.since):
            return False
        return not (self.before is not None and (started is None or started >= self.before))


def list_runs(output: str, run_filter: RunFilter | None = None) -> list[RunEntry]:
    """Every run under ``output`` that passes ``run_filter``, newest first."""
    ids = list_run_ids(output)
    entries = read_entries(output, ids)
    chosen = [e for e in entries if run_filter is None or run_filter.matches(e)]
    oldest = datetime.min.replace(tzinfo=UTC)
    chosen.sort(key=lambda e: (e.started or oldest, e.run_id), reverse=True)
    return chosen


def read_entries(output: str, run_ids: Iterable[str]) -> list[RunEntry]:
    """The entries of these runs: their cards in concurrent GETs, older runs file by file."""
    ids = list(run_ids)
    if not ids:
        return []
    probe = RunStore(output, ids[0])
    stores = {run_id: RunStore(output, run_id) for run_id in ids}
    blobs = _cat(probe, [stores[r].path(CARD_FILE) for r in ids])
    entries = []
    for run_id in ids:
        store = stores[run_id]
        card = parse_card(blobs.get(store.path(CARD_FILE)))
        if card is None:
            legacy = legacy_entry(store)
            if legacy is not None:
                entries.append(legacy)
            continue
        status = decide_status(card)
        if status == "incomplete" and card.get("status") == "running":
            # Killed after metrics.json but before its card said so? metrics.json decides.
            summary = store.peek_json(store.metrics_path)
            if isinstance(summary, dict) and summary.get("complete"):
                status = "complete"
        entries.append(RunEntry(card=card, status=status, url=store.url()))
    return entries


def legacy_entry(store: RunStore) -> RunEntry | None:
    """A run without a card, described from spec.json, metrics.json, lock.json, tags.json.

    None when the directory holds none of them: what a store that keeps directories
    (SeaweedFS) leaves after ``rm``, or a run that is just being created.
    """
    spec_record, summary, tags = store.gather(
        lambda: store.peek_json(store.spec_path),
        lambda: store.peek_json(store.metrics_path),
        lambda: parse_tags(store.read_bytes(store.path(TAGS_FILE))),
    )
    lock = RunLock(store)
    holder = lock.holder()
    if spec_record is None and summary is None and holder is None:
        return None
    record = spec_record if isinstance(spec_record, dict) else {}
    recorded = record.get("spec")
    spec: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    summary = summary if isinstance(summary, dict) else None
    complete = summary is not None and bool(summary.get("complete"))
    running = holder is not None and not holder.get("unreadable") and not lock.is_stale(holder)
    status = "complete" if complete else "running" if running else "incomplete"
    model = spec.get("model") or {}
    card: dict[str, Any] = {
        "run_id": store.run_id,
        "name": spec.get("name") or (summary or {}).get("name"),
        "model": model_label(model),
        "provider": model.get("provider"),
        "dataset": public_url(str(record.get("dataset_url") or "")) or None,
        "n_total": None,
        "n_done": None,
        "n_error": None,
        "main_metric": main_metric(summary, first_metric_name(spec)),
        "tokens": None,
        "cost_usd": None,
        "started_at": record.get("started_at") or (summary or {}).get("started_at"),
        "finished_at": None,
        "status": status,
        "holder": None,
        "heartbeat_at": None,
        "tags": tags,
        "shardeval_version": record.get("shardeval_version"),
    }
    if summary is not None:
        card.update(
            n_total=summary.get("n_rows"),
            n_done=summary.get("n_rows") if complete else None,
            n_error=summary.get("n_error"),
            tokens=summary.get("usage"),
            cost_usd=(summary.get("cost") or {}).get("usd"),
            finished_at=summary.get("finished_at"),
        )
    if running and holder is not None:
        card["holder"] = {"host": holder.get("host"), "pid": holder.get("pid")}
    return RunEntry(card=card, status=status, url=store.url(), legacy=True)


def _cat(store: RunStore, paths: list[str]) -> dict[str, bytes | None]:
    """The bytes of each path (None where missing), one GET each; concurrent on object stores."""
    calls = [functools.partial(store.read_bytes, path) for path in paths]
    return dict(zip(paths, store.gather(*calls), strict=True))
