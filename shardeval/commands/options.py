"""Options shared by the commands that read runs (``status``, ``runs``, ``resume``, ``rm``...).

Each of them finds the output the same way (:func:`shardeval.catalog.resolve_output`):
``--output``, else the ``--spec``'s ``output``, else ``./shardeval-runs``.
"""

from __future__ import annotations

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
