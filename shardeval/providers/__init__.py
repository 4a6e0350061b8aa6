"""Model providers: a registry of factories, imported lazily."""

from shardeval.providers.base import (
    PROVIDERS,
    Completion,
    Provider,
    ProviderRequest,
    check_provider,
    create_provider,
)

__all__ = [
    "PROVIDERS",
    "Completion",
    "Provider",
    "ProviderRequest",
    "check_provider",
    "create_provider",
]
