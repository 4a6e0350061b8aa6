"""The run session without Prefect: prepare, attempt, stages, finalize, answered from storage."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from shardeval.engines import close_engines, engine_for
from shardeval.errors import SpecError
from shardeval.finalize import finalize
from shardeval.hashing import legacy_run_id
from shardeval.progress import forget
from shardeval.runner import run_batch
from shardeval.session import RunSession
from shardeval.spec import load_spec
from tests.helpers.specs import write_spec


def run_without_prefect(session: RunSession) -> dict[str, object]:
    """What the evaluate flow composes, step by step, with plain threads instead of tasks."""
    try:
        with session.attempt():
            for stage in session.stages():
                engine = engine_for(stage.run.run_id, stage.run.model)
                for work, _stale in stage.works:
                    run_batch(stage.run.store(), work, engine, stage.run.progress())
            return session.finalize().metrics_json
    finally:
        close_engines(session.run_id)
        forget(session.run_id)


def test_a_session_runs_and_a_second_one_is_answered_from_storage(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, n_items=12, batch_size=5, output=str(tmp_path / "out"))
    session = RunSession.prepare(str(spec))
    assert session.answer_from_storage() is None
    summary = run_without_prefect(session)
    assert summary["complete"] and summary["n_rows"] == 12

    again = RunSession.prepare(str(spec))
    assert again.run_id == session.run_id
    stored = again.answer_from_storage()
    assert stored is not None and stored["n_rows"] == 12
    # A metrics edit keeps the run id but metrics.json is no longer current.
    edited = RunSession.prepare(
        str(
            write_spec(
                tmp_path,
                n_items=12,
                batch_size=5,
                output=str(tmp_path / "out"),
                metrics=[{"type": "includes", "target": "answer"}],
            )
        )
    )
    assert edited.run_id == session.run_id
    assert edited.answer_from_storage() is None
    # --retry-failed always runs.
    assert RunSession.prepare(str(spec), retry_failed=True).answer_from_storage() is None


def test_a_price_edit_keeps_the_run_and_its_keys_but_not_its_cost(tmp_path: Path) -> None:
    """Prices are in no key; metrics.json's cost says which prices it used (re-finalized)."""

    def priced(prompt: float) -> RunSession:
        pricing = {"prompt_per_mtok": prompt, "completion_per_mtok": 1.0}
        out = str(tmp_path / "out")
        return RunSession.prepare(
            str(write_spec(tmp_path, n_items=6, output=out, model={"pricing": pricing}))
        )

    session = priced(1.0)
    run_without_prefect(session)
    assert priced(1.0).answer_from_storage() is not None
    edited = priced(2.0)
    assert (edited.run_id, [b.key for b in edited.plan.batches]) == (
        session.run_id,
        [b.key for b in session.plan.batches],
    )
    assert edited.answer_from_storage() is None  # the stored cost is at the old price
    summary = run_without_prefect(edited)
    assert summary["cost"]["parts"][0]["price"]["prompt_per_mtok"] == 2.0
    assert priced(2.0).answer_from_storage() is not None


