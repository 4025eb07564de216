"""Which recipes need a new release, for CI: those whose inputs changed.

A recipe's inputs are the recipe itself, the files it reads (concept lists, example
pools: inlined into the resolved recipe) and the code of the plug-ins it uses. Their
content hash (`inputs_fingerprint`) is written into every release's tag; a recipe is
stale when its current fingerprint differs from its latest release's, or when it was
never released. `since` narrows the candidates to recipes whose files changed in git
since a ref (the commits a CI push brought), so CI does not even load the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from synthfactory.recipe import load_recipe
from synthfactory.registry import DataRegistry
from synthfactory.release import code_files, inputs_fingerprint, latest_release_with_inputs
from synthfactory.shard_cache import code_version


@dataclass(frozen=True)
class Decision:
    recipe: Path
    dataset: str
    stale: bool
    reason: str


def recipe_paths(registry: DataRegistry) -> list[Path]:
    return sorted((registry.root / "recipes").glob("*.yaml"))


def dependencies(recipe_path: Path, registry: DataRegistry) -> list[str]:
    """Registry-relative paths of everything the recipe's release depends on."""
    recipe = load_recipe(recipe_path)
    own = [recipe_path.resolve(), *((recipe_path.parent / name).resolve() for name in recipe.input_files())]
    paths = []
    for path in own:
        try:
            paths.append(path.relative_to(registry.root).as_posix())
        except ValueError:
            continue  # outside the registry: only the fingerprint can tell
    return paths + [relative for _, relative in code_files(recipe)]


def changed_since(registry: DataRegistry, ref: str) -> set[str]:
    """Files that differ between `ref` and the working tree (committed or not)."""
    return set(registry.git("diff", "--name-only", ref, "--").split())


def decide(registry: DataRegistry, recipes: list[Path], since: str | None = None) -> list[Decision]:
    changed = changed_since(registry, since) if since else None
    decisions = []
    for path in recipes:
        recipe = load_recipe(path)
        if changed is not None and not changed.intersection(dependencies(path, registry)):
            decisions.append(Decision(path, recipe.name, False, f"no input changed since {since}"))
            continue
        fingerprint = inputs_fingerprint(recipe, code_version(code_files(recipe)))
        releases = registry.releases(recipe.name)
        current = latest_release_with_inputs(registry, recipe.name, fingerprint)
        if not releases:
            decisions.append(Decision(path, recipe.name, True, "never released"))
        elif current is None:
            decisions.append(Decision(path, recipe.name, True, f"inputs differ from {releases[-1].tag}"))
        else:
            decisions.append(Decision(path, recipe.name, False, f"up to date with {current}"))
    return decisions
