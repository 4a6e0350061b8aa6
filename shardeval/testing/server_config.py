"""How the test server behaves (:class:`ServerConfig`), and the same settings as command-line flags.

The config is validated on construction, because ``POST /config`` builds a new one from a
client's JSON and a bad value must become a 400, not a crashed handler. :func:`config_to_argv`
and :func:`build_parser` are inverses: a :class:`~shardeval.testing.server.TestServer` started
as a subprocess passes its config to ``python -m shardeval.testing.server`` as flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from shardeval.testing.answers import DEFAULT_WRONG_EVERY

MODES = ("arith", "echo", "random")

Mode = Literal["arith", "echo", "random"]


@dataclass
class ServerConfig:
    """How the fake model behaves; every field can be changed at runtime via ``POST /config``.

    Attributes:
        latency_min: Minimum added latency per completion, in seconds.
        latency_max: Maximum added latency; the delay is drawn uniformly from
            ``[latency_min, max(latency_min, latency_max)]`` with a generator seeded by ``seed``,
            so leaving it at 0 gives a fixed ``latency_min``.
        mode: ``"arith"`` answers "What is A + B?" (echo otherwise), ``"echo"`` answers
            ``"echo: <last user message>"``, ``"random"`` answers one of A/B/C/D.
        wrong_every: In arith mode, questions whose ``sha256 % wrong_every == 0`` get
            ``A + B + 1``: a deterministic ~90% accuracy by default; ``0`` means never wrong.
        seed: Seeds the latency, failure and random-answer generators (reseeded whenever
            ``seed`` is set through ``/config``), so a sequential run is reproducible.
        fail_rate: Probability in ``[0, 1]`` that a completion request fails with
            ``fail_status`` (seeded draw).
        fail_status: HTTP status used for injected failures (``fail_rate``, ``fail_next``,
            ``down``).
        fail_next: The next N completion requests fail with ``fail_status``; counts down to 0.
        down: Simulate an outage: every completion request gets ``fail_status``.
        retry_after: If set, sent as ``Retry-After`` (seconds) and ``retry-after-ms`` on every
            429 and 503 response, to test that clients honour it.
        require_api_key: If set, requests without ``Authorization: Bearer <key>`` get 401.
        model: The model name listed by ``/v1/models`` and used when a request names none.
        strict_model: Answer 404 "model ... does not exist" (as OpenAI and vLLM do) to a completion
            request naming another model; by default any model name is accepted.
    """

    latency_min: float = 0.0
    latency_max: float = 0.0
    mode: Mode = "arith"
    wrong_every: int = DEFAULT_WRONG_EVERY
    seed: int = 0
    fail_rate: float = 0.0
    fail_status: int = 500
    fail_next: int = 0
    down: bool = False
    retry_after: float | None = None
    require_api_key: str | None = None
    model: str = "test-model"
    strict_model: bool = False

    def __post_init__(self) -> None:
        """Reject nonsense early: a bad ``/config`` body must be a 400, not a crashed handler."""
        self.latency_min = _number(self.latency_min, "latency_min", minimum=0.0)
        self.latency_max = _number(self.latency_max, "latency_max", minimum=0.0)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.wrong_every = _integer(self.wrong_every, "wrong_every")
        self.seed = _integer(self.seed, "seed")
        self.fail_rate = _number(self.fail_rate, "fail_rate", minimum=0.0)
        if self.fail_rate > 1.0:
            raise ValueError(f"fail_rate must be in [0, 1], got {self.fail_rate}")
        self.fail_status = _integer(self.fail_status, "fail_status")
        if not 400 <= self.fail_status <= 599:
            raise ValueError(f"fail_status must be an HTTP error status, got {self.fail_status}")
        self.fail_next = _integer(self.fail_next, "fail_next")
        if self.fail_next < 0:
            raise ValueError(f"fail_next must be >= 0, got {self.fail_next}")
        if not isinstance(self.down, bool):
            raise ValueError(f"down must be a boolean, got {self.down!r}")
        if self.retry_after is not None:
            self.retry_after = _number(self.retry_after, "retry_after", minimum=0.0)
        if self.require_api_key is not None and not isinstance(self.require_api_key, str):
            raise ValueError("require_api_key must be a string or null")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data (what ``GET /config`` returns)."""
        return dataclasses.asdict(self)


def _number(value: Any, name: str, *, minimum: float) -> float:
    """``value`` as a float >= ``minimum``; raises ``ValueError`` so ``/config`` can answer 400."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    """``value`` as an int (integral floats from JSON are accepted, booleans are not)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


# -- command line ----------------------------------------------------------------------------


def config_to_argv(config: ServerConfig) -> list[str]:
    """Command-line flags that make :func:`~shardeval.testing.server.main` start with ``config``.

    The inverse of :func:`build_parser`.

    Args:
        config: The config to encode.

    Returns:
        Flags for ``python -m shardeval.testing.server`` (without ``--port``).
    """
    argv = [
        "--latency",
        repr(config.latency_min),
        "--latency-max",
        repr(config.latency_max),
        "--mode",
        config.mode,
        "--wrong-every",
        str(config.wrong_every),
        "--seed",
        str(config.seed),
        "--fail-rate",
        repr(config.fail_rate),
        "--fail-status",
        str(config.fail_status),
        "--fail-next",
        str(config.fail_next),
        "--model",
        config.model,
    ]
    if config.down:
        argv.append("--down")
    if config.retry_after is not None:
        argv += ["--retry-after", repr(config.retry_after)]
    if config.require_api_key is not None:
        argv += ["--require-api-key", config.require_api_key]
    if config.strict_model:
        argv.append("--strict-model")
    return argv


def build_parser() -> argparse.ArgumentParser:
    """The CLI; flag names mirror :class:`ServerConfig` fields."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="python -m shardeval.testing.server",
        description="shardeval's OpenAI-compatible test server (binds 127.0.0.1 only).",
    )
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    parser.add_argument(
        "--latency",
        "--latency-min",
        dest="latency_min",
        type=float,
        default=defaults.latency_min,
        help="latency per completion in seconds (minimum, if --latency-max is larger)",
    )
    parser.add_argument(
        "--latency-max",
        type=float,
        default=None,
        help="maximum latency; uniform in [latency, latency-max] (default: = --latency)",
    )
    parser.add_argument("--mode", choices=MODES, default=defaults.mode)
    parser.add_argument("--wrong-every", type=int, default=defaults.wrong_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--fail-rate", type=float, default=defaults.fail_rate)
    parser.add_argument("--fail-status", type=int, default=defaults.fail_status)
    parser.add_argument("--fail-next", type=int, default=defaults.fail_next)
    parser.add_argument("--down", action="store_true", help="start in outage mode")
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument(
        "--require-api-key",
        default=None,
        metavar="KEY",
        help="answer 401 unless a request carries 'Authorization: Bearer KEY'",
    )
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument(
        "--strict-model",
        action="store_true",
        help="answer 404 to completions naming another model than --model",
    )
    return parser
