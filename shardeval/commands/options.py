"""Arguments and options shared by several commands, and how a spec argument is read.

The commands that read runs (``status``, ``runs``, ``resume``, ``rm``...) find the output the
same way (:func:`shardeval.catalog.resolve_output`): ``--output``, else the ``--spec``'s
``output``, else ``./shardeval-runs``. The commands that take a spec (``run``, ``validate``)
share its argument and the ``--model``/``--set`` overrides; those that run an eval (``run``,
``resume``) share their options, so that they read alike in ``--help``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunsOutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        help="Where runs are stored (default: the --spec's output, else ./shardeval-runs).",
    ),
]
RunsSpecOpt = Annotated[
    str | None,
    typer.Option("--spec", help="A spec whose output holds the runs (when --output is not given)."),
]
RunIdArg = Annotated[str, typer.Argument(help="The run id.", show_default=False)]

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


# What a command that runs an eval (``run``, ``resume``) takes besides its spec or run id.
RetryFailedOpt = Annotated[
    bool, typer.Option("--retry-failed", help="Send again the rows whose status is error.")
]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N items.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait for another process holding the run.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")]


def spec_source(spec: str) -> str:
    """A spec argument as the session gets it: a URL as given, a path absolute (``~`` expanded).

    The spec's own relative paths (its dataset) are resolved against this location.
    """
    return spec if "://" in spec else str(Path(spec).expanduser().resolve())
