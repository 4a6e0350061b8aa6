"""The ``python`` metric: score with your own function, named as ``"package.module:callable"``.

The function is imported once, when the metric is created, so a typo is reported before any
model call. It is called as ``fn(response, item)`` and returns one of:

* a number (``float``, ``int`` or ``bool``): the score, stored in ``score_<name>``;
* a ``dict`` of ``str`` to number: several scores, stored in ``score_<name>_<key>``;
* ``None``: this row has no score.

Anything else raises :class:`TypeError` naming the function, which the run reports as a
per-row scoring error.

**Async functions** are supported: when the function (or what it returns) is a coroutine, it
is run to completion with :func:`asyncio.run` when no event loop is running in the calling
thread. Scorers are synchronous, so when one is called from inside a running loop the coroutine
is run on a short-lived helper thread with its own loop, and the calling loop is blocked until
it finishes: from async code, prefer calling scorers through :func:`asyncio.to_thread`.

The metric fingerprint holds the function's *name*, not its code: after changing what the
function returns, rename it (or give the metric a new ``name``) so that stored scores are
recomputed.
"""

from __future__ import annotations

import asyncio
import inspect
import numbers
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from shardeval.errors import MetricError
from shardeval.metrics.base import Item, Scorer, ScoreValue, metric
from shardeval.registry import import_object

T = TypeVar("T")

_IMPORT_HINT = (
    "check the spelling, and that the module is importable where the flow runs: installed in "
    "the environment or on PYTHONPATH (the directory that contains the package), for workers too"
)


@metric("python")
def python(*, function: str) -> Scorer:
    """Score with the user function ``function`` (``"package.module:callable"``).

    Args:
        function: Import path of a callable ``fn(response, item)``, sync or async.

    Raises:
        MetricError: if the function cannot be imported or is not callable.
    """
    fn = _load(function)

    def score(response: str, item: Item) -> ScoreValue:
        result = fn(response, item)
        if inspect.isawaitable(result):
            result = _run_awaitable(result)
        return validate_result(result, function)

    return score


def _load(function: str) -> Callable[..., Any]:
    """Import the user function once, with a message that says what to fix."""
    try:
        fn = import_object(function)
    except (ImportError, AttributeError, ValueError) as exc:
        raise MetricError(
            f"function {function!r} cannot be imported: {type(exc).__name__}: {exc}",
            hint=_IMPORT_HINT,
        ) from None
    if not callable(fn):
        raise MetricError(f"function {function!r} is not callable (it is a {type(fn).__name__})")
    return fn


def _run_awaitable(awaitable: Awaitable[T]) -> T:
    """Run an awaitable to completion from synchronous code (see the module docstring)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(awaitable))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardeval-metric") as executor:
        return executor.submit(asyncio.run, _await(awaitable)).result()


async def _await(awaitable: Awaitable[T]) -> T:
    """Wrap any awaitable in a coroutine, the only thing :func:`asyncio.run` accepts."""
    return await awaitable


def validate_result(result: object, function: str) -> ScoreValue:
    """Check what a user function returned and convert numbers to ``float``.

    Raises:
        TypeError: naming the function and the offending value's type.
    """
    if result is None:
        return None
    if isinstance(result, numbers.Real):
        return float(result)
    if isinstance(result, dict):
        return _validate_dict(result, function)
    raise TypeError(
        f"python metric function {function!r} returned {type(result).__name__}; "
        "expected a number, a dict of str to number, or None"
    )


def _validate_dict(result: dict[Any, Any], function: str) -> dict[str, float]:
    scores: dict[str, float] = {}
    for key, value in result.items():
        if not isinstance(key, str) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"python metric function {function!r} returned a dict with entry "
                f"{key!r}: {type(value).__name__}; expected str keys and number values"
            )
        scores[key] = float(value)
    return scores
