"""A release job from recipe to tag, as plain steps the Prefect flow orchestrates.

prepare() resolves everything a run needs and fails before any work on bad input;
the flow then generates shards, and stage() / validate() / materialize() / publish()
turn them into a gated, versioned release.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import posixpath
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow.parquet as pq
import yaml
from pydantic import ValidationError

from synthfactory import pipeline, settings
from synthfactory.card import render_card
from synthfactory.checks import DatasetView, PreviousRelease
from synthfactory.models import UsesModel
from synthfactory.recipe import Execution, Recipe, RecipeError, load_recipe
from synthfactory.drills import crash_point
from synthfactory.registry import DataRegistry, FileSnapshot, RegistryError, Release
from synthfactory.report import render_report
from synthfactory.shard_cache import ShardCache, code_version, recipe_digest, shard_keys
from synthfactory.shards import CORE_COLUMNS, SHARDS_DIR, ShardPlan, plan_shards, read_shard
from synthfactory.storage import StorageConfig, StorageError, ensure_bucket
from synthfactory.validation import GateResult, GateSpec, manifest_frame, quality_row, validate_manifest

#: the key under which stage() hands validate() the quality limits (not written to metrics.json)
GATE_LIMITS = "gate_limits"
#: in a run's work dir: the pid of the process that owns it, and the journal of a publish in progress
OWNER_FILE, JOURNAL_FILE, SNAPSHOT_DIR = "owner.pid", "publishing.json", "snapshot"
#: a work dir with no owner file yet is being created; older than this, it was abandoned
OWNERLESS_GRACE_S = 60.0


class GateFailedError(RuntimeError):
    """The validation gate rejected the release; nothing was published."""


class ShardFailedError(RuntimeError):
    """A shard kept failing after its retries; nothing was published."""


@dataclass(frozen=True)
class ReleaseJob:
    """Everything a run needs, resolved up front; holds no secrets (it is a task input)."""

    recipe: Recipe
    registry: DataRegistry
    recipe_source: Path
    recipe_file: str  # where the recipe lives inside the registry
    inputs: tuple[tuple[Path, str], ...]  # (file the recipe reads, its path inside the registry)
    code: tuple[tuple[Path, str], ...]  # (running source file, its path inside the registry)
    command: str  # how `dvc repro` regenerates this release
    work_dir: Path
    code_version: str  # hash of the code files: part of every shard's cache key

    @property
    def stage_dir(self) -> Path:
        """Becomes data/<dataset>/ when the gate passes."""
        return self.work_dir / "release"

    @property
    def cache(self) -> ShardCache:
        return ShardCache(self.registry.scratch / "shards" / self.recipe.name)

    @property
    def release_dir(self) -> Path:
        return self.registry.release_dir(self.recipe.name)

    @property
    def code_files(self) -> tuple[str, ...]:
        return tuple(relative for _, relative in self.code)

    @property
    def dependencies(self) -> list[str]:
        """What the dvc.yaml stage depends on: the recipe, the files it reads, the code."""
        return [self.recipe_file, *(relative for _, relative in self.inputs), *self.code_files]

    def plans(self) -> list[ShardPlan]:
        return plan_shards(self.recipe.name, self.recipe.samples, self.recipe.shard_size)

    @functools.cached_property
    def shard_keys(self) -> list[tuple[ShardPlan, str]]:
        plans = self.plans()
        return list(zip(plans, shard_keys(self.recipe, self.code_version, plans), strict=True))

    @property
    def inputs_fingerprint(self) -> str:
        """Hash of everything the release's bytes depend on (recipe with the files it
        reads inlined, code), not of how it runs: equal fingerprints need no new release."""
        return inputs_fingerprint(self.recipe, self.code_version)

    def tracked_files(self) -> list[str]:
        """Files a publish may rewrite besides the release entries; snapshotted for rollback."""
        return ["dvc.yaml", "dvc.lock", ".dvc/config", *self.dependencies,
                f"data/{self.recipe.name}/.gitignore"]


def inputs_fingerprint(recipe: Recipe, code: str) -> str:
    return hashlib.sha256(f"{recipe_digest(recipe)}:{code}".encode()).hexdigest()


def code_files(recipe: Recipe) -> tuple[tuple[Path, str], ...]:
    """(source file, path relative to its package's parent) of the code that shapes the bytes:
    each plug-in's module, the synthfactory modules it imports from, and the shard writer."""
    from synthfactory import shards

    plugin_modules = {inspect.getmodule(type(plugin)) for plugin in pipeline.plugins_for(recipe)}
    modules = {shards, *plugin_modules}
    for module in plugin_modules:
        for value in vars(module).values():
            if isinstance(value, ModuleType):
                imported = value
            elif inspect.isclass(value) or inspect.isfunction(value):
                imported = inspect.getmodule(value)
            else:
                continue
            if imported is not None and imported.__name__.startswith("synthfactory."):
                modules.add(imported)
    files = []
    for module in sorted(modules, key=lambda m: m.__name__):  # type: ignore[union-attr]
        source = Path(inspect.getsourcefile(module)).resolve()  # type: ignore[arg-type]
        package_root = Path(sys.modules[module.__name__.split(".")[0]].__file__).resolve().parent.parent  # type: ignore[arg-type]
        files.append((source, source.relative_to(package_root).as_posix()))
    return tuple(files)


def preflight(
    recipe_path: str | Path,
    registry_path: str | Path,
    samples: int | None,
    seed: int | None,
    publish: bool,
    overrides: Sequence[str] = (),
) -> tuple[Recipe, DataRegistry]:
    """Every check that can fail on bad input, before any work: recipe, models, storage, registry."""
    recipe = load_recipe(recipe_path, samples=samples, seed=seed, overrides=overrides)
    pipeline.generator_for(recipe).preflight()
    for check in pipeline.checks_for(recipe):
        check.preflight()
    if publish:
        ensure_bucket(settings.resolve_storage())
    return recipe, DataRegistry.open(Path(registry_path))


def prepare(
    recipe_path: str | Path,
    registry_path: str | Path,
    samples: int | None = None,
    seed: int | None = None,
    publish: bool = True,
    overrides: Sequence[str] = (),
) -> ReleaseJob:
    """Preflight, then give the run a private work dir in the registry's scratch space."""
    recipe, registry = preflight(recipe_path, registry_path, samples, seed, publish, overrides)
    recipe_source = Path(recipe_path).resolve()
    recipe_file, inputs = recipe_locations(recipe, recipe_source, registry)
    command = ["synthfactory", "run", recipe_file, "--no-publish"]
    if samples is not None:
        command += ["--samples", str(samples)]
    if seed is not None:
        command += ["--seed", str(seed)]
    for assignment in overrides:
        command += ["--set", assignment]
    recover_interrupted(registry, wait=False)
    (registry.scratch / "work").mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-", dir=registry.scratch / "work"))
    (work_dir / OWNER_FILE).write_text(str(os.getpid()))
    code = code_files(recipe)
    return ReleaseJob(
        recipe, registry, recipe_source, recipe_file, inputs, code, shlex.join(command), work_dir, code_version(code)
    )


def recipe_locations(
    recipe: Recipe, recipe_source: Path, registry: DataRegistry
) -> tuple[str, tuple[tuple[Path, str], ...]]:
    """Where the recipe, and each file it reads, lives inside the registry: (recipe path,
    ((file, its path), ...)). A recipe from outside goes to recipes/<name>.yaml."""
    try:
        recipe_file = recipe_source.relative_to(registry.root).as_posix()
    except ValueError:
        recipe_file = f"recipes/{recipe.name}.yaml"
    inputs = tuple(
        ((recipe_source.parent / name).resolve(), posixpath.normpath(posixpath.join(posixpath.dirname(recipe_file), name)))
        for name in recipe.input_files()
    )
    return recipe_file, inputs


def execution_for(recipe: Recipe, workers: int | None = None, dask_address: str | None = None) -> Execution:
    """The recipe's execution settings with a run's own choices (they change where shards
    run, not what they hold); a bad value is a RecipeError naming the option."""
    update: dict[str, Any] = {"workers": workers} if workers else {}
    if dask_address:
        update.update(runner="dask", dask_address=dask_address)
    try:
        return Execution.model_validate({**recipe.execution.model_dump(), **update})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}, got {e['input']!r}" for e in exc.errors())
        raise RecipeError(f"invalid run option: {problems}") from None


