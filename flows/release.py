"""The release flow: plan shards -> generate in parallel -> stage -> validate -> publish.

The flow only sequences tasks; every step is a plain function in synthfactory.release.
Shard generation is a subflow whose task runner comes from the recipe's `execution`
(process pool, threads, or Dask), so the same deployment can fan out locally or over a
cluster without a code change.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from synthfactory import pipeline, release, settings
from synthfactory.live import FeedWriter
from synthfactory.models import ModelError
from synthfactory.progress import ShardProgress
from synthfactory.recipe import Execution
from synthfactory.report import run_markdown
from synthfactory.shards import SHARDS_DIR
from synthfactory.validation import prefetch_gx
from tasks.generate import generate_shard
from tasks.release import materialize_release, publish_release, stage_release, validate_release

settings.apply_offline_defaults()

#: poll interval while back-pressure holds generation for a slow live reader
READER_POLL_S = 0.5


def _run_name() -> str:
    """'release-shapes' rather than the recipe's full path, in the Prefect UI."""
    from prefect.runtime import flow_run

    return f"release-{Path(flow_run.parameters['recipe_path']).stem}"


def task_runner_for(execution: Execution) -> TaskRunner:
    """The recipe's choice of where shards run. Models load once per worker process
    (plug-ins are cached per process), whichever runner it is."""
    if execution.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if execution.dask_address:
            return DaskTaskRunner(address=execution.dask_address)
        workers = execution.workers or os.cpu_count() or 1
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        })
    if execution.runner == "thread":
        return ThreadPoolTaskRunner(max_workers=execution.workers)
    return ProcessPoolTaskRunner(max_workers=execution.workers)


@flow(name="generate-shards", flow_run_name="generate-{job.recipe.name}")
def generate_shards(job: release.ReleaseJob, execution: Execution) -> list[pipeline.ShardResult]:
    """Fan the shards out over the task runner (all at once, or, while a live reader lags
    by `max_unread_shards`, no more than it can take); each finished shard is announced
    on the live feed at once. Shards the cache already holds return at once."""
    generate = generate_shard.with_options(retries=execution.retries, retry_delay_seconds=execution.retry_delays())
    pending = deque(job.shard_keys)
    labels = pipeline.generator_for(job.recipe).labels()
    feed = FeedWriter(job.registry.root, job.recipe.name, len(pending), execution.max_unread_shards,
                      list(labels) if labels else None)
    progress_id = create_progress_artifact(
        0.0, key=f"{_artifact_key(job)}-progress", description=f"shards of {job.recipe.name} finished (%)"
    )
    in_flight: dict[Any, Any] = {}
    results: list[pipeline.ShardResult] = []
    try:
        with ShardProgress(job.recipe.name, len(pending)) as progress:
            while pending or in_flight:
                while pending and not feed.must_wait(len(in_flight)):
                    plan, key = pending.popleft()
                    in_flight[generate.submit(job.recipe, plan, job.cache, key)] = plan
                if not in_flight:
                    time.sleep(READER_POLL_S)
                    continue
                future = next(as_completed(list(in_flight)))
                plan = in_flight.pop(future)
                try:
                    result = future.result()
                except Exception as exc:
                    attempts = "(not retried)" if isinstance(exc, ModelError) else f"after {execution.retries + 1} attempts"
                    raise release.ShardFailedError(
                        f"shard {plan.name} failed {attempts}: {type(exc).__name__}: {exc} "
                        f"(finished shards are kept in {job.cache.root}; a rerun reuses them)"
                    ) from exc
                results.append(result)
                feed.shard_ready(result.name, job.cache.entry(result.key) / SHARDS_DIR / result.name, result.samples)
                progress.shard_done(result.samples)
                update_progress_artifact(progress_id, 100.0 * len(results) / feed.feed.total_shards)
    except BaseException as exc:
        feed.close("failed", f"{type(exc).__name__}: {exc}")
        raise
    feed.close("finished")
    return results


def _artifact_key(job: release.ReleaseJob) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "release-" + job.recipe.name.replace("_", "-")


@flow(name="release", flow_run_name=_run_name)
def release_flow(
    recipe_path: str,
    registry: str | None = None,
    samples: int | None = None,
    seed: int | None = None,
    publish: bool = True,
    overrides: list[str] | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
    only_if_changed: bool = False,
) -> dict[str, Any]:
    """Turn a recipe into a gated release in `registry` (tagged and pushed when `publish`).

    `registry` defaults to $SYNTHFACTORY_REGISTRY, else the working directory (a
    deployment's checkout). `overrides` are `FIELD.PATH=VALUE` edits of the recipe, as
    `synthfactory run --set`. `workers` and `dask_address` (an existing Dask scheduler,
    e.g. tcp://10.0.0.5:8786) change where shards run, not what they hold.
    `only_if_changed` skips the run when the latest release already has these inputs
    (a schedule then tags only real changes).
    """
    job = release.prepare(recipe_path, registry or settings.default_registry(), samples=samples, seed=seed,
                          publish=publish, overrides=overrides or ())
    if only_if_changed and (current := release.latest_release_with_inputs(job.registry, job.recipe.name, job.inputs_fingerprint)):
        release.discard(job)
        return {"dataset": job.recipe.name, "tag": current, "up_to_date": True}
    prefetch_gx()  # the ~4 s import overlaps generation
    execution = release.execution_for(job.recipe, workers, dask_address)

    timings: dict[str, float] = {}
    started = time.perf_counter()
    results = generate_shards.with_options(task_runner=task_runner_for(execution))(job, execution)
    run = pipeline.RunStats.of(results, time.perf_counter() - started)
    timings["generate"] = run.seconds

    with _timed(timings, "stage"):
        metrics = stage_release(job, results, run)
    with _timed(timings, "validate"):
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
        "rejected_by": metrics["rejected_by"],
        "retries": run.retries,
        "shards_generated": run.shards_generated,
        "shards_reused": run.shards_reused,
        "samples_per_s": metrics["run"]["samples_per_s"],
        "tag": None,
    }
    with _timed(timings, "publish" if publish else "materialize"):
        if publish:
            published = publish_release(job, metrics)
            summary.update(tag=published.tag, commit=published.commit, push_retries=published.push_retries)
        else:
            materialize_release(job)
    summary["stage_seconds"] = timings
    create_markdown_artifact(
        run_markdown(summary, run), key=_artifact_key(job),
        description=f"{summary['tag'] or job.recipe.name + ' (not published)'}: what the run did",
    )
    create_link_artifact(
        f"file://{job.release_dir / 'report' / 'index.html'}", link_text=f"{summary['tag'] or job.recipe.name} report",
        key=f"{_artifact_key(job)}-report",
    )
    return summary


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - started, 3)


def run_release(
    recipe_path: str,
    registry: str = ".",
    samples: int | None = None,
    seed: int | None = None,
    publish: bool = True,
    workers: int | None = None,
    overrides: list[str] | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Check the inputs, then run the flow (on the configured Prefect API, else a local
    temporary one). Bad input fails here, before Prefect starts."""
    recipe, _ = release.preflight(recipe_path, registry, samples, seed, publish, overrides or ())
    release.execution_for(recipe, workers, dask_address)
    with prefect_api():
        return release_flow(
            recipe_path=recipe_path, registry=registry, samples=samples, seed=seed, publish=publish,
            overrides=overrides, workers=workers, dask_address=dask_address,
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
