"""A run that ``--fresh`` started is resumed by its id: every resumable error says so.

The same command with ``--fresh`` would start yet another run (a new timestamp in its id) and
send every finished request again, so the errors that end such a run point at ``--run-id``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shardeval import interrupt
from shardeval.breaker import Breaker
from shardeval.errors import ProviderError, ShardevalError
from shardeval.run_id import advise_resume_by_id
from shardeval.spec import ModelSpec

RUN = "arith-openai-4917c52809-20261202T051806"
CLI_ADVICE = f"run the same command with `--run-id {RUN}` in place of `--fresh`"
PYTHON_ADVICE = f"call it again with run_id='{RUN}' in place of fresh=True"


def stop_error(reason: interrupt.StopReason) -> ShardevalError:
    interrupt.stop_run(RUN, reason, "why")
    try:
        return interrupt.stop_for(RUN).error("32 of 200 done")
    finally:
        interrupt.forget(RUN)


def unreachable_error() -> ShardevalError:
    breaker = Breaker(quiet_s=0.0)
    model = ModelSpec(model="m", base_url="http://127.0.0.1:9/v1")
    return breaker.unreachable(model, "model", ProviderError("connection refused"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: stop_error("interrupted"),
        lambda: stop_error("storage_failed"),
        lambda: stop_error("lease_lost"),
        lambda: stop_error("budget_reached"),
        unreachable_error,
    ],
    ids=["signal", "storage", "lease", "budget", "unreachable"],
)
def test_every_resumable_error_names_the_run_to_resume(make: Callable[[], ShardevalError]) -> None:
    error = make()
    before = str(error)
    assert "the same command" in before
    kind, code = type(error), error.exit_code

    advise_resume_by_id(error, RUN)

    after = str(error)
    assert CLI_ADVICE in after, after
    assert "run the same command to" not in after and "the same command again" not in after
    assert type(error) is kind and error.exit_code == code
    assert error.args[0] == error.message  # what a traceback or a log shows says it too


def test_the_python_api_is_told_the_argument() -> None:
    error = stop_error("interrupted")
    advise_resume_by_id(error, RUN, python=True)
    assert f"32 of 200 done; {PYTHON_ADVICE} to resume" in str(error)


def test_an_error_without_resume_advice_is_left_as_it_is() -> None:
    error = ShardevalError("model.base_url: not a URL", hint="write it as http://host:port/v1")
    advise_resume_by_id(error, RUN)
    assert (
        str(error)
        == "model.base_url: not a URL\n  to resolve this: write it as http://host:port/v1"
    )
