"""The baseline the release flow is measured against: a bare spawn process pool running
the recipe's generator plug-in into plain tar shards, nothing else (no Prefect, shard
cache, manifest, checks, gate or registry). A whole command, like `synthfactory run`.

    python bench/bare_pool.py recipes/shapes.yaml --samples 20000 --workers 2 --out /tmp/bare

Prints one JSON line: samples, shards, seconds, shard_cpu_seconds (summed over shards).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import time
from pathlib import Path


@functools.cache
def _generator(recipe_path: str, samples: int):
    from synthfactory.recipe import load_recipe
    from synthfactory.release.bundle import plugins_of

    recipe = load_recipe(recipe_path, samples=samples)
    return recipe, plugins_of(recipe).generator


def make_shard(job: tuple[str, int, int, int, str]) -> tuple[int, float]:
    """Generate samples [start, stop) and write them as one tar: (samples, CPU seconds)."""
    from synthfactory.samples import slot_for
    from synthfactory.shards import write_tar

    recipe_path, samples, start, stop, out = job
    recipe, generator = _generator(recipe_path, samples)  # once per worker, as the flow's workers warm up
    started = time.process_time()
    made = list(generator.generate([slot_for(recipe.seed, i) for i in range(start, stop)]))
    write_tar(Path(out) / f"{start:012d}.tar", made)
    return len(made), time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--shard-size", type=int, default=2500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(args.recipe, args.samples, start, min(args.samples, start + args.shard_size), str(args.out))
            for start in range(0, args.samples, args.shard_size)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        done = pool.map(make_shard, jobs, chunksize=1)
    print(json.dumps({"samples": sum(n for n, _ in done), "shards": len(done),
                      "seconds": round(time.perf_counter() - started, 3),
                      "shard_cpu_seconds": round(sum(cpu for _, cpu in done), 3)}))


if __name__ == "__main__":
    main()
