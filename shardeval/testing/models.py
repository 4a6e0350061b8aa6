"""Offline "models" for ``provider: python``: the quickstart runs with no server and no network.

They answer exactly like the test server's ``arith`` mode (same module, same deterministic wrong
answers), so a spec scores the same whether it points at the server or at these functions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from shardeval.testing.answers import DEFAULT_WRONG_EVERY, answer_arith, last_user_message

__all__ = ["arith", "arith_async", "arith_sloppy"]

SLOPPY_WRONG_EVERY = 3
"""``arith_sloppy`` is wrong for about a third of the questions (``arith``: a tenth)."""


def arith(item: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> str:
    """Answer "What is A + B?" in the last user message, like the server's ``arith`` mode.

    Args:
        item: The dataset row (unused: the answer depends only on the rendered prompt, as a real
            model's would).
        messages: The rendered chat messages.

    Returns:
        The sum as text (off by one for a deterministic ~10% of questions), or
        ``"echo: <message>"`` when there is no arithmetic question.
    """
    return answer_arith(last_user_message(messages), DEFAULT_WRONG_EVERY)


async def arith_async(item: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> str:
    """Async twin of :func:`arith`, for exercising the provider's coroutine path.

    It yields to the event loop once so that it really behaves like a coroutine (other tasks run
    in between) rather than a sync function in disguise.

    Args:
        item: The dataset row (unused).
        messages: The rendered chat messages.

    Returns:
        The same answer as :func:`arith`.
    """
    await asyncio.sleep(0)
    return arith(item, messages)


def arith_sloppy(item: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> str:
    """A worse twin of :func:`arith` (wrong about a third of the time), for comparing models.

    ``examples/suite.yaml`` evaluates both, so an offline suite has two models that differ.

    Args:
        item: The dataset row (unused).
        messages: The rendered chat messages.

    Returns:
        The sum as text, off by one for a deterministic ~33% of questions.
    """
    return answer_arith(last_user_message(messages), SLOPPY_WRONG_EVERY)
