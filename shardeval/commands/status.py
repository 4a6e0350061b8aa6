"""``shardeval status RUN_ID``: what a run holds, as a table or JSON.

:mod:`shardeval.status` gathers the numbers from storage; this module renders them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from shardeval.commands.options import RunsOutputOpt, RunsSpecOpt
from shardeval.display import out_console

if TYPE_CHECKING:
    from shardeval.status import RunStatus


def register(app: typer.Typer) -> None:
    """Add ``status`` to the app."""
    app.command("status")(status)


def status(
    run_id: Annotated[str, typer.Argument(help="The run to look at.", show_default=False)],
    output: RunsOutputOpt = None,
    spec: RunsSpecOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show what a run holds: items done, errors, batches, tokens, who holds it, if complete.

    Reads storage only (no Prefect, no lock), so it works from another terminal while the
    run is going on, or after it died.
    """
    import json

    from shardeval.catalog import resolve_output
    from shardeval.status import read_status

    found = read_status(resolve_output(output, spec), run_id)
    if as_json:
        print(json.dumps(found.to_dict(), indent=2, sort_keys=True))
    else:
        out_console.print(render_status(found))


def render_status(status: RunStatus) -> Group:
    """A Rich table of a status, with a line on who holds the run."""
    table = Table(
        title=f"{status.name or 'run'} · {status.run_id}", title_justify="left", show_header=False
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    styles = {"running": "cyan", "complete": "green", "stopped": "yellow"}
    table.add_row("state", Text(status.state, style=styles.get(status.state, "")))
    if status.total is None:
        table.add_row("items", f"{status.done:,} done (no plan written yet)")
    else:
        share = f" ({status.done / status.total:.1%})" if status.total else ""
        table.add_row("items", f"{status.done:,} of {status.total:,} done{share}")
    table.add_row("ok / error", f"{status.ok:,} / {status.error:,}")
    if status.errors_by_kind:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(status.errors_by_kind.items()))
        table.add_row("errors by kind", kinds)
    batches = f"{status.batches_committed:,}"
    if status.batches_total is not None:
        batches += f" of {status.batches_total:,} committed"
    else:
        batches += " committed"
    if status.batches_in_progress or status.parts:
        batches += f"; {status.batches_in_progress:,} in progress ({status.parts:,} parts)"
    table.add_row("batches", batches)
    table.add_row(
        "tokens",
        f"{status.prompt_tokens:,} prompt · {status.completion_tokens:,} completion",
    )
    if status.cost_usd is not None:
        projected = status.projected_cost_usd
        cost = f"${status.cost_usd:,.4f} spent ({status.price_source} price)"
        if projected is not None and status.done < (status.total or 0):
            cost += f"; ~${projected:,.4f} for the whole run at this rate"
        table.add_row("cost", cost)
    else:
        table.add_row("cost", "unknown (no price for this model, or no token counts)")
    table.add_row("held by", _holder_text(status))
    if status.complete:
        table.add_row(
            "metrics.json",
            "written" + ("" if status.current else " (for an older plan; a rerun updates it)"),
        )
    if status.stored_outside_plan:
        table.add_row(
            "other rows", f"{status.stored_outside_plan:,} stored for items not in the latest plan"
        )
    if status.unreadable:
        table.add_row(
            "unreadable",
            Text(
                f"{len(status.unreadable):,} file(s); the next run sets them aside and "
                "recomputes their items",
                style="red",
            ),
        )
    if status.quarantined:
        table.add_row("quarantine", f"{status.quarantined:,} file(s) set aside")
    table.add_row("location", status.url)
    return Group(table)


def _holder_text(status: RunStatus) -> Text:
    record = status.holder
    if record is None:
        return Text("nobody", style="dim")
    if record.get("unreadable"):
        return Text("lock.json is being rewritten or is damaged", style="yellow")
    who = f"host {record.get('host')}, pid {record.get('pid')}, since {record.get('since')}"
    renewed = record.get("renewed_at")
    if isinstance(renewed, int | float):
        who += f" (lease renewed {max(0.0, time.time() - renewed):.0f}s ago)"
    if status.holder_stale:
        return Text(f"nobody: stale lock from {who}; the next run takes it over", style="yellow")
    return Text(who, style="cyan")
