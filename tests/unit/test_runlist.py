"""Run cards, listing, filters, ages, status decisions, tags and rm, without Prefect."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shardeval.catalog import RunNotFound, resolve_output
from shardeval.errors import RunIncomplete, SpecError
from shardeval.locking import RunLock
from shardeval.removal import delete, select
from shardeval.runcard import CARD_FILE, CardKeeper, check_tag, read_card, write_tags
from shardeval.runlist import RunEntry, RunFilter, decide_status, list_runs, parse_age
from shardeval.session import RunSession
from shardeval.storage import RunStore
from tests.helpers.specs import write_spec
from tests.helpers.waiting import wait_until
from tests.unit.test_session import run_without_prefect

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


# ------------------------------------------------------------------------------ ages
@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("45s", timedelta(seconds=45)),
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("1.5h", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        (" 2w ", timedelta(weeks=2)),
    ],
)
def test_ages_count_back_from_now(text: str, delta: timedelta) -> None:
    assert parse_age(text, now=NOW) == NOW - delta


def test_a_date_is_a_moment_in_utc_unless_it_says_otherwise() -> None:
    assert parse_age("2026-11-01", now=NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    moment = parse_age("2026-11-01T10:00:00+02:00", now=NOW)
    assert moment == datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize("text", ["7", "7days", "d7", "-3d", "yesterday", ""])
def test_a_bad_age_names_the_option(text: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_age(text, option="--older-than", now=NOW)
    assert "--older-than" in str(caught.value) and caught.value.exit_code == 2


# -------------------------------------------------------------------------- statuses
def card(status: str, **extra: Any) -> dict[str, Any]:
    return {"run_id": "r", "status": status, **extra}


def beat(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).isoformat(timespec="seconds")


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def alive(pid: int) -> bool:
    return pid == 111


def test_status_decisions() -> None:
    here = {"host": "here", "pid": 111}
    dead_here = {"host": "here", "pid": 222}
    there = {"host": "there", "pid": 222}
    decide = {"now": NOW, "host": "here", "alive": alive, "stale_s": 60}
    assert decide_status(card("complete"), **decide) == "complete"
    assert decide_status(card("incomplete"), **decide) == "incomplete"
    assert decide_status(card("running", heartbeat_at=beat(5), holder=here), **decide) == "running"
    # On this host a dead pid settles it, however fresh the heartbeat.
    assert (
        decide_status(card("running", heartbeat_at=beat(5), holder=dead_here), **decide)
        == "incomplete"
    )
    # On another host only the heartbeat can tell.
    assert decide_status(card("running", heartbeat_at=beat(5), holder=there), **decide) == "running"
    assert (
        decide_status(card("running", heartbeat_at=beat(61), holder=there), **decide)
        == "incomplete"
    )
    assert decide_status(card("running", holder=here), **decide) == "incomplete"
    assert decide_status(card("???"), **decide) == "incomplete"


# --------------------------------------------------------------------------- filters
def entry(**fields: Any) -> RunEntry:
    status = fields.pop("status", "complete")
    base = {"run_id": "r", "name": "arith", "model": "gpt-4o-mini", "tags": []}
    return RunEntry(card={**base, **fields}, status=status, url="u")


def test_filters() -> None:
    day_old = entry(started_at=beat(86400), tags=["baseline", "prod"])
    assert RunFilter().matches(day_old)
    assert RunFilter(name="arith").matches(day_old)
    assert RunFilter(name="ar*").matches(day_old)
    assert not RunFilter(name="arithmetic").matches(day_old)
    assert RunFilter(model="gpt-4o*").matches(day_old)
    assert not RunFilter(model="gpt-4o").matches(day_old)
    assert RunFilter(status="complete").matches(day_old)
    assert not RunFilter(status="running").matches(day_old)
    assert RunFilter(tags=["baseline"]).matches(day_old)
    assert RunFilter(tags=["baseline", "prod"]).matches(day_old)
    assert not RunFilter(tags=["baseline", "nightly"]).matches(day_old)
    assert RunFilter(since=NOW - timedelta(days=2)).matches(day_old)
    assert not RunFilter(since=NOW - timedelta(hours=1)).matches(day_old)
    assert RunFilter(before=NOW - timedelta(hours=1)).matches(day_old)
    assert not RunFilter(before=NOW - timedelta(days=2)).matches(day_old)
    # A run with no start time is neither recent nor old.
    assert not RunFilter(since=NOW).matches(entry())
    assert not RunFilter(before=NOW).matches(entry())
    with pytest.raises(SpecError, match="--status 'done'"):
        RunFilter(status="done")


def test_tag_names_are_checked() -> None:
    assert check_tag("baseline") == "baseline"
    assert check_tag("v1.2_rc-3") == "v1.2_rc-3"
    for bad in ("", "has space", "a/b", "ü", "x;rm"):
        with pytest.raises(SpecError):
            check_tag(bad)


def test_the_output_rule(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, n_items=2, output=str(tmp_path / "from-spec"))
    assert resolve_output("s3://b/x", str(spec)) == "s3://b/x"
    assert resolve_output(None, str(spec)) == str(tmp_path / "from-spec")
    assert resolve_output(None, None) == "./shardeval-runs"


# ------------------------------------------------------------------- cards and lists
def make_run(tmp_path: Path, name: str, n_items: int = 6, **overrides: Any) -> RunSession:
    out = tmp_path / "out"
    spec = write_spec(tmp_path / name, n_items=n_items, batch_size=3, name=name, output=str(out))
    session = RunSession.prepare(str(spec), **overrides)
    run_without_prefect(session)
    return session


def test_a_finished_run_has_a_complete_card(tmp_path: Path) -> None:
    session = make_run(tmp_path, "arith")
    found = read_card(session.store)
    metrics = json.loads((Path(session.store.root) / "metrics.json").read_text())
    assert found is not None
    assert found["status"] == "complete"
    assert (found["n_done"], found["n_total"], found["n_error"]) == (6, 6, 0)
    assert found["main_metric"]["name"] == "exact_match"
    assert found["main_metric"]["mean"] == metrics["metrics"]["exact_match"]["mean"]
    assert found["main_metric"]["ci95"] == metrics["metrics"]["exact_match"]["ci95"]
    assert found["started_at"] == metrics["started_at"]
    assert found["finished_at"] == metrics["finished_at"]
    assert found["holder"] is None and found["tags"] == []
    assert found["model"] == "shardeval.testing.models:arith"


def test_the_card_is_refreshed_while_running_and_says_how_the_attempt_ended(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    spec = write_spec(tmp_path, n_items=6, batch_size=3, output=str(out))
    session = RunSession.prepare(str(spec))
    write_tags_later = RunStore(str(out), session.run_id)
    with session.lease():
        keeper = CardKeeper(session, refresh_s=0.05)
        with keeper:
            first = read_card(session.store)
            assert first is not None and first["status"] == "running"
            assert first["holder"] == {"host": os.uname().nodename, "pid": os.getpid()}
            session.progress.plan(6, 2, 0)
            session.progress.finished("ok", batch="b")
            session.progress.finished("error", "http_400", batch="b")
            write_tags_later.write_json(write_tags_later.path("tags.json"), ["wip"])

            def refreshed() -> dict[str, Any] | None:
                card = read_card(session.store)
                return card if card and card["n_done"] == 2 and card["tags"] == ["wip"] else None

            current = wait_until(refreshed, timeout=10, what="a refresh with the progress and tags")
            assert current["n_error"] == 1
            assert list_runs(str(out))[0].status == "running"
        ended = read_card(session.store)
    assert ended is not None and ended["status"] == "incomplete"
    assert ended["finished_at"] is not None and ended["holder"] is None
    # No late refresh turns it back into "running": once the refresh thread is gone, none can.
    wait_until(
        lambda: not any(t.name == "shardeval-card" for t in threading.enumerate()),
        timeout=10,
        what="the card's refresh thread ending",
    )
    assert read_card(session.store)["status"] == "incomplete"  # type: ignore[index]
    assert list_runs(str(out))[0].status == "incomplete"


def test_a_failed_attempt_leaves_an_incomplete_card(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, n_items=6, batch_size=3, output=str(tmp_path / "out"))
    session = RunSession.prepare(str(spec))
    with pytest.raises(RunIncomplete), session.attempt():
        raise RunIncomplete("a batch failed")
    found = read_card(session.store)
    assert found is not None and found["status"] == "incomplete"


def test_listing_newest_first_with_old_runs_and_killed_ones(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    first = make_run(tmp_path, "alpha")
    time.sleep(1.1)  # started_at has a resolution of one second
    second = make_run(tmp_path, "beta", n_items=4)
    time.sleep(1.1)
    third = make_run(tmp_path, "gamma")
    # gamma: killed while running (a card whose heartbeat stopped, a holder long gone).
    killed = read_card(third.store)
    assert killed is not None
    killed.update(status="running", heartbeat_at=ago(3600), holder={"host": "h", "pid": 1})
    (Path(third.store.root) / "metrics.json").unlink()
    third.store.write_json(third.store.path(CARD_FILE), killed)
    # alpha: written by an older shardeval (no card).
    (Path(first.store.root) / CARD_FILE).unlink()
    write_tags(first.store, ["baseline"])

    listed = list_runs(out)
    assert [e.run_id for e in listed] == [third.run_id, second.run_id, first.run_id]
    assert [e.status for e in listed] == ["incomplete", "complete", "complete"]
    old = listed[2]
    assert old.legacy and old.tags == ["baseline"]
    assert (old.card["n_done"], old.card["n_total"]) == (6, 6)
    assert old.card["main_metric"]["name"] == "exact_match"
    assert [e.run_id for e in list_runs(out, RunFilter(tags=["baseline"]))] == [first.run_id]
    assert [e.run_id for e in list_runs(out, RunFilter(status="incomplete"))] == [third.run_id]
    assert [e.run_id for e in list_runs(out, RunFilter(name="beta"))] == [second.run_id]
    json.dumps([e.to_dict() for e in listed])  # JSON-able


def test_a_run_killed_after_metrics_json_is_listed_complete_and_its_card_repaired(
    tmp_path: Path,
) -> None:
    session = make_run(tmp_path, "arith")
    stale = read_card(session.store)
    assert stale is not None
    stale.update(status="running", heartbeat_at=ago(3600), holder={"host": "h", "pid": 1})
    session.store.write_json(session.store.path(CARD_FILE), stale)
    assert list_runs(str(tmp_path / "out"))[0].status == "complete"  # metrics.json decides
    again = RunSession.prepare(str(tmp_path / "arith" / "spec.yaml"))
    assert again.answer_from_storage() is not None
    assert read_card(session.store)["status"] == "complete"  # type: ignore[index]


# ---------------------------------------------------------------------------------- rm
def test_rm_keeps_held_and_tagged_runs_and_deletes_the_rest(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    held = make_run(tmp_path, "held")
    tagged = make_run(tmp_path, "tagged")
    plain = make_run(tmp_path, "plain")
    write_tags(tagged.store, ["baseline"])
    lease = RunLock(held.store)
    lease.acquire()  # a live holder (this process)
    try:
        by_filter = select(out, [], RunFilter(before=datetime.now(UTC) + timedelta(1)), [])
        kept = {c.run_id: c.kept for c in by_filter.candidates}
        assert kept[plain.run_id] is None
        assert kept[tagged.run_id] == "tagged baseline"
        assert kept[held.run_id] is not None and kept[held.run_id].startswith("held by")
        assert all(c.size > 0 and c.files > 0 for c in by_filter.candidates)
        delete(out, by_filter)
        assert by_filter.deleted == [plain.run_id]
        assert not Path(plain.store.root).exists()
        # By id: a tagged run goes unless its tag is kept; a held one never.
        by_id = select(out, [tagged.run_id, held.run_id], None, ["baseline"])
        assert [c.kept is None for c in by_id.candidates] == [False, False]
        by_id = select(out, [tagged.run_id, held.run_id], None, [])
        delete(out, by_id)
        assert by_id.deleted == [tagged.run_id]
        assert Path(held.store.root).exists()
        with pytest.raises(RunNotFound):
            select(out, ["no-such-run"], None, [])
    finally:
        lease.release()
    # Once the holder is gone the run can go.
    removal = delete(out, select(out, [held.run_id], None, []))
    assert removal.deleted == [held.run_id]
    assert list_runs(out) == []
    assert not any((tmp_path / "out" / "runs").iterdir())


def test_an_old_run_without_a_card_is_resumable(tmp_path: Path) -> None:
    from shardeval.resume import prepare_resume

    session = make_run(tmp_path, "arith")
    root = Path(session.store.root)
    (root / CARD_FILE).unlink()
    (root / "metrics.json").unlink()
    (root / "results.parquet").unlink()
    shutil.rmtree(root / "batches")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "arith" / "spec.yaml").unlink()  # no spec file anywhere
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        resumed = prepare_resume(session.run_id, str(tmp_path / "out"))
    finally:
        os.chdir(cwd)
    assert resumed.run_id == session.run_id
    assert resumed.answer_from_storage() is None
    summary = run_without_prefect(resumed)
    assert summary["complete"] and summary["n_rows"] == 6
    assert list_runs(str(tmp_path / "out"))[0].status == "complete"


def test_a_card_holds_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-" + os.urandom(8).hex()
    monkeypatch.setenv("SHARDEVAL_TEST_KEY", secret)
    spec = write_spec(
        tmp_path,
        base_url="http://127.0.0.1:9/v1",
        n_items=3,
        output=str(tmp_path / "out"),
        model={"api_key_env": "SHARDEVAL_TEST_KEY"},
    )
    session = RunSession.prepare(str(spec))
    with session.lease(), CardKeeper(session):
        written = (Path(session.store.root) / CARD_FILE).read_text()
    assert secret not in written
    assert secret not in (Path(session.store.root) / CARD_FILE).read_text()
    assert json.loads(written)["provider"] == "openai"


def test_dataset_urls_lose_their_credentials() -> None:
    from shardeval.runcard import public_url

    assert public_url("https://user:pw@host:8443/d.jsonl") == "https://host:8443/d.jsonl"
    assert public_url("s3://bucket/d.jsonl") == "s3://bucket/d.jsonl"
    assert public_url("/data/d.jsonl") == "/data/d.jsonl"


def test_resume_keeps_the_last_attempts_limit(tmp_path: Path) -> None:
    from shardeval.resume import prepare_resume

    session = make_run(tmp_path, "arith", n_items=6, limit=4)
    resumed = prepare_resume(session.run_id, str(tmp_path / "out"))
    assert resumed.plan.n_rows == 4
    assert resumed.answer_from_storage() is not None
    assert prepare_resume(session.run_id, str(tmp_path / "out"), limit=6).plan.n_rows == 6


def test_tags_are_the_list_that_baseline_tag_selectors_read(tmp_path: Path) -> None:
    from shardeval.history import find_baseline

    old = make_run(tmp_path, "arith")
    write_tags(old.store, ["baseline"])
    assert json.loads((Path(old.store.root) / "tags.json").read_text()) == ["baseline"]
    assert read_card(old.store)["tags"] == ["baseline"]  # type: ignore[index]
    found = find_baseline(str(tmp_path / "out"), "arith", "arith-later", "tag:baseline")
    assert found == old.run_id
