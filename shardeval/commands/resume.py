"""``shardeval resume RUN_ID``: continue a run from what it stored, without its spec file."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from shardeval.commands.options import (
    LimitOpt,
    QuietOpt,
    RetryFailedOpt,
    RunIdArg,
    RunsOutputOpt,
    RunsSpecOpt,
    VerboseOpt,
    WaitOpt,
)


def register(app: typer.Typer) -> None:
    """Add ``resume`` to the app."""
    app.command("resume")(resume)


def resume(
    run_id: RunIdArg,
    output: RunsOutputOpt = None,
    spec: RunsSpecOpt = None,
    retry_failed: RetryFailedOpt = False,
    allow_dataset_change: Annotated[
        bool,
        typer.Option(
            "--allow-dataset-change",
            help="Go on if the dataset changed since the run's last attempt (only the "
            "changed items are sent).",
        ),
    ] = False,
    limit: LimitOpt = None,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Continue a run from its spec.json: same run id, same dataset, only what is missing.

    The API key comes from the environment variable named in the run's model block. If the
    dataset changed or vanished since the run's last attempt, it says what and exits 2.
    """
    started = time.monotonic()
    from shardeval.catalog import resolve_output
    from shardeval.resume import prepare_resume
    from shardeval.run_console import configure_logging, evaluate_session

    configure_logging(verbose)
    session = prepare_resume(
        run_id,
        resolve_output(output, spec),
        retry_failed=retry_failed,
        allow_dataset_change=allow_dataset_change,
        limit=limit,
    )
    evaluate_session(session, started=started, quiet=quiet, verbose=verbose, wait=wait)
