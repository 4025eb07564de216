"""The one fingerprint of what a release's bytes depend on: the recipe and the code.

Three things hash it. A shard's cache key (so a rerun reuses exactly the shards whose
inputs are unchanged), the dvc.yaml stage's deps (so `dvc status` sees a change), and
the inputs fingerprint written into each release's tag (so `regenerate` releases only
what changed). The code is declared, not guessed: a plug-in lists the modules besides
its own whose code shapes its output (`code`), and every release depends on the sample
and shard format and on the shard builder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from synthfactory.recipe import Recipe
from synthfactory.shards import ShardPlan

#: recipe fields that change how a run executes or is accounted, never the bytes it makes
RUN_SETTINGS = ("execution", "faults", "cost", "budget_usd")
#: code every release's bytes depend on, whatever its plug-ins
FORMAT_CODE = ("synthfactory.samples", "synthfactory.shards", "synthfactory.release.build")

CodeFile = tuple[Path, str]  # (source file, its path inside a registry)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def recipe_digest(recipe: Recipe, *, exclude: Sequence[str] = RUN_SETTINGS) -> str:
    """Hash of the resolved recipe (every default spelled out, input files inlined) without `exclude`."""
    content = recipe.model_dump(mode="json", exclude=set(exclude))
    return _sha256(json.dumps(content, sort_keys=True, separators=(",", ":")))


def code_modules(plugins: Iterable[object]) -> list[str]:
    """Module names of the code that shapes the bytes of a release made by `plugins`."""
    names = set(FORMAT_CODE)
    for plugin in plugins:
        names.add(type(plugin).__module__)
        names.update(getattr(plugin, "code", ()))
    return sorted(names)


def code_files(plugins: Iterable[object]) -> tuple[CodeFile, ...]:
    """(source file, path relative to its top-level package's parent) of every code module."""
    files = []
    for name in code_modules(plugins):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"declared code module {name!r} cannot be found")
        source = Path(spec.origin).resolve()
        top = importlib.util.find_spec(name.split(".")[0])
        package_root = Path(top.origin).resolve().parent.parent  # type: ignore[union-attr,arg-type]
        files.append((source, source.relative_to(package_root).as_posix()))
    return tuple(files)


def code_version(files: Iterable[CodeFile]) -> str:
    """Hash of the code files' contents and their paths."""
    digest = hashlib.sha256()
    for source, relative in sorted(files, key=lambda pair: pair[1]):
        digest.update(relative.encode() + b"\0" + hashlib.sha256(Path(source).read_bytes()).digest())
    return digest.hexdigest()


def shard_keys(recipe: Recipe, code: str, plans: Iterable[ShardPlan]) -> list[str]:
    """Each shard's cache key. The sample count only decides how many shards there are, so
    it is left out: a recipe that appends samples keeps the keys of its full shards."""
    content = recipe_digest(recipe, exclude=("samples", *RUN_SETTINGS))
    return [_sha256(f"{content}:{code}:{plan.index}:{plan.start}:{plan.stop}") for plan in plans]


def inputs_fingerprint(recipe: Recipe, code: str) -> str:
    """Hash of everything a release's bytes depend on: equal fingerprints need no new release."""
    return _sha256(f"{recipe_digest(recipe)}:{code}")
