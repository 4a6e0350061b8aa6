"""One small registry mechanism shared by providers and metrics.

Factories are registered under a name, either directly (:meth:`Registry.register`) or as a
dotted path that is imported only when first used (:meth:`Registry.register_lazy`), so that
``import shardeval`` never imports an SDK it does not need. Third-party packages can add entries
through the ``shardeval.<kind>`` entry-point group. The registry is read-only from outside
(:attr:`Registry.names`); registering a name twice is an error.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Generic, TypeVar

from shardeval.errors import ShardevalError

T = TypeVar("T")


def import_object(dotted: str) -> object:
    """Import ``package.module:attribute`` (or ``package.module.attribute``)."""
    module_name, _, attribute = dotted.partition(":")
    if not attribute:
        module_name, _, attribute = dotted.rpartition(".")
    module = importlib.import_module(module_name)
    obj: object = module
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named factories of one kind (``provider`` or ``metric``)."""

    def __init__(self, kind: str, error: type[ShardevalError]) -> None:
        self.kind = kind
        self._error = error
        self._factories: dict[str, T] = {}
        self._lazy: dict[str, str] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``factory`` under ``name``."""

        def decorator(factory: T) -> T:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def register_lazy(self, name: str, dotted: str) -> None:
        """Register a factory by dotted path; it is imported on first :meth:`get`."""
        if name in self._lazy or name in self._factories:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._lazy[name] = dotted

    @property
    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted."""
        self._load_entry_points()
        return tuple(sorted(set(self._factories) | set(self._lazy)))

    def get(self, name: str) -> T:
        """The factory registered under ``name``.

        Raises:
            ShardevalError: (of the registry's error type) with a "did you mean" suggestion.
        """
        if name not in self._factories and name not in self._lazy:
            self._load_entry_points()
        if name in self._factories:
            return self._factories[name]
        if name in self._lazy:
            dotted = self._lazy[name]
            try:
                factory = import_object(dotted)
            except ImportError as exc:
                raise self._error(
                    f"{self.kind} {name!r} needs a package that is not installed: {exc}",
                    hint="install the extra that provides it (pip install 'shardeval[...]')",
                ) from exc
            self._factories[name] = factory  # type: ignore[assignment]
            return self._factories[name]
        close = difflib.get_close_matches(name, self.names, n=1)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        raise self._error(
            f"unknown {self.kind} {name!r}{suggestion} (known: {', '.join(self.names)})"
        )

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry in importlib.metadata.entry_points(group=f"shardeval.{self.kind}s"):
            if entry.name not in self._factories and entry.name not in self._lazy:
                self._lazy[entry.name] = entry.value
