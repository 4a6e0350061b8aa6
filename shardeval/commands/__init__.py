"""The commands of the ``shardeval`` CLI, one module each; :mod:`shardeval.cli` holds the app.

Each module here defines ``register(app)`` and adds its commands to the Typer app; the list
below is the order ``shardeval --help`` shows them in. A module imports only what its commands
need at call time, so ``shardeval --help`` and ``validate`` stay fast.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES: tuple[str, ...] = (
    "run",  # run, validate
    "status",
    "rescore",
    "test_server",
    "runs",
    "resume",
    "rm",
    "tag",
    "compare",
    "alerts",
    "report",
    "server",
)
"""Modules of this package that add commands (``shardeval.commands.<name>``)."""


def register_all(app: typer.Typer) -> None:
    """Add every command module's commands to ``app``."""
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(app)
