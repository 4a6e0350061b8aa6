"""``shardeval test-server``: the bundled OpenAI-compatible test model, for trying things out."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``test-server`` to the app."""
    app.command("test-server")(test_server)


def test_server(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8000,
    latency: Annotated[float, typer.Option(help="Seconds per request.")] = 0.05,
    mode: Annotated[str, typer.Option(help="arith | echo | random")] = "arith",
    require_api_key: Annotated[
        str | None,
        typer.Option(
            "--require-api-key",
            help="Answer 401 unless a request carries Authorization: Bearer KEY.",
            metavar="KEY",
        ),
    ] = None,
) -> None:
    """Serve the bundled OpenAI-compatible test model on 127.0.0.1 (for trying things out)."""
    from shardeval.testing.server import main as server_main

    argv = ["--port", str(port), "--latency", str(latency), "--mode", mode]
    if require_api_key is not None:
        argv += ["--require-api-key", require_api_key]
    server_main(argv)
