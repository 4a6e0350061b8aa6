"""Starting the ``evaluate`` flow for a prepared run session (the CLI's and ``shardeval.run``'s).

The library never imports ``flows/`` at import time; this module imports it only when a run
actually needs Prefect, so validation and "answered from storage" stay Prefect-free.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from shardeval.display import spinner
from shardeval.session import RunSession


def quiet_prefect(verbose: bool = False) -> None:
    """Settings shardeval applies wherever it starts Prefect (environment defaults only).

    Prefect's INFO lines would tear through the progress bar (they still reach the API/UI);
    this tool never needs to phone home, and many eval machines have no route out; a loaded
    2-core machine can take longer than Prefect's default 20 s to start its server.
    """
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _flow_settings() -> contextlib.AbstractContextManager[Any]:
    """Prefect settings for a flow this process runs itself (the CLI, ``shardeval.run``).

    Flow-run heartbeats are turned off unless the user set their frequency: at the end of a
    run Prefect joins its heartbeat thread, which sleeps in whole seconds (0.5-1 s added to
    every run), and a flow run in this process needs no heartbeat to be seen as alive (the
    command is the one watching it). Deployment runs (a worker's) keep them.
    """
    from prefect.settings import get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        return contextlib.nullcontext()
    return temporary_settings(updates={"flows.heartbeat_frequency": None})


def _start_prefect(show: bool) -> None:
    """Choose the Prefect API (see shardeval.local_server) and check that it answers.

    Without an explicit ``PREFECT_API_URL`` this is shardeval's local server, started once in
    a session of its own (so the terminal's Ctrl-C never reaches it) and reused by later runs;
    ``SHARDEVAL_LOCAL_SERVER=0`` keeps Prefect's temporary in-process server.
    """
    from shardeval.display import err_console
    from shardeval.local_server import use_prefect_api

    api = use_prefect_api(waiting=lambda message: spinner(message, enabled=show))
    if api.message:
        from rich.markup import escape

        err_console.print(f"[dim]{escape(api.message)}[/]")
    if api.url:
        message = f"Connecting to Prefect at {api.url}..."
    else:
        message = "Starting Prefect's temporary API server (10-20 s)..."
    from prefect.client.orchestration import get_client

    shown = show and api.source != "local"  # the local server was just checked: no spinner
    with spinner(message, enabled=shown), get_client(sync_client=True) as client:
        client.api_healthcheck()


@contextlib.contextmanager
def prefect_for_flows(show: bool) -> Iterator[None]:
    """Prefect ready for the flows this process runs itself.

    The API chosen and answering, then the settings such flows run with: every command and
    ``shardeval`` function that runs a flow in this process enters this once.
    """
    _start_prefect(show)
    with _flow_settings():
        yield


def run_evaluate(
    session: RunSession,
    *,
    wait: bool = False,
    task_runner: str = "threads",
    dask_address: str | None = None,
    baseline: str | None = None,
    show: bool = False,
) -> dict[str, Any]:
    """Run the ``evaluate`` flow on ``session``; return its metrics.json content."""
    with spinner("Loading Prefect...", enabled=show):
        from flows.evaluate import evaluate
    flow_fn: Any = evaluate
    if task_runner != "threads":
        from shardeval.taskrunners import make_task_runner

        flow_fn = evaluate.with_options(task_runner=make_task_runner(task_runner, dask_address))
    with prefect_for_flows(show):
        summary: dict[str, Any] = flow_fn(
            spec=session,
            output=session.store.output,
            run_id=session.run_id,
            wait=wait,
            task_runner=task_runner,
            dask_address=dask_address,
            baseline=baseline,
        )
    return summary
