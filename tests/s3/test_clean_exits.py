"""Readers must not crash at exit: 20 consecutive answers from storage all exit 0.

pyarrow 26.0.1 aborts the interpreter at exit ("terminate called without an active
exception", exit 134) in 35-100% of processes that read Parquet through a Python file object.
Every `status` and every `run` answered from storage reads Parquet; none may die that way,
on local disk or on S3.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shardeval.session import RunSession
from tests.conftest import cli_env
from tests.helpers.specs import write_spec
from tests.s3.servers import S3Backend
from tests.unit.test_session import run_without_prefect

REPEATS = 20


def complete_run(tmp_path: Path, output: str) -> tuple[Path, str]:
    spec = write_spec(tmp_path, n_items=30, batch_size=10, output=output)
    session = RunSession.prepare(str(spec))
    run_without_prefect(session)
    return spec, session.run_id


def exits(args: list[str], env: dict[str, str]) -> list[int]:
    codes = []
    for _ in range(REPEATS):
        done = subprocess.run(
            [sys.executable, "-m", "shardeval", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "terminate called" not in done.stderr, done.stderr
        codes.append(done.returncode)
    return codes


def test_answers_from_local_storage_exit_cleanly(tmp_path: Path) -> None:
    spec, run_id = complete_run(tmp_path, str(tmp_path / "out"))
    env = cli_env(None)
    assert exits(["status", run_id, "--output", str(tmp_path / "out")], env) == [0] * REPEATS
    assert exits(["run", str(spec), "-q"], env) == [0] * REPEATS


def test_answers_from_s3_exit_cleanly(tmp_path: Path, s3_backend: S3Backend, bucket: str) -> None:
    output = f"s3://{bucket}/clean-exits"
    spec, run_id = complete_run(tmp_path, output)
    env = cli_env(None, **s3_backend.env())
    assert exits(["status", run_id, "--output", output], env) == [0] * REPEATS
    assert exits(["run", str(spec), "-q"], env) == [0] * REPEATS


pytestmark = pytest.mark.slow
