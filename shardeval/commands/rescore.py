"""``shardeval rescore RUN_ID``: new metrics over a run's stored responses, no model call."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from shardeval.commands.options import VerboseOpt, spec_source
from shardeval.display import print_summary, spinner
from shardeval.run_console import configure_logging, route_prefect_logs


def register(app: typer.Typer) -> None:
    """Add ``rescore`` to the app."""
    app.command("rescore")(rescore)


def rescore(
    run_id: Annotated[str, typer.Argument(help="The run to re-score.", show_default=False)],
    spec: Annotated[
        str | None, typer.Option(help="Spec whose metrics to apply (default: the run's own).")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Where runs are stored (default: the --spec's output, else ./shardeval-runs).",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run's holder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No spinner.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Apply metrics to a run's stored responses: new results and metrics, no model call."""
    started = time.monotonic()
    configure_logging(verbose)
    from shardeval.catalog import resolve_output
    from shardeval.launch import prefect_for_flows
    from shardeval.rescore import prepare_rescore

    source = spec_source(spec) if spec else None
    output = resolve_output(output, source)
    job = prepare_rescore(run_id, output, source)  # exit 2 before Prefect if it cannot work
    show = not quiet and sys.stderr.isatty()
    with spinner("Loading Prefect...", enabled=show):
        from flows.rescore import rescore as rescore_flow
    route_prefect_logs(job.store, verbose)
    with prefect_for_flows(show):
        summary = rescore_flow(run_id=run_id, spec=source, output=output, wait=wait)
    print_summary(
        summary,
        wall_s=time.monotonic() - started,
        sent=0,
        from_cache=summary["n_rows"],
        results_dir=job.store.url(),
    )
