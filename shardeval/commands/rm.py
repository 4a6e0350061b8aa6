"""``shardeval rm``: delete runs by id or by filters; asks first, never a run in use."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from shardeval.commands.options import RunsOutputOpt, RunsSpecOpt
from shardeval.display import err_console, out_console
from shardeval.errors import ShardevalError, SpecError


def register(app: typer.Typer) -> None:
    """Add ``rm`` to the app."""
    app.command("rm")(rm)


def rm(
    run_ids: Annotated[
        list[str] | None, typer.Argument(help="Runs to delete.", show_default=False)
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than", help="Runs started more than this long ago (30d, 12h) or before a date."
        ),
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="Only runs in this state: complete, incomplete.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Only this eval name (a glob works).")
    ] = None,
    keep_tagged: Annotated[
        list[str] | None,
        typer.Option("--keep-tagged", help="Never delete runs with this tag (repeatable)."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    output: RunsOutputOpt = None,
    spec: RunsSpecOpt = None,
) -> None:
    """Delete runs: by id, or every run matching --older-than/--status/--name.

    Prints what it would delete and asks (or needs --yes). A run held by a live process is
    never deleted; filters never delete a tagged run; --keep-tagged keeps runs with that tag.
    """
    from shardeval.catalog import resolve_output
    from shardeval.removal import delete, select
    from shardeval.runlist import RunFilter, parse_age

    ids = list(run_ids or [])
    filtered = older_than is not None or status is not None or name is not None
    if ids and filtered:
        raise SpecError(
            "give run ids or filters (--older-than, --status, --name), not both",
            hint="`shardeval runs` with the same filters shows which runs they select",
        )
    if not ids and not filtered:
        raise SpecError(
            "nothing to delete: give run ids, or --older-than/--status/--name",
            hint="for example: shardeval rm --older-than 30d --status incomplete",
        )
    if status == "running":
        raise SpecError("--status running: a running run is never deleted", hint="stop it first")
    where = resolve_output(output, spec)
    run_filter = None
    if filtered:
        before = parse_age(older_than, option="--older-than") if older_than else None
        run_filter = RunFilter(name=name, status=status, before=before)
    removal = select(where, ids, run_filter, list(keep_tagged or []))
    if not removal.candidates:
        out_console.print(f"no runs under {where} match")
        return
    out_console.print(_plan_table(removal))
    if filtered and any(c.kept and c.kept.startswith("tagged") for c in removal.candidates):
        out_console.print("[dim]filters never remove a tagged run: untag it, or name it by id[/]")
    todo = removal.to_delete
    held = [c for c in removal.candidates if c.kept and c.kept.startswith("held")]
    if todo:
        size = sum(c.size for c in todo)
        question = f"delete {len(todo)} run(s), {_bytes(size)}?"
        if not yes:
            if not sys.stdin.isatty():
                raise SpecError(
                    f"{question} (not asked: no terminal)",
                    hint="pass --yes to delete without asking",
                )
            if not typer.confirm(question, default=False):
                raise ShardevalError("not confirmed: nothing deleted")
        delete(where, removal)
        for run_id in removal.deleted:
            out_console.print(f"deleted {run_id}")
        for run_id, reason in removal.refused.items():
            err_console.print(f"[yellow]not deleted[/] {run_id}: {reason}")
    refused = [c.run_id for c in held] + list(removal.refused)
    if refused:
        raise ShardevalError(
            f"not deleted (held by a live process): {', '.join(refused)}",
            hint="stop that process or wait for it to finish, then run rm again",
        )


def _plan_table(removal: Any) -> Any:
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for column in ("run", "eval", "status", "started", "size", "files", "action"):
        table.add_column(column, justify="right" if column in ("size", "files") else "left")
    for candidate in removal.candidates:
        card = candidate.entry.card
        table.add_row(
            candidate.run_id,
            str(card.get("name") or ""),
            candidate.entry.status,
            _when(card.get("started_at")),
            _bytes(candidate.size),
            f"{candidate.files:,}",
            f"keep: {candidate.kept}" if candidate.kept else "delete",
        )
    return table


def _when(value: Any) -> str:
    from shardeval.commands.runs import _when as when

    return when(value)


def _bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{size} B"
