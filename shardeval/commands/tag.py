"""``shardeval tag RUN_ID TAG`` and ``untag``: labels kept in the run's ``tags.json``.

``runs --tag T`` selects by them, ``rm`` never removes a tagged run through its filters, and
``baseline`` is the tag a comparison looks for.
"""

from __future__ import annotations

from typing import Annotated

import typer

from shardeval.commands.options import RunIdArg, RunsOutputOpt, RunsSpecOpt
from shardeval.display import out_console

TagArg = Annotated[str, typer.Argument(help="Tag name: letters, digits, '.', '_', '-'.")]


def register(app: typer.Typer) -> None:
    """Add ``tag`` and ``untag`` to the app."""
    app.command("tag")(tag)
    app.command("untag")(untag)


def tag(
    run_id: RunIdArg, name: TagArg, output: RunsOutputOpt = None, spec: RunsSpecOpt = None
) -> None:
    """Tag a run (for example baseline); a run can have many tags."""
    _change(run_id, name, output, spec, add=True)


def untag(
    run_id: RunIdArg, name: TagArg, output: RunsOutputOpt = None, spec: RunsSpecOpt = None
) -> None:
    """Remove a tag from a run."""
    _change(run_id, name, output, spec, add=False)


def _change(run_id: str, name: str, output: str | None, spec: str | None, *, add: bool) -> None:
    from shardeval.catalog import open_store, resolve_output
    from shardeval.runcard import check_tag, read_tags, write_tags

    check_tag(name)
    store = open_store(resolve_output(output, spec), run_id)
    tags = read_tags(store)
    if add == (name in tags):
        state = "already tagged" if add else "not tagged"
        out_console.print(f"run {run_id} is {state} {name}: tags {', '.join(tags) or 'none'}")
        return
    tags = [*tags, name] if add else [t for t in tags if t != name]
    write_tags(store, tags)
    out_console.print(f"run {run_id}: tags {', '.join(sorted(tags)) or 'none'}")
