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
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.logging import RichHandler

from shardeval.commands.options import RunsOutputOpt, RunsSpecOpt
from shardeval.display import err_console, out_console, print_summary, spinner
from shardeval.errors import EXIT_INTERRUPTED, RunInterrupted, ShardevalError, SpecError
from shardeval.overrides import resolve_spec
from shardeval.run_console import evaluate_session, print_log_location, route_prefect_logs

if TYPE_CHECKING:
    pass

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
    # Help texts are plain text: "[dask]" is the name of an extra, not rich markup.
    rich_markup_mode=None,
)

SpecArg = Annotated[
    str, typer.Argument(help="Eval spec or suite YAML (path or fsspec URL).", show_default=False)
]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Where runs are stored (any fsspec URL).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Model name to use instead of the spec's model.model."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a spec field, e.g. --set model.params.temperature=0.7 (the value is "
        "YAML; repeatable; applied before the run id is derived).",
    ),
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
    model: ModelOpt = None,
    set_: SetOpt = None,
    no_preflight: Annotated[
        bool,
        typer.Option(
            "--no-preflight",
            help="Skip the check that the endpoint answers and knows the model before the "
            "first batch.",
        ),
    ] = False,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            help="When complete, compare with previous (the latest complete earlier run of "
            "this eval), tag:NAME or a run id; stored as comparison.json. A suite compares "
            "each cell with its own earlier run (same eval and model): previous or tag:NAME.",
        ),
    ] = None,
    fail_on_regression: Annotated[
        bool,
        typer.Option(
            "--fail-on-regression", help="With --baseline: exit 3 on a significant regression."
        ),
    ] = False,
) -> None:
    """Run an eval or a suite (or resume it: the same command continues where it stopped)."""
    if _is_suite(spec):
        from shardeval.suite_cli import run_suite

        unsupported: dict[str, object] = {"--run-id": run_id, "--fresh": fresh}
        unsupported["--batch-size"] = batch_size
        unsupported |= {"--concurrency": concurrency, "--dask-address": dask_address}
        unsupported["--task-runner"] = task_runner if task_runner != "threads" else None
        unsupported |= {"--model": model, "--set": set_}
        return run_suite(
            _spec_source(spec),
            output=output,
            retry_failed=retry_failed,
            limit=limit,
            wait=wait,
            quiet=quiet,
            verbose=verbose,
            unsupported=unsupported,
            baseline=baseline,
            fail_on_regression=fail_on_regression,
        )
    started = time.monotonic()
    _configure_logging(verbose)
    from shardeval.session import RunSession
    from shardeval.taskrunners import check_task_runner

    runner_kind = check_task_runner(task_runner, dask_address)
    if fail_on_regression and not baseline:
        raise SpecError("--fail-on-regression needs --baseline", hint="add --baseline previous")
    if baseline:
        from shardeval.baseline import check_selector

        check_selector(baseline)
    session = RunSession.prepare(
        _spec_source(spec),
        output=output,
        run_id=run_id,
        fresh=fresh,
        retry_failed=retry_failed,
        limit=limit,
        batch_size=batch_size,
        concurrency=concurrency,
        overrides=_overrides(model, set_),
    )
    if session.new_run_reason:
        err_console.print(f"[yellow]{_escape(session.new_run_reason)}[/]")
    evaluate_session(
        session,
        started=started,
        quiet=quiet,
        verbose=verbose,
        wait=wait,
        task_runner=runner_kind,
        dask_address=dask_address,
        no_preflight=no_preflight,
        baseline=baseline,
        fail_on_regression=fail_on_regression,
    )


