"""``--model`` and ``--set FIELD=VALUE``: applied before the run id, errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardeval.errors import SpecError
from shardeval.hashing import default_run_id
from shardeval.overrides import parse_override, resolve_spec
from shardeval.spec import load_spec
from tests.helpers.specs import write_spec


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    return write_spec(tmp_path, base_url="http://127.0.0.1:1/v1", n_items=2)


def test_set_parses_yaml_scalars_and_nested_paths(spec_path: Path) -> None:
    spec = resolve_spec(
        str(spec_path),
        overrides=[
            "model.params.temperature=0.7",
            "model.params.stop=[END]",
            "batch_size=7",
            "metrics[0].ignore_case=true",
            'name="arith-2"',
        ],
    )
    assert spec.model.params == {"temperature": 0.7, "stop": ["END"]}
    assert spec.batch_size == 7
    assert spec.metrics[0].params["ignore_case"] is True
    assert spec.name == "arith-2"
    assert spec.source == str(spec_path)  # the dataset still resolves against the file


def test_model_and_set_change_the_run_id(spec_path: Path) -> None:
    base = load_spec(spec_path)
    other_model = resolve_spec(str(spec_path), model="gpt-4o")
    hotter = resolve_spec(str(spec_path), overrides=["model.params.temperature=0.7"])
    assert other_model.model.model == "gpt-4o"
    ids = {default_run_id(base), default_run_id(other_model), default_run_id(hotter)}
    assert len(ids) == 3
    # Transport settings are not identity: the run id stays.
    assert default_run_id(resolve_spec(base, overrides=["model.concurrency=3"])) == (
        default_run_id(base)
    )


def test_model_name_stays_text(spec_path: Path) -> None:
    assert resolve_spec(str(spec_path), overrides=['model.model="1.5"']).model.model == "1.5"
    assert resolve_spec(str(spec_path), model="1.5").model.model == "1.5"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.temprature=1",
            r"model\.temprature: unknown field \(from --set model\.temprature=1\)",
        ),
        ("model.concurrency=0", r"model\.concurrency: Input should be greater than 0"),
        ("metrics[3].target=a", r"metrics\[3\]: no such list item \(metrics has 1\)"),
        ("name.x=1", r"name\.x: name is not a mapping"),
        ("temperature", r"expected FIELD=VALUE"),
        ("model..x=1", r"is not a field path"),
    ],
)
def test_bad_overrides_name_the_field(spec_path: Path, override: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        resolve_spec(str(spec_path), overrides=[override])
    assert caught.value.exit_code == 2


def test_parse_override() -> None:
    assert parse_override("metrics[0].target=answer") == (["metrics", 0, "target"], "answer")
    assert parse_override("model.params.seed=") == (["model", "params", "seed"], "")
