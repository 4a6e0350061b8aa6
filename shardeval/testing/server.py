"""shardeval's own OpenAI-compatible test server: a fake model with knobs for every failure.

Tests, benchmarks and the README quickstart need an endpoint that is deterministic (so accuracy
and resume assertions are exact), observable (so tests can assert *how many* calls were made,
which is the whole point of a resumable evaluator) and breakable on demand (500s, 429s with
``Retry-After``, outages, slow calls, bad keys). A real model gives none of that, so this module
serves ``POST /v1/chat/completions`` from :mod:`shardeval.testing.answers` and exposes:

* ``GET /v1/models``: the one model name, so clients that probe the endpoint are happy.
* ``GET /stats``: the counters (requests, by status, completions, per-prompt counts, in-flight).
* ``POST /reset``: zero the counters between test phases.
* ``GET|POST /config``: read or change any :class:`ServerConfig` field while running.
* ``GET /health``: liveness, unaffected by ``down`` so harnesses can tell "up but failing" from
  "not started".

Magic markers in the last user message let one test item misbehave without reconfiguring the
server: ``[[status:NNN]]`` (400-599) always answers with that status and an OpenAI-style error
body, ``[[sleep:S]]`` adds ``S`` seconds of latency.

The server only ever binds ``127.0.0.1``: it has no authentication worth the name and must never
be reachable from another machine. Run it with :class:`TestServer` (in a thread or a subprocess)
or from the command line::

    python -m shardeval.testing.server --port 0 --latency 0.02 --mode arith

which prints exactly one line, ``shardeval test server listening on http://127.0.0.1:PORT/v1``,
once it accepts connections.

The server is split by job: :mod:`~shardeval.testing.server_config` (:class:`ServerConfig` and
its flags), :mod:`~shardeval.testing.fake_model` (the app and its handlers),
:mod:`~shardeval.testing.server_stats` (the counters and :func:`prompt_key`),
:mod:`~shardeval.testing.server_runner` (listening on 127.0.0.1) and
:mod:`~shardeval.testing.server_handle` (:class:`TestServer`). This module is the public entry
point: it re-exports them and runs the command line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from shardeval.testing.fake_model import RANDOM_CHOICES as RANDOM_CHOICES
from shardeval.testing.fake_model import create_app
from shardeval.testing.server_config import MODES as MODES
from shardeval.testing.server_config import Mode as Mode
from shardeval.testing.server_config import ServerConfig, build_parser, config_to_argv
from shardeval.testing.server_handle import TestServer
from shardeval.testing.server_runner import HOST, LISTENING_PREFIX, serve_until_signalled
from shardeval.testing.server_stats import PROMPT_KEY_CHARS as PROMPT_KEY_CHARS
from shardeval.testing.server_stats import prompt_key

__all__ = [
    "HOST",
    "LISTENING_PREFIX",
    "ServerConfig",
    "TestServer",
    "config_to_argv",
    "create_app",
    "main",
    "prompt_key",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m shardeval.testing.server [flags]``.

    Prints exactly one line, ``shardeval test server listening on http://127.0.0.1:PORT/v1``,
    once the socket accepts connections (callers wait for it instead of polling), then serves
    until SIGTERM or SIGINT.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The process exit code (0 after a clean shutdown).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ServerConfig(
            latency_min=args.latency_min,
            latency_max=args.latency_min if args.latency_max is None else args.latency_max,
            mode=args.mode,
            wrong_every=args.wrong_every,
            seed=args.seed,
            fail_rate=args.fail_rate,
            fail_status=args.fail_status,
            fail_next=args.fail_next,
            down=args.down,
            retry_after=args.retry_after,
            require_api_key=args.require_api_key,
            model=args.model,
            strict_model=args.strict_model,
        )
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve_until_signalled(config, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
