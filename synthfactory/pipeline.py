"""The release stages as plain functions; flows/ and tasks/ only orchestrate them.

build_shard: generate one shard's samples and write the tar + manifest fragments.
make_shard: the same through the content-addressed shard cache (resumable runs).
assemble: merge fragments into the release's manifest, rejected list and metrics.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synthfactory.checks import CHECKS, Check, DatasetCheck, DatasetView, PreviousRelease
from synthfactory.generators import GENERATORS, Generator, PluginSpec, Rejection, Sample, SampleSlot, TransientGeneratorError
from synthfactory.generators.base import derive_seed
from synthfactory.models import UsesModel
from synthfactory.plugins import Registry
from synthfactory.recipe import Faults, Recipe
from synthfactory.shard_cache import ShardCache
from synthfactory.shards import (
    REJECTED_DIR,
    REJECTED_SCHEMA,
    ShardPlan,
    fragment_path,
    manifest_schema,
    sample_key,
    sample_seed,
    set_aside,
    write_shard,
)


@dataclass(frozen=True)
class ShardResult:
    """One shard of a run: what it holds and what producing it cost in this run."""

    index: int
    name: str
    samples: int
    rejected: int
    seconds: float  # generation time in this run (0 when reused from the shard cache)
    attempt: int
    key: str = ""  # shard-cache key
    reused: bool = False
    worker: str = ""  # host:pid that produced it in this run
    device: str = "cpu"


@functools.lru_cache(maxsize=8)
def _cached_plugin(registry: Registry[Any], kind: str, params_json: str) -> Any:
    """One plug-in instance per worker process and params; models load lazily on first use."""
    return registry.get(kind).from_params(json.loads(params_json))


def _plugin(registry: Registry[Any], spec: PluginSpec) -> Any:
    return _cached_plugin(registry, spec.kind, json.dumps(spec.params, sort_keys=True))


def generator_for(recipe: Recipe) -> Generator:
    return _plugin(GENERATORS, recipe.generator)


def checks_for(recipe: Recipe) -> list[Check]:
    return [_plugin(CHECKS, spec) for spec in recipe.checks]


def plugins_for(recipe: Recipe) -> list[Generator | Check]:
    """Every plug-in a recipe runs: the generator chain (upstream included) and the checks."""
    return [*generator_for(recipe).chain(), *checks_for(recipe)]


def schema_for(recipe: Recipe) -> pa.Schema:
    return manifest_schema(generator_for(recipe), checks_for(recipe))


def planned_rows(recipe: Recipe) -> int:
    """Samples the release holds if nothing is rejected (slots × outputs per slot)."""
    return recipe.samples * generator_for(recipe).outputs_per_slot()


def run_checks(checks: list[Check], samples: list[Sample]) -> tuple[list[Sample], list[Rejection]]:
    """Apply each check in turn: measured columns join the sample, failures are set aside."""
    refused: list[Rejection] = []
    for check in checks:
        kept = []
        for sample, verdict in zip(samples, check.check(samples) if samples else [], strict=True):
            sample.columns.update(verdict.columns)
            if verdict.reason is None:
                kept.append(sample)
            else:
                refused.append(Rejection(sample.slot, verdict.reason, stage=check.plugin_name, sample=sample))
        samples = kept
    return samples, refused


def build_shard(
    recipe: Recipe, plan: ShardPlan, stage_dir: Path, fragments_dir: Path, attempt: int = 1
) -> ShardResult:
    """Generate samples [plan.start, plan.stop) and write them as one shard."""
    started = time.perf_counter()
    generator = generator_for(recipe)
    slots = [SampleSlot(i, sample_key(i), sample_seed(recipe.seed, i)) for i in range(plan.start, plan.stop)]
    samples, rejections = [], []
    for item in generator.generate(slots):
        (rejections if isinstance(item, Rejection) else samples).append(item)
    unfilled = {slot.index for slot in slots} - {item.slot.index for item in (*samples, *rejections)}
    if unfilled:
        raise RuntimeError(f"generator {recipe.generator.kind} left {len(unfilled)} slots without a sample or rejection")
    samples, refused = run_checks(checks_for(recipe), samples)
    rejections += refused
    write_shard(stage_dir, plan.name, fragments_dir, samples, rejections, generator, schema_for(recipe))
    devices = sorted({str(p.device) for p in plugins_for(recipe) if isinstance(p, UsesModel)} - {"cpu"})
    return ShardResult(
        index=plan.index,
        name=plan.name,
        samples=len(samples),
        rejected=len(rejections),
        seconds=time.perf_counter() - started,
        attempt=attempt,
        worker=this_worker(),
        device=",".join(devices) or "cpu",
    )


def this_worker() -> str:
    """host:pid, to tell which worker process produced a shard."""
    return f"{socket.gethostname()}:{os.getpid()}"


def injected_fault(faults: Faults, seed: int, shard: int, attempt: int) -> bool:
    """The recipe's fault drill: fail the first `fail_attempts` attempts of the chosen shards,
    and a deterministic `fail_rate` fraction of all other attempts."""
    if faults.shards is not None and shard not in faults.shards:
        return False
    if attempt <= faults.fail_attempts:
        return True
    return derive_seed(derive_seed(seed, shard), attempt) < faults.fail_rate * 2**63


def make_shard(recipe: Recipe, plan: ShardPlan, cache: ShardCache, key: str, attempt: int = 1) -> ShardResult:
    """The shard from the cache if a run already finished it, else generated and committed
    to the cache atomically (a kill mid-shard leaves only a staging dir, never an entry)."""
    recorded = cache.lookup(key)
    if recorded is not None:
        return ShardResult(plan.index, plan.name, recorded["samples"], recorded["rejected"], 0.0, attempt,
                           key=key, reused=True, worker=this_worker())
    if injected_fault(recipe.faults, recipe.seed, plan.index, attempt):
        raise TransientGeneratorError(f"injected fault: shard {plan.index} attempt {attempt}")
    staging = cache.staging_dir(key)
    try:
        result = build_shard(recipe, plan, staging, staging, attempt)
        cache.commit(staging, key, {"samples": result.samples, "rejected": result.rejected, "seconds": result.seconds})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace(result, key=key)


@dataclass(frozen=True)
class RunStats:
    """What the run did, as reported to the user, in metrics.json and as Prefect artifacts."""

    seconds: float  # wall time of the shard fan-out
    retries: int
    shards_generated: int
    shards_reused: int  # found finished in the shard cache (resumed or unchanged)
    worker_seconds: float  # generation time summed over shards
    worker_processes: int  # distinct processes that ran shards (scale-out at work)
    device_seconds: dict[str, float]  # generation time on accelerators, per device

    @classmethod
    def of(cls, results: list[ShardResult], seconds: float) -> "RunStats":
        device_seconds: dict[str, float] = {}
        for r in results:
            if r.device != "cpu":
                device_seconds[r.device] = round(device_seconds.get(r.device, 0.0) + r.seconds, 3)
        return cls(
            seconds=round(seconds, 3),
            retries=sum(r.attempt - 1 for r in results),
            shards_generated=sum(not r.reused for r in results),
            shards_reused=sum(r.reused for r in results),
            worker_seconds=round(sum(r.seconds for r in results), 3),
            worker_processes=len({r.worker for r in results}),
            device_seconds=device_seconds,
        )

    def as_dict(self, samples: int) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": round(samples / self.seconds, 1) if self.seconds else None}


def assemble(recipe: Recipe, cache: ShardCache, results: list[ShardResult]) -> tuple[pa.Table, pa.Table]:
    """Merge the shard fragments from the cache: (manifest, rejected) in shard order."""
    ordered = sorted(results, key=lambda r: r.index)

    def merged(kind: str, schema: pa.Schema) -> pa.Table:
        parts = [pq.read_table(fragment_path(cache.entry(r.key), r.name, kind), schema=schema) for r in ordered]
        return pa.concat_tables(parts) if parts else schema.empty_table()

    return merged("manifest", schema_for(recipe)), merged("rejected", REJECTED_SCHEMA)


@dataclass
class Quality:
    """What the dataset-level checks found, for metrics.json, the gate and the report."""

    metrics: dict[str, dict[str, float]]  # check -> metric -> value
    limits: list[tuple[str, float | None, float | None]]  # (check_metric, min, max) the gate enforces
    notes: list[str]


def dataset_checks_for(recipe: Recipe) -> list[DatasetCheck]:
    return [check for check in checks_for(recipe) if isinstance(check, DatasetCheck)]


def judge_dataset(
    recipe: Recipe, stage_dir: Path, manifest: pa.Table, rejected: pa.Table, previous: PreviousRelease | None
) -> tuple[pa.Table, pa.Table, Quality]:
    """Run the dataset-level checks in recipe order; samples a check refuses leave the
    shards for rejected/ (and rejected.parquet, with the check and reason) before the
    next check looks. Returns the final (manifest, rejected) and the quality figures."""
    view = DatasetView(manifest, generator_for(recipe).labels(), stage_dir)
    quality = Quality({}, [], [])
    for check in dataset_checks_for(recipe):
        findings = check.evaluate(view, previous)
        name = check.plugin_name
        quality.metrics[name] = findings.metrics
        quality.limits += [(f"{name}_{metric}", low, high) for metric, (low, high) in findings.limits.items()]
        quality.notes += [f"{name}: {note}" for note in findings.notes]
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
    return view.manifest, rejected, quality


def _rejected_rows(refused: pa.Table, stage: str, reasons: dict[str, str]) -> pa.Table:
    keys = refused.column("key").to_pylist()
    columns = {name: refused.column(name) for name in ("key", "shard", "index", "seed", "group", "caption")}
    return pa.table(
        {**columns, "stage": [stage] * len(keys), "reason": [reasons[k] for k in keys]}, schema=REJECTED_SCHEMA
    )


def write_stage(stage_dir: Path, manifest: pa.Table, rejected: pa.Table) -> None:
    (stage_dir / REJECTED_DIR).mkdir(parents=True, exist_ok=True)  # present (maybe empty) in every release
    pq.write_table(manifest, stage_dir / "manifest.parquet", compression="zstd")
    pq.write_table(rejected, stage_dir / "rejected.parquet", compression="zstd")


def dataset_metrics(
    recipe: Recipe, manifest: pa.Table, rejected: pa.Table, labels: tuple[str, ...] | None
) -> dict[str, Any]:
    """Figures that `dvc metrics show/diff` compares between releases.

    Label entropy is normalised by the expected label set, so a missing class lowers it.
    """
    planned = planned_rows(recipe)
    captions = manifest.column("caption")
    lengths = pc.utf8_length(captions)
    metrics: dict[str, Any] = {
        "samples": manifest.num_rows,
        "planned": planned,
        "shards": recipe.shard_count,
        "rejected": rejected.num_rows,
        "rejected_by": dict(sorted(Counter(rejected.column("stage").to_pylist()).items())),
        "accept_rate": round(manifest.num_rows / planned, 4),
        "bytes": int(pc.sum(manifest.column("bytes")).as_py() or 0),
        "caption_length_mean": round(pc.mean(lengths).as_py() or 0.0, 2),
        "distinct_caption_ratio": round(pc.count_distinct(captions).as_py() / max(1, manifest.num_rows), 4),
    }
    if labels and "label" in manifest.column_names:
        counts = Counter(manifest.column("label").to_pylist())
        total = sum(counts.values()) or 1
        shares = {label: counts.get(label, 0) / total for label in sorted({*labels, *counts})}
        entropy = -sum(s * math.log(s) for s in shares.values() if s > 0)
        metrics["label_entropy_norm"] = round(entropy / math.log(len(shares)), 4) if len(shares) > 1 else 0.0
        metrics["label_share_min"] = round(min(shares.values()), 4)
        metrics["label_share_max"] = round(max(shares.values()), 4)
        metrics["labels"] = {label: counts.get(label, 0) for label in shares}
    return metrics


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
