"""A failed flow run says why: the error's own text (and hint) as its state message.

When a flow raises, Prefect sets the state message to ``Flow run encountered an exception:
RunIncomplete: ...`` and logs a traceback; ``prefect deployment run --watch`` then ends with
"Flow run finished in state 'Failed'" and the reason is left to the worker's log. A
:class:`~shardeval.errors.ShardevalError` is a user-facing outcome, not a bug, so the flow
returns a ``Failed`` state whose message is exactly what the CLI would print (``str(error)``:
the message, then ``to resolve this: <hint>``). The exception rides along as the state's data,
so a caller of the flow function (the CLI, the Python API) still gets it raised, with its
exit code. Any other exception (a bug) keeps Prefect's own handling and its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from shardeval.errors import ShardevalError

F = TypeVar("F", bound=Callable[..., Any])


def fail_with_reason(fn: F) -> F:
    """Wrap a flow function (under ``@flow``) so a ShardevalError fails it with its text."""

    @functools.wraps(fn)  # Prefect reads parameters through __wrapped__
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ShardevalError as exc:
            from prefect.states import Failed

            return Failed(message=str(exc), data=exc)

    return wrapper  # type: ignore[return-value]