def latest_release_with_inputs(registry: DataRegistry, dataset: str, fingerprint: str) -> str | None:
    """The latest release's tag if it was made from exactly these inputs, else None."""
    latest = registry.latest_tag(dataset)
    if latest is not None and registry.tag_note(latest).get("inputs_fingerprint") == fingerprint:
        return latest
    return None


def discard(job: ReleaseJob) -> None:
    """Drop a job's work dir without releasing (nothing else was written)."""
    shutil.rmtree(job.work_dir, ignore_errors=True)


def gate_spec(recipe: Recipe) -> GateSpec:
    generator = pipeline.generator_for(recipe)
    schema = pipeline.schema_for(recipe)
    planned = pipeline.planned_rows(recipe)
    rules = recipe.validation
    labels = generator.labels()
    return GateSpec(
        expected_rows=(math.ceil(planned * rules.min_accept_rate), planned),
        caption_length=(rules.caption_length.min, rules.caption_length.max),
        image_size=generator.image_size(),
        label_set=labels,
        balance_tolerance=rules.balance_tolerance if labels else None,
        required_columns=tuple(schema.names),
        nullable_columns=tuple(field.name for field in schema if field.name not in CORE_COLUMNS),
        column_minimums=tuple(
            (column, minimum) for check in pipeline.checks_for(recipe) for column, minimum in check.column_minimums().items()
        ),
    )


