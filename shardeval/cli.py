"""The ``shardeval`` command line.

Exit codes (the contract scripts rely on): 0 the run is complete (item errors are counted,
not fatal); 2 invalid spec, dataset or options; 1 the run could not finish (what finished is
kept); 130 interrupted after saving what finished.

Everything that can be checked without Prefect is checked before Prefect is imported, so a
typo costs a second, not Prefect's start-up; a run whose results are all stored and current
is answered from storage without starting Prefect at all.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.logging import RichHandler

from shardeval import interrupt
from shardeval.display import err_console, live_progress, out_console, print_summary, spinner
from shardeval.errors import EXIT_INTERRUPTED, RunInterrupted, ShardevalError
from shardeval.overrides import resolve_spec

try:  # typer >= 0.29 vendors click: its usage errors are not click's own exception classes
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover - older typer raises click's exceptions
    _TyperClickException = click.ClickException  # type: ignore[misc,assignment]

app = typer.Typer(
    name="shardeval",
    help="Resumable, content-addressed LLM evaluations on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SpecArg = Annotated[
    str, typer.Argument(help="Eval spec or suite YAML (path or fsspec URL).", show_default=False)
]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Where runs are stored (any fsspec URL).")
]


@app.command()
def run(
    spec: SpecArg,
    output: OutputOpt = None,
    run_id: Annotated[
        str | None, typer.Option(help="Run to write (default: derived from the spec).")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start a new run; leave the old one untouched.")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Send again the rows whose status is error.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate only the first N items.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Items per batch task.")] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Requests in flight at once.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for another process holding the run.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
    task_runner: Annotated[
        str,
        typer.Option(
            "--task-runner",
            help="Where batch tasks run: threads (this process) or dask (worker processes; "
            "needs the [dask] extra and a Prefect server, see docs/distributed.md).",
        ),
    ] = "threads",
    dask_address: Annotated[
        str | None,
        typer.Option(
            "--dask-address",
            help="An existing Dask scheduler (tcp://host:8786) for --task-runner dask "
            "(default: a local cluster of SHARDEVAL_DASK_WORKERS processes).",
        ),
    ] = None,
) -> None:
    """Run an eval or a suite (or resume it: the same command continues where it stopped)."""
    if _is_suite(spec):
        from shardeval.suite_cli import run_suite

        unsupported = {"--run-id": run_id, "--fresh": fresh, "--batch-size": batch_size}
        unsupported |= {"--concurrency": concurrency, "--dask-address": dask_address}
        unsupported["--task-runner"] = task_runner if task_runner != "threads" else None
        return run_suite(
            _spec_source(spec),
            output=output,
            retry_failed=retry_failed,
            limit=limit,
            wait=wait,
            quiet=quiet,
            verbose=verbose,
            unsupported=unsupported,
        )
    started = time.monotonic()
    _configure_logging(verbose)
    from shardeval.launch import run_evaluate
    from shardeval.session import RunSession
    from shardeval.taskrunners import NO_SERVER_WARNING, check_task_runner, has_prefect_server

    runner_kind = check_task_runner(task_runner, dask_address)
    session = RunSession.prepare(
        _spec_source(spec),
        output=output,
        run_id=run_id,
        fresh=fresh,
        retry_failed=retry_failed,
        limit=limit,
        batch_size=batch_size,
        concurrency=concurrency,
    )
    if session.new_run_reason:
        err_console.print(f"[yellow]{_escape(session.new_run_reason)}[/]")
    stored = session.answer_from_storage()
    if stored is not None:
        err_console.print(
            f"[dim]run {session.run_id} is complete and current: answered from storage[/]"
        )
        print_summary(
            stored,
            wall_s=time.monotonic() - started,
            sent=0,
            from_cache=stored["n_rows"],
            results_dir=session.store.url(),
        )
        return
    show = not quiet and sys.stderr.isatty()
    if runner_kind != "threads" and not has_prefect_server():
        err_console.print(f"[yellow]warning[/]: {_escape(NO_SERVER_WARNING)}")
    _install_signal_handlers(session.spec.grace_period_s)
    progress = session.progress
    with live_progress(progress, enabled=not quiet):
        summary = run_evaluate(
            session, wait=wait, task_runner=runner_kind, dask_address=dask_address, show=show
        )
    print_summary(
        summary,
        wall_s=time.monotonic() - started,
        sent=progress.sent,
        from_cache=progress.from_cache,
        results_dir=session.store.url(),
    )


@app.command()
def validate(
    spec: SpecArg,
    limit: Annotated[int | None, typer.Option(min=1, help="Check only the first N items.")] = None,
) -> None:
    """Check a spec or a suite and its datasets (prompts, metrics) without calling the model."""
    if _is_suite(spec):
        from shardeval.suite_cli import validate_suite

        return validate_suite(_spec_source(spec), limit=limit)
    from shardeval.hashing import default_run_id
    from shardeval.validation import validate as validate_spec

    eval_spec = resolve_spec(_spec_source(spec))
    checked = validate_spec(eval_spec, limit=limit)
    plan = checked.plan
    out_console.print(f"[green]ok[/]: {spec}")
    out_console.print(f"  dataset: {checked.dataset.url} ({len(checked.dataset):,} items)")
    out_console.print(
        f"  requests: {plan.n_rows:,} ({eval_spec.trials} trial(s)) in {len(plan.batches):,} "
        f"batches of {eval_spec.batch_size}"
    )
    out_console.print(f"  metrics: {', '.join(m.name for m in checked.metrics) or 'none'}")
    out_console.print(f"  run id: {default_run_id(eval_spec)}")


@app.command()
def status(
    run_id: Annotated[str, typer.Argument(help="The run to look at.", show_default=False)],
    output: OutputOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show what a run holds: items done, errors, batches, tokens, who holds it, if complete.

    Reads storage only (no Prefect, no lock), so it works from another terminal while the
    run is going on, or after it died.
    """
    import json

    from shardeval.spec import EvalSpec
    from shardeval.status import read_status, render_status

    found = read_status(output or EvalSpec.model_fields["output"].default, run_id)
    if as_json:
        print(json.dumps(found.to_dict(), indent=2, sort_keys=True))
    else:
        out_console.print(render_status(found))


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Apply metrics to a run's stored responses: new results and metrics, no model call."""
    started = time.monotonic()
    _configure_logging(verbose)
    from shardeval.launch import start_prefect
    from shardeval.rescore import prepare_rescore

    source = _spec_source(spec) if spec else None
    if output is None:
        from shardeval.overrides import resolve_spec
        from shardeval.spec import EvalSpec

        output = resolve_spec(source).output if source else EvalSpec.model_fields["output"].default
    job = prepare_rescore(run_id, output, source)  # exit 2 before Prefect if it cannot work
    show = not quiet and sys.stderr.isatty()
    with spinner("Loading Prefect...", enabled=show):
        from flows.rescore import rescore as rescore_flow
    start_prefect(show)
    summary = rescore_flow(run_id=run_id, spec=source, output=output, wait=wait)
    print_summary(
        summary,
        wall_s=time.monotonic() - started,
        sent=0,
        from_cache=summary["n_rows"],
        results_dir=job.store.url(),
    )


