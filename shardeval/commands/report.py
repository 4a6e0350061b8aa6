"""``shardeval report RUN_ID``: write (or refresh) a run's self-contained ``report.html``.

Reads the run's results.parquet, metrics.json and spec.json; makes no model call and does
not import Prefect. ``-o FILE`` writes the page elsewhere (any path or fsspec URL) and leaves
the run's own copy alone.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer


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
        comparison, base_results = comparison_dict(output, compare, run_id)
    where = write_run_report(store, comparison=comparison, base_results=base_results, target=to)
    out_console.print(where)


def comparison_dict(output: str, base: str, cand: str) -> tuple[dict[str, Any], Any]:
    """The ``compare --json`` dict plus a ``flips`` list, and the base run's results."""
    from shardeval.compare import compare_runs

    comparison, base_run, _ = compare_runs(base, cand, output)
    data = comparison.to_dict()
    data["flips"] = [
        {
            "item_id": flip.item_id,
            "trial": flip.trial,
            "metric": metric,
            "kind": kind,
            "base": flip.base_score,
            "cand": flip.cand_score,
            "base_response": flip.base_response,
            "cand_response": flip.cand_response,
            "prompt": flip.prompt,
            "target": flip.target,
        }
        for metric, kinds in comparison.flips.items()
        for kind, flips in kinds.items()
        for flip in flips
    ]
    return data, base_run.results
