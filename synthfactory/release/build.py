"""Building one shard: generate its slots, run the per-sample checks, write the tar and
manifest fragments, through the content-addressed shard cache (resumable runs).

This is what a shard worker runs; it imports only what generating needs (no GX, DVC
or pandas), so a worker process is ready sooner.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from synthfactory.checks import Check
from synthfactory.generators import TransientGeneratorError
from synthfactory.recipe import Faults, Recipe
from synthfactory.release.bundle import plugins_of
from synthfactory.release.shard_cache import ShardCache
from synthfactory.samples import Rejection, Sample, derive_seed, slot_for
from synthfactory.shards import ShardPlan, write_shard
from synthfactory.usage import add_usage


class ShardFailedError(RuntimeError):
    """A shard kept failing after its retries; nothing was published."""


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
    usage: dict[str, float] = field(default_factory=dict)  # what making it used (recorded: also when reused)
    messages: tuple[str, ...] = ()  # warnings a worker process logged while making it (for the run's logs)
    cpu_seconds: float = 0.0  # CPU time the worker spent on it in this run (its process's, or its thread's)


def run_checks(checks: tuple[Check, ...], samples: list[Sample]) -> tuple[list[Sample], list[Rejection]]:
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


def build_shard(recipe: Recipe, plan: ShardPlan, stage_dir: Path, fragments_dir: Path, attempt: int = 1,
                responses: Path | None = None) -> ShardResult:
    """Generate samples [plan.start, plan.stop) and write them as one shard (served-model
    answers kept in `responses`)."""
    started = time.perf_counter()
    plugins = plugins_of(recipe)
    generator = plugins.generator
    chain = generator.chain()
    for link in chain:
        link.response_cache = responses
        link.take_usage()  # drop what a failed earlier attempt in this process counted
    slots = [slot_for(recipe.seed, i) for i in range(plan.start, plan.stop)]
    samples, rejections = [], []
    for item in generator.generate(slots):
        (rejections if isinstance(item, Rejection) else samples).append(item)
    usage = add_usage(link.take_usage() for link in chain)
    unfilled = {slot.index for slot in slots} - {item.slot.index for item in (*samples, *rejections)}
    if unfilled:
        raise RuntimeError(f"generator {recipe.generator.kind} left {len(unfilled)} slots without a sample or rejection")
    samples, refused = run_checks(plugins.checks, samples)
    rejections += refused
    write_shard(stage_dir, plan.name, fragments_dir, samples, rejections, generator.plugin_name, generator.version,
                plugins.schema)
    seconds, device = time.perf_counter() - started, ",".join(plugins.devices()) or "cpu"
    if device != "cpu":  # accelerator time is priced (recipe cost.usd_per_gpu_hour)
        usage = add_usage([usage, {"device_s": seconds}])
    return ShardResult(
        index=plan.index,
        name=plan.name,
        samples=len(samples),
        rejected=len(rejections),
        seconds=seconds,
        attempt=attempt,
        worker=this_worker(),
        device=device,
        usage=usage,
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
                           key=key, reused=True, worker=this_worker(), usage=recorded.get("usage", {}))
    if injected_fault(recipe.faults, recipe.seed, plan.index, attempt):
        raise TransientGeneratorError(f"injected fault: shard {plan.index} attempt {attempt}")
    staging = cache.staging_dir(key)
    try:
        result = build_shard(recipe, plan, staging, staging, attempt, cache.responses)
        cache.commit(staging, key, {"samples": result.samples, "rejected": result.rejected, "seconds": result.seconds,
                                    "usage": result.usage})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace(result, key=key)