@app.command("test-server")
def test_server(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8000,
    latency: Annotated[float, typer.Option(help="Seconds per request.")] = 0.05,
    mode: Annotated[str, typer.Option(help="arith | echo | random")] = "arith",
) -> None:
    """Serve the bundled OpenAI-compatible test model on 127.0.0.1 (for trying things out)."""
    from shardeval.testing.server import main as server_main

    server_main(["--port", str(port), "--latency", str(latency), "--mode", mode])


def _register_commands() -> None:
    from shardeval.commands import register_all

    register_all(app)


_register_commands()


def _is_suite(spec: str) -> bool:
    from shardeval.suite import is_suite_file

    return is_suite_file(_spec_source(spec))


def _spec_source(spec: str) -> str:
    return spec if "://" in spec else str(Path(spec).expanduser().resolve())


def _install_signal_handlers(grace_period_s: float) -> None:
    """Make Ctrl-C/SIGTERM stop gracefully.

    The first signal stops sending, lets requests in flight finish, saves and exits 130;
    a second one exits at once (every file is written atomically, so nothing is corrupted).
    """

    def handler(signum: int, frame: Any) -> None:
        if interrupt.stop_requested():
            err_console.print("[red]stopping now[/]")
            os._exit(EXIT_INTERRUPTED)
        err_console.print(
            f"[yellow]stopping: no new requests; {grace_period_s:g}s for those in flight, "
            "then saving (press Ctrl-C again to stop at once)[/]"
        )
        interrupt.request_stop(grace_period_s)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _configure_logging(verbose: bool) -> None:
    # A user error is printed once, cleanly, by main(); Prefect would add a traceback.
    from shardeval.launch import quiet_prefect

    quiet_prefect(verbose)
    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    logger = logging.getLogger("shardeval")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    # What a run found when it started ("resuming run X: ...; dataset changed: ...").
    logging.getLogger("shardeval.run").setLevel(logging.INFO)


def main() -> None:
    """Entry point: user errors print a clean message and exit 2/1, Ctrl-C exits 130."""
    try:
        app(standalone_mode=False)
    except ShardevalError as exc:
        err_console.print(f"[bold red]error[/]: {_escape(str(exc))}")
        if isinstance(exc, RunInterrupted):
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except (click.ClickException, _TyperClickException) as exc:
        exc.show()
        sys.exit(exc.exit_code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    main()
