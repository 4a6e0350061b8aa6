"""Bad input fails fast: exit 2, a message that says what and where, and nothing written.

Every case runs the real CLI as a subprocess in plain mode (no ``PREFECT_API_URL``) with its
own empty ``PREFECT_HOME``: had Prefect been started, its temporary server would have created a
database there, so an empty home proves these errors were found before Prefect was imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import cli_env
from tests.helpers.specs import arith_items, write_spec

pytestmark = pytest.mark.slow  # every test here runs the CLI as a subprocess

# Bad input is found before Prefect starts; a couple of seconds on an idle machine, with room
# for a loaded CI box.
FAST_S = 20.0


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def text(self) -> str:
        """stdout + stderr with whitespace collapsed (rich wraps long lines)."""
        return " ".join((self.stdout + "\n" + self.stderr).split())


def shardeval(*args: str, cwd: Path, prefect_home: Path, drop: tuple[str, ...] = ()) -> CliResult:
    """Run ``python -m shardeval ARGS`` with no Prefect server and a private Prefect home."""
    env = cli_env(None, PREFECT_HOME=str(prefect_home), COLUMNS="200")
    for name in drop:
        env.pop(name, None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "shardeval", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return CliResult(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def files_under(path: Path) -> list[Path]:
    """Every file below ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    return [Path(root) / name for root, _dirs, names in os.walk(path) for name in names]


def line_containing(path: Path, needle: str) -> int:
    """1-based number of the first line of ``path`` that contains ``needle``."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


# --------------------------------------------------------------------------- bad inputs
# Each builder writes a broken spec (and dataset) into a directory and returns the spec path
# plus the fragments the error message must contain.


def unknown_spec_key(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d)
    text = spec.read_text().replace("  concurrency: 8\n", "  concurrency: 8\n  temprature: 0\n")
    assert "temprature" in text
    spec.write_text(text)
    return spec, [f"spec.yaml:{line_containing(spec, 'temprature')}", "model.temprature"]


def negative_batch_size(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d, batch_size=-1)
    return spec, [f"spec.yaml:{line_containing(spec, 'batch_size')}", "batch_size"]


def malformed_jsonl_line(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d, n_items=10)
    lines = (d / "items.jsonl").read_text().splitlines()
    lines[4] = '{"id": "q00004", "a": 1,'
    (d / "items.jsonl").write_text("\n".join(lines) + "\n")
    return spec, ["items.jsonl:5"]


def duplicate_ids(d: Path) -> tuple[Path, list[str]]:
    items = arith_items(10)
    items[6]["id"] = items[2]["id"]
    return write_spec(d, items=items), ["items.jsonl", items[2]["id"]]


def missing_prompt_variable(d: Path) -> tuple[Path, list[str]]:
    items = arith_items(10)
    del items[7]["b"]
    return write_spec(d, items=items), [items[7]["id"], "'b'"]


def unknown_metric_type(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d, metrics=[{"type": "exact_mach", "target": "answer"}])
    return spec, ["metrics[0]", "exact_mach", "did you mean", "exact_match"]


def regex_does_not_compile(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d, metrics=[{"type": "regex", "name": "first_number", "pattern": "([0-9]+"}])
    return spec, ["metrics[0]", "first_number", "([0-9]+", "compile"]


def missing_target_field(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d, metrics=[{"type": "exact_match", "name": "em", "target": "solution"}])
    return spec, ["metrics[0]", "em", "'solution'"]


def python_metric_not_importable(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d, metrics=[{"type": "python", "function": "no_such_module_xyz:score"}])
    return spec, ["metrics[0]", "no_such_module_xyz:score"]


def python_provider_not_importable(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d, model={"function": "shardeval.testing.models:no_such_fn"})
    return spec, ["model.function", "shardeval.testing.models:no_such_fn"]


def missing_dataset_file(d: Path) -> tuple[Path, list[str]]:
    spec = write_spec(d, dataset={"path": "nope.jsonl", "id_field": "id"})
    return spec, [str(d / "nope.jsonl")]


def openai_without_key(d: Path) -> tuple[Path, list[str]]:
    # No base_url: the real OpenAI endpoint, which needs the key from the environment.
    spec = write_spec(d, model={"provider": "openai", "model": "gpt-4o-mini", "function": None})
    return spec, ["OPENAI_API_KEY"]


BAD_INPUTS: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {
    "unknown-spec-key": unknown_spec_key,
    "negative-batch-size": negative_batch_size,
    "malformed-jsonl-line": malformed_jsonl_line,
    "duplicate-ids": duplicate_ids,
    "missing-prompt-variable": missing_prompt_variable,
    "unknown-metric-type": unknown_metric_type,
    "regex-does-not-compile": regex_does_not_compile,
    "missing-target-field": missing_target_field,
    "python-metric-not-importable": python_metric_not_importable,
    "python-provider-not-importable": python_provider_not_importable,
    "missing-dataset-file": missing_dataset_file,
    "openai-without-key": openai_without_key,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_message_and_writes_nothing(case: str, tmp_path: Path) -> None:
    spec_dir = tmp_path / "eval"
    spec, fragments = BAD_INPUTS[case](spec_dir)
    before = sorted(p.name for p in spec_dir.iterdir())
    output = tmp_path / "out"
    home = tmp_path / "prefect-home"
    home.mkdir()

    result = shardeval(
        "run",
        str(spec),
        "--output",
        str(output),
        cwd=tmp_path,
        prefect_home=home,
        drop=("OPENAI_API_KEY",),
    )

    assert result.returncode == 2, result.text
    assert "error" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.text, f"{fragment!r} missing from: {result.text}"
    # Nothing written: no run directory, no partial file, not even next to the spec.
    assert files_under(output) == []
    assert files_under(spec_dir / "runs") == []
    assert sorted(p.name for p in spec_dir.iterdir()) == before
    # Prefect never started (it would have created its database in PREFECT_HOME).
    assert files_under(home) == [], files_under(home)
    assert result.elapsed_s < FAST_S


def test_validate_good_spec_exits_0_without_prefect(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "eval", n_items=25)
    home = tmp_path / "prefect-home"
    home.mkdir()

    result = shardeval("validate", str(spec), cwd=tmp_path, prefect_home=home)

    assert result.returncode == 0, result.text
    assert "ok" in result.stdout
    assert "25 items" in result.text
    assert "exact_match" in result.text
    assert files_under(tmp_path / "eval" / "runs") == []
    assert files_under(home) == []
    assert result.elapsed_s < FAST_S


def test_validate_bad_spec_exits_2(tmp_path: Path) -> None:
    spec, fragments = unknown_metric_type(tmp_path / "eval")
    home = tmp_path / "prefect-home"
    home.mkdir()

    result = shardeval("validate", str(spec), cwd=tmp_path, prefect_home=home)

    assert result.returncode == 2, result.text
    for fragment in fragments:
        assert fragment in result.text
    assert files_under(home) == []


def test_bad_option_exits_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "eval", n_items=5)
    home = tmp_path / "prefect-home"
    home.mkdir()

    result = shardeval(
        "run",
        str(spec),
        "--batch-size",
        "0",
        "--output",
        str(tmp_path / "out"),
        cwd=tmp_path,
        prefect_home=home,
    )

    assert result.returncode == 2, result.text
    assert "--batch-size" in result.text
    assert files_under(tmp_path / "out") == []
    assert files_under(home) == []
