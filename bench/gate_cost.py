"""What the quality gate costs next to generation, for a recipe (default: the procedural
shapes recipe with its dedup / diversity / balance checks), measured in one run.

  generate      build every shard with no checks (serial, one process)
  + checks      the same with the recipe's checks (per-sample parts run in the shard task)
  judge         dataset-level checks on the assembled release (dedup, diversity, balance)
  gx            the GX gate with the quality table vs without it

gate cost = (checks - generate) + judge + (gx with quality - gx without); target ≤ 10 %.

    python bench/gate_cost.py --samples 10000
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "shapes.yaml")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gate_cost.json")
    args = parser.parse_args()

    from synthfactory import settings

    settings.apply_offline_defaults()
    import dataclasses

    from synthfactory.recipe import load_recipe
    from synthfactory.release.build import make_shard
    from synthfactory.release.bundle import plugins_of
    from synthfactory.release.fingerprint import shard_keys
    from synthfactory.release.gate import gate_spec
    from synthfactory.release.shard_cache import ShardCache
    from synthfactory.release.stage import assemble, judge_dataset
    from synthfactory.shards import plan_shards
    from synthfactory.validation import manifest_frame, quality_row, validate_manifest

    checked = load_recipe(args.recipe, samples=args.samples)
    plain = load_recipe(args.recipe, samples=args.samples, overrides=["checks=[]"])
    scratch = Path(tempfile.mkdtemp(prefix="synthfactory-gate-bench-"))
    timings: dict[str, float] = {}

    def build(recipe, name: str) -> tuple[ShardCache, list]:
        started = time.perf_counter()
        cache = ShardCache(scratch / name)
        plans = plan_shards(recipe.name, recipe.samples, recipe.shard_size)
        results = [make_shard(recipe, plan, cache, key) for plan, key in zip(plans, shard_keys(recipe, "bench", plans))]
        timings[name] = time.perf_counter() - started
        return cache, results

    build(plain, "generate")
    cache, results = build(checked, "checks")
    for result in results:
        cache.link_into(result.key, result.name, scratch / "stage")
    manifest, rejected = assemble(cache, plugins_of(checked).schema, results)
    started = time.perf_counter()
    manifest, rejected, quality = judge_dataset(plugins_of(checked), scratch / "stage", manifest, rejected, None)
    timings["judge"] = time.perf_counter() - started
    frame = manifest_frame(manifest)
    spec = gate_spec(checked)
    validate_manifest(frame, spec, scratch / "warm-up")  # GX import and first-run costs out of the way
    for label, limits in (("gx", ()), ("gx_quality", tuple(quality.limits))):
        started = time.perf_counter()
        validate_manifest(frame, dataclasses.replace(spec, metric_limits=limits), scratch / label,
                          quality_row(quality.metrics))
        timings[label] = time.perf_counter() - started
    gate = (timings["checks"] - timings["generate"]) + timings["judge"] + (timings["gx_quality"] - timings["gx"])
    result = {
        "samples": args.samples,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "gate_seconds": round(gate, 3),
        "gate_share_of_generation": round(gate / timings["generate"], 4),
        "quality": quality.metrics,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
