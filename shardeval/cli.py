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
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.logging import RichHandler

from shardeval import interrupt
from shardeval.commands.options import RunsOutputOpt, RunsSpecOpt
from shardeval.display import err_console, live_progress, out_console, print_summary, spinner
from shardeval.errors import EXIT_INTERRUPTED, RunInterrupted, ShardevalError, SpecError
from shardeval.overrides import resolve_spec

if TYPE_CHECKING:
    from shardeval.session import RunSession

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
            "this eval), tag:NAME or a run id; stored as comparison.json.",
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
        unsupported |= {"--model": model, "--set": set_, "--baseline": baseline}
        unsupported["--fail-on-regression"] = fail_on_regression
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


def evaluate_session(
    session: RunSession,
    *,
    started: float,
    quiet: bool = False,
    verbose: bool = False,
    wait: bool = False,
    task_runner: str = "threads",
    dask_address: str | None = None,
    no_preflight: bool = False,
    baseline: str | None = None,
    fail_on_regression: bool = False,
) -> None:
    """Answer a prepared session from storage, or run it; print the summary (run, resume)."""
    from shardeval.launch import run_evaluate
    from shardeval.taskrunners import NO_SERVER_WARNING, has_prefect_server

    runner_kind = task_runner
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
        if baseline:
            from shardeval.baseline import compare_with_baseline

            found = compare_with_baseline(session.store, session.spec.name, baseline)
            _report_comparison(found.to_dict() if found else None, fail_on_regression)
        return
    if not no_preflight:  # before Prefect starts: a wrong endpoint or key fails in seconds
        with spinner("Checking the endpoint...", enabled=not quiet and sys.stderr.isatty()):
            session.preflight()
    show = not quiet and sys.stderr.isatty()
    # Without PREFECT_API_URL, start_prefect gives the workers shardeval's local server.
    local_off = os.environ.get("SHARDEVAL_LOCAL_SERVER", "").strip() == "0"
    if runner_kind != "threads" and local_off and not has_prefect_server():
        err_console.print(f"[yellow]warning[/]: {_escape(NO_SERVER_WARNING)}")
    _install_signal_handlers(session.run_id, session.spec.grace_period_s)
    with spinner("Loading Prefect...", enabled=show):
        import prefect  # noqa: F401  (its import configures logging, redirected next)
    _route_prefect_logs(session.store, verbose)
    progress = session.progress
    with live_progress(progress, enabled=not quiet):
        summary = run_evaluate(
            session,
            wait=wait,
            task_runner=runner_kind,
            dask_address=dask_address,
            baseline=baseline,
            show=show,
        )
    print_summary(
        summary,
        wall_s=time.monotonic() - started,
        sent=progress.sent,
        from_cache=progress.from_cache,
        results_dir=session.store.url(),
    )
    if baseline:
        _report_comparison(summary.get("comparison"), fail_on_regression)


def _report_comparison(comparison: dict[str, Any] | None, fail_on_regression: bool) -> None:
    """Print the run's comparison with its baseline; exit 3 on a regression if asked."""
    from shardeval.commands.compare import gate, print_comparison_dict

    if comparison is None:
        err_console.print("[dim]no baseline yet: nothing to compare with[/]")
        return
    print_comparison_dict(comparison)
    if fail_on_regression:
        gate(comparison)


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
    _route_prefect_logs(job.store, verbose)
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


def _install_signal_handlers(run_id: str, grace_period_s: float) -> None:
    """Make Ctrl-C/SIGTERM (to this process or its whole group) stop ``run_id`` gracefully.

    The first signal stops sending, lets requests in flight finish, saves and exits 130;
    a second one (or one after the run already stopped for another reason) exits at once:
    every file is written atomically, so nothing is corrupted, and the lease expires by
    itself. Dask workers of a local cluster get the group's signal too, and stop the same
    way with the same grace period (:func:`shardeval.interrupt.handle_signals_in_dask_worker`).
    """
    os.environ[interrupt.GRACE_ENV] = f"{grace_period_s:g}"
    signalled = threading.Event()  # this process's, not the run's: the run's stop is
    # forgotten when its flow unwinds, and Prefect then hands a second SIGTERM back here.

    def stop_now() -> None:
        err_console.print("[red]stopping now[/]")
        _print_log_location()
        os._exit(EXIT_INTERRUPTED)

    interrupt.on_second_signal(stop_now)  # the flow's own SIGTERM handler calls it

    def handler(signum: int, frame: Any) -> None:
        if signalled.is_set() or interrupt.any_requested():
            stop_now()
        err_console.print(
            f"[yellow]stopping: no new requests; {grace_period_s:g}s for those in flight, "
            "then saving (press Ctrl-C again to stop at once)[/]"
        )
        signalled.set()
        message = "stopped by a signal"
        interrupt.stop_run(run_id, "interrupted", message, grace_period_s=grace_period_s)
        interrupt.stop_active("interrupted", message, grace_period_s=grace_period_s)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


_prefect_log: Path | None = None
"""Where Prefect's log lines went (see :func:`_route_prefect_logs`), to say so at the end."""


def _route_prefect_logs(store: Any, verbose: bool) -> None:
    """Send Prefect's (and Dask's) log lines to a file instead of the console.

    Their tracebacks and ERROR lines (an API hiccup, a task crash report, an events worker
    retrying) are not for the person at the terminal: the run's own outcome is printed once,
    cleanly, by :func:`main`. They go to ``prefect.log`` in the run directory (local
    output), else to ``shardeval-logs/<run id>.log`` in the temp directory; the final
    message says where. ``--verbose`` keeps them on the console. Call after Prefect is
    imported (its import configures logging); its flow-run logs still reach the API and UI.
    """
    global _prefect_log
    if verbose:
        return
    import tempfile

    candidates = [Path(store.path("prefect.log"))] if store.is_local else []
    candidates.append(Path(tempfile.gettempdir()) / "shardeval-logs" / f"{store.run_id}.log")
    file_handler: logging.Handler | None = None
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:  # a full or read-only output: the temp directory will do
            continue
        _prefect_log = path
        break
    logging.raiseExceptions = False  # a failing log write (a full disk) must not print either
    if file_handler is None:
        file_handler = logging.NullHandler()
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(threadName)s %(name)s - %(message)s")
    )
    for name in (None, "prefect._internal", "uvicorn", "fastapi"):
        logger = logging.getLogger(name)
        consoles = [h for h in logger.handlers if _is_console(h)]
        for handler in consoles:
            logger.removeHandler(handler)
        if consoles:
            logger.addHandler(file_handler)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def _print_log_location() -> None:
    if _prefect_log is not None and _prefect_log.exists() and _prefect_log.stat().st_size:
        err_console.print(f"[dim]Prefect's log: {_escape(str(_prefect_log))}[/]")


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
        _print_log_location()
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
