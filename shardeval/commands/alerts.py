"""``shardeval alerts install``: a Prefect Automation that messages you on a regression."""

from __future__ import annotations

from typing import Annotated

import typer

from shardeval.display import out_console

alerts_app = typer.Typer(
    name="alerts",
    help="Notifications through Prefect when a run regresses against its baseline.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the ``alerts`` command group."""
    app.add_typer(alerts_app)


@alerts_app.command()
def install(
    block: Annotated[
        str,
        typer.Option(
            "--block",
            help="An existing notification block: NAME or BLOCK_TYPE_SLUG/NAME "
            "(e.g. slack-webhook/nightly).",
            show_default=False,
        ),
    ],
    name: Annotated[
        str, typer.Option("--name", help="The Automation's name (updated if it exists).")
    ] = "shardeval-regression",
) -> None:
    """Create (or update) the Automation: on shardeval.regression.detected, notify via BLOCK.

    Talks to the Prefect server in PREFECT_API_URL; see docs/alerts.md.
    """
    from shardeval.alerts import REGRESSION_EVENT, install_automation

    automation_id, created = install_automation(block, name)
    verb = "created" if created else "updated"
    out_console.print(
        f"[green]{verb}[/] automation {name!r} ({automation_id}): "
        f"{REGRESSION_EVENT} → notify through {block!r}"
    )
