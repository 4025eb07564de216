"""Prefect tasks that turn generated shards into a release: thin wrappers over the steps
in synthfactory.release. They run in the flow's process (called, not submitted)."""

from __future__ import annotations

from prefect import task

from synthfactory import settings
from synthfactory.registry import Release
from synthfactory.release import gate, links, publish, stage
from synthfactory.release.build import ShardResult
from synthfactory.release.job import ReleaseJob
from synthfactory.release.summary import RunStats, Staged
from synthfactory.validation import GateResult


@task(name="stage-release")
def stage_release(job: ReleaseJob, results: list[ShardResult], run: RunStats) -> Staged:
    return stage.stage(job, results, run)


@task(name="validate-release")
def validate_release(job: ReleaseJob, staged: Staged) -> GateResult:
    return gate.validate(job, staged)


@task(name="materialize-release")
def materialize_release(job: ReleaseJob) -> None:
    publish.materialize(job)


@task(name="publish-release")
def publish_release(job: ReleaseJob, staged: Staged) -> Release:
    """Not retried as a whole (the push inside is); credentials are resolved here, not
    passed in, because task inputs must never hold secrets."""
    return publish.publish(job, settings.resolve_storage(), staged.metrics)


@task(name="share-report")
def share_report(job: ReleaseJob) -> links.SharedLink:
    """A browser link to the pushed release's HTML report (credentials resolved here)."""
    return links.share_file(settings.resolve_storage(), job.release_dir / "report" / "index.html", "text/html; charset=utf-8")
