"""What a run does in a terminal: signals, Prefect's log lines, the summary and comparison.

Shared by ``shardeval run``, ``resume``, ``rescore`` and suites (shardeval/suite_cli.py): the
first Ctrl-C/SIGTERM stops the run gracefully and a second exits at once; Prefect's own log
lines go to a file, not the terminal; a prepared session is answered from storage or run.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.logging import RichHandler
from rich.markup import escape as _escape

from shardeval import interrupt
from shardeval.display import err_console, live_progress, print_summary, spinner
from shardeval.errors import EXIT_INTERRUPTED

if TYPE_CHECKING:
    from shardeval.session import RunSession


def configure_logging(verbose: bool) -> None:
    """Quiet Prefect and send shardeval's own log lines to stderr, before a run starts."""
    # A user error is printed once, cleanly, by cli.main(); Prefect would add a traceback.
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
            report_comparison(found.to_dict() if found else None, fail_on_regression)
        return
    if not no_preflight:  # before Prefect starts: a wrong endpoint or key fails in seconds
        with spinner("Checking the endpoint...", enabled=not quiet and sys.stderr.isatty()):
            session.preflight()
    show = not quiet and sys.stderr.isatty()
    # Without PREFECT_API_URL, prefect_for_flows gives the workers shardeval's local server.
    local_off = os.environ.get("SHARDEVAL_LOCAL_SERVER", "").strip() == "0"
    if runner_kind != "threads" and local_off and not has_prefect_server():
        err_console.print(f"[yellow]warning[/]: {_escape(NO_SERVER_WARNING)}")
    install_signal_handlers(session.run_id, session.spec.grace_period_s)
    with spinner("Loading Prefect...", enabled=show):
        import prefect  # noqa: F401  (its import configures logging, redirected next)
    route_prefect_logs(session.store, verbose)
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
        report_comparison(summary.get("comparison"), fail_on_regression)


def report_comparison(comparison: dict[str, Any] | None, fail_on_regression: bool) -> None:
    """Print the run's comparison with its baseline; exit 3 on a regression if asked."""
    from shardeval.commands.compare import gate, print_comparison_dict

    if comparison is None:
        err_console.print("[dim]no baseline yet: nothing to compare with[/]")
        return
    print_comparison_dict(comparison)
    if fail_on_regression:
        gate(comparison)


def install_signal_handlers(run_id: str, grace_period_s: float) -> None:
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
        print_log_location()
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
"""Where Prefect's log lines went (see :func:`route_prefect_logs`), to say so at the end."""


def route_prefect_logs(store: Any, verbose: bool) -> None:
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


def print_log_location() -> None:
    """Say where Prefect's log lines went, if any were written."""
    if _prefect_log is not None and _prefect_log.exists() and _prefect_log.stat().st_size:
        err_console.print(f"[dim]Prefect's log: {_escape(str(_prefect_log))}[/]")
