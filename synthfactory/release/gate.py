"""The release gate: the Great Expectations suite a recipe implies, and the files that
record its verdict beside the staged release (metrics.json, the dataset card, the
report and the resolved recipe)."""

from __future__ import annotations

import dataclasses
import math

import pyarrow.parquet as pq

from synthfactory.drills import crash_point
from synthfactory.files import atomic_write, atomic_write_json
from synthfactory.recipe import Recipe
from synthfactory.release.bundle import plugins_of
from synthfactory.release.card import render_card
from synthfactory.release.job import ReleaseJob
from synthfactory.release.report import render_report
from synthfactory.release.summary import Staged
from synthfactory.shards import CORE_COLUMNS, read_manifest
from synthfactory.validation import GateResult, GateSpec, ShareRule, quality_row, validate_staged


class GateFailedError(RuntimeError):
    """The validation gate rejected the release; nothing was published."""


def gate_spec(recipe: Recipe) -> GateSpec:
    plugins = plugins_of(recipe)
    planned = plugins.planned_rows(recipe.samples)
    rules = recipe.validation
    labels = plugins.labels()
    return GateSpec(
        expected_rows=(math.ceil(planned * rules.min_accept_rate), planned),
        caption_length=(rules.caption_length.min, rules.caption_length.max),
        image_size=plugins.image_size(),
        label_set=labels,
        shares=tuple(ShareRule(column, tuple(sorted(targets.items())))
                     for column, targets in plugins.generator.target_shares().items()),
        share_significance=rules.share_significance,
        required_columns=tuple(plugins.schema.names),
        nullable_columns=tuple(name for name in plugins.schema.names if name not in CORE_COLUMNS),
        column_minimums=plugins.column_minimums(),
    )


def validate(job: ReleaseJob, staged: Staged) -> GateResult:
    """Run the GX gate on the staged manifest; write metrics (with the verdict), card,
    report and recipe beside it."""
    spec = dataclasses.replace(gate_spec(job.recipe), metric_limits=staged.quality.limits)
    gate = validate_staged(job.stage_dir, spec, job.stage_dir / "validation",
                           quality_row(staged.quality.metrics))
    crash_point("validate")
    metrics = {**staged.metrics,
               "validation": {"success": gate.success, "expectations": len(gate.outcomes), "failed": len(gate.failures)}}
    atomic_write_json(job.stage_dir / "metrics.json", metrics)
    verdict = [f"passed: {len(gate.outcomes)} expectations"] if gate.success else gate.summary().splitlines()
    plugins = job.plugins
    card = render_card(job.recipe, metrics, verdict, job.code_files, job.inputs_fingerprint,
                       plugins.image_size() is not None, plugins.models(), plugins.origins())
    atomic_write(job.stage_dir / "README.md", card)
    render_report(job.stage_dir, job.recipe.name, read_manifest(job.stage_dir),
                  pq.read_table(job.stage_dir / "rejected.parquet"),
                  metrics, staged.quality, verdict)
    atomic_write(job.stage_dir / "recipe.yaml", job.recipe.to_yaml())
    return gate
