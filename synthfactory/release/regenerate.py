"""Which recipes need a new release, for CI: those whose inputs changed.

A recipe's inputs are the recipe itself, the files it reads (concept lists, example
pools: inlined into the resolved recipe) and the code of the plug-ins it uses. Their
content hash (`inputs_fingerprint`) is written into every release's tag; a recipe is
stale when its current fingerprint differs from its latest release's, or when it was
never released. `since` narrows the candidates to recipes whose files changed in git
since a ref (the commits a CI push brought), so CI does not even load the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from synthfactory.recipe import Recipe, load_recipe
from synthfactory.registry import DataRegistry, RegistryError
from synthfactory.release.bundle import plugins_of
from synthfactory.release.fingerprint import CodeFile, code_files, code_version, inputs_fingerprint
from synthfactory.release.job import latest_release_with_inputs, recipe_locations


@dataclass(frozen=True)
class Decision:
    recipe: Path
    dataset: str
    stale: bool
    reason: str


def recipe_paths(registry: DataRegistry) -> list[Path]:
    return sorted((registry.root / "recipes").glob("*.yaml"))


def dependencies(recipe: Recipe, recipe_path: Path, registry: DataRegistry, code: Sequence[CodeFile]) -> list[str]:
    """Registry paths of everything the recipe's release depends on (the dvc.yaml deps)."""
    recipe_file, inputs = recipe_locations(recipe, recipe_path.resolve(), registry)
    return [recipe_file, *(relative for _, relative in inputs), *(relative for _, relative in code)]


def changed_since(registry: DataRegistry, ref: str) -> set[str]:
    """Files that differ between `ref` and the working tree (committed or not). `ref` is
    resolved to a commit first and passed after --end-of-options, so a ref like
    `--output=FILE` stays a ref; names come NUL-separated, unquoted (spaces, non-ASCII)."""
    try:
        commit = registry.git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}").strip()
    except RegistryError:
        raise RegistryError(f"--since {ref!r}: not a commit in {registry.root}") from None
    return {name for name in registry.git("diff", "-z", "--name-only", "--end-of-options", commit, "--").split("\0") if name}


def decide(registry: DataRegistry, recipes: list[Path], since: str | None = None) -> list[Decision]:
    changed = changed_since(registry, since) if since else None
    decisions = []
    for path in recipes:
        recipe = load_recipe(path)
        code = code_files(plugins_of(recipe).plugins)
        if changed is not None and not changed.intersection(dependencies(recipe, path, registry, code)):
            decisions.append(Decision(path, recipe.name, False, f"no input changed since {since}"))
            continue
        latest = registry.latest_tag(recipe.name)
        if latest is None:
            decisions.append(Decision(path, recipe.name, True, "never released"))
        elif latest_release_with_inputs(registry, recipe.name, inputs_fingerprint(recipe, code_version(code))) is None:
            decisions.append(Decision(path, recipe.name, True, f"inputs differ from {latest}"))
        else:
            decisions.append(Decision(path, recipe.name, False, f"up to date with {latest}"))
    return decisions
