"""``shardeval report RUN_ID``: write (or refresh) a run's self-contained ``report.html``.

Reads the run's results.parquet, metrics.json and spec.json; makes no model call and does
not import Prefect. ``-o FILE`` writes the page elsewhere (any path or fsspec URL) and leaves
the run's own copy alone.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer

from shardeval.errors import EXIT_USAGE, ShardevalError


class CompareUnavailable(ShardevalError):
    """``--compare`` without the comparison module (exit 2: an option this build lacks)."""

    exit_code = EXIT_USAGE


def register(app: typer.Typer) -> None:
    """Add the ``report`` command."""
    app.command("report")(report)


def report(
    run_id: Annotated[str, typer.Argument(help="The run to report on.", show_default=False)],
    output: Annotated[
        str | None, typer.Option("--output", help="Where runs are stored (any fsspec URL).")
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option("--compare", help="Base run to compare with (its id, under the same output)."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("-o", "--file", help="Write the page here instead of the run's report.html."),
    ] = None,
) -> None:
    """Write a run's report.html (one self-contained page, no network needed); print where."""
    from shardeval.catalog import DEFAULT_OUTPUT, open_store
    from shardeval.display import out_console
    from shardeval.report.writer import write_run_report

    output = output or DEFAULT_OUTPUT
    store = open_store(output, run_id)  # an unknown id: exit 2 with the closest ids
    comparison = None
    base_results = None
    if compare is not None:
        base = open_store(output, compare)
        comparison = comparison_dict(output, compare, run_id)
        base_results = base.read_table(base.results_path)
    where = write_run_report(store, comparison=comparison, base_results=base_results, target=to)
    out_console.print(where)


def comparison_dict(output: str, base: str, cand: str) -> dict[str, Any]:
    """The ``compare --json`` dict (plus ``flips``) of two runs, from :mod:`shardeval.compare`.

    Raises:
        CompareUnavailable: this installation has no ``shardeval.compare``.
    """
    try:
        compare_module = importlib.import_module("shardeval.compare")
    except ImportError as exc:
        raise CompareUnavailable(
            "--compare needs `shardeval compare`, which this installation does not have",
            hint="write the page without --compare, or upgrade shardeval",
        ) from exc
    result = compare_module.compare(base, cand, output=output)
    data: dict[str, Any] = dict(result.to_dict())
    data.setdefault("flips", list(getattr(result, "flips", []) or []))
    return data
