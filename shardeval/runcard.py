"""The run card, ``<run>/run.json``: one small file that says what a run is and how far it got.

``shardeval runs`` lists every run under an output from the cards alone, so on an object store
a listing costs one LIST of ``runs/`` and one GET per run, however many files each run holds.
The card is written by the run session (never by a reader):

* when an attempt starts (``status: running``, with the holder's host and pid);
* every :data:`REFRESH_S` seconds while the attempt runs, from the run's progress counters
  (a timer thread: ``heartbeat_at`` says the holder is alive);
* when the attempt ends: ``complete`` with the main metric after metrics.json was written,
  ``incomplete`` otherwise. A killed attempt leaves ``running`` with a heartbeat that stops
  being fresh, which readers take for ``incomplete`` (see :mod:`shardeval.runlist`).

The truth stays where it was: metrics.json says a run is complete, lock.json who holds it,
``tags.json`` its tags. The card carries copies (each write reads tags.json again), so it is
only ever a summary, and a run without a card (written by an older shardeval) is listed from
those files instead. A card holds no secret: model name, provider, the dataset URL without
credentials, counts, times, tags.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import urllib.parse
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shardeval import __version__
from shardeval.errors import SpecError
from shardeval.storage import RunStore

if TYPE_CHECKING:
    from shardeval.session import RunSession

logger = logging.getLogger("shardeval.runcard")

CARD_FILE = "run.json"
TAGS_FILE = "tags.json"
CARD_VERSION = 1
REFRESH_S = 10.0
"""How often a running attempt rewrites its card (one small PUT on an object store)."""
STALE_S = 60.0
"""A ``running`` card whose heartbeat is older than this is taken for a dead holder."""
TAG_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def now_iso() -> str:
    """The current UTC time as the card writes it (seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ tags
def check_tag(tag: str) -> str:
    """``tag`` if it is a valid tag name, else SpecError (exit 2)."""
    if not TAG_PATTERN.fullmatch(tag):
        raise SpecError(
            f"invalid tag {tag!r}: a tag is letters, digits, '.', '_' and '-'",
            hint="for example: baseline, prod-2026-12, v1.2",
        )
    return tag


def read_tags(store: RunStore) -> list[str]:
    """The run's tags from ``tags.json`` (a JSON list, as ``run --baseline tag:T`` reads it)."""
    return parse_tags(store.read_bytes(store.path(TAGS_FILE)))


def parse_tags(data: bytes | None) -> list[str]:
    """Tags from tags.json's bytes: ``["baseline"]`` (``{"tags": [...]}`` is read too)."""
    import json

    if data is None:
        return []
    try:
        tags = json.loads(data)
    except ValueError:
        return []
    if isinstance(tags, dict):
        tags = tags.get("tags")
    return sorted({str(t) for t in tags}) if isinstance(tags, list) else []


def write_tags(store: RunStore, tags: list[str]) -> None:
    """Replace the run's tags (tags.json is the truth), then the card's copy of them."""
    tags = sorted(set(tags))
    store.write_json(store.path(TAGS_FILE), tags)
    card = read_card(store)
    if card is not None:
        card["tags"] = tags
        store.write_json(store.path(CARD_FILE), card)


# ------------------------------------------------------------------------------------ cards
def read_card(store: RunStore) -> dict[str, Any] | None:
    """The run's card, or None (no card, or one that does not parse: never quarantined here)."""
    data = store.read_bytes(store.path(CARD_FILE))
    return parse_card(data)


def parse_card(data: bytes | None) -> dict[str, Any] | None:
    """A card's JSON, or None if it is missing or not a card."""
    import json

    if data is None:
        return None
    try:
        card = json.loads(data)
    except ValueError:
        return None
    return card if isinstance(card, dict) and "run_id" in card else None


def public_url(url: str) -> str:
    """A URL without any ``user:password@`` part (a card never holds a secret)."""
    if "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def main_metric(summary: dict[str, Any] | None, name: str | None) -> dict[str, Any] | None:
    """``{name, mean, ci95}`` of the spec's first metric in a metrics.json, if scored."""
    stats = (summary or {}).get("metrics")
    if not isinstance(stats, dict) or not stats:
        return None
    if name not in stats:
        name = sorted(stats)[0]
    entry = stats[name] if isinstance(stats[name], dict) else {}
    return {"name": name, "mean": entry.get("mean"), "ci95": entry.get("ci95")}


def model_label(model: dict[str, Any]) -> str:
    """What a person calls the model: its name, else the python function, else the provider."""
    return str(model.get("model") or model.get("function") or model.get("provider") or "")


def first_metric_name(spec: dict[str, Any]) -> str | None:
    """The name of a public spec's first metric (the card's main metric)."""
    metrics = spec.get("metrics") or []
    if not metrics or not isinstance(metrics[0], dict):
        return None
    first = metrics[0]
    return str(first.get("name") or first.get("type"))


def session_card(
    session: RunSession, status: str, summary: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The card of a session's run now (``summary``: metrics.json, for ``complete``)."""
    spec = session.spec.public_dict()
    plan_rows = session.plan.n_rows
    progress = session.progress
    found = session._found
    done = max(progress.done, found.done_rows if found is not None else 0)
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "run_id": session.run_id,
        "name": session.spec.name,
        "model": model_label(spec["model"]),
        "provider": session.spec.model.provider,
        "dataset": public_url(session.validated.dataset.url),
        "n_total": plan_rows,
        "n_done": min(done, plan_rows),
        "n_error": progress.errors,
        "main_metric": None,
        "tokens": None,
        "cost_usd": None,
        "started_at": session.stats.started_at.isoformat(timespec="seconds"),
        "finished_at": None,
        "status": status,
        "holder": None,
        "heartbeat_at": now_iso(),
        "tags": read_tags(session.store),
        "shardeval_version": __version__,
    }
    if status == "running":
        card["holder"] = {"host": socket.gethostname(), "pid": os.getpid()}
    else:
        card["finished_at"] = now_iso()
    if summary is not None:
        card.update(
            n_total=summary.get("n_rows", plan_rows),
            n_done=summary.get("n_rows", plan_rows),
            n_error=summary.get("n_error", 0),
            main_metric=main_metric(summary, first_metric_name(spec)),
            tokens=summary.get("usage"),
            cost_usd=(summary.get("cost") or {}).get("usd"),
            started_at=summary.get("started_at") or card["started_at"],
            finished_at=summary.get("finished_at") or card["finished_at"],
        )
    return card


class CardKeeper:
    """Writes a session's card while its attempt runs (use as a context manager).

    Entering writes ``running`` and starts the refresh thread; :meth:`finish` writes
    ``complete``; leaving without finishing writes ``incomplete``. A card that cannot be
    written is logged and skipped: the card is a summary, never a reason to stop a run.
    """

    def __init__(self, session: RunSession, *, refresh_s: float = REFRESH_S) -> None:
        self.session = session
        self.refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()
        self._final = False

    def __enter__(self) -> CardKeeper:
        self._write("running")
        self._thread = threading.Thread(target=self._refresh, name="shardeval-card", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt()
        if not self._final:
            self._write("incomplete", final=True)

    def finish(self, summary: dict[str, Any]) -> None:
        """The run is complete: metrics.json is written; the card says so, with its metrics."""
        self._halt()
        self._write("complete", summary, final=True)

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self._write("running")

    def _write(
        self, status: str, summary: dict[str, Any] | None = None, *, final: bool = False
    ) -> None:
        with self._write_lock:
            if self._final:
                return  # a late refresh must not turn a finished card back into "running"
            try:
                card = session_card(self.session, status, summary)
                store = self.session.store
                store.write_json(store.path(CARD_FILE), card)
            except Exception as exc:  # storage hiccup: the next write tries again
                logger.warning("could not write the run card of %s: %s", self.session.run_id, exc)
                return
            finally:
                if final:
                    self._final = True


def record_complete(session: RunSession, summary: dict[str, Any]) -> None:
    """Write a ``complete`` card for a run answered from storage whose card does not say so.

    (A run killed between metrics.json and its last card write, or written by an older
    shardeval.) Only when nobody holds the run: a live holder keeps its own card.
    """
    from shardeval.locking import RunLock

    store = session.store
    card = read_card(store)
    if card is not None and card.get("status") == "complete":
        return
    if RunLock(store).holder() is not None:
        return
    try:
        written = session_card(session, "complete", summary)
        store.write_json(store.path(CARD_FILE), written)
    except Exception as exc:  # a summary only; never fail the answer for it
        logger.warning("could not write the run card of %s: %s", store.run_id, exc)
