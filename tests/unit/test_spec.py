"""Spec loading: unknown keys, types and YAML errors are reported with file:line and field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardeval.errors import SpecError
from shardeval.overrides import resolve_spec
from shardeval.spec import load_spec

GOOD = """\
name: arith
dataset:
  path: items.jsonl
prompt:
  user: "What is {{ a }}?"
model:
  provider: openai
  model: m
metrics:
  - type: exact_match
    target: answer
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_good_spec_resolves_dataset_against_the_spec_file(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.dataset_url() == str(tmp_path / "items.jsonl")
    assert spec.batch_size == 100 and spec.model.concurrency == 16
    assert spec.metrics[0].metric_name == "exact_match"


def test_unknown_key_names_line_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  model: m\n", "  model: m\n  temprature: 0\n"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert f"{path}:9" in message
    assert "model.temprature: unknown field" in message


def test_wrong_value_names_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "batch_size: -1\n")
    with pytest.raises(
        SpecError, match=r"spec.yaml:12: batch_size: Input should be greater than 0"
    ):
        load_spec(path)


def test_missing_required_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('  user: "What is {{ a }}?"\n', '  system: "x"\n'))
    with pytest.raises(SpecError, match=r"prompt.user: required field is missing"):
        load_spec(path)


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "batch_size: [1\n")
    with pytest.raises(SpecError, match=r"spec.yaml:\d+: not valid YAML"):
        load_spec(path)


def test_duplicate_metric_names_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "  - type: exact_match\n    target: answer\n")
    with pytest.raises(SpecError, match="two metrics are named 'exact_match'"):
        load_spec(path)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_are_validated(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert resolve_spec(spec, batch_size=7, concurrency=3).model.concurrency == 3
    assert resolve_spec(spec, batch_size=7).source == spec.source
    with pytest.raises(SpecError, match="invalid option"):
        resolve_spec(spec, concurrency=0)
