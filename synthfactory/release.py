"""A release job from recipe to tag, as plain steps the Prefect flow orchestrates.

prepare() resolves everything a run needs and fails before any work on bad input;
the flow then generates shards, and stage() / validate() / materialize() / publish()
turn them into a gated, versioned release.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from synthfactory import pipeline
from synthfactory.card import render_card
from synthfactory.recipe import Recipe, load_recipe
from synthfactory.registry import DataRegistry, Release
from synthfactory.shards import ShardPlan, manifest_schema, plan_shards, read_shard
from synthfactory.storage import StorageConfig
from synthfactory.validation import GateResult, GateSpec, validate_manifest

class GateFailedError(RuntimeError):
    """The validation gate rejected the release; nothing was published."""


@dataclass(frozen=True)
class ReleaseJob:
    recipe: Recipe
    registry: DataRegistry
    recipe_file: str  # the recipe's path inside the registry
    code_files: tuple[str, ...]  # generator + shard-format code, inside the registry
    command: str  # how `dvc repro` regenerates this release
    work_dir: Path

    @property
    def stage_dir(self) -> Path:
        """Becomes data/<dataset>/ when the gate passes."""
        return self.work_dir / "release"

    @property
    def shards_dir(self) -> Path:
        return self.stage_dir / "shards"

    @property
    def fragments_dir(self) -> Path:
        return self.work_dir / "fragments"

    @property
    def release_dir(self) -> Path:
        return self.registry.release_dir(self.recipe.name)

    def plans(self) -> list[ShardPlan]:
        return plan_shards(self.recipe.name, self.recipe.samples, self.recipe.shard_size)

    def publish_paths(self) -> list[str]:
        """Everything a release commit may touch (git adds only what changed)."""
        return ["dvc.yaml", "dvc.lock", ".dvc/config", f"data/{self.recipe.name}", self.recipe_file, *self.code_files]


def _code_files(recipe: Recipe) -> list[tuple[Path, str]]:
    """(source file, path relative to its package's parent) of the code that shapes the bytes."""
    from synthfactory import shards
    from synthfactory.generators import base

    generator_module = inspect.getmodule(type(pipeline.generator_for(recipe)))
    files = []
    for module in (generator_module, base, shards):
        source = Path(inspect.getsourcefile(module)).resolve()  # type: ignore[arg-type]
        package_root = Path(sys.modules[module.__name__.split(".")[0]].__file__).resolve().parent.parent  # type: ignore[arg-type]
        files.append((source, source.relative_to(package_root).as_posix()))
    return files


def prepare(
    recipe_path: str | Path,
    registry: DataRegistry,
    samples: int | None = None,
    seed: int | None = None,
) -> ReleaseJob:
    """Load and check the recipe, sync its inputs into the registry, pick the work dir."""
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, samples=samples, seed=seed)
    try:
        recipe_file = recipe_path.resolve().relative_to(registry.root).as_posix()
    except ValueError:
        recipe_file = f"recipes/{recipe.name}.yaml"
    registry.sync_file(recipe_path, recipe_file)
    code_files = tuple(registry.sync_file(source, relative) for source, relative in _code_files(recipe))
    command = ["synthfactory", "run", recipe_file, "--no-publish"]
    if samples is not None:
        command += ["--samples", str(samples)]
    if seed is not None:
        command += ["--seed", str(seed)]
    work_dir = registry.scratch / "work" / f"{recipe.name}-{recipe.fingerprint()[:16]}"
    if work_dir.exists():  # leftovers of an interrupted run of the same recipe
        shutil.rmtree(work_dir)
    return ReleaseJob(recipe, registry, recipe_file, code_files, shlex.join(command), work_dir)


def gate_spec(recipe: Recipe) -> GateSpec:
    generator = pipeline.generator_for(recipe)
    settings = recipe.validation
    labels = generator.labels()
    return GateSpec(
        expected_rows=(math.ceil(recipe.samples * settings.min_accept_rate), recipe.samples),
        caption_length=(settings.caption_length.min, settings.caption_length.max),
        image_size=generator.image_size(),
        label_set=labels,
        balance_tolerance=settings.balance_tolerance if labels else None,
        required_columns=tuple(manifest_schema(type(generator)).names),
    )


def stage(job: ReleaseJob, results: list[pipeline.ShardResult], run: pipeline.RunStats) -> dict[str, Any]:
    """Merge shard fragments into the staged manifest and metrics; return the metrics."""
    manifest = pipeline.assemble(job.recipe, job.fragments_dir, results, job.stage_dir)
    metrics = pipeline.dataset_metrics(job.recipe, manifest, sum(r.rejected for r in results))
    metrics["run"] = run.as_dict(manifest.num_rows)
    return metrics


def validate(job: ReleaseJob, metrics: dict[str, Any]) -> GateResult:
    """Run the GX gate on the staged manifest; write metrics, card and recipe beside it."""
    manifest = pq.read_table(job.stage_dir / "manifest.parquet").to_pandas()
    gate = validate_manifest(manifest, gate_spec(job.recipe), job.stage_dir / "validation")
    failed = len(gate.failures)
    metrics["validation"] = {"success": gate.success, "expectations": len(gate.outcomes), "failed": failed}
    pipeline.write_json(job.stage_dir / "metrics.json", metrics)
    verdict = [f"passed: {len(gate.outcomes)} expectations"] if gate.success else gate.summary().splitlines()
    card = render_card(job.recipe, metrics, verdict, list(job.code_files), pipeline.generator_for(job.recipe).image_size() is not None)
    (job.stage_dir / "README.md").write_text(card)
    (job.stage_dir / "recipe.yaml").write_text(job.recipe.to_yaml())
    return gate


def materialize(job: ReleaseJob) -> None:
    """Move the gated release into data/<dataset>/ and drop the work dir."""
    with job.registry.lock():
        pipeline.move_into(job.stage_dir, job.release_dir)
    shutil.rmtree(job.work_dir, ignore_errors=True)


def publish(job: ReleaseJob, storage: StorageConfig, metrics: dict[str, Any]) -> Release:
    """Record the stage, push to S3, commit and tag; on failure undo the workspace changes."""
    registry, name = job.registry, job.recipe.name
    paths = job.publish_paths()
    with registry.lock():
        try:
            registry.configure_remote(storage)
            registry.record_stage(name, job.command, [job.recipe_file, *job.code_files])
            tag = f"{name}@v{registry.next_version(name)}"
            summary = {
                "samples": metrics["samples"],
                "rejected": metrics["rejected"],
                "recipe_fingerprint": job.recipe.fingerprint(),
                "run": metrics.get("run", {}),
            }
            message = f"Release {tag}: {metrics['samples']} samples from {job.recipe_file}"
            return registry.publish(name, storage, paths, message, f"{tag}\n\n{json.dumps(summary, sort_keys=True)}")
        except BaseException:
            registry.rollback(name, paths)
            raise


def verify_release(release_dir: Path) -> tuple[int, list[str]]:
    """Re-hash every sample in the shards against the manifest: (samples checked, problems)."""
    manifest = pq.read_table(release_dir / "manifest.parquet", columns=["key", "shard", "payload", "sha256"]).to_pylist()
    expected = {row["key"]: row for row in manifest}
    problems, seen = [], 0
    for shard in sorted((release_dir / "shards").glob("*.tar")):
        for key, files in read_shard(shard):
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