@app.command()
def validate(
    spec: SpecArg,
    limit: Annotated[int | None, typer.Option(min=1, help="Check only the first N items.")] = None,
    model: ModelOpt = None,
    set_: SetOpt = None,
    check_endpoint: Annotated[
        bool,
        typer.Option(
            "--check-endpoint",
            help="Also check that the endpoint answers, the API key is accepted and the model "
            "exists (one or two small requests, like run's preflight).",
        ),
    ] = False,
) -> None:
    """Check a spec (or every cell of a suite) and its dataset without running the eval.

    Without --check-endpoint no request is made; the API key is then only checked to be set
    for api.openai.com (other endpoints may need none).
    """
    if _is_suite(spec):
        from shardeval.suite_cli import validate_suite

        return validate_suite(_spec_source(spec), limit=limit)
    from shardeval.hashing import default_run_id
    from shardeval.validation import validate as validate_spec

    eval_spec = resolve_spec(_spec_source(spec), overrides=_overrides(model, set_))
    checked = validate_spec(eval_spec, limit=limit)
    if check_endpoint:
        from shardeval.preflight import preflight

        preflight(eval_spec)
    plan = checked.plan
    out_console.print(f"[green]ok[/]: {spec}")
    out_console.print(f"  dataset: {checked.dataset.url} ({len(checked.dataset):,} items)")
    out_console.print(
        f"  requests: {plan.n_rows:,} ({eval_spec.trials} trial(s)) in {len(plan.batches):,} "
        f"batches of {eval_spec.batch_size}"
    )
    out_console.print(f"  metrics: {', '.join(m.name for m in checked.metrics) or 'none'}")
    out_console.print(f"  run id: {default_run_id(eval_spec)}")
    if check_endpoint:
        from shardeval.preflight import endpoints

        for endpoint in endpoints(eval_spec):
            out_console.print(
                f"  endpoint: {endpoint.field} at {endpoint.base_url} answers and serves "
                f"{_escape(endpoint.model.model)}"
            )


@app.command()
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
    from shardeval.status import read_status, render_status

    found = read_status(resolve_output(output, spec), run_id)
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
    from shardeval.catalog import resolve_output
    from shardeval.launch import start_prefect
    from shardeval.rescore import prepare_rescore

    source = _spec_source(spec) if spec else None
    output = resolve_output(output, source)
    job = prepare_rescore(run_id, output, source)  # exit 2 before Prefect if it cannot work
    show = not quiet and sys.stderr.isatty()
    with spinner("Loading Prefect...", enabled=show):
        from flows.rescore import rescore as rescore_flow
    route_prefect_logs(job.store, verbose)
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
    require_api_key: Annotated[
        str | None,
        typer.Option(
            "--require-api-key",
            help="Answer 401 unless a request carries Authorization: Bearer KEY.",
            metavar="KEY",
        ),
    ] = None,
) -> None:
    """Serve the bundled OpenAI-compatible test model on 127.0.0.1 (for trying things out)."""
    from shardeval.testing.server import main as server_main

    argv = ["--port", str(port), "--latency", str(latency), "--mode", mode]
    if require_api_key is not None:
        argv += ["--require-api-key", require_api_key]
    server_main(argv)


def _register_commands() -> None:
    from shardeval.commands import register_all

    register_all(app)


_register_commands()


def _is_suite(spec: str) -> bool:
    from shardeval.suite import is_suite_file

    return is_suite_file(_spec_source(spec))


def _overrides(model: str | None, sets: list[str] | None) -> list[str]:
    """``--model`` and ``--set`` as the flow's ``overrides`` parameter (FIELD=VALUE strings).

    ``--model`` becomes a quoted YAML string, so a model named ``1.5`` or ``yes`` stays text.
    """
    import json

    found = list(sets or [])
    if model is not None:
        found.append(f"model.model={json.dumps(model)}")
    return found


def _spec_source(spec: str) -> str:
    return spec if "://" in spec else str(Path(spec).expanduser().resolve())


def _configure_logging(verbose: bool) -> None:
    # A user error is printed once, cleanly, by main(); Prefect would add a traceback.
    from shardeval.launch import quiet_prefect

    quiet_prefect(verbose)
    # Set, not defaulted: the processes this one starts (Dask workers) inherit it, and their
    # console is the user's terminal; without --verbose, Prefect's lines go to the log file.
    if not verbose:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
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
        print_log_location()
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
