"""A Python callable as the model: ``function: "package.module:callable"``.

The callable receives ``(item, messages)`` and returns the response text (or a mapping with
``text`` and optional ``prompt_tokens``/``completion_tokens``). It may be ``async``. A sync
callable runs in a worker thread so a slow one (a local model, a blocking client) never stalls
the event loop that serves every other request. Raising
:class:`~shardeval.errors.TransientProviderError` asks for a retry; any other exception
becomes an error row.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from shardeval.errors import PermanentProviderError, ProviderError, SpecError
from shardeval.providers.base import Completion, ProviderRequest
from shardeval.registry import import_object
from shardeval.spec import ModelSpec


class PythonProvider:
    """Calls a user function for each request."""

    def __init__(self, model: ModelSpec) -> None:
        self._function = self.load(model)
        self._is_async = inspect.iscoroutinefunction(self._function)

    @staticmethod
    def load(model: ModelSpec) -> Callable[..., Any]:
        """Import the callable the spec names, or explain why not."""
        if not model.function:
            raise SpecError("model.function: required for the python provider ('module:callable')")
        try:
            function = import_object(model.function)
        except (ImportError, AttributeError) as exc:
            raise SpecError(
                f"model.function: cannot import {model.function!r}: {exc}",
                hint="make sure the module is importable (installed, or on PYTHONPATH)",
            ) from None
        if not callable(function):
            raise SpecError(f"model.function: {model.function!r} is not callable")
        return function

    check = load

    async def complete(self, request: ProviderRequest) -> Completion:
        """Call the function and normalise what it returns."""
        try:
            if self._is_async:
                result = await self._function(dict(request.item), list(request.messages))
            else:
                result = await asyncio.to_thread(
                    self._function, dict(request.item), list(request.messages)
                )
        except ProviderError:
            raise
        except Exception as exc:
            raise PermanentProviderError(f"{type(exc).__name__}: {exc}") from exc
        return _to_completion(result)

    async def aclose(self) -> None:
        """Nothing to release."""


def _to_completion(result: Any) -> Completion:
    if isinstance(result, Completion):
        return result
    if isinstance(result, str):
        return Completion(text=result)
    if isinstance(result, Mapping) and "text" in result:
        return Completion(
            text=str(result["text"]),
            prompt_tokens=result.get("prompt_tokens"),
            completion_tokens=result.get("completion_tokens"),
            finish_reason=result.get("finish_reason"),
        )
    raise PermanentProviderError(
        f"the function returned {type(result).__name__}; expected str or a mapping with 'text'"
    )
