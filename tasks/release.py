"""Prefect tasks of the release flow: thin wrappers over synthfactory.release/pipeline.

One task per shard (many samples), never per sample: a task run costs 10-60 ms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.runtime import task_run

from synthfactory import pipeline, release, settings
from synthfactory.recipe import Recipe
from synthfactory.registry import Release
from synthfactory.shards import ShardPlan
from synthfactory.validation import GateResult


@task(name="generate-shard", task_run_name="generate-{plan.name}", retries=3, retry_delay_seconds=1.0)
def generate_shard(recipe: Recipe, plan: ShardPlan, shards_dir: Path, fragments_dir: Path) -> pipeline.ShardResult:
    """Generate and write one shard; the attempt number makes retries visible in metrics."""
    return pipeline.build_shard(recipe, plan, shards_dir, fragments_dir, attempt=task_run.run_count)


@task(name="stage-release")
def stage_release(job: release.ReleaseJob, results: list[pipeline.ShardResult], run: pipeline.RunStats) -> dict[str, Any]:
    return release.stage(job, results, run)


@task(name="validate-release")
def validate_release(job: release.ReleaseJob, metrics: dict[str, Any]) -> GateResult:
    return release.validate(job, metrics)


@task(name="materialize-release")
def materialize_release(job: release.ReleaseJob) -> None:
    release.materialize(job)


@task(name="publish-release")
def publish_release(job: release.ReleaseJob, metrics: dict[str, Any]) -> Release:
    """Not retried as a whole (the push inside is); credentials are resolved here, not
    passed in, because task inputs must never hold secrets."""
    return release.publish(job, settings.resolve_storage(), metrics)