def test_run_id_does_not_depend_on_where_the_project_is(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    spec = write_spec(one, n_items=3, output=str(tmp_path / "shared"))
    two = tmp_path / "elsewhere" / "two"
    shutil.copytree(one, two)
    first = RunSession.prepare(str(spec))
    second = RunSession.prepare(str(two / spec.name))
    assert first.run_id == second.run_id


def test_a_run_under_the_old_absolute_path_id_keeps_resolving(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, n_items=3, output=str(tmp_path / "out"))
    spec = load_spec(str(spec_path))
    old = legacy_run_id(spec)
    assert old != RunSession.prepare(str(spec_path)).run_id
    (tmp_path / "out" / "runs" / old).mkdir(parents=True)
    assert RunSession.prepare(str(spec_path)).run_id == old


def test_a_new_run_says_which_identity_input_differs(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    spec = write_spec(tmp_path, n_items=4, output=out)
    first = RunSession.prepare(str(spec))
    assert first.new_run_reason is None  # the first run of an eval needs no explanation
    run_without_prefect(first)
    hotter = write_spec(tmp_path, n_items=4, output=out, model={"params": {"temperature": 0.7}})
    second = RunSession.prepare(str(hotter))
    assert second.run_id != first.run_id
    assert second.new_run_reason is not None
    assert first.run_id in second.new_run_reason
    assert "params.temperature" in second.new_run_reason
    assert "prompt" not in second.new_run_reason.split(" in ", 1)[1]


def test_fresh_with_run_id_is_an_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, n_items=2)
    with pytest.raises(SpecError, match="--fresh"):
        RunSession.prepare(str(spec), run_id="x", fresh=True)


def test_a_deployment_run_gets_a_run_per_flow_run(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, n_items=2, output=str(tmp_path / "out"))
    a = RunSession.prepare(str(spec), flow_run_id="0123456789abcdef")
    b = RunSession.prepare(str(spec), flow_run_id="fedcba9876543210")
    assert a.run_id.endswith("-01234567") and b.run_id.endswith("-fedcba98")
    assert RunSession.prepare(str(spec), flow_run_id="0123456789abcdef").run_id == a.run_id


def test_a_batch_damaged_after_its_stage_is_repaired_in_the_same_attempt(
    tmp_path: Path,
) -> None:
    """A batch that Prefect reports Cached is never read by its task: finalizing finds it."""
    spec = write_spec(tmp_path, n_items=10, batch_size=5, output=str(tmp_path / "out"))
    session = RunSession.prepare(str(spec))
    store = session.store
    phases = []
    with session.attempt():
        for stage in session.stages():
            phases.append(stage.phase)
            engine = engine_for(stage.run.run_id, stage.run.model)
            for work, _stale in stage.works:
                run_batch(stage.run.store(), work, engine, stage.run.progress())
            if stage.phase == "generating":
                Path(store.batch_path(session.plan.batches[0].key)).write_bytes(b"not parquet")
        summary = session.finalize().metrics_json
    close_engines(session.run_id)
    assert phases == ["generating", "repairing"]
    assert summary["n_ok"] == 10
    assert list(Path(store.path("quarantine")).iterdir())  # set aside, never deleted


def test_finalize_on_its_own_scores_judged_rows_from_stored_judgements(tmp_path: Path) -> None:
    judge = {
        "type": "llm_judge",
        "name": "judged",
        "model": {"provider": "python", "function": "tests.unit.metric_functions:judge_sum"},
        "rubric": "Response: {{ response }}",
    }
    spec = write_spec(
        tmp_path,
        n_items=6,
        batch_size=3,
        output=str(tmp_path / "out"),
        metrics=[{"type": "exact_match", "target": "answer"}, judge],
    )
    session = RunSession.prepare(str(spec))
    summary = run_without_prefect(session)
    assert summary["metrics"]["judged"]["n"] == 6
    # A fresh session (no judgements in memory) finalizes to the same scores.
    alone = RunSession.prepare(str(spec))
    done = finalize(
        alone.store,
        alone.plan,
        alone.metrics,
        started_at=alone.stats.started_at,
        finished_at=alone.stats.started_at,
    )
    assert done.metrics_json["metrics"]["judged"] == summary["metrics"]["judged"]
    assert done.metrics_json["scoring_errors"] == summary["scoring_errors"] == {}


def test_status_says_what_the_stored_rows_cost_and_projects_the_rest(tmp_path: Path) -> None:
    from shardeval.status import read_status

    out = tmp_path / "out"
    model = {
        "provider": "python",
        "function": "tests.unit.metric_functions:counted_model",
        "pricing": {"prompt_per_mtok": 1000.0, "completion_per_mtok": 5000.0},
    }
    spec = write_spec(tmp_path, n_items=10, batch_size=5, output=str(out), model=model)
    session = RunSession.prepare(str(spec))
    with session.attempt():
        stage = next(session.stages())
        engine = engine_for(stage.run.run_id, stage.run.model)
        work, _stale = next(iter(stage.works))  # only the first of two batches
        run_batch(stage.run.store(), work, engine, stage.run.progress())
    close_engines(session.run_id)
    status = read_status(str(out), session.run_id)
    # 5 rows × (10 × $1000 + 2 × $5000) per million tokens = 5 × $0.02
    assert status.done == 5 and status.cost_usd == pytest.approx(0.1)
    assert status.projected_cost_usd == pytest.approx(0.2)
    assert status.to_dict()["projected_cost_usd"] == pytest.approx(0.2)


def test_max_cost_stops_the_run_and_a_higher_limit_continues(tmp_path: Path) -> None:
    """Each answer costs $0.02 (see counted_model and the price): a $0.10 budget stops the run
    after about 5 answers; the rerun with $1 sends only the rest, each prompt once."""
    from shardeval.errors import RunIncomplete, RunInterrupted
    from shardeval.interrupt import stop_for

    def spec_with(limit: float) -> Path:
        model = {
            "provider": "python",
            "function": "tests.unit.metric_functions:counted_model",
            "pricing": {"prompt_per_mtok": 1000.0, "completion_per_mtok": 5000.0},
            "max_cost_usd": limit,
            "concurrency": 1,
        }
        return write_spec(
            tmp_path,
            n_items=20,
            batch_size=4,
            output=str(tmp_path / "out"),
            model=model,
            flush_every_items=1,
        )

    session = RunSession.prepare(str(spec_with(0.10)))
    with pytest.raises(RunIncomplete, match="budget reached"), session.attempt():
        for stage in session.stages():
            engine = engine_for(stage.run.run_id, stage.run.model)
            for work, _stale in stage.works:
                with contextlib.suppress(RunInterrupted):  # a batch cut short by the stop
                    run_batch(stage.run.store(), work, engine, stage.run.progress())
                if stop_for(session.run_id).requested:
                    raise stop_for(session.run_id).error()
    from shardeval.status import read_status

    stopped = read_status(str(tmp_path / "out"), session.run_id)
    assert 5 <= stopped.done < 20 and stopped.cost_usd is not None
    assert stopped.cost_usd == pytest.approx(0.02 * stopped.done)

    again = RunSession.prepare(str(spec_with(1.0)))
    assert again.run_id == session.run_id  # the limit is not part of the run's identity
    summary = run_without_prefect(again)
    assert summary["n_ok"] == 20
    assert summary["cost"]["usd"] == pytest.approx(0.40)


def test_a_session_handed_to_the_flow_is_not_encoded_row_by_row(tmp_path: Path) -> None:
    """Prefect records flow parameters; a session's plan must not be walked to do so."""
    from flows.evaluate import evaluate

    session = RunSession.prepare(str(write_spec(tmp_path, n_items=50)))
    assert evaluate.serialize_parameters({"spec": session}) == {"spec": "<RunSession>"}


def test_a_pickled_session_is_just_its_run(tmp_path: Path) -> None:
    """Prefect ships flow parameters to Dask workers: a session must pickle, and cheaply."""
    import pickle

    from shardeval.session import SessionRef

    session = RunSession.prepare(str(write_spec(tmp_path, n_items=5, output=str(tmp_path / "o"))))
    with session.attempt():  # holds the lease and the run card's refresh thread meanwhile
        restored = pickle.loads(pickle.dumps(session))
    assert restored == SessionRef(session.run_id, str(tmp_path / "o"))


def test_the_run_card_carries_what_the_run_cost(tmp_path: Path) -> None:
    """`shardeval runs` reads one card per run: a priced run's card says what it cost."""
    import json

    model = {
        "provider": "python",
        "function": "tests.unit.metric_functions:counted_model",
        "pricing": {"prompt_per_mtok": 1000.0, "completion_per_mtok": 5000.0},
    }
    spec = write_spec(tmp_path, n_items=4, output=str(tmp_path / "out"), model=model)
    session = RunSession.prepare(str(spec))
    run_without_prefect(session)
    card = json.loads(Path(session.store.path("run.json")).read_text())
    assert card["status"] == "complete" and card["cost_usd"] == pytest.approx(0.08)
