"""A recipe's plug-ins, built once per process: the generator chain and the checks, with
what the rest of a release asks of them (manifest schema, labels, image size, models)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa

from synthfactory.checks import CHECKS, Check, DatasetCheck
from synthfactory.generators import GENERATORS, Generator
from synthfactory.models import UsesModel
from synthfactory.recipe import Recipe
from synthfactory.sources.base import Origin, Source
from synthfactory.shards import manifest_schema


@dataclass(frozen=True)
class PluginBundle:
    generator: Generator
    checks: tuple[Check, ...]

    @property
    def plugins(self) -> list[Generator | Check]:
        """Every plug-in the recipe runs: the generator chain (upstream included), then the
        checks, then the sources they read."""
        runs = [*self.generator.chain(), *self.checks]
        return [*runs, *(source for plugin in runs for source in plugin.reads())]

    @property
    def dataset_checks(self) -> list[DatasetCheck]:
        return [check for check in self.checks if isinstance(check, DatasetCheck)]

    @cached_property
    def schema(self) -> pa.Schema:
        return manifest_schema(self.generator.columns, *(check.columns for check in self.checks))

    def labels(self) -> tuple[str, ...] | None:
        return self.generator.labels()

    def image_size(self) -> tuple[int, int] | None:
        return self.generator.image_size()

    def planned_rows(self, samples: int) -> int:
        """Samples a release of `samples` slots holds if nothing is rejected."""
        return samples * self.generator.outputs_per_slot()

    def column_minimums(self) -> tuple[tuple[str, float], ...]:
        return tuple((column, minimum) for check in self.checks for column, minimum in check.column_minimums().items())

    def models(self) -> list[tuple[str, str, str]]:
        """(role, id, revision) of every model the recipe runs."""
        return [(p.model_role, p.model.id, p.model.revision) for p in self.plugins if isinstance(p, UsesModel)]

    def origins(self) -> list[Origin]:
        """Where the real data the recipe reads comes from, each source once."""
        return list(dict.fromkeys(p.origin() for p in self.plugins if isinstance(p, Source)))

    def devices(self) -> list[str]:
        """Accelerators the plug-ins run on (empty on CPU)."""
        return sorted({str(p.device) for p in self.plugins if isinstance(p, UsesModel)} - {"cpu"})

    def preflight(self) -> None:
        """Fail fast on inputs that cannot work (missing weights), before any shard runs."""
        for plugin in (self.generator, *self.checks):
            plugin.preflight()


@functools.lru_cache(maxsize=8)
def _bundle(generator: str, checks: str, recipe_dir: Path | None) -> PluginBundle:
    spec = json.loads(generator)
    bundle = PluginBundle(
        GENERATORS.get(spec["kind"]).from_params(spec["params"]),
        tuple(CHECKS.get(c["kind"]).from_params(c["params"]) for c in json.loads(checks)),
    )
    bundle.generator.recipe_dir = recipe_dir  # first: a mix builds its sources and generators with it
    for plugin in (*bundle.generator.chain(), *bundle.checks):
        plugin.recipe_dir = recipe_dir
    return bundle


def plugins_of(recipe: Recipe) -> PluginBundle:
    """The recipe's plug-ins, shared by every shard a worker process runs (models load once)."""
    return _bundle(
        json.dumps(recipe.generator.model_dump(mode="json"), sort_keys=True),
        json.dumps([c.model_dump(mode="json") for c in recipe.checks], sort_keys=True),
        recipe.recipe_dir,
    )
