"""The answer of a complete run, found again without reading its dataset or importing pyarrow.

Typing ``shardeval run spec.yaml`` again on a complete run must say "answered from storage"
at once. The exact path (:meth:`shardeval.session.RunSession.prepare` then
``answer_from_storage``) proves that nothing changed by reading and hashing the whole dataset,
which takes the import of pyarrow and pandas (~0.5 s) and, at a million items, most of a
minute. After the exact path has answered (or completed the run), the CLI leaves an *answer
record* in ``<SHARDEVAL_HOME>/answers/<key>.json``:

* the **key** is a digest of everything the exact path's decision read that a file's stat
  cannot vouch for: the spec file's path and bytes, the command's options (output, run id,
  limit, batch size, concurrency, ``--set``/``--model``, task runner), the working directory
  (relative outputs), ``PYTHONPATH`` and the interpreter (which code a ``module:callable``
  names), shardeval's version and ``HASH_VERSION``;
* the record lists the **files** the answer depends on, each with its stat (size, mtime and
  ctime in ns, inode, device): the dataset, the modules of every metric's code (custom
  ``python`` metrics included) and of a python provider's function, and the run's own
  metrics.json, results.parquet and run.json.

The next command with the same key answers from the record if every file's stat is unchanged
and no lease (``lock.json``) is held; otherwise, or on any doubt (an object store, a URL spec,
``--fresh``, ``--retry-failed``, ``--baseline``, an unreadable record), it takes the exact
path, which writes a new record. An edit of the dataset changes its mtime and ctime (ctime
cannot be set back by a program), a changed metric or prompt changes the spec's bytes or a
module's stat, a rescore rewrites metrics.json. As in git's index, a file modified within
:data:`RACY_S` of the moment it was read could be edited again within the same timestamp tick:
such a file is never vouched for (no record is written).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardeval import __version__

if TYPE_CHECKING:
    from shardeval.session import RunSession

RECORD_VERSION = 1
RACY_S = 2.0
"""A file whose mtime is this close to the moment it was stat'ed before reading is not
vouched for: filesystems stamp times in ticks (milliseconds here, seconds on some network
filesystems), so a same-size edit in the same tick would leave the stat unchanged."""

Stat = list[int]


def file_stat(path: str) -> Stat | None:
    """``[size, mtime_ns, ctime_ns, inode, device]`` of a local file, or None if absent."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return [found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino, found.st_dev]


def answer_key(spec_source: str, options: Mapping[str, Any]) -> str | None:
    """The record key of this command, or None when no record may answer it.

    ``options`` are the command's options that can change the answer; the caller leaves out
    only those that cannot (``--quiet``, ``--verbose``, ``--wait``, ``--no-preflight``).
    """
    if "://" in spec_source:
        return None
    try:
        text = Path(spec_source).read_bytes()
    except OSError:
        return None
    from shardeval.hashing import HASH_VERSION

    identity = {
        "record": RECORD_VERSION,
        "shardeval": __version__,
        "hash_version": HASH_VERSION,
        "spec_path": spec_source,
        "spec_sha256": hashlib.sha256(text).hexdigest(),
        "options": dict(options),
        "cwd": os.getcwd(),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "python": sys.executable,
    }
    canonical = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _record_path(key: str) -> Path:
    from shardeval.server_files import shardeval_home

    return shardeval_home() / "answers" / f"{key}.json"


