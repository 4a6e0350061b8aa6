"""``shardeval run`` and ``shardeval validate``: the two commands that take a spec (or a suite).

Everything that can be checked without Prefect is checked here before Prefect is imported, so
a typo costs a second, not Prefect's start-up; :func:`shardeval.run_console.evaluate_session`
then answers a complete run from storage or starts the flow. A file with a top-level
``suite:`` key goes to :mod:`shardeval.suite_cli` instead.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape

from shardeval.commands.options import (
    LimitOpt,
    ModelOpt,
    OutputOpt,
    QuietOpt,
    RetryFailedOpt,
    SetOpt,
    SpecArg,
    VerboseOpt,
    WaitOpt,
    spec_source,
)
from shardeval.display import err_console, out_console
from shardeval.errors import ShardevalError, SpecError


def register(app: typer.Typer) -> None:
    """Add ``run`` and ``validate`` to the app."""
    app.command("run")(run)
    app.command("validate")(validate)


def run(
    spec: SpecArg,
    output: OutputOpt = None,
    run_id: Annotated[
        str | None, typer.Option(help="Run to write (default: derived from the spec).")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start a new run; leave the old one untouched.")
    ] = False,
    retry_failed: RetryFailedOpt = False,
    limit: LimitOpt = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Items per batch task.")] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Requests in flight at once.")
    ] = None,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
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
    started_ns, started = time.time_ns(), time.monotonic()
    from shardeval.answer_record import answer_from_record, answer_key

    # Before the spec is even parsed: a complete run answers from its record in a blink.
    key = None
    if not (fresh or retry_failed or baseline or fail_on_regression):
        options: dict[str, object] = {"output": output, "run_id": run_id, "limit": limit}
        options |= {"model": model, "batch_size": batch_size, "concurrency": concurrency}
        options |= {"set": set_, "task_runner": task_runner, "dask_address": dask_address}
        key = answer_key(spec_source(spec), options)
    if key is not None and answer_from_record(key, started=started):
        return None
    if _is_suite(spec):
        from shardeval.suite_cli import run_suite

        unsupported: dict[str, object] = {"--run-id": run_id, "--fresh": fresh}
        unsupported["--batch-size"] = batch_size
        unsupported |= {"--concurrency": concurrency, "--dask-address": dask_address}
        unsupported["--task-runner"] = task_runner if task_runner != "threads" else None
        unsupported |= {"--model": model, "--set": set_}
        return run_suite(
            spec_source(spec),
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
    from shardeval.run_console import configure_logging, evaluate_session
    from shardeval.run_id import advise_resume_by_id
    from shardeval.session import RunSession

    configure_logging(verbose)
    from shardeval.taskrunners import check_task_runner

    runner_kind = check_task_runner(task_runner, dask_address)
    if fail_on_regression and not baseline:
        raise SpecError("--fail-on-regression needs --baseline", hint="add --baseline previous")
    if baseline:
        from shardeval.baseline import check_selector

        check_selector(baseline)
    session = RunSession.prepare(
        spec_source(spec),
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
        err_console.print(f"[yellow]{escape(session.new_run_reason)}[/]")
    try:
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
    except ShardevalError as error:
        if fresh:  # the same command would start another run: name the one to resume
            advise_resume_by_id(error, session.run_id)
        raise
    if key is not None:
        from shardeval.answer_record import remember_answer

        remember_answer(key, session, read_started_ns=started_ns)


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

        return validate_suite(spec_source(spec), limit=limit)
    from shardeval.hashing import default_run_id
    from shardeval.overrides import resolve_spec
    from shardeval.validation import validate as validate_spec

    eval_spec = resolve_spec(spec_source(spec), overrides=_overrides(model, set_))
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
                f"{escape(endpoint.model.model)}"
            )


def _is_suite(spec: str) -> bool:
    from shardeval.suite import is_suite_file

    return is_suite_file(spec_source(spec))


def _overrides(model: str | None, sets: list[str] | None) -> list[str]:
    """``--model`` and ``--set`` as the flow's ``overrides`` parameter (FIELD=VALUE strings).

    ``--model`` becomes a quoted YAML string, so a model named ``1.5`` or ``yes`` stays text.
    """
    import json

    found = list(sets or [])
    if model is not None:
        found.append(f"model.model={json.dumps(model)}")
    return found
