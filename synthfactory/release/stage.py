"""Staging a release: the run's shards linked into the work dir, their fragments merged
into the manifest, the dataset-level checks run (which may set samples aside), the
manifest written as one partition per shard, and the figures `dvc metrics diff`
compares between releases."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from synthfactory import settings
from synthfactory.checks import DatasetView, PreviousRelease
from synthfactory.checks.balance import counts
from synthfactory.files import atomic_write, link_or_copy
from synthfactory.registry import RegistryError, dvc_get
from synthfactory.release.build import ShardResult
from synthfactory.release.bundle import PluginBundle
from synthfactory.release.job import ReleaseJob
from synthfactory.release.lineage import DIVERSITY_CHECK, trace_lineage
from synthfactory.release.cost import cost_usd
from synthfactory.release.shard_cache import ShardCache
from synthfactory.release.summary import Quality, RunStats, Staged
from synthfactory.shards import (
    LEGACY_MANIFEST,
    MANIFEST_DIR,
    REJECTED_DIR,
    REJECTED_SCHEMA,
    SAMPLE_ID_COLUMNS,
    fragment_path,
    has_manifest,
    manifest_record,
    parquet_bytes,
    read_manifest,
    set_aside,
)
from synthfactory.storage import StorageError


def stage(job: ReleaseJob, results: list[ShardResult], run: RunStats) -> Staged:
    """Merge shard fragments, run the dataset-level checks, write the staged manifest
    (one partition per shard) and rejected.parquet."""
    for result in results:
        job.cache.link_into(result.key, result.name, job.stage_dir)
    manifest, rejected = assemble(job.cache, job.plugins.schema, results)
    plugins = job.plugins
    previous = previous_release(job) if plugins.dataset_checks else None
    manifest, rejected, quality = judge_dataset(plugins, job.stage_dir, manifest, rejected, previous)
    lineage = trace_lineage(job.recipe, plugins, job.registry, quality.metrics.get(DIVERSITY_CHECK))
    quality = dataclasses.replace(
        quality,
        metrics={**quality.metrics, "lineage": lineage.figures},
        limits=(*quality.limits, *((f"lineage_{name}", low, high) for name, (low, high) in lineage.limits.items())),
        notes=(*quality.notes, *(f"lineage: {note}" for note in lineage.notes)),
    )
    (job.stage_dir / REJECTED_DIR).mkdir(parents=True, exist_ok=True)  # present (maybe empty) in every release
    write_partitions(job.cache, results, manifest, job.stage_dir)
    atomic_write(job.stage_dir / "rejected.parquet", parquet_bytes(rejected))
    metrics = dataset_metrics(plugins, job.recipe.samples, job.recipe.shard_count, manifest, rejected)
    metrics["run"] = run.as_dict(manifest.num_rows)
    if run.usage:  # top level, so `dvc metrics diff` shows what each release used and cost
        metrics["usage"] = run.usage
        metrics["cost_usd"] = cost_usd(job.recipe.cost, run.usage)
    metrics["quality"] = quality.metrics
    metrics["lineage"] = lineage.as_metrics()
    return Staged(metrics, quality)


def assemble(cache: ShardCache, schema: pa.Schema, results: list[ShardResult]) -> tuple[pa.Table, pa.Table]:
    """Merge the shard fragments from the cache: (manifest, rejected) in shard order."""
    ordered = sorted(results, key=lambda r: r.index)

    def merged(kind: str, kind_schema: pa.Schema) -> pa.Table:
        parts = [pq.read_table(fragment_path(cache.entry(r.key), r.name, kind), schema=kind_schema) for r in ordered]
        return pa.concat_tables(parts) if parts else kind_schema.empty_table()

    return merged("manifest", schema), merged("rejected", REJECTED_SCHEMA)


def write_partitions(cache: ShardCache, results: list[ShardResult], manifest: pa.Table, stage_dir: Path) -> None:
    """One manifest partition per shard in `stage_dir`, an empty one for a shard whose every
    sample was refused: the shard's fragment, hard-linked from the cache, so a shard
    reused from the last release keeps its bytes and DVC uploads nothing for it; only a
    shard a dataset check set samples aside from gets its remaining rows of `manifest`
    (which is in shard order) written anew."""
    (stage_dir / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    kept = counts(manifest.column("shard"))
    start = 0
    for result in sorted(results, key=lambda r: r.index):
        rows, partition = kept[result.name], stage_dir / manifest_record(result.name)
        if rows == result.samples:
            link_or_copy(cache.shard_files(result.key, result.name)[1], partition)
        else:
            atomic_write(partition, parquet_bytes(manifest.slice(start, rows)))
        start += rows


def judge_dataset(
    plugins: PluginBundle, stage_dir: Path, manifest: pa.Table, rejected: pa.Table, previous: PreviousRelease | None
) -> tuple[pa.Table, pa.Table, Quality]:
    """Run the dataset-level checks in recipe order; samples a check refuses leave the
    shards for rejected/ (and rejected.parquet, with the check and reason) before the
    next check looks. Returns the final (manifest, rejected) and the quality figures."""
    view = DatasetView(manifest, plugins.labels(), stage_dir)
    figures: dict[str, dict[str, float]] = {}
    limits: list[tuple[str, float | None, float | None]] = []
    notes: list[str] = []
    for check in plugins.dataset_checks:
        findings = check.evaluate(view, previous)
        name = check.plugin_name
        figures[name] = findings.metrics
        limits += [(f"{name}_{metric}", low, high) for metric, (low, high) in findings.limits.items()]
        notes += [f"{name}: {note}" for note in findings.notes]
        if findings.rejected:
            refused_mask = pc.is_in(view.manifest.column("key"), value_set=pa.array(list(findings.rejected)))
            refused = view.manifest.filter(refused_mask)
            rejected = pa.concat_tables([rejected, _rejected_rows(refused, name, findings.rejected)])
            by_shard: dict[str, set[str]] = {}
            for key, shard in zip(refused.column("key").to_pylist(), refused.column("shard").to_pylist()):
                by_shard.setdefault(shard, set()).add(key)
            for shard, keys in sorted(by_shard.items()):
                set_aside(stage_dir, shard, keys)
            view = view.without(refused_mask)
    quality = Quality(
        figures, tuple(limits), tuple(notes),
        previous=previous.tag if previous else None,
        previous_metrics=previous.metrics.get("quality", {}) if previous else {},
    )
    return view.manifest, rejected, quality


def _rejected_rows(refused: pa.Table, stage: str, reasons: dict[str, str]) -> pa.Table:
    keys = refused.column("key").to_pylist()
    columns = {name: refused.column(name) for name in SAMPLE_ID_COLUMNS}
    return pa.table(
        {**columns, "stage": [stage] * len(keys), "reason": [reasons[k] for k in keys]}, schema=REJECTED_SCHEMA
    )


def dataset_metrics(
    plugins: PluginBundle, samples: int, shards: int, manifest: pa.Table, rejected: pa.Table
) -> dict[str, Any]:
    """Figures that `dvc metrics show/diff` compares between releases.

    Label entropy is normalised by the expected label set, so a missing class lowers it.
    """
    planned = plugins.planned_rows(samples)
    labels = plugins.labels()
    captions = manifest.column("caption")
    lengths = pc.utf8_length(captions)
    metrics: dict[str, Any] = {
        "samples": manifest.num_rows,
        "planned": planned,
        "shards": shards,
        "rejected": rejected.num_rows,
        "rejected_by": dict(sorted(Counter(rejected.column("stage").to_pylist()).items())),
        "accept_rate": round(manifest.num_rows / planned, 4),
        "bytes": int(pc.sum(manifest.column("bytes")).as_py() or 0),
        "caption_length_mean": round(pc.mean(lengths).as_py() or 0.0, 2),
        "distinct_caption_ratio": round(pc.count_distinct(captions).as_py() / max(1, manifest.num_rows), 4),
    }
    if labels and "label" in manifest.column_names:
        tally = counts(manifest.column("label"))
        total = sum(tally.values()) or 1
        shares = {label: tally.get(label, 0) / total for label in sorted({*labels, *tally})}
        entropy = -sum(s * math.log(s) for s in shares.values() if s > 0)
        metrics["label_entropy_norm"] = round(entropy / math.log(len(shares)), 4) if len(shares) > 1 else 0.0
        metrics["label_share_min"] = round(min(shares.values()), 4)
        metrics["label_share_max"] = round(max(shares.values()), 4)
        metrics["labels"] = {label: tally.get(label, 0) for label in shares}
    return metrics


def previous_release(job: ReleaseJob) -> PreviousRelease | None:
    """The latest release of the dataset, with its samples when the workspace holds them
    (data/<dataset>/ is that release, not another version checked out)."""
    releases = job.registry.releases(job.recipe.name)
    if not releases:
        return None
    latest = releases[-1]
    workspace = job.release_dir
    try:
        in_workspace = json.loads((workspace / "metrics.json").read_text()) == latest.metrics
    except (OSError, json.JSONDecodeError):
        in_workspace = False
    labels = job.plugins.labels()
    if in_workspace and has_manifest(workspace):
        data = DatasetView(read_manifest(workspace), labels, workspace)
    else:
        manifest = _fetch_manifest(job, latest.tag)
        data = DatasetView(manifest, labels) if manifest is not None else None
    try:
        recipe = yaml.safe_load(job.registry.git("show", f"{latest.tag}:data/{job.recipe.name}/recipe.yaml"))
    except (RegistryError, yaml.YAMLError):
        recipe = None
    return PreviousRelease(latest.tag, latest.metrics, data, same_recipe=recipe == job.recipe.model_dump(mode="json"))


def _fetch_manifest(job: ReleaseJob, tag: str) -> pa.Table | None:
    """The manifest of release `tag` from the DVC remote (a fresh clone has no data), so
    cross-release dedup works in CI: its partitions, or the single file of a release made
    before the manifest was partitioned. None if unreachable."""
    try:
        storage = settings.resolve_storage()
    except StorageError:
        return None
    fetched = job.work_dir / f"previous-{tag.replace('@', '-')}"
    fetched.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_DIR, LEGACY_MANIFEST):  # a tag has one layout or the other
        try:
            dvc_get(str(job.registry.root), f"data/{job.recipe.name}/{name}", tag, fetched / name, storage)
            return read_manifest(fetched)
        except (RegistryError, OSError):
            continue
    return None