def previous_release(job: ReleaseJob) -> PreviousRelease | None:
    """The latest release of the dataset, with its samples when the workspace holds them
    (data/<dataset>/ is that release, not another version checked out)."""
    releases = job.registry.releases(job.recipe.name)
    if not releases:
        return None
    latest = releases[-1]
    data = None
    workspace = job.release_dir
    try:
        in_workspace = json.loads((workspace / "metrics.json").read_text()) == latest.metrics
    except (OSError, json.JSONDecodeError):
        in_workspace = False
    labels = pipeline.generator_for(job.recipe).labels()
    if in_workspace and (workspace / "manifest.parquet").exists():
        data = DatasetView(pq.read_table(workspace / "manifest.parquet"), labels, workspace)
    else:
        manifest = _fetch_manifest(job, latest.tag)
        data = DatasetView(manifest, labels) if manifest is not None else None
    try:
        recipe = yaml.safe_load(job.registry.git("show", f"{latest.tag}:data/{job.recipe.name}/recipe.yaml"))
    except (RegistryError, yaml.YAMLError):
        recipe = None
    return PreviousRelease(latest.tag, latest.metrics, data, same_recipe=recipe == job.recipe.model_dump(mode="json"))


def _fetch_manifest(job: ReleaseJob, tag: str) -> Any:
    """The manifest of release `tag` from the DVC remote (a fresh clone has no data):
    `dvc get` of that one file, so cross-release dedup works in CI. None if unreachable."""
    try:
        env = settings.resolve_storage().subprocess_env()
    except StorageError:
        return None
    target = job.work_dir / f"previous-{tag.replace('@', '-')}.parquet"
    try:
        job.registry.dvc("get", str(job.registry.root), f"data/{job.recipe.name}/manifest.parquet",
                         "--rev", tag, "-o", str(target), env=env)
        return pq.read_table(target)
    except (RegistryError, OSError):
        return None


def stage(job: ReleaseJob, results: list[pipeline.ShardResult], run: pipeline.RunStats) -> dict[str, Any]:
    """Merge shard fragments, run the dataset-level checks (which may set samples aside),
    write the staged manifest; return the metrics (with the gate's quality limits)."""
    for result in results:
        job.cache.link_into(result.key, result.name, job.stage_dir)
    manifest, rejected = pipeline.assemble(job.recipe, job.cache, results)
    previous = previous_release(job) if pipeline.dataset_checks_for(job.recipe) else None
    manifest, rejected, quality = pipeline.judge_dataset(job.recipe, job.stage_dir, manifest, rejected, previous)
    pipeline.write_stage(job.stage_dir, manifest, rejected)
    labels = pipeline.generator_for(job.recipe).labels()
    metrics = pipeline.dataset_metrics(job.recipe, manifest, rejected, labels)
    metrics["run"] = run.as_dict(manifest.num_rows)
    if quality.metrics:
        metrics["quality"] = quality.metrics
    metrics[GATE_LIMITS] = {
        "limits": quality.limits,
        "notes": quality.notes,
        "previous": previous.tag if previous else None,
        "previous_quality": previous.metrics.get("quality", {}) if previous else {},
    }
    return metrics


def validate(job: ReleaseJob, metrics: dict[str, Any]) -> GateResult:
    """Run the GX gate on the staged manifest; write metrics (with the verdict), card and
    recipe beside it. The caller's metrics are left as they were."""
    metrics = dict(metrics)
    judged = metrics.pop(GATE_LIMITS, {"limits": [], "notes": []})
    table = pq.read_table(job.stage_dir / "manifest.parquet")
    spec = dataclasses.replace(gate_spec(job.recipe), metric_limits=tuple(map(tuple, judged["limits"])))
    gate = validate_manifest(manifest_frame(table), spec, job.stage_dir / "validation", quality_row(metrics.get("quality", {})))
    crash_point("validate")
    verdict_figures = {"success": gate.success, "expectations": len(gate.outcomes), "failed": len(gate.failures)}
    metrics["validation"] = verdict_figures
    pipeline.write_json(job.stage_dir / "metrics.json", metrics)
    verdict = [f"passed: {len(gate.outcomes)} expectations"] if gate.success else gate.summary().splitlines()
    models_used = [
        (plugin.model_role, plugin.model.id, plugin.model.revision)
        for plugin in pipeline.plugins_for(job.recipe)
        if isinstance(plugin, UsesModel)
    ]
    has_images = pipeline.generator_for(job.recipe).image_size() is not None
    card = render_card(job.recipe, metrics, verdict, list(job.code_files), has_images, models_used)
    (job.stage_dir / "README.md").write_text(card)
    render_report(job.stage_dir, job.recipe.name, table, pq.read_table(job.stage_dir / "rejected.parquet"),
                  metrics, judged, verdict)
    (job.stage_dir / "recipe.yaml").write_text(job.recipe.to_yaml())
    return gate


