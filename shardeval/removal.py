"""Deleting runs: ``shardeval rm``.

A run is deleted only while ``rm`` holds its lease (:class:`~shardeval.locking.RunLock`): a
run held by a live process is refused (a lease left by a dead one is taken over, as ``run``
does), and no run can start writing it while it is being deleted. Files go in an order that
never shows a half-deleted run as complete: ``run.json`` first (the card ``runs`` trusts),
then ``metrics.json`` (the truth of "complete"), then everything else, ``lock.json`` last
(released by the lease itself).

Selection: by id, or by filters (age, status, name). Filters never select a tagged run
(design.md: tagged runs are never removed by filters); ``--keep-tagged T`` also keeps runs
tagged ``T`` that were named by id.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from shardeval.catalog import list_run_ids, not_found
from shardeval.errors import RunLockedError
from shardeval.locking import RunLock
from shardeval.runcard import CARD_FILE, read_tags
from shardeval.runlist import RunEntry, RunFilter, list_runs, read_entries
from shardeval.storage import RunStore


@dataclass
class Candidate:
    """A run ``rm`` would delete, or keeps (and why)."""

    entry: RunEntry
    size: int = 0
    files: int = 0
    kept: str | None = None
    """Why it is kept (held by a live process, tagged), None if it is to be deleted."""

    @property
    def run_id(self) -> str:  # noqa: D102
        return self.entry.run_id


@dataclass
class Removal:
    """What ``rm`` chose and did."""

    candidates: list[Candidate] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    """Runs that turned out to be held when deleting (run id → holder)."""

    @property
    def to_delete(self) -> list[Candidate]:  # noqa: D102
        return [c for c in self.candidates if c.kept is None]


def select(
    output: str,
    run_ids: list[str],
    run_filter: RunFilter | None,
    keep_tagged: list[str],
) -> Removal:
    """The runs to delete: ``run_ids`` (each must exist), or those ``run_filter`` matches."""
    existing = list_run_ids(output)
    if run_ids:
        missing = [r for r in run_ids if r not in existing]
        if missing:
            raise not_found(output, missing[0])
        chosen = read_entries(output, dict.fromkeys(run_ids))
    else:
        chosen = list_runs(output, run_filter)
    removal = Removal()
    for entry in chosen:
        store = RunStore(output, entry.run_id)
        candidate = Candidate(entry)
        candidate.size, candidate.files = _size(store)
        candidate.kept = _why_kept(store, entry, by_id=bool(run_ids), keep_tagged=keep_tagged)
        removal.candidates.append(candidate)
    return removal


def _why_kept(
    store: RunStore, entry: RunEntry, *, by_id: bool, keep_tagged: list[str]
) -> str | None:
    tags = read_tags(store)  # tags.json is the truth, not the card's copy
    protected = sorted(set(tags) & set(keep_tagged))
    if protected:
        return f"tagged {', '.join(protected)}"
    if tags and not by_id:
        return f"tagged {', '.join(tags)}"  # filters never remove a tagged run
    lock = RunLock(store)
    holder = lock.holder()
    if holder is not None and not lock.is_stale(holder):
        return f"held by host {holder.get('host')}, pid {holder.get('pid')}"
    return None


def _size(store: RunStore) -> tuple[int, int]:
    """Bytes and files under the run directory (one recursive listing)."""
    try:
        found = store.fs.find(store.root, detail=True)
    except FileNotFoundError:
        return 0, 0
    sizes = [int(info.get("size") or 0) for info in found.values()]
    return sum(sizes), len(sizes)


def delete(output: str, removal: Removal) -> Removal:
    """Delete every selected run, each while holding its lease (see the module docstring)."""
    for candidate in removal.to_delete:
        store = RunStore(output, candidate.run_id)
        lock = RunLock(store)
        try:
            lock.acquire()
        except RunLockedError as exc:
            removal.refused[candidate.run_id] = exc.message
            continue
        try:
            delete_run_files(store, keep=lock.path)
        finally:
            lock.release()
        _remove_dirs(store)
        removal.deleted.append(candidate.run_id)
    return removal


def delete_run_files(store: RunStore, *, keep: str) -> None:
    """run.json, then metrics.json, then every other file of the run except ``keep``."""
    for first in (store.path(CARD_FILE), store.metrics_path):
        if store.exists(first):
            store.delete([first])
    try:
        rest = [str(p) for p in store.fs.find(store.root)]
    except FileNotFoundError:
        rest = []
    rest = [p for p in rest if p.rstrip("/") != keep]
    for start in range(0, len(rest), 1000):  # S3 deletes up to 1,000 keys per request
        store.delete(rest[start : start + 1000])


def _remove_dirs(store: RunStore) -> None:
    """Local disk: the emptied directories (object stores have none)."""
    if not store.is_local:
        return
    import os

    for dirpath, _dirs, _files in sorted(os.walk(store.root), key=lambda w: -len(w[0])):
        store.remove_empty_dir(dirpath)
    store.remove_empty_dir(posixpath.normpath(store.root))
