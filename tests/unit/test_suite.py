"""Suites without Prefect: loading errors with file:line, cells, suite run id, suite files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shardeval.errors import EXIT_USAGE
from shardeval.suite import SuiteError, is_suite_file, load_suite
from shardeval.suite_session import SuiteIncomplete, SuiteSession
from tests.helpers.suites import write_suite
from tests.unit.test_session import run_without_prefect

ARITH = "shardeval.testing.models:arith"
SLOPPY = "shardeval.testing.models:arith_sloppy"


def rewrite(path: Path, **fields: object) -> Path:
    data = yaml.safe_load(path.read_text())
    data.update(fields)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(SuiteError) as caught:
        SuiteSession.prepare(str(path))
    assert caught.value.exit_code == EXIT_USAGE
    return str(caught.value)


def line_with(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_cells_are_every_eval_times_every_model_with_overrides(tmp_path: Path) -> None:
    suite = write_suite(
        tmp_path, models=[{"function": ARITH}, {"function": SLOPPY, "concurrency": 3}]
    )
    rewrite(
        suite,
        evals=[
            "evals/e0/spec.yaml",
            {"path": "evals/e1/spec.yaml", "set": {"batch_size": 5, "model": {"concurrency": 2}}},
        ],
    )
    cells = load_suite(str(suite)).cells
    assert [(c.eval_label, c.model_label) for c in cells] == [
        ("e0", "arith"),
        ("e0", "arith_sloppy"),
        ("e1", "arith"),
        ("e1", "arith_sloppy"),
    ]
    by = {(c.eval_label, c.model_label): c.spec for c in cells}
    assert by["e0", "arith"].model.concurrency == 8  # the spec's own
    assert by["e0", "arith_sloppy"].model.concurrency == 3  # the matrix entry
    assert by["e1", "arith_sloppy"].model.concurrency == 2  # the eval's set wins
    assert by["e1", "arith"].batch_size == 5 and by["e0", "arith"].batch_size == 10
    assert by["e1", "arith_sloppy"].model.function == SLOPPY
    assert by["e1", "arith_sloppy"].model.provider == "python"  # merged, not replaced
    # The spec keeps its file: its dataset path still resolves next to it.
    assert by["e1", "arith"].dataset_url() == str(tmp_path / "evals" / "e1" / "items.jsonl")


def test_without_a_matrix_each_eval_keeps_its_model(tmp_path: Path) -> None:
    cells = load_suite(str(write_suite(tmp_path, evals=3))).cells
    assert [(c.eval_label, c.model_label, c.model_index) for c in cells] == [
        ("e0", "arith", None),
        ("e1", "arith", None),
        ("e2", "arith", None),
    ]


def test_suite_output_overrides_each_spec_and_files_go_under_suites(tmp_path: Path) -> None:
    suite = SuiteSession.prepare(str(write_suite(tmp_path)))
    assert {c.session.store.output for c in suite.cells} == {str(tmp_path / "out")}
    assert suite.store.suite_path == str(
        tmp_path / "out" / "suites" / suite.suite_run_id / "suite.json"
    )
    other = SuiteSession.prepare(str(tmp_path / "suite.yaml"), output=str(tmp_path / "cli"))
    assert other.store.url().startswith(str(tmp_path / "cli" / "suites"))


def test_unknown_suite_key_names_the_line(tmp_path: Path) -> None:
    suite = rewrite(write_suite(tmp_path), paralel=3)
    message = error_of(suite)
    assert f"{suite}:{line_with(suite, 'paralel')}: paralel: unknown field" in message


def test_bad_model_matrix_field_and_value_name_the_line(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, models=[{"function": ARITH}, {"modle": "x"}])
    message = error_of(suite)
    assert "models[1]: unknown model field(s) modle" in message
    assert f"{suite}:{line_with(suite, 'models:')}:" in message

    suite = write_suite(tmp_path, models=[{"function": ARITH}, {"concurrency": 0}])
    message = error_of(suite)
    expected = f"{suite}:{line_with(suite, 'concurrency: 0')}: models[1].concurrency: "
    assert expected + "Input should be greater than 0" in message, message
    assert "evals/e0/spec.yaml" in message  # which spec it was applied to


def test_bad_set_override_names_the_suite_line_and_field(tmp_path: Path) -> None:
    suite = write_suite(tmp_path)
    rewrite(
        suite,
        evals=["evals/e0/spec.yaml", {"path": "evals/e1/spec.yaml", "set": {"batch_size": 0}}],
    )
    message = error_of(suite)
    line = line_with(suite, "batch_size: 0")
    assert f"{suite}:{line}: evals[1].set.batch_size: Input should be greater than 0" in message

    rewrite(suite, evals=[{"path": "evals/e0/spec.yaml", "set": {"batch_sise": 5}}])
    assert "evals[0].set.batch_sise: unknown field" in error_of(suite)


def test_missing_or_invalid_spec_names_suite_and_spec(tmp_path: Path) -> None:
    suite = rewrite(write_suite(tmp_path), evals=["evals/e0/spec.yaml", "evals/nope.yaml"])
    message = error_of(suite)
    assert f"{suite}:{line_with(suite, 'nope.yaml')}: evals[1] (evals/nope.yaml)" in message
    assert "spec file not found" in message

    spec = tmp_path / "evals" / "e0" / "spec.yaml"
    rewrite(spec, batch_size=-1)
    rewrite(suite, evals=["evals/e0/spec.yaml"])
    message = error_of(suite)
    assert f"evals[0] (evals/e0/spec.yaml): {spec}:" in message
    assert "batch_size: Input should be greater than 0" in message


def test_a_dataset_problem_is_found_before_any_model_call(tmp_path: Path) -> None:
    """Validation reads every cell's dataset: a metric target missing in one eval's items."""
    suite = write_suite(tmp_path, evals=2, models=[{"function": ARITH}, {"function": SLOPPY}])
    rewrite(
        tmp_path / "evals" / "e1" / "spec.yaml", metrics=[{"type": "exact_match", "target": "nope"}]
    )
    message = error_of(suite)
    assert f"{suite}:{line_with(suite, 'e1/spec.yaml')}: evals[1] (evals/e1/spec.yaml)" in message
    assert "× models[0]" in message and "metrics[0] (exact_match)" in message
    assert "'nope'" in message
    assert not (tmp_path / "out").exists()  # nothing was written, nothing was sent


def test_two_cells_of_one_run_are_refused(tmp_path: Path) -> None:
    suite = rewrite(
        write_suite(tmp_path),
        evals=["evals/e0/spec.yaml", {"path": "evals/e0/spec.yaml", "set": {"batch_size": 7}}],
    )
    message = error_of(suite)
    assert "are the same run" in message and "evals[0]" in message and "evals[1]" in message


def test_suite_run_id_depends_on_the_cells_runs_only(tmp_path: Path) -> None:
    path = write_suite(tmp_path, evals=2, models=[{"function": ARITH}, {"function": SLOPPY}])
    first = SuiteSession.prepare(str(path)).suite_run_id
    assert first.startswith("nightly-") and len(first) == len("nightly-") + 10
    assert SuiteSession.prepare(str(path)).suite_run_id == first
    # Order of the file and fields outside the run id (batch size, parallel) do not matter.
    rewrite(path, evals=["evals/e1/spec.yaml", "evals/e0/spec.yaml"], parallel=1)
    rewrite(tmp_path / "evals" / "e0" / "spec.yaml", batch_size=3)
    assert SuiteSession.prepare(str(path)).suite_run_id == first
    # Another model is another suite run.
    rewrite(path, models=[{"function": ARITH}, {"function": ARITH, "revision": "v2"}])
    assert SuiteSession.prepare(str(path)).suite_run_id != first


def test_is_suite_file(tmp_path: Path) -> None:
    suite = write_suite(tmp_path)
    assert is_suite_file(str(suite))
    assert not is_suite_file(str(tmp_path / "evals" / "e0" / "spec.yaml"))
    assert not is_suite_file(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("suite: [unclosed")
    assert not is_suite_file(str(tmp_path / "bad.yaml"))


def test_complete_is_decided_by_each_cells_stored_metrics(tmp_path: Path) -> None:
    """The suite files record cells as they finish; a cell is complete by its run's content."""
    path = write_suite(tmp_path, evals=2, n_items=6)
    suite = SuiteSession.prepare(str(path))
    pending = suite.start()
    assert len(pending) == 2
    record = json.loads(Path(suite.store.suite_path).read_text())
    assert record["suite_run_id"] == suite.suite_run_id
    assert [c["status"] for c in record["cells"]] == ["incomplete", "incomplete"]

    first, second = suite.cells
    suite.cell_started(first)
    suite.cell_finished(first, run_without_prefect(first.session))
    suite.cell_started(second)
    suite.cell_failed(second, RuntimeError("endpoint down"))
    summary = suite.finish()
    assert not summary["complete"]
    record = json.loads(Path(suite.store.suite_path).read_text())
    assert [(c["run_id"], c["status"]) for c in record["cells"]] == [
        (first.run_id, "complete"),
        (second.run_id, "failed"),
    ]
    assert record["cells"][1]["error"] == "RuntimeError: endpoint down"
    stored = json.loads(Path(suite.store.summary_path).read_text())
    assert stored["cells"][0]["metrics"]["n_rows"] == 6
    page = Path(suite.store.report_path).read_text()  # written before summary.json
    assert stored["report"].endswith("report.html") and suite.suite_run_id in page
    assert "http://" not in page and "https://" not in page
    assert stored["cells"][0]["main"]["metric"] == "exact_match"
    with pytest.raises(SuiteIncomplete, match=r"1 of 2 cells .*e1 × arith .*endpoint down"):
        suite.raise_for_failures()

    # A new attempt: the first cell is complete by its metrics.json, the second is not.
    again = SuiteSession.prepare(str(path))
    assert again.suite_run_id == suite.suite_run_id
    assert [c.run_id for c in again.start()] == [second.run_id]
    # Editing the first eval's metrics makes its stored metrics.json stale: it runs again.
    rewrite(
        tmp_path / "evals" / "e0" / "spec.yaml", metrics=[{"type": "includes", "target": "answer"}]
    )
    assert len(SuiteSession.prepare(str(path)).start()) == 2


def test_the_suite_page_shows_a_cells_history_over_nights(tmp_path: Path) -> None:
    """An earlier night of the same cell (a deployment run: the cell's id plus a suffix) is
    drawn in the suite's report.html; the other model's runs are not mixed in."""
    from shardeval.session import RunSession

    path = write_suite(tmp_path, evals=1, n_items=6)
    suite = SuiteSession.prepare(str(path))
    (cell,) = suite.start()
    earlier = RunSession.prepare(
        cell.session.spec, output=cell.session.store.output, run_id=f"{cell.run_id}-0badcafe"
    )
    run_without_prefect(earlier)  # last night's run of the same cell
    suite.cell_started(cell)
    suite.cell_finished(cell, run_without_prefect(cell.session))
    series = suite._history()
    assert [(s["eval"], len(s["points"])) for s in series] == [(cell.cell.eval_label, 2)]
    assert {p["run_id"] for p in series[0]["points"]} == {cell.run_id, earlier.run_id}
    suite.finish()
    page = Path(suite.store.report_path).read_text()
    assert f"{cell.cell.eval_label} · {cell.cell.model_label}" in page
