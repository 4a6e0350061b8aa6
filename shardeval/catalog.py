"""The runs under an output: which exist, and finding one by id.

Every command that takes a run id (status, rescore, compare, report, resume, ...) opens it
through :func:`open_store`, so an id that does not exist gets the same answer everywhere:
"no run X under OUTPUT", with the closest ids stored there.
"""

from __future__ import annotations

import difflib
import posixpath
from pathlib import Path

from shardeval.errors import ShardevalError
from shardeval.storage import RunStore

DEFAULT_OUTPUT = "./shardeval-runs"


class RunNotFound(ShardevalError):
    """No run with that id under the output (exit 2: the id or the output is wrong)."""

    exit_code = 2


def runs_dir(output: str) -> RunStore:
    """A store rooted at ``<output>/runs`` (its ``root`` is the runs directory's parent)."""
    return RunStore(output, "_")


def list_run_ids(output: str) -> list[str]:
    """Ids of the run directories under ``output``, sorted (one LIST)."""
    probe = runs_dir(output)
    parent = posixpath.dirname(probe.root)
    try:
        found = probe._list(parent)
    except ShardevalError:
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in found)


def not_found(output: str, run_id: str) -> RunNotFound:
    """The error for an unknown run id: the closest ids under ``output`` in its hint."""
    if "/" in run_id.rstrip("/"):
        return _a_path_for_an_id(run_id)
    ids = list_run_ids(output)
    where = RunStore(output, run_id).url_of(posixpath.dirname(RunStore(output, run_id).root))
    if not ids:
        hint = "no runs are stored there; pass --output with the run's output location"
    else:
        close = difflib.get_close_matches(run_id, ids, n=5, cutoff=0.3)
        shown = close or ids[-10:]
        label = "closest runs stored there" if close else "runs stored there"
        hint = f"{label}: {', '.join(shown)}; or pass --output with another location"
    return RunNotFound(f"no run {run_id!r} under {where}", hint=hint)


def _a_path_for_an_id(path: str) -> RunNotFound:
    """A run's directory where its id belongs (``shardeval run`` prints ``results: <dir>``)."""
    parent, run_id = posixpath.split(path.rstrip("/"))
    if posixpath.basename(parent) != "runs":
        return RunNotFound(
            f"{path!r} is not a run id",
            hint="a run id looks like arith-1a2b3c4d5e (`shardeval runs` lists them)",
        )
    output = posixpath.dirname(parent) or "."
    return RunNotFound(
        f"{path!r} is a run's directory, not a run id",
        hint=f"that is run {run_id} under {output}: pass {run_id} with --output {output} "
        f'(in Python: open_run("{run_id}", output="{output}"))',
    )


def open_store(output: str, run_id: str) -> RunStore:
    """The store of an existing run (one with a spec.json), else :class:`RunNotFound`."""
    store = RunStore(output, run_id)
    if not store.exists(store.spec_path):
        raise not_found(output, run_id)
    return store


def resolve_output(output: str | None, spec: str | None = None) -> str:
    """Where a command that reads runs looks (design.md, "Command line").

    ``--output``, else the ``--spec``'s ``output``, else ``./shardeval-runs``. One rule for
    every such command; a bad spec is an exit-2 error.
    """
    if output:
        return output
    if spec:
        from shardeval.overrides import resolve_spec

        source = spec if "://" in spec else str(Path(spec).expanduser().resolve())
        return resolve_spec(source).output
    return DEFAULT_OUTPUT
