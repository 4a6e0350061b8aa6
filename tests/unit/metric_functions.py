"""User-style scoring functions for the ``python`` metric tests, imported by dotted path."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from typing import Any

NOT_CALLABLE = 42


def length_ratio(response: str, item: Mapping[str, Any]) -> float:
    return len(response) / len(str(item["answer"]))


def is_yes(response: str, item: Mapping[str, Any]) -> bool:
    return response.strip().lower() == "yes"


def word_count(response: str, item: Mapping[str, Any]) -> int:
    return len(response.split())


def maybe_none(response: str, item: Mapping[str, Any]) -> float | None:
    return None if not response else 1.0


def precision_recall(response: str, item: Mapping[str, Any]) -> dict[str, float]:
    said = set(response.split())
    expected = set(str(item["answer"]).split())
    hit = len(said & expected)
    return {
        "precision": hit / len(said) if said else 0.0,
        "recall": hit / len(expected) if expected else 0.0,
    }


async def async_exact(response: str, item: Mapping[str, Any]) -> float:
    await asyncio.sleep(0)
    return 1.0 if response.strip() == str(item["answer"]) else 0.0


def returns_string(response: str, item: Mapping[str, Any]) -> str:
    return "high"


def returns_bad_dict(response: str, item: Mapping[str, Any]) -> dict[str, object]:
    return {"ok": 1.0, "bad": "x"}


def raises(response: str, item: Mapping[str, Any]) -> float:
    raise RuntimeError("scorer exploded")


def judge_sum(item: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """A python-provider judge: grades ``Response: <text>`` against the item's answer."""
    response = messages[-1]["content"].rsplit("Response:", 1)[-1].strip()
    return "GRADE: C" if response == str(item["answer"]) else "GRADE: I"


def counted_model(item: dict[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    """A python-provider model that reports token counts (10 in, 2 out) like an API does."""
    return {"text": str(item["answer"]), "prompt_tokens": 10, "completion_tokens": 2}


SURROGATE_CALLS: list[str] = []


def surrogate_model(item: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """Half an emoji (a lone surrogate) for q00001, an error with one for q00002; counted."""
    SURROGATE_CALLS.append(item["id"])
    if item["id"] == "q00001":
        return "half an emoji \ud83d"
    if item["id"] == "q00002":
        raise ValueError("cannot say \udc00")
    return str(item["answer"])


async def async_surrogate_model(item: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """:func:`surrogate_model` as a coroutine (the engine's per-request path)."""
    return surrogate_model(item, messages)


class Reason(enum.Enum):
    """A finish reason some libraries return as an enum, stored as its ``str``."""

    X = "x"


def badly_typed_model(item: dict[str, Any], messages: list[dict[str, str]]) -> dict[str, Any]:
    """Token counts of the wrong type for q00001 and q00002; numpy-like ints elsewhere."""
    if item["id"] == "q00001":
        return {"text": "1", "prompt_tokens": "12"}
    if item["id"] == "q00002":
        return {"text": "2", "completion_tokens": 1.5}
    return {"text": str(item["answer"]), "prompt_tokens": _Index(7), "finish_reason": Reason.X}


class _Index:
    """An integer type that is not ``int`` (numpy's ``int64`` behaves like this)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value