def _swap_in(job: ReleaseJob) -> list[str]:
    """Move the staged entries into data/<dataset>/, setting the previous ones aside in
    the work dir (renames on one filesystem); DVC's .gitignore there is left alone."""
    previous = job.work_dir / "previous"
    previous.mkdir()
    job.release_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(entry.name for entry in job.stage_dir.iterdir())
    for name in names:
        target = job.release_dir / name
        if target.exists():
            target.rename(previous / name)
        (job.stage_dir / name).rename(target)
    return names


def _swap_back(job: ReleaseJob, names: list[str]) -> None:
    previous = job.work_dir / "previous"
    for name in names:
        (job.release_dir / name).rename(job.stage_dir / name)
        if (previous / name).exists():
            (previous / name).rename(job.release_dir / name)
    previous.rmdir()
    if not any(job.release_dir.iterdir()):
        job.release_dir.rmdir()


def materialize(job: ReleaseJob) -> None:
    """--no-publish: put the gated release in data/<dataset>/ without touching git or DVC."""
    with job.registry.lock():
        _swap_in(job)
        job.cache.prune(keep={key for _, key in job.shard_keys})
    shutil.rmtree(job.work_dir)


def publish(job: ReleaseJob, storage: StorageConfig, metrics: dict[str, Any]) -> Release:
    """Under the registry lock: swap the release in, sync recipe and code, record the
    stage, push, commit, tag. On any failure the workspace goes back exactly as it was
    (uncommitted edits included) and the staged release back to the work dir.

    A journal (the files' previous bytes, the base commit, the planned tag) is written
    first, so a run killed half-way through is rolled back by the next run the same way."""
    registry, name = job.registry, job.recipe.name
    with registry.lock():
        _recover(registry)
        snapshot = registry.snapshot(job.tracked_files())
        tag = registry.next_tag(name)
        message = f"Release {tag}: {metrics['samples']} samples from {job.recipe_file}"
        names = sorted(entry.name for entry in job.stage_dir.iterdir())
        snapshot.save(job.work_dir / SNAPSHOT_DIR)
        _write_journal(job.work_dir, {
            "dataset": name,
            "tag": tag,
            "base_commit": registry.git("rev-parse", "HEAD").strip(),
            "message": message,
            "names": names,
            "existing": [n for n in names if (job.release_dir / n).exists()],
        })
        swapped = _swap_in(job)
        try:
            registry.sync_file(job.recipe_source, job.recipe_file)
            for source, relative in (*job.inputs, *job.code):
                registry.sync_file(source, relative)
            registry.configure_remote(storage)
            registry.record_stage(name, job.command, job.dependencies)
            summary = {
                "samples": metrics["samples"],
                "rejected": metrics["rejected"],
                "recipe_fingerprint": job.recipe.fingerprint(),
                "inputs_fingerprint": job.inputs_fingerprint,
                "run": metrics.get("run", {}),
            }
            released = registry.commit_and_tag(
                name,
                tag,
                storage,
                paths=[*job.tracked_files(), f"data/{name}"],
                message=message,
                tag_note=f"{tag}\n\n{json.dumps(summary, sort_keys=True)}",
                push_retry_delays=job.recipe.execution.retry_delays(),
            )
        except BaseException as failure:
            try:
                snapshot.restore()
                _swap_back(job, swapped)
                (job.work_dir / JOURNAL_FILE).unlink()
            except Exception as rollback_failure:  # keep the original error in front
                failure.add_note(f"rolling back the registry also failed: {rollback_failure}")
            raise
        (job.work_dir / JOURNAL_FILE).unlink()
        job.cache.prune(keep={key for _, key in job.shard_keys})
    shutil.rmtree(job.work_dir)
    return released


