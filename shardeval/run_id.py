"""Which run a command writes: the run id rule of design.md, and why a new run was started.

The id itself is a hash of the run's identity (:func:`shardeval.hashing.run_id_inputs`); this
module adds what needs the output's contents: resuming a run stored under the id an older
shardeval derived, telling the user which input differs from the closest existing run
when a command starts a new run where a resume may have been expected, and naming the run to
resume after a ``--fresh`` run stopped (the same command would not reach it again).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from shardeval.catalog import list_run_ids
from shardeval.errors import ShardevalError, SpecError
from shardeval.hashing import default_run_id, identity_changes, legacy_run_id, run_id_inputs
from shardeval.spec import EvalSpec
from shardeval.storage import RunStore

MAX_COMPARED_RUNS = 20
"""How many runs of the same eval are read to say why a new run id was derived."""
_SAME_COMMAND = re.compile(r"\b(?:re)?run the same command(?: again)?")
"""The advice every resumable error gives (``interrupt.RESUME_HINT`` and its variants)."""


def choose_run_id(
    spec: EvalSpec, output: str, run_id: str | None, *, fresh: bool
) -> tuple[str, str | None]:
    """The run to write, and why it is a new run where a resume may have been expected.

    ``--run-id`` if given; else ``<name>-<hash>`` (design.md, Run id); ``--fresh`` adds a
    timestamp. A run stored under the id shardeval 0.1 derived (from the absolute dataset path)
    is resumed under that id.
    """
    if run_id:
        if fresh:
            raise SpecError(
                "--fresh starts a new run with a new id; it cannot be combined with --run-id",
                hint="drop --fresh to write that run, or --run-id to start a fresh one",
            )
        return run_id, None
    base = default_run_id(spec)
    if fresh:
        return f"{base}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}", None
    existing = set(list_run_ids(output))
    if base in existing:
        return base, None
    legacy = legacy_run_id(spec)
    if legacy in existing:
        return legacy, None
    return base, why_new_run(spec, output, existing)


def why_new_run(spec: EvalSpec, output: str, existing: set[str]) -> str | None:
    """Which run id input differs from the closest run of the same eval under ``output``.

    None when there is no other run of this eval (a first run needs no explanation).
    """
    candidates = sorted(r for r in existing if r.startswith(f"{spec.name}-"))[-MAX_COMPARED_RUNS:]
    if not candidates:
        return None
    mine = run_id_inputs(spec)
    best: tuple[int, str, list[str]] | None = None
    for other in candidates:
        record = RunStore(output, other).read_json(RunStore(output, other).spec_path)
        if not isinstance(record, dict):
            continue
        theirs = record.get("identity") or _identity_of_record(record)
        if theirs is None:
            continue
        changes = identity_changes(theirs, mine)
        if changes and (best is None or len(changes) < best[0]):
            best = (len(changes), other, changes)
    if best is None:
        return None
    return f"new run: differs from {best[1]} (the closest run of {spec.name!r}) in " + "; ".join(
        best[2]
    )


def _identity_of_record(record: dict[str, Any]) -> dict[str, Any] | None:
    """Run id inputs of a run recorded before spec.json held them."""
    try:
        recorded = EvalSpec.model_validate(record["spec"])
    except Exception:
        return None
    recorded._source = record.get("spec_source")
    return run_id_inputs(recorded)


def advise_resume_by_id(error: ShardevalError, run_id: str, *, python: bool = False) -> None:
    """Point ``error``'s "run the same command" advice at the run ``--fresh`` started.

    That run's id has a timestamp that the same command never derives again: typed again,
    ``--fresh`` would start yet another run and pay for every finished request once more.
    The run holding them is reached by its id, with the command's other options unchanged.
    ``python``: the advice is for ``shardeval.run(..., fresh=True)``.
    """
    by_id = (
        f"call it again with run_id={run_id!r} in place of fresh=True"
        if python
        else f"run the same command with `--run-id {run_id}` in place of `--fresh`"
    )
    error.message = _SAME_COMMAND.sub(by_id, error.message)
    if error.hint:
        error.hint = _SAME_COMMAND.sub(by_id, error.hint)
    error.args = (error.message, *error.args[1:])
