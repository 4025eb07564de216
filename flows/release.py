"""The release flow: plan shards -> generate in parallel -> stage -> validate -> publish.

The flow only sequences tasks; every step is a plain function in synthfactory.release.
Shard generation is a subflow whose task runner comes from the recipe's `execution`
(process pool, threads, or Dask), so the same deployment can fan out locally or over a
cluster without a code change.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, NoReturn

from prefect import flow, get_run_logger
from pydantic import Field
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import refresh_global_settings_context
from prefect.exceptions import CancelledRun, FailedRun
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import ThreadPoolTaskRunner

from synthfactory import settings
from synthfactory.live import FeedWriter
from synthfactory.local_api import ensure_local_api, ui_url
from synthfactory.models import ModelError
from synthfactory.progress import ShardProgress
from synthfactory.recipe import DASK_ADDRESS_PATTERN, MAX_SAMPLES, MAX_SEED, MAX_WORKERS, RecipeError
from synthfactory.registry import RegistryError
from synthfactory.release.build import ShardFailedError, ShardResult
from synthfactory.release.early_push import EarlyPush
from synthfactory.release.cost import BudgetExceededError, describe_usage, shards_cost
from synthfactory.release.gate import GateFailedError
from synthfactory.release.links import browser_link, keep_failed_report
from synthfactory.release.job import (
    ReleaseJob, ReleaseRequest, discard, latest_release_with_inputs, prepare, prepare_started, release_locks,
)
from synthfactory.release.report import gate_failure_markdown, run_markdown, skip_markdown
from synthfactory.release.summary import RunStats, RunSummary
from synthfactory.release import workers as shard_workers
from synthfactory.release.workers import ShardWorkers
from synthfactory.storage import StorageError
from synthfactory.validation import GateResult, prefetch_gx
from tasks.generate import generate_shard
from tasks.release import materialize_release, publish_release, share_report, stage_release, validate_release

settings.apply_offline_defaults()
logger = logging.getLogger("synthfactory.flows")

#: failures a user fixes from the message alone (bad input, a failed gate, storage, a
#: shard that kept failing): logged as one line, never with a traceback
EXPECTED_ERRORS = (RecipeError, ModelError, StorageError, RegistryError, GateFailedError, ShardFailedError,
                   BudgetExceededError)


def _failure(record: logging.LogRecord) -> BaseException | None:
    return record.exc_info[1] if record.exc_info else None


def _one_line(record: logging.LogRecord, error: BaseException) -> None:
    record.exc_info, record.exc_text = None, None
    record.msg, record.args = "%s: %s", (type(error).__name__, error)
    record.expected_failure = isinstance(error, EXPECTED_ERRORS)


class OneLineErrors(logging.Filter):
    """An expected failure is logged once, as its message: no traceback, and not again when
    Prefect re-raises the failed state ("Engine execution exited ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = _failure(record)
        if isinstance(error, (FailedRun, CancelledRun)):
            return False
        if isinstance(error, EXPECTED_ERRORS):
            if str(record.msg).startswith("Engine execution exited"):
                return False
            _one_line(record, error)
        return True


class NoConsoleTracebacks(logging.Filter):
    """For the terminal of `synthfactory run` (without --debug): the command prints an
    expected failure itself, and any other error without its traceback (the run's logs
    in the Prefect UI keep it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = _failure(record)
        if isinstance(error, EXPECTED_ERRORS) or getattr(record, "expected_failure", False):
            return False
        if error is not None:
            _one_line(record, error)
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(OneLineErrors())


def quiet_console() -> None:
    """No tracebacks in the terminal; see `NoConsoleTracebacks`."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, NoConsoleTracebacks) for f in handler.filters):
            handler.addFilter(NoConsoleTracebacks())

#: poll interval while back-pressure holds generation for a slow live reader
READER_POLL_S = 0.5
#: a job the caller already prepared for the flow it is about to run (the CLI checks its
#: inputs before Prefect starts; the flow then does not check them again)
_PREPARED: ContextVar[ReleaseJob | None] = ContextVar("prepared_release_job", default=None)


def _prepared_job(request: ReleaseRequest) -> ReleaseJob:
    """The job the caller prepared for this request, else a fresh one. A function of the
    module (not the ContextVar itself in the flow body): a process pool pickles the flow
    function by value, with the globals it names, and a ContextVar cannot be pickled."""
    prepared = _PREPARED.get()
    return prepared if prepared is not None and prepared.request == request else prepare(request)


#: the shape of the names Prefect and its UI's Custom-run form make up: adjective-animal
#: ("crimson-okapi"; the form's are capitalised, "Handmade-Dunker")
_GENERATED_NAME = re.compile(r"[a-z]+-[a-z]+|[A-Z][a-z]+-[A-Z][a-z]+")


def _run_name() -> str:
    """'release-shapes' rather than a made-up name, until the run ends and says what it
    made (`_name_run`); a name the user typed (not adjective-animal) is kept."""
    from prefect.runtime import flow_run

    if flow_run.name and not _GENERATED_NAME.fullmatch(flow_run.name):
        return flow_run.name
    return _start_name(flow_run.parameters["recipe_path"])


def _start_name(recipe_path: str) -> str:
    return f"release-{Path(recipe_path).stem}"


def _name_run(name: str) -> None:
    """Rename the run to tell its outcome in the runs list (a user's own name stays)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.name != _start_name(flow_run.parameters["recipe_path"]):
        return
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_name(flow_run.id, name)
    except Exception as exc:  # the name is a courtesy: never fail a release over it
        get_run_logger().warning("could not rename the run to %r: %s", name, exc)


def _say(message: str, *args: Any) -> None:
    """One line of the release's story, in the run's logs (the UI) and the terminal."""
    get_run_logger().info(message, *args)


def generate_shards(job: ReleaseJob, workers: ShardWorkers, early_push: EarlyPush | None = None) -> list[ShardResult]:
    """Fan the shards out over `workers` (all at once, or, while a live reader lags by
    `max_unread_shards`, no more than it can take); each finished shard is announced on
    the live feed at once. Shards the cache already holds return at once. The shard
    tasks are the release run's own threads, so the UI shows them (and the progress) on
    it; each finished shard costs the flow host the same whatever the shard count, and
    a publishing run pushes it to the remote at once (`early_push`)."""
    execution = job.execution
    generate = generate_shard.with_options(retries=execution.retries, retry_delay_seconds=execution.retry_delays())
    pending = deque(job.shard_keys)
    labels = job.plugins.labels()
    feed = FeedWriter(job.registry.root, job.recipe.name, len(pending), execution.max_unread_shards,
                      list(labels) if labels else None)
    progress_id = create_progress_artifact(
        0.0, key=f"{_artifact_key(job)}-progress", description=f"shards of {job.recipe.name} finished (%)"
    )
    finished: queue.SimpleQueue[Any] = queue.SimpleQueue()
    in_flight: dict[Any, Any] = {}
    results: list[ShardResult] = []
    try:
        with ThreadPoolTaskRunner(max_workers=workers.in_flight) as runner, \
                ShardProgress(job.recipe.name, len(pending)) as progress:
            while pending or in_flight:
                while pending and not feed.must_wait(len(in_flight)):
                    plan, key = pending.popleft()
                    parameters = {"workers": workers, "recipe": job.recipe, "plan": plan, "cache": job.cache, "key": key}
                    future = runner.submit(generate, parameters)
                    in_flight[future] = plan
                    future.add_done_callback(finished.put)
                if not in_flight:
                    time.sleep(READER_POLL_S)
                    continue
                future = finished.get()
                plan = in_flight.pop(future)
                try:
                    result = future.result()
                except Exception as exc:
                    attempts = "(not retried)" if isinstance(exc, ModelError) else f"after {execution.retries + 1} attempts"
                    raise ShardFailedError(
                        f"shard {plan.name} failed {attempts}: {type(exc).__name__}: {exc} "
                        f"(finished shards are kept in {job.cache.root}; a rerun reuses them)"
                    ) from exc
                results.append(result)
                _within_budget(job, results)
                shard, manifest = job.cache.shard_files(result.key, result.name)
                feed.shard_ready(result.name, shard, result.samples, manifest)
                if early_push is not None:
                    early_push.shard_ready(shard, manifest)
                progress.shard_done(result.samples)
                update_progress_artifact(progress_id, 100.0 * len(results) / feed.feed.total_shards)
    except BaseException as exc:
        feed.close("failed", f"{type(exc).__name__}: {exc}")
        raise
    feed.close("finished")
    return results


def _within_budget(job: ReleaseJob, results: list[ShardResult]) -> None:
    """Stop generating once the shards made so far cost the recipe's budget_usd; they stay
    in the shard cache (shards in flight finish there too), so a rerun with a higher
    budget pays only for the rest."""
    budget = job.recipe.budget_usd
    if budget is None or len(results) == len(job.shard_keys):  # all made: nothing left to stop
        return
    spent = shards_cost(job.recipe.cost, results)["total"]
    if spent >= budget:
        raise BudgetExceededError(
            f"budget_usd {budget:g} reached: the {len(results)} of {job.recipe.shard_count} shards made so far cost "
            f"${spent:.4f}; they are kept in {job.cache.root} (raise budget_usd and rerun to make the rest)"
        )


def _artifact_key(job: ReleaseJob) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "release-" + job.recipe.name.replace("_", "-")


# The parameters' bounds and shapes go into the deployment's schema: the UI's form and the
# Prefect server refuse a bad value when the run is submitted, before any worker starts;
# what only the recipe can tell (an override naming no field) fails at the run's start.
# The path and override shapes are in the schema only: `synthfactory run` may name a
# recipe anywhere, and `prepare` checks overrides itself.
RecipePath = Annotated[str, Field(max_length=500, json_schema_extra={"pattern": r"^[\w@+-][\w.@+-]*(/[\w@+-][\w.@+-]*)*\.ya?ml$"})]
Override = Annotated[str, Field(max_length=4000, json_schema_extra={"pattern": r"^[A-Za-z_][\w-]*(\.[\w-]+)*="})]
DaskAddress = Annotated[str, Field(max_length=500, json_schema_extra={"pattern": DASK_ADDRESS_PATTERN})]


@flow(name="release", flow_run_name=_run_name)
def release_flow(
    recipe_path: RecipePath,
    registry: Annotated[str, Field(min_length=1, max_length=1000)] | None = None,
    samples: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] | None = None,
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None,
    publish: bool = True,
    overrides: Annotated[list[Override], Field(max_length=100)] | None = None,
    workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] | None = None,
    dask_address: DaskAddress | None = None,
    force: bool = False,
) -> RunSummary:
    """Turn a recipe into a gated release in `registry` (tagged and pushed when `publish`).

    A publishing run whose inputs (recipe, files it reads, plug-in code) equal the
    latest release's reports that release as current and tags nothing new, unless
    `force`: a schedule tags only real changes, and a rerun after a crash past the tag
    does not publish a duplicate. (The Args below are the Prefect UI's form help.)

    Args:
        recipe_path: The recipe YAML, relative to the checkout (no ".." or leading "/"),
            e.g. recipes/shapes.yaml.
        registry: The git + DVC data registry to release into; empty: $SYNTHFACTORY_REGISTRY,
            else the checkout the worker runs in.
        samples: How many samples to generate; empty: the recipe's `samples`.
        seed: The master seed (every sample's seed derives from it); empty: the recipe's.
        publish: Commit, tag and push the release; off: write it to data/<dataset>/ only.
        overrides: Recipe edits as FIELD.PATH=VALUE (YAML values), e.g.
            generator.params.image_size=32, as `synthfactory run --set`.
        workers: Parallel shard workers; empty: the recipe's execution.workers.
        dask_address: An existing Dask scheduler to run shards on, e.g. tls://10.0.0.5:8786;
            empty: the recipe's runner.
        force: Release even when the inputs equal the latest release's (otherwise that
            release is reported as current and nothing is tagged).
    """
    job = None
    try:
        job = _prepared_job(ReleaseRequest(
            _confined(recipe_path, overrides), registry or settings.default_registry(), samples, seed, publish,
            tuple(overrides or ()), workers, dask_address, force,
        ))
        summary = _release(job)
    except BaseException:
        _name_run(f"{job.recipe.name if job else Path(recipe_path).stem}: failed")
        raise
    finally:
        if job is not None:
            release_locks(job)
    _name_run(summary.run_name())
    return summary


def _confined(recipe_path: str, overrides: list[str] | None = None) -> str:
    """A deployment run (parameters from the UI or API, untrusted) reads recipes inside its
    checkout only, and may not edit a served model's endpoint: pointed elsewhere, the
    worker would send the key it names (any variable in its environment) to that URL. A
    run started here by `synthfactory run` may name any file and edit anything."""
    from prefect.runtime import deployment

    if deployment.id is None:
        return recipe_path
    checkout = Path.cwd().resolve()
    if Path(recipe_path).is_absolute() or not (checkout / recipe_path).resolve().is_relative_to(checkout):
        raise RecipeError(f"recipe_path {recipe_path!r}: a deployment run reads recipes inside its checkout only")
    for override in overrides or ():
        if "backend" in override.split("=", 1)[0].split("."):
            raise RecipeError(f"override {override.split('=', 1)[0]!r}: a deployment run cannot change where a model "
                              "is served (edit the recipe in the checkout instead)")
    return recipe_path


def _release(job: ReleaseJob) -> RunSummary:
    """The flow's steps, for a prepared job (which holds its dataset's run lock)."""
    publish, force = job.request.publish, job.request.force
    summary = RunSummary(job.recipe.name, str(job.registry.root), str(job.release_dir), store=job.store)
    if publish and not force and (current := latest_release_with_inputs(job.registry, job.recipe.name, job.inputs_fingerprint)):
        discard(job)
        summary.tag, summary.up_to_date = current, True
        _say("skipped: %s is current (made from these inputs: recipe, files it reads, plug-in code); "
             "nothing new generated or tagged (force=True releases again)", current)
        create_markdown_artifact(skip_markdown(summary), key=_artifact_key(job), description=f"skipped: {current} is current")
        return summary
    prefetch_gx()  # the gate process imports GX on another core while the shards generate

    started = time.perf_counter()
    early_push = EarlyPush(settings.resolve_storage()) if publish else None
    try:
        to_generate = job.shards_to_generate
        workers = shard_workers.take(job.work_dir) or ShardWorkers.start(job.execution, job.recipe, to_generate)
        recipe = job.recipe
        _say("plan: %d samples of %s in %d shards of %d; %d to generate, %d finished earlier (reused); %s",
             recipe.samples, recipe.name, recipe.shard_count, recipe.shard_size, to_generate,
             recipe.shard_count - to_generate, workers.description)
        return _generated_release(job, summary, started, workers, early_push)
    finally:
        if early_push is not None:
            early_push.cancel()  # uploads still queued when the run fails


def _generated_release(job: ReleaseJob, summary: RunSummary, started: float, workers: ShardWorkers,
                       early_push: EarlyPush | None) -> RunSummary:
    publish = job.request.publish
    try:
        results = generate_shards(job, workers, early_push)
    finally:
        workers.close()
    run = RunStats.of(results, time.perf_counter() - started)
    summary.stage_seconds["generate"] = run.seconds
    _say("generated: %d shards made, %d reused, %d shard retries in %.1f s",
         run.shards_generated, run.shards_reused, run.retries, run.seconds)

    with _timed(summary, "stage"):
        staged = stage_release(job, results, run)
    metrics = staged.metrics
    _say("staged: %d samples, %d rejected%s", metrics["samples"], metrics["rejected"],
         "".join(f", {count} by {check}" for check, count in metrics["rejected_by"].items()))
    with _timed(summary, "validate"):
        gate = validate_release(job, staged)
    if not gate.success:
        _gate_failed(job, gate)
    _say("gate passed: %d expectations met", len(gate.outcomes))
    summary.samples, summary.rejected, summary.rejected_by = metrics["samples"], metrics["rejected"], metrics["rejected_by"]
    summary.retries, summary.shards_generated, summary.shards_reused = run.retries, run.shards_generated, run.shards_reused
    summary.samples_per_s, summary.expectations = metrics["run"]["samples_per_s"], len(gate.outcomes)
    summary.usage = describe_usage(metrics) or ""
    if summary.usage:
        _say("cost and usage: %s", summary.usage)
    with _timed(summary, "publish" if publish else "materialize"):
        if publish:
            if early_push is not None:
                _say("early push: %s", early_push.finish().describe())
            published = publish_release(job, staged)
            summary.tag, summary.commit, summary.push_retries = published.tag, published.commit, published.push_retries
        else:
            materialize_release(job)
    if summary.tag:
        _say("released %s (commit %s), pushed to %s%s; get it with: %s", summary.tag, (summary.commit or "")[:12],
             summary.store or "no remote", f" after {summary.push_retries} push retries" if summary.push_retries else "",
             " or ".join(summary.pull_commands()))
    else:
        _say("written to %s (not published)", summary.release_dir)
    create_markdown_artifact(
        run_markdown(summary, run), key=_artifact_key(job),
        description=f"{summary.tag or job.recipe.name + ' (not published)'}: what the run did",
    )
    if summary.tag:
        try:
            link = share_report(job)
            summary.report_url, summary.report_expires = link.url, link.describe()
            _say("report: %s (%s)", link.url, link.describe())
        except Exception as exc:  # the release is tagged and pushed: a missing link must not fail it
            get_run_logger().warning("no shareable report link: %s: %s", type(exc).__name__, exc)
    create_link_artifact(
        summary.report_url or f"file://{job.release_dir / 'report' / 'index.html'}",
        link_text=f"{summary.tag or job.recipe.name} report" + (f" ({summary.report_expires})" if summary.report_url else ""),
        key=f"{_artifact_key(job)}-report",
    )
    return summary


def _gate_failed(job: ReleaseJob, gate: GateResult) -> NoReturn:
    """Keep the failed run's report and Data Docs (the next run reuses the stage), link
    them from the run, and end it with the failed expectations."""
    from prefect.runtime import flow_run

    try:
        kept = keep_failed_report(job.stage_dir, job.recipe.name, str(flow_run.id or "local"))
    except OSError as exc:  # a full or read-only disk: link the stage's copy, which the next run reuses
        get_run_logger().warning("could not keep the failed gate's report: %s", exc)
        kept = job.stage_dir
    data_docs, report = browser_link(kept / "validation" / "index.html"), browser_link(kept / "report" / "index.html")
    create_markdown_artifact(gate_failure_markdown(job.recipe.name, gate, data_docs, report), key=_artifact_key(job),
                             description=f"{job.recipe.name}: gate failed, nothing published")
    create_link_artifact(data_docs, link_text=f"{job.recipe.name}: Data Docs of the failed gate",
                         key=f"{_artifact_key(job)}-report")
    raise GateFailedError(
        f"validation gate failed for {job.recipe.name}; nothing was published (Data Docs: {data_docs})\n{gate.summary()}"
    )


@contextmanager
def _timed(summary: RunSummary, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    summary.stage_seconds[stage] = round(time.perf_counter() - started, 3)


def run_release(
    recipe_path: str,
    registry: str = ".",
    samples: int | None = None,
    seed: int | None = None,
    publish: bool = True,
    workers: int | None = None,
    overrides: list[str] | tuple[str, ...] | None = None,
    dask_address: str | None = None,
    force: bool = False,
) -> RunSummary:
    """Check the inputs and start the shard workers, then run the flow (on the configured
    Prefect API, else a local one). Bad input fails here, before Prefect starts."""
    request = ReleaseRequest(recipe_path, registry, samples, seed, publish, tuple(overrides or ()), workers, dask_address,
                             force)
    return run_prepared(prepare_started(request))


def run_prepared(job: ReleaseJob) -> RunSummary:
    """Run the flow for a job `prepare` checked (and whose workers may be starting)."""
    token = _PREPARED.set(job)
    try:
        with prefect_api():
            return release_flow(**job.request.parameters())
    finally:
        _PREPARED.reset(token)
        shard_workers.close_unused(job.work_dir)
        release_locks(job)  # the flow did, unless it never started


@contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured Prefect API, else the local server (started in the background
    if none runs, and kept for later runs: see `synthfactory.local_api`)."""
    if PREFECT_API_URL.value():
        yield
        return
    api_url, started = ensure_local_api()
    logger.info("Prefect API: %s local server at %s (UI: %s)", "started a" if started else "the",
                api_url, ui_url(api_url))
    # In the environment and Prefect's process-wide settings, not only this context's:
    # shard worker processes and Prefect's own threads (log and event forwarding) must
    # report here too, or each starts a temporary server of its own. The UI URL makes
    # Prefect's "View at" links open the current UI.
    before = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    os.environ.update(PREFECT_API_URL=api_url, PREFECT_UI_URL=ui_url(api_url))
    refresh_global_settings_context()
    try:
        yield
    finally:
        drain_prefect_workers()
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
        refresh_global_settings_context()


def drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues while its API is known: drained at
    exit instead, they would find no API and start a temporary server to send them to."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10, at_exit=False)
    EventsWorker.drain_all(timeout=10, at_exit=False)
