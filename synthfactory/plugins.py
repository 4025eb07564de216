"""One registry per kind of plug-in (generator, check, source, store).

A plug-in registers itself under a short name with a decorator; recipes refer to it by
that name. The factory's own plug-ins are the modules of one package (a new one is one
new file); another installed package adds its own through an entry point in the
registry's group (``[project.entry-points."synthfactory.generators"]``), so users extend
the factory without forking it. Unknown names fail with the list of known ones, so a
typo in a recipe is a one-line fix.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from abc import ABC
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")
#: key of the pydantic validation context that holds the recipe's directory
RECIPE_DIR = "recipe_dir"


class PluginParams(BaseModel):
    """Base of every plug-in's params model: unknown keys are recipe errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin(ABC):
    """What every plug-in has: params, its registry name, a version, the code its output
    depends on, and the manifest columns it contributes."""

    Params: ClassVar[type[PluginParams]]
    #: the name the plug-in is registered under (set by `Registry.register`)
    plugin_name: ClassVar[str]
    #: bump when the output for the same params and seed changes
    version: ClassVar[str]
    #: modules besides the plug-in's own whose code shapes its output; hashed into every
    #: shard's cache key, the release's dvc.yaml deps and its inputs fingerprint
    code: ClassVar[tuple[str, ...]] = ()
    #: manifest columns the plug-in contributes and their Arrow types (fixed schema = stable bytes)
    columns: ClassVar[dict[str, pa.DataType]] = {}

    #: the directory of the recipe the plug-in was built from: relative data paths in its
    #: params (a real-data source) resolve against it; None outside a recipe (cwd)
    recipe_dir: Path | None = None

    def __init__(self, params: PluginParams) -> None:
        self.params = params

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Any:
        """Build from already-resolved params (as stored in a loaded recipe)."""
        return cls(cls.Params.model_validate(params))

    def preflight(self) -> None:
        """Fail fast, before any shard runs, on inputs that cannot work (missing model weights)."""

    def reads(self) -> list["Plugin"]:
        """The real-data sources the plug-in reads: their code shapes its output too."""
        return []


class PluginSpec(BaseModel):
    """A plug-in as a recipe names it: registry name + params (validated by the plug-in)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class UnknownPluginError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> plug-in class, filled by `register` decorators when the modules are imported."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package  # its modules are imported on first lookup
        self.entry_point_group = package  # e.g. synthfactory.generators
        self._discovered = False
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

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def _discover(self) -> None:
        """Import every module of the plug-in package, then every entry point of the group
        (each names a module whose import registers its plug-ins)."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{module.name}")
        for entry_point in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                entry_point.load()
            except Exception as exc:  # a broken third-party plug-in must say which one it is
                raise ImportError(
                    f"{self.kind} plug-in entry point {entry_point.name!r} ({entry_point.value}) failed to load: {exc}"
                ) from exc
