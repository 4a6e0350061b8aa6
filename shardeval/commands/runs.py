"""``shardeval runs``: every run under an output, newest first, from the run cards."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from shardeval.commands.options import RunsOutputOpt, RunsSpecOpt
from shardeval.display import out_console

StatusOpt = Annotated[
    str | None,
    typer.Option("--status", help="Only runs in this state: complete, incomplete or running."),
]
NameOpt = Annotated[str | None, typer.Option("--name", help="Only this eval name (a glob works).")]


def register(app: typer.Typer) -> None:
    """Add ``runs`` to the app."""
    app.command("runs")(runs)


def runs(
    output: RunsOutputOpt = None,
    spec: RunsSpecOpt = None,
    name: NameOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Only this model (a glob works).")
    ] = None,
    status: StatusOpt = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only runs started since: an age (12h, 7d, 2w) or a date."),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only runs with this tag (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the runs under an output, newest first: status, progress, main metric, tags.

    Reads one small file per run (run.json), so it is cheap on object stores too.
    """
    from shardeval.catalog import resolve_output
    from shardeval.runlist import RunFilter, list_runs, parse_age

    chosen = RunFilter(
        name=name,
        model=model,
        status=status,
        tags=list(tag or []),
        since=parse_age(since, option="--since") if since else None,
    )
    where = resolve_output(output, spec)
    entries = list_runs(where, chosen)
    if as_json:
        print(json.dumps([e.to_dict() for e in entries], indent=2, sort_keys=True))
        return
    if not entries:
        out_console.print(f"[dim]no runs under {where} match[/]")
        return
    out_console.print(runs_table(entries))


def runs_table(entries: list[Any]) -> Any:
    """The Rich table ``runs`` prints."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("run", no_wrap=True)
    for column in ("eval", "model", "status", "done", "metric", "errors", "tokens", "cost"):
        table.add_column(column, justify="right" if column in ("done", "errors") else "left")
    table.add_column("started")
    table.add_column("finished/holder")
    table.add_column("tags")
    styles = {"complete": "green", "running": "cyan", "incomplete": "yellow"}
    for entry in entries:
        card = entry.card
        table.add_row(
            entry.run_id,
            str(card.get("name") or ""),
            str(card.get("model") or ""),
            Text(entry.status, style=styles.get(entry.status, "")),
            _done(card),
            _metric(card.get("main_metric")),
            _count(card.get("n_error")),
            _tokens(card.get("tokens")),
            _cost(card.get("cost_usd"), entry.status),
            _short(card.get("started_at")),
            _holder(entry) if entry.status == "running" else _short(card.get("finished_at")),
            ", ".join(entry.tags),
        )
    return table


def _done(card: dict[str, Any]) -> str:
    done, total = card.get("n_done"), card.get("n_total")
    left = f"{done:,}" if isinstance(done, int) else "?"
    right = f"{total:,}" if isinstance(total, int) else "?"
    return f"{left}/{right}"


def _metric(metric: Any) -> str:
    if not isinstance(metric, dict) or metric.get("mean") is None:
        return ""
    return f"{metric.get('name')}={metric['mean']:.3f}"  # the CI is in --json


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else ""


def _tokens(tokens: Any) -> str:
    if not isinstance(tokens, dict):
        return ""
    total = sum(v for v in tokens.values() if isinstance(v, int))
    return f"{total:,}"


def _cost(usd: Any, status: str) -> str:
    """Spent, in USD; ``unknown`` for a complete run without a price (never $0)."""
    if isinstance(usd, int | float):
        return f"${usd:,.2f}" if usd >= 0.01 else f"${usd:,.4f}"
    return "unknown" if status == "complete" else ""


def _when(value: Any) -> str:
    from shardeval.runlist import parse_time

    moment = parse_time(value)
    if moment is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _short(value: Any) -> str:
    """``12-01 09:47`` (UTC): the table's columns stay narrow."""
    return _when(value)[5:]


def _holder(entry: Any) -> str:
    holder = entry.card.get("holder") or {}
    text = f"{holder.get('host')}:{holder.get('pid')}"
    from shardeval.runlist import parse_time

    beat = parse_time(entry.card.get("heartbeat_at"))
    if beat is not None:
        text += f" {(datetime.now(UTC) - beat).total_seconds():.0f}s ago"
    return text
