"""One registry per kind of plug-in (generator, check, store).

A plug-in registers itself under a short name with a decorator; recipes refer to it by
that name. Unknown names fail with the list of known ones, so a typo in a recipe is a
one-line fix.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from types import ModuleType
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownPluginError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> plug-in class, filled by `register` decorators at import time."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self._package = package  # modules in it are imported on first lookup
        self._discovered = package is None
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            existing = self._entries.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing.__module__}")
            self._entries[name] = cls
            cls.plugin_name = name  # type: ignore[attr-defined]  # so an instance knows its recipe name
            return cls

        return decorate

    def get(self, name: str) -> type[T]:
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownPluginError(f"unknown {self.kind} {name!r}; available: {known}") from None

    def _discover(self) -> None:
        """Import every module of the plug-in package, so a new plug-in is one new file."""
        if self._discovered:
            return
        self._discovered = True
        package: ModuleType = importlib.import_module(self._package)  # type: ignore[arg-type]
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{module.name}")
