"""A release job from recipe to tag, as plain steps the Prefect flow orchestrates.

prepare() resolves everything a run needs and fails before any work on bad input;
the flow then generates shards, and stage() / validate() / materialize() / publish()
turn them into a gated, versioned release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import posixpath
import shlex
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow.parquet as pq
import yaml

from synthfactory import pipeline, settings
from synthfactory.card import render_card
from synthfactory.checks import DatasetView, PreviousRelease
from synthfactory.models import UsesModel
from synthfactory.recipe import Recipe, load_recipe
from synthfactory.registry import DataRegistry, RegistryError, Release
from synthfactory.report import render_report
from synthfactory.shards import CORE_COLUMNS, SHARDS_DIR, ShardPlan, plan_shards, read_shard
from synthfactory.storage import StorageConfig, StorageError, ensure_bucket
from synthfactory.validation import GateResult, GateSpec, manifest_frame, quality_row, validate_manifest

#: the key under which stage() hands validate() the quality limits (not written to metrics.json)
GATE_LIMITS = "gate_limits"


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

    @property
    def stage_dir(self) -> Path:
        """Becomes data/<dataset>/ when the gate passes."""
        return self.work_dir / "release"

    @property
    def fragments_dir(self) -> Path:
        return self.work_dir / "fragments"

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

    def tracked_files(self) -> list[str]:
        """Files a publish may rewrite besides the release entries; snapshotted for rollback."""
        return ["dvc.yaml", "dvc.lock", ".dvc/config", *self.dependencies,
                f"data/{self.recipe.name}/.gitignore"]


def _code_files(recipe: Recipe) -> tuple[tuple[Path, str], ...]:
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
    try:
        recipe_file = recipe_source.relative_to(registry.root).as_posix()
    except ValueError:
        recipe_file = f"recipes/{recipe.name}.yaml"
    command = ["synthfactory", "run", recipe_file, "--no-publish"]
    if samples is not None:
        command += ["--samples", str(samples)]
    if seed is not None:
        command += ["--seed", str(seed)]
    for assignment in overrides:
        command += ["--set", assignment]
    (registry.scratch / "work").mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-", dir=registry.scratch / "work"))
    inputs = tuple(
        ((recipe_source.parent / name).resolve(), posixpath.normpath(posixpath.join(posixpath.dirname(recipe_file), name)))
        for name in recipe.input_files()
    )
    return ReleaseJob(
        recipe, registry, recipe_source, recipe_file, inputs, _code_files(recipe), shlex.join(command), work_dir
    )


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
    manifest, rejected = pipeline.assemble(job.recipe, job.fragments_dir, results)
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
    shutil.rmtree(job.work_dir)


def publish(job: ReleaseJob, storage: StorageConfig, metrics: dict[str, Any]) -> Release:
    """Under the registry lock: swap the release in, sync recipe and code, record the
    stage, push, commit, tag. On any failure the workspace goes back exactly as it was
    (uncommitted edits included) and the staged release back to the work dir."""
    registry, name = job.registry, job.recipe.name
    with registry.lock():
        snapshot = registry.snapshot(job.tracked_files())
        swapped = _swap_in(job)
        try:
            registry.sync_file(job.recipe_source, job.recipe_file)
            for source, relative in (*job.inputs, *job.code):
                registry.sync_file(source, relative)
            registry.configure_remote(storage)
            registry.record_stage(name, job.command, job.dependencies)
            tag = registry.next_tag(name)
            summary = {
                "samples": metrics["samples"],
                "rejected": metrics["rejected"],
                "recipe_fingerprint": job.recipe.fingerprint(),
                "run": metrics.get("run", {}),
            }
            released = registry.commit_and_tag(
                name,
                tag,
                storage,
                paths=[*job.tracked_files(), f"data/{name}"],
                message=f"Release {tag}: {metrics['samples']} samples from {job.recipe_file}",
                tag_note=f"{tag}\n\n{json.dumps(summary, sort_keys=True)}",
                push_retry_delays=job.recipe.execution.retry_delays(),
            )
        except BaseException as failure:
            try:
                snapshot.restore()
                _swap_back(job, swapped)
            except Exception as rollback_failure:  # keep the original error in front
                failure.add_note(f"rolling back the registry also failed: {rollback_failure}")
            raise
    shutil.rmtree(job.work_dir)
    return released


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
