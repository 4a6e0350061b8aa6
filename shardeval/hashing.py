"""Identity: every fingerprint and cache key shardeval computes lives here.

What identifies a result is *what was asked of which model*, nothing about where or how fast:

* **model fingerprint** = provider, model, revision, params (and ``function`` for the python
  provider). Left out on purpose: ``api_key_env`` and the key (secrets), ``base_url`` (where the
  model is, not which model it is), ``concurrency``, ``timeout_s``, ``max_retries`` and
  ``prefect_limit`` (how we call it, not what we ask), ``pricing`` and ``max_cost_usd`` (what
  it costs, not what it answers).
* **item key** = (model fingerprint, rendered messages, trial). Editing one dataset row changes
  only that row's key; editing a field the prompt does not use changes no key at all.
* **batch key** = the batch's item keys, in order.
* **metric fingerprint** = type, name, parameters, and the metric's code version.

``HASH_VERSION`` is part of every key: bump it when the canonical form changes, so old results
are never misread as new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardeval.spec import EvalSpec, ModelSpec

HASH_VERSION = 1
KEY_HEX_CHARS = 32  # 128 bits: collision-free at any realistic dataset size, half the storage

Messages = Sequence[Mapping[str, str]]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same data always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _make_canonical_encoder() -> Callable[[Any], str]:
    """A faster :func:`canonical_json` for JSON data (rows, messages): same text, a third the cost.

    ``json.dumps`` builds a ``JSONEncoder`` and then a C encoder on every call, which is most
    of the time spent on a short row. This builds the C encoder once, with exactly the
    arguments ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    default=str)`` passes it, except that it skips the circular-reference check (parsed rows
    cannot be circular, and a shared check table would outlive a failed call). Without the
    C accelerator it is ``canonical_json`` itself.
    test_datasets checks that both give the same text for awkward values.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return canonical_json
    encode = make(None, str, json.encoder.encode_basestring, None, ":", ",", True, False, True)
    join = "".join
    return lambda row: join(encode(row, 0))


fast_canonical_json = _make_canonical_encoder()
""":func:`canonical_json` of JSON data (no cycles): what item keys and dataset rows hash."""


def digest(value: Any, length: int = KEY_HEX_CHARS) -> str:
    """Hex sha256 of the canonical JSON of ``value``, truncated to ``length`` characters."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:length]


def model_fingerprint(model: ModelSpec) -> dict[str, Any]:
    """The fields that say *which* model answers (see the module docstring for exclusions)."""
    fingerprint: dict[str, Any] = {
        "provider": model.provider,
        "model": model.model,
        "revision": model.revision,
        "params": model.params,
    }
    if model.function is not None:
        fingerprint["function"] = model.function
    return fingerprint


def model_hash(model: ModelSpec) -> str:
    """Digest of :func:`model_fingerprint`."""
    return digest({"v": HASH_VERSION, "model": model_fingerprint(model)})


def item_key(model_digest: str, messages: Messages, trial: int) -> str:
    """Key of one request: the same model, messages and trial always give the same key."""
    payload = f"{HASH_VERSION}\x1f{model_digest}\x1f{trial}\x1f{messages_json(messages)}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


_encode_string = getattr(json.encoder, "c_encode_basestring", json.encoder.encode_basestring)


def messages_json(messages: Messages) -> str:
    """:func:`canonical_json` of chat messages, written directly for the usual shape.

    Messages of exactly ``role`` and ``content`` strings (what prompts render) are joined
    from their encoded strings, keys in sorted order, about six times faster than the general
    encoder; anything else goes through it. test_hashing checks both give the same text.
    """
    parts = []
    for message in messages:
        if type(message) is not dict or len(message) != 2:
            return fast_canonical_json(messages)
        content, role = message.get("content"), message.get("role")
        if type(content) is not str or type(role) is not str:
            return fast_canonical_json(messages)
        parts.append(f'{{"content":{_encode_string(content)},"role":{_encode_string(role)}}}')
    return f"[{','.join(parts)}]"


def batch_key(item_keys: Iterable[str]) -> str:
    """Key of a batch: its item keys in order."""
    hasher = hashlib.sha256(f"{HASH_VERSION}\x1f".encode())
    for key in item_keys:
        hasher.update(key.encode("ascii"))
        hasher.update(b"\x1f")
    return hasher.hexdigest()[:KEY_HEX_CHARS]


def content_id(item: Mapping[str, Any]) -> str:
    """Id of an item without an id field: the hash of its content (16 hex characters)."""
    return digest(item, length=16)


def dataset_identity(spec: EvalSpec) -> str:
    """The dataset as the run id sees it: a URL, or a path relative to the spec file.

    Local paths use POSIX separators. So a moved or re-cloned project, or a second worker
    with the repository at another path, derives the same run id and resumes the same run
    on a shared output.
    """
    url = spec.dataset_url()
    source = spec.source
    if "://" in url or source is None or "://" in source:
        return url
    spec_dir = os.path.dirname(os.path.abspath(os.path.expanduser(source)))
    return os.path.relpath(url, spec_dir).replace(os.sep, "/")


def run_id_inputs(spec: EvalSpec, *, dataset: str | None = None) -> dict[str, Any]:
    """What the run id is a hash of: model fingerprint, dataset, prompt and trials.

    Editing metrics or the batch size keeps the run id (those never need the model again);
    a new model, dataset location, prompt or trial count starts a new run.
    """
    return {
        "model": model_fingerprint(spec.model),
        "dataset": dataset_identity(spec) if dataset is None else dataset,
        "prompt": spec.prompt.model_dump(),
        "trials": spec.trials,
    }


def default_run_id(spec: EvalSpec) -> str:
    """``<name>-<short hash of run_id_inputs>``: typing the same command again resumes."""
    return _run_id(spec.name, run_id_inputs(spec))


def legacy_run_id(spec: EvalSpec) -> str:
    """The id shardeval 0.1 derived (absolute dataset path): such runs keep resolving."""
    return _run_id(spec.name, run_id_inputs(spec, dataset=spec.dataset_url()))


def _run_id(name: str, inputs: dict[str, Any]) -> str:
    return f"{name}-{digest({'v': HASH_VERSION, **inputs}, length=10)}"


IDENTITY_LABELS = {
    "model": "model fingerprint (provider, model, revision, params)",
    "dataset": "dataset path",
    "prompt": "prompt",
    "trials": "trials",
}


def identity_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Which run id inputs differ, as ``model fingerprint (...): params.temperature 0 → 0.7``."""
    changes = []
    for name, label in IDENTITY_LABELS.items():
        old, new = before.get(name), after.get(name)
        if canonical_json(old) == canonical_json(new):
            continue
        detail = _first_difference(old, new)
        changes.append(f"{label}: {detail}" if detail else label)
    return changes


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if canonical_json(old.get(key)) != canonical_json(new.get(key)):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}".lstrip("."))
    where = f"{path} " if path else ""
    return f"{where}{_short(old)} → {_short(new)}"


def _short(value: Any) -> str:
    text = canonical_json(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
