"""The public Python API: its surface, its imports, and opening runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import shardeval
from shardeval.catalog import RunNotFound
from tests.conftest import ROOT
from tests.helpers.specs import write_spec
from tests.unit.test_session import run_without_prefect

PUBLIC = [
    "DatasetError",
    "EvalSpec",
    "MetricError",
    "PermanentProviderError",
    "PromptError",
    "ProviderError",
    "Run",
    "RunInterrupted",
    "RunLockedError",
    "ShardevalError",
    "SpecError",
    "StorageError",
    "TransientProviderError",
    "__version__",
    "compare",
    "load_spec",
    "open_run",
    "rescore",
    "resume",
    "run",
]


def test_the_public_surface_is_pinned() -> None:
    assert sorted(shardeval.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(shardeval, name) is not None


def test_import_shardeval_imports_no_prefect() -> None:
    code = (
        "import json, sys, shardeval; shardeval.run; shardeval.open_run;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_open_run_reads_metrics_results_and_status(tmp_path: Path) -> None:
    from shardeval.session import RunSession

    out = tmp_path / "out"
    spec = write_spec(tmp_path, n_items=7, batch_size=3, output=str(out))
    session = RunSession.prepare(str(spec))
    run_without_prefect(session)

    run = shardeval.open_run(session.run_id, output=str(out))
    assert run.id == session.run_id
    assert run.url.endswith(f"runs/{session.run_id}")
    assert run.spec["spec"]["name"] == "arith"
    assert run.metrics is not None and run.metrics["n_rows"] == 7
    df = run.results()
    assert list(df.item_id) == [f"q{i:05d}" for i in range(7)]
    assert run.status().state == "complete"


def test_an_unknown_run_lists_the_closest_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardeval.session import RunSession

    out = tmp_path / "out"
    spec = write_spec(tmp_path, n_items=2, output=str(out))
    session = RunSession.prepare(str(spec))
    run_without_prefect(session)
    typo = session.run_id[:-1] + ("0" if session.run_id[-1] != "0" else "1")
    with pytest.raises(RunNotFound) as caught:
        shardeval.open_run(typo, output=str(out))
    assert session.run_id in str(caught.value)
    assert caught.value.exit_code == 2

    # A relative run directory (what `shardeval run` prints as "results:") where its id
    # belongs: the error names the id and the output to pass instead.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunNotFound) as caught:
        shardeval.open_run(f"out/runs/{session.run_id}")
    assert f"pass {session.run_id} with --output out" in str(caught.value)
    assert shardeval.open_run(session.run_id, output=str(out)).metrics is not None
