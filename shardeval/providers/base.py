"""What a provider is: something that turns chat messages into a completion.

Providers only make calls and classify failures; retries, the shared concurrency limit and
timing live in :mod:`shardeval.engine`, so every provider gets them the same way. A provider
raises :class:`~shardeval.errors.TransientProviderError` for failures worth retrying
(timeouts, 429, 5xx, connection errors) and
:class:`~shardeval.errors.PermanentProviderError` for the rest (other 4xx), which become error
rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shardeval.errors import SpecError
from shardeval.registry import Registry
from shardeval.spec import ModelSpec

Message = Mapping[str, str]


@dataclass(frozen=True)
class ProviderRequest:
    """One call: the rendered messages, plus the item for providers that want it."""

    key: str
    item_id: str
    messages: Sequence[Message]
    item: Mapping[str, Any]
    trial: int


@dataclass(frozen=True)
class Completion:
    """What a successful call returned."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class Provider(Protocol):
    """A model endpoint. Created and used inside one event loop."""

    async def complete(self, request: ProviderRequest) -> Completion:
        """Make one call; raise a ProviderError subclass on failure."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


ProviderFactory = Callable[[ModelSpec], Provider]

PROVIDERS: Registry[ProviderFactory] = Registry("provider", SpecError)
PROVIDERS.register_lazy("openai", "shardeval.providers.openai:OpenAIProvider")
PROVIDERS.register_lazy("python", "shardeval.providers.python:PythonProvider")


def create_provider(model: ModelSpec) -> Provider:
    """Build the provider a model spec names (imports it on first use)."""
    return PROVIDERS.get(model.provider)(model)


def check_provider(model: ModelSpec) -> None:
    """Fail early (exit 2, before any call) if the provider cannot be built from this spec."""
    factory = PROVIDERS.get(model.provider)
    checker = getattr(factory, "check", None)
    if checker is not None:
        checker(model)