def recorded_answer(key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(record, metrics.json)`` if the record of ``key`` still holds, else None."""
    try:
        record = json.loads(_record_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("record") != RECORD_VERSION:
        return None
    files = record.get("files")
    run_dir = record.get("run_dir")
    if not isinstance(files, dict) or not isinstance(run_dir, str):
        return None
    for path, stat in files.items():
        if file_stat(path) != stat:
            return None
    if os.path.lexists(os.path.join(run_dir, "lock.json")):
        return None  # someone holds the run (or left a lease the exact path clears)
    try:
        summary = json.loads(Path(run_dir, "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not summary.get("complete"):
        return None
    if summary.get("run_id") != record.get("run_id"):
        return None
    if summary.get("plan_fingerprint") != record.get("plan_fingerprint"):
        return None
    return record, summary


def answer_from_record(key: str, *, started: float) -> bool:
    """Print the answer of ``key``'s record, as the exact path does, if it holds; True if so.

    ``started`` is the command's ``time.monotonic()`` start, for the summary's wall time.
    """
    found = recorded_answer(key)
    if found is None:
        return False
    record, summary = found
    from shardeval.display import err_console, print_summary

    run_id = record["run_id"]
    err_console.print(f"[dim]run {run_id} is complete and current: answered from storage[/]")
    print_summary(
        summary,
        wall_s=time.monotonic() - started,
        sent=0,
        from_cache=summary["n_rows"],
        results_dir=record["results_dir"],
    )
    return True


def remember_answer(key: str, session: RunSession, *, read_started_ns: int) -> bool:
    """Write the record of ``key`` for a session whose metrics.json is current; True if written.

    ``read_started_ns`` is when the command started (before the dataset was read): a file
    modified less than :data:`RACY_S` before it is racy and makes the record unsafe.
    """
    from shardeval.cost import part_prices
    from shardeval.finality import summary_has_auth_errors
    from shardeval.finalize import is_current

    store = session.store
    dataset = session.validated.dataset
    if not store.is_local or session.retry_failed or session.new_run_reason:
        return False
    if dataset.source_stat is None or dataset.source_path is None:
        return False  # an object store or an fsspec URL: its etag is not read here
    summary = store.read_json(store.metrics_path)
    prices = part_prices(session.spec.model, session.metrics)  # as answer_from_storage asks
    plan = session.plan.fingerprint()
    if summary_has_auth_errors(summary) or not is_current(
        summary, plan_fingerprint=plan, metrics=session.metrics, prices=prices
    ):
        return False
    card = store.read_json(store.path("run.json"))
    if not isinstance(card, dict) or card.get("status") != "complete":
        return False  # the exact path writes the complete card first (record_complete)
    files: dict[str, Stat] = {}
    vouched: dict[str, Stat | None] = {dataset.source_path: dataset.source_stat}
    for module_file in _code_files(session):
        if module_file is None:
            return False
        vouched[module_file] = file_stat(module_file)
    racy_before = read_started_ns - int(RACY_S * 1e9)
    for path, stat in vouched.items():
        if stat is None or file_stat(path) != stat or max(stat[1], stat[2]) > racy_before:
            return False
        files[path] = stat
    run_dir = store.path()
    for name in ("metrics.json", "results.parquet", "run.json"):
        written = file_stat(os.path.join(run_dir, name))
        if written is None:
            return False
        files[os.path.join(run_dir, name)] = written
    record = {
        "record": RECORD_VERSION,
        "run_id": session.run_id,
        "run_dir": run_dir,
        "results_dir": store.url(),
        "plan_fingerprint": session.plan.fingerprint(),
        "files": files,
        "written_at": time.time(),
    }
    target = _record_path(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, target)  # whole or absent: a reader never sees half a record
    except OSError:
        return False
    return True


def _code_files(session: RunSession) -> list[str | None]:
    """The module files of the code that decides the answer (None: one cannot be found).

    Each metric's scorer module, a custom ``python`` metric's function module, and the python
    provider's function module. A metric's fingerprint names its function, not its code, so
    the exact path would answer the same after an edit; the record is stricter on purpose:
    a module edited (or deleted) since is checked by the exact path again.
    """
    modules = [metric.scorer.__module__ for metric in session.metrics]
    for metric in session.metrics:
        function = metric.params.get("function")
        if isinstance(function, str):
            modules.append(function.partition(":")[0])
    if session.spec.model.function:
        modules.append(session.spec.model.function.partition(":")[0])
    files: list[str | None] = []
    for name in dict.fromkeys(modules):
        module = sys.modules.get(name)
        found = getattr(module, "__file__", None)
        files.append(os.path.abspath(found) if isinstance(found, str) else None)
    return files
