"""The deterministic "model" behind the test server and the offline ``provider: python`` model.

Both answer from this one module so that a quickstart run against the HTTP test server and one
against the in-process python model produce the *same* answers, and therefore the same accuracy:
tests can swap one for the other without changing their expectations.

Arithmetic answers are wrong on purpose for a deterministic ~1/``wrong_every`` of the questions,
chosen by hashing the question text, so metrics have something to measure and a re-run gives the
same score (no randomness, no dependence on order or concurrency).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_WRONG_EVERY",
    "answer_arith",
    "arith_is_wrong",
    "echo_answer",
    "last_user_message",
    "message_text",
    "parse_arith",
]

DEFAULT_WRONG_EVERY = 10

# "What is A + B?" with optional signs and optional parentheses around negatives ("(-3)").
_ARITH_RE = re.compile(
    r"what\s+is\s+\(?\s*([+-]?\d+)\s*\)?\s*\+\s*\(?\s*([+-]?\d+)\s*\)?\s*\?",
    re.IGNORECASE,
)


def message_text(content: Any) -> str:
    """Plain text of one message's ``content``.

    OpenAI allows ``content`` to be a string or a list of parts (``{"type": "text", ...}``);
    accepting both keeps the test server usable with clients that always send parts.

    Args:
        content: The ``content`` value of a chat message.

    Returns:
        The text, with text parts joined by newlines; other part types are ignored.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        ]
        return "\n".join(texts)
    return str(content)


def last_user_message(messages: Sequence[Mapping[str, Any]]) -> str:
    """Text of the last ``user`` message, which is what the fake model "reads".

    Falling back to the last message of any role means a conversation without a user turn still
    gets a deterministic answer instead of an error.

    Args:
        messages: Chat messages in OpenAI form.

    Returns:
        The text of the last user message, else of the last message, else ``""``.
    """
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    if messages:
        return message_text(messages[-1].get("content"))
    return ""


def parse_arith(text: str) -> tuple[int, int] | None:
    """Find the operands of the *last* "What is A + B?" in ``text``.

    The last match wins so that few-shot prompts ("What is 1 + 2? 3 ... What is 4 + 5?") are
    answered for the question actually being asked.

    Args:
        text: The prompt text.

    Returns:
        ``(A, B)``, or ``None`` when there is no such question.
    """
    matches = _ARITH_RE.findall(text)
    if not matches:
        return None
    a, b = matches[-1]
    return int(a), int(b)


def arith_is_wrong(text: str, wrong_every: int = DEFAULT_WRONG_EVERY) -> bool:
    """Whether the fake model gets this question wrong.

    Hashing the text (not a random draw) makes the ~1/``wrong_every`` error rate identical on
    every run, for every trial and at any concurrency, so accuracy assertions are exact.

    Args:
        text: The prompt text (the last user message).
        wrong_every: ``sha256(text) % wrong_every == 0`` means wrong; ``0`` or less disables
            wrong answers, ``1`` makes every answer wrong.

    Returns:
        ``True`` if the answer should be off by one.
    """
    if wrong_every <= 0:
        return False
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")
    return value % wrong_every == 0


def echo_answer(text: str) -> str:
    """The echo-mode answer: the prompt, prefixed so it is obviously not a real completion."""
    return f"echo: {text}"


def answer_arith(text: str, wrong_every: int = DEFAULT_WRONG_EVERY) -> str:
    """Answer "What is A + B?" with the number (deterministically wrong sometimes), else echo.

    Args:
        text: The prompt text (the last user message).
        wrong_every: See :func:`arith_is_wrong`.

    Returns:
        ``str(A + B)``, or ``str(A + B + 1)`` for the deterministic wrong ones; the echo answer
        when the text holds no arithmetic question.
    """
    operands = parse_arith(text)
    if operands is None:
        return echo_answer(text)
    total = operands[0] + operands[1]
    if arith_is_wrong(text, wrong_every):
        total += 1
    return str(total)
