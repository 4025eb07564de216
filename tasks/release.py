"""Prefect tasks that turn generated shards into a release: thin wrappers over
synthfactory.release. They run in the flow's process (called, not submitted)."""

from __future__ import annotations

from typing import Any

from prefect import task

from synthfactory import pipeline, release, settings
from synthfactory.registry import Release
from synthfactory.validation import GateResult


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
