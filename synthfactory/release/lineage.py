"""Lineage: which makers produced a release, what they were trained on, and its synthetic
generation depth.

Real data has depth 0. Rows a generator makes have depth 1 + the deepest data its
makers were trained on (as the recipe declares under `lineage.models`; undeclared
makers count as trained on real data), and a mix reusing an earlier release inherits
that release's depth. A model trained on a synthetic release, used to generate the next,
makes depth 2: the loop in which diversity falls generation after generation (model
collapse). So the depth is recorded in metrics.json and the card, the gate warns from
`warn_depth` and refuses beyond `max_depth`, and each parent release's diversity
figures are compared with this one's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from synthfactory.checks.diversity import HIGHER_IS_DIVERSE
from synthfactory.recipe import Lineage, Recipe, RecipeError
from synthfactory.registry import DataRegistry
from synthfactory.release.bundle import PluginBundle
from synthfactory.tags import ReleaseTag

#: the check whose figures are compared along the lineage
DIVERSITY_CHECK = "diversity"


@dataclass(frozen=True)
class LineageRecord:
    depth: int
    makers: list[dict[str, Any]]  # name, trained_on, depth of what it was trained on + 1
    parents: list[dict[str, Any]]  # tag, depth, their diversity figures
    figures: dict[str, float] = field(default_factory=dict)  # depth, diversity_drop (for the gate)
    limits: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_metrics(self) -> dict[str, Any]:
        return {"depth": self.depth, "makers": self.makers, "parents": self.parents}


def trace(
    settings: Lineage,
    makers: list[str],
    reused_releases: list[str],
    release_metrics: Callable[[str], dict[str, Any] | None],
    diversity: dict[str, float] | None,
) -> LineageRecord:
    """The lineage of a release made by `makers` from `reused_releases` (tags of this
    registry); `release_metrics(tag)` reads a release's metrics.json (None: no such tag)."""
    declared = {model.name: model.trained_on for model in settings.models}
    notes: list[str] = []
    unknown = sorted(set(declared) - set(makers))
    if unknown:  # a misspelt name would leave its maker undeclared and max_depth unenforced
        raise LineageError(f"lineage.models: {', '.join(unknown)} is not a maker of this recipe; "
                           f"its makers are {', '.join(dict.fromkeys(makers)) or 'none (real data only)'}")
    parent_tags = sorted({*reused_releases, *(t for name in makers for t in declared.get(name, ()) if ReleaseTag.parse(t))})
    parents = []
    depth_of: dict[str, int] = {}
    for tag in parent_tags:
        metrics = release_metrics(tag)
        if metrics is None:
            raise LineageError(f"lineage: release {tag} (a parent of this release) is not in this registry")
        depth_of[tag] = int((metrics.get("lineage") or {}).get("depth", 1))  # before lineage: one generation
        parents.append({"tag": tag, "depth": depth_of[tag],
                        "diversity": (metrics.get("quality") or {}).get(DIVERSITY_CHECK, {})})
    maker_rows = []
    for name in dict.fromkeys(makers):
        trained_on = declared.get(name, ())
        maker_rows.append({"name": name, "trained_on": list(trained_on),
                           "depth": 1 + max((depth_of.get(t, 0) for t in trained_on), default=0)})
    depth = max([row["depth"] for row in maker_rows] + [depth_of[t] for t in reused_releases], default=0)
    figures: dict[str, float] = {"depth": depth}
    limits: dict[str, tuple[float | None, float | None]] = {}
    if settings.max_depth is not None:
        limits["depth"] = (None, settings.max_depth)
    if settings.warn_depth is not None and depth >= settings.warn_depth:
        notes.append(f"synthetic generation depth {depth} (warn_depth {settings.warn_depth}): makers trained on "
                     "synthetic data; compare its diversity with its parents'")
    drops = [
        (parent["tag"], metric, _drop(metric, before, diversity[metric]))
        for parent in parents for metric, before in parent["diversity"].items()
        if diversity and metric in diversity and isinstance(before, int | float) and before > 0
    ]
    if drops:
        tag, metric, worst = max(drops, key=lambda drop: drop[2])
        figures["diversity_drop"] = round(worst, 4)
        notes.append(f"largest diversity drop along the lineage: {metric} {worst:+.1%} below {tag}"
                     if worst > 0 else "no diversity figure fell below a parent release's")
        if settings.max_diversity_drop is not None:
            limits["diversity_drop"] = (None, settings.max_diversity_drop)
    return LineageRecord(depth, maker_rows, parents, figures, limits, notes)


def trace_lineage(recipe: Recipe, plugins: PluginBundle, registry: DataRegistry,
                  diversity: dict[str, float] | None) -> LineageRecord:
    """The lineage of `recipe`'s release in `registry` (see `trace`)."""
    generator = plugins.generator
    return trace(recipe.lineage, generator.makers(), generator.parent_releases(), registry.release_metrics, diversity)


def _drop(metric: str, before: float, now: float) -> float:
    """How much less diverse `now` is than `before`, as a fraction (negative: more diverse)."""
    return (before - now) / before if metric in HIGHER_IS_DIVERSE else (now - before) / before


class LineageError(RecipeError):
    """A lineage the registry cannot back (a parent release that does not exist)."""
