"""Identity: what changes a key and, as importantly, what does not."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from shardeval.hashing import (
    HASH_VERSION,
    batch_key,
    canonical_json,
    default_run_id,
    item_key,
    messages_json,
    model_hash,
)
from shardeval.spec import EvalSpec, ModelSpec

MESSAGES = [{"role": "user", "content": "What is 1 + 2?"}]


def model(**fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"provider": "openai", "model": "m", **fields})


def test_model_hash_ignores_transport_and_secrets() -> None:
    base = model_hash(model())
    assert model_hash(model(base_url="http://other:1/v1")) == base
    assert model_hash(model(api_key_env="OTHER_KEY", concurrency=99, timeout_s=3)) == base
    assert model_hash(model(max_retries=0, prefect_limit="x")) == base


def test_model_hash_changes_with_what_is_asked() -> None:
    base = model_hash(model())
    assert model_hash(model(model="m2")) != base
    assert model_hash(model(revision="ckpt-2")) != base
    assert model_hash(model(params={"temperature": 0.7})) != base


def test_item_key_depends_on_messages_and_trial_only() -> None:
    digest = model_hash(model())
    key = item_key(digest, MESSAGES, 0)
    assert key == item_key(digest, [dict(m) for m in MESSAGES], 0)
    assert key != item_key(digest, MESSAGES, 1)
    assert key != item_key(digest, [{"role": "user", "content": "What is 1 + 3?"}], 0)
    assert key != item_key(model_hash(model(model="m2")), MESSAGES, 0)
    assert len(key) == 32


def test_batch_key_is_order_sensitive() -> None:
    assert batch_key(["a", "b"]) != batch_key(["b", "a"])
    assert batch_key(["a", "b"]) == batch_key(iter(["a", "b"]))


def test_default_run_id_survives_metric_and_batch_edits() -> None:
    spec = {
        "name": "x",
        "dataset": {"path": "/data/items.jsonl"},
        "prompt": {"user": "{{ q }}"},
        "model": {"provider": "openai", "model": "m"},
    }
    base = default_run_id(EvalSpec.model_validate(spec))
    assert base.startswith("x-")
    edited = {**spec, "batch_size": 7, "metrics": [{"type": "includes", "target": "a"}]}
    assert default_run_id(EvalSpec.model_validate(edited)) == base
    assert default_run_id(EvalSpec.model_validate({**spec, "trials": 2})) != base
    new_prompt = {**spec, "prompt": {"user": "Q: {{ q }}"}}
    assert default_run_id(EvalSpec.model_validate(new_prompt)) != base


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Answer."}, {"role": "user", "content": "What is 1 + 2?"}],
        [{"content": 'naïve \u2603 "q" \\ \n\t\x00 \ud7ff', "role": "user"}],
        [],
        [{"role": "user", "content": "x", "name": "extra key"}],
        [{"role": "user", "content": 7}],
        ({"role": "user", "content": "a tuple of messages"},),
    ],
)
def test_messages_json_is_canonical_json(messages: Any) -> None:
    assert messages_json(messages) == canonical_json(messages)


def test_item_key_is_pinned_to_the_canonical_json_of_the_messages() -> None:
    """Keys stored by earlier versions stay valid: the payload's form is fixed."""
    payload = f"{HASH_VERSION}\x1fdigest\x1f2\x1f{canonical_json(MESSAGES)}"
    expected = hashlib.sha256(payload.encode()).hexdigest()[:32]
    assert item_key("digest", MESSAGES, 2) == expected
