"""Command modules of the ``shardeval`` CLI beyond the core ones in :mod:`shardeval.cli`.

Each module here defines ``register(app)`` and adds its commands to the Typer app; the list
below is the order ``shardeval --help`` shows them in. A module imports only what its commands
need at call time, so ``shardeval --help`` and ``validate`` stay fast.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES: tuple[str, ...] = (
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