def _write_journal(work_dir: Path, journal: dict[str, Any]) -> None:
    tmp = work_dir / f".{JOURNAL_FILE}.tmp"
    tmp.write_text(json.dumps(journal, indent=1))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, work_dir / JOURNAL_FILE)


def _owner_alive(work_dir: Path) -> bool:
    try:
        pid = int((work_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        try:
            return time.time() - work_dir.stat().st_mtime < OWNERLESS_GRACE_S
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def recover_interrupted(registry: DataRegistry, wait: bool = True) -> list[str]:
    """Undo what killed runs left behind: a half-done publish is rolled back (or, if its
    tag exists, recognised as complete) and work dirs of dead runs are deleted. Their
    finished shards stay in the shard cache, so the rerun only does the missing ones.

    Runs under the registry lock; with `wait=False` it does nothing while another run
    holds the lock (that run recovers before it publishes). Returns what it did."""
    from filelock import Timeout

    if not (registry.scratch / "work").exists():
        return []
    lock = registry.lock()
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return []
    try:
        return _recover(registry)
    finally:
        lock.release()


def _recover(registry: DataRegistry) -> list[str]:
    """recover_interrupted() for a caller that holds the registry lock."""
    done = []
    work_root = registry.scratch / "work"
    for work_dir in sorted(p for p in work_root.iterdir() if p.is_dir()) if work_root.exists() else []:
        if _owner_alive(work_dir):
            continue
        journal = work_dir / JOURNAL_FILE
        if journal.exists():
            done.append(_roll_back_publish(registry, work_dir, json.loads(journal.read_text())))
        shutil.rmtree(work_dir, ignore_errors=True)
    return done


def _roll_back_publish(registry: DataRegistry, work_dir: Path, journal: dict[str, Any]) -> str:
    tag, base = journal["tag"], journal["base_commit"]
    if any(r.tag == tag for r in registry.releases(journal["dataset"])):
        return f"{tag}: the interrupted run had finished publishing"
    (registry.root / ".git" / "index.lock").unlink(missing_ok=True)  # left by a git killed with the run
    head = registry.git("rev-parse", "HEAD").strip()
    if head != base:
        parent = registry.git("rev-parse", "HEAD^").strip()
        subject = registry.git("log", "-1", "--format=%s").strip()
        if parent != base or subject != journal["message"]:
            raise RegistryError(
                f"an interrupted publish of {tag} left {registry.root} at {head[:12]}, which is not its release "
                f"commit on {base[:12]}: inspect the repository, then delete {work_dir}"
            )
        registry.git("reset", "--quiet", "--soft", base)
    snapshot = FileSnapshot.load(registry.root, work_dir / SNAPSHOT_DIR)
    release_dir = registry.release_dir(journal["dataset"])
    registry.git("reset", "--quiet", base, "--", *snapshot.paths, f"data/{journal['dataset']}")
    snapshot.restore()
    previous = work_dir / "previous"
    for name in journal["names"]:
        current, original = release_dir / name, previous / name
        if name in journal["existing"] and not original.exists():
            continue  # never moved aside: still the previous release's
        if current.is_dir():
            shutil.rmtree(current)
        else:
            current.unlink(missing_ok=True)
        if original.exists():
            original.rename(current)
    return f"{tag}: rolled back a publish interrupted at {head[:12]}"


def verify_release(release_dir: Path) -> tuple[int, list[str]]:
    """Re-hash every sample in the shards against the manifest: (samples checked, problems)."""
    try:
        manifest = pq.read_table(release_dir / "manifest.parquet", columns=["key", "shard", "payload", "sha256"]).to_pylist()
    except (OSError, ValueError) as exc:
        return 0, [f"cannot read {release_dir / 'manifest.parquet'}: {exc}"]
    expected = {row["key"]: row for row in manifest}
    problems, seen = [], 0
    for shard in sorted((release_dir / SHARDS_DIR).glob("*.tar")):
        try:
            samples = list(read_shard(shard))
        except (OSError, tarfile.TarError) as exc:
            problems.append(f"{shard.name}: unreadable tar ({exc})")
            continue
        for key, files in samples:
            row = expected.pop(key, None)
            if row is None:
                problems.append(f"{shard.name}: sample {key} is not in the manifest")
                continue
            seen += 1
            if row["shard"] != shard.name:
                problems.append(f"{key}: in {shard.name}, manifest says {row['shard']}")
            payload = files.get(row["payload"])
            if payload is None or hashlib.sha256(payload).hexdigest() != row["sha256"]:
                problems.append(f"{key}: payload .{row['payload']} does not match its sha256")
    problems += [f"{key}: in the manifest but in no shard" for key in sorted(expected)]
    return seen, problems
