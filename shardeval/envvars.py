"""Numbers read from environment variables, with one rule for every setting.

An unset or blank variable means "use the default"; anything else must parse and be in range,
or the run stops before it starts with an error that names the variable and what it accepts
(a typo in ``SHARDEVAL_STORAGE_RETRIES=six`` must not silently mean the default).
"""

from __future__ import annotations

import os
from typing import TypeVar, overload

from shardeval.errors import ShardevalError, SpecError

Number = TypeVar("Number", int, float)


@overload
def env_number(
    name: str,
    kind: type[Number],
    *,
    minimum: float,
    default: Number,
    error: type[ShardevalError] = ...,
) -> Number: ...


@overload
def env_number(
    name: str,
    kind: type[Number],
    *,
    minimum: float,
    default: None = None,
    error: type[ShardevalError] = ...,
) -> Number | None: ...


def env_number(
    name: str,
    kind: type[Number],
    *,
    minimum: float,
    default: Number | None = None,
    error: type[ShardevalError] = SpecError,
) -> Number | None:
    """The number in ``$name`` as ``kind`` (``int`` or ``float``), or ``default`` when unset.

    Args:
        name: the environment variable.
        kind: ``int`` or ``float``; an ``int`` setting does not accept ``2.5``.
        minimum: the smallest value accepted.
        default: returned when the variable is unset or blank.
        error: the error raised for a bad value, so that it maps to the exit code of the
            part of shardeval that reads it (a storage setting is a StorageError).

    Raises:
        ShardevalError: the value does not parse as ``kind`` or is below ``minimum``.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise error(
            f"{name}={text!r} is not a valid setting",
            hint=f"set {name} to {'a whole number' if kind is int else 'a number'} "
            f">= {minimum:g}, or unset it",
        )
    return value
