"""The ``shardeval`` command line: the Typer app and its entry point.

Exit codes (the contract scripts rely on): 0 the run is complete (item errors are counted,
not fatal); 2 invalid spec, dataset or options; 1 the run could not finish (what finished is
kept); 130 interrupted after saving what finished; 3 ``--fail-on-regression`` found one.

The commands are in :mod:`shardeval.commands`, one module each (``run`` and ``validate`` in
:mod:`shardeval.commands.run`). :func:`main` is the one place an error becomes an exit code:
user errors print a clean message, bugs keep their traceback.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.markup import escape

from shardeval.commands import register_all
from shardeval.display import err_console
from shardeval.errors import EXIT_INTERRUPTED, RunInterrupted, ShardevalError
from shardeval.fast_exit import exit_now
from shardeval.run_console import print_log_location

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
register_all(app)


def main() -> None:
    """Entry point: user errors print a clean message and exit 2/1, Ctrl-C exits 130.

    The process then ends at once (:func:`shardeval.fast_exit.exit_now`).
    """
    try:
        _run_app()
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(0)


def _run_app() -> None:
    try:
        app(standalone_mode=False)
    except ShardevalError as exc:
        err_console.print(f"[bold red]error[/]: {escape(str(exc))}")
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


if __name__ == "__main__":
    main()
