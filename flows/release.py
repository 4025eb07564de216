"""The release flow: plan shards -> generate in parallel -> stage -> validate -> publish.

The flow only sequences tasks; every step is a plain function in synthfactory.release.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner

from synthfactory import pipeline, release, settings
from synthfactory.models import ModelError
from synthfactory.progress import ShardProgress
from synthfactory.validation import prefetch_gx
from tasks.generate import generate_shard
from tasks.release import materialize_release, publish_release, stage_release, validate_release

settings.apply_offline_defaults()


def _run_name() -> str:
    """'release-shapes' rather than the recipe's full path, in the Prefect UI."""
    from prefect.runtime import flow_run

    return f"release-{Path(flow_run.parameters['recipe_path']).stem}"


@flow(name="release", flow_run_name=_run_name, task_runner=ProcessPoolTaskRunner())
def release_flow(
    recipe_path: str,
    registry: str | None = None,
    samples: int | None = None,
    seed: int | None = None,
    publish: bool = True,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Turn a recipe into a gated release in `registry` (tagged and pushed when `publish`).

    `registry` defaults to $SYNTHFACTORY_REGISTRY, else the working directory (a
    deployment's checkout). `overrides` are `FIELD.PATH=VALUE` edits of the recipe, as
    `synthfactory run --set`.
    """
    job = release.prepare(recipe_path, registry or settings.default_registry(), samples=samples, seed=seed, publish=publish, overrides=overrides or ())
    prefetch_gx()  # the ~4 s import overlaps generation

    execution = job.recipe.execution
    generate = generate_shard.with_options(retries=execution.retries, retry_delay_seconds=execution.retry_delays())
    started = time.perf_counter()
    futures = {generate.submit(job.recipe, plan, job.stage_dir, job.fragments_dir): plan for plan in job.plans()}
    results = []
    with ShardProgress(job.recipe.name, len(futures)) as progress:
        for future in as_completed(list(futures)):
            try:
                result = future.result()
            except Exception as exc:
                attempts = "(not retried)" if isinstance(exc, ModelError) else f"after {execution.retries + 1} attempts"
                raise release.ShardFailedError(
                    f"shard {futures[future].name} failed {attempts}: "
                    f"{type(exc).__name__}: {exc} (finished shards stay in {job.work_dir})"
                ) from exc
            results.append(result)
            progress.shard_done(result.samples)
    run = pipeline.RunStats(
        seconds=round(time.perf_counter() - started, 3),
        retries=sum(r.attempt - 1 for r in results),
    )

    metrics = stage_release(job, results, run)
    gate = validate_release(job, metrics)
    if not gate.success:
        raise release.GateFailedError(
            f"validation gate failed for {job.recipe.name}; nothing was published "
            f"(report: {job.stage_dir / 'validation' / 'index.html'})\n{gate.summary()}"
        )
    summary: dict[str, Any] = {
        "dataset": job.recipe.name,
        "registry": str(job.registry.root),
        "release_dir": str(job.release_dir),
        "samples": metrics["samples"],
        "rejected": metrics["rejected"],
        "retries": run.retries,
        "samples_per_s": metrics["run"]["samples_per_s"],
        "tag": None,
    }
    if publish:
        published = publish_release(job, metrics)
        summary.update(tag=published.tag, commit=published.commit)
    else:
        materialize_release(job)
    return summary


def run_release(
    recipe_path: str,
    registry: str = ".",
    samples: int | None = None,
    seed: int | None = None,
    publish: bool = True,
    workers: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Check the inputs, then run the flow with a process pool sized from `workers` (or
    the recipe, or the CPU count). Bad input fails here, before Prefect starts."""
    recipe, _ = release.preflight(recipe_path, registry, samples, seed, publish, overrides or ())
    workers = workers or recipe.execution.workers
    runner = ProcessPoolTaskRunner(max_workers=workers) if workers else ProcessPoolTaskRunner()
    with prefect_api():
        return release_flow.with_options(task_runner=runner)(
            recipe_path=recipe_path, registry=registry, samples=samples, seed=seed, publish=publish, overrides=overrides
        )


@contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured Prefect API, or one local temporary server for the whole run.

    Without this, each task-pool process would start its own temporary server (seconds
    each) instead of reporting to the flow's.
    """
    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # stopped at exit, after Prefect has flushed its logs and events
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield
