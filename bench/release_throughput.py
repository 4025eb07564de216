"""Release throughput: bare generator loop vs the Prefect release flow, in one run.

Variants, each writing the same shards into a fresh registry on this machine:
  bare_serial    a plain loop: generate each shard and write it (the baseline)
  bare_parallel  the same loop over a process pool of the flow's worker count
  flow           `synthfactory run --no-publish` (Prefect flow, GX gate, staging)
  flow_publish   `synthfactory run` (+ dvc commit/push to embedded S3, git commit, tag)

The Prefect API (a local temporary server) and SeaweedFS are started once, before any
timing, as they would be in a deployment. Prints ratios; writes bench/results/*.json.

    python bench/release_throughput.py --samples 20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "shapes.yaml"


def _bare_shard(args: tuple) -> int:
    from synthfactory.release.build import build_shard

    recipe, plan, stage_dir, fragments_dir = args
    return build_shard(recipe, plan, stage_dir, fragments_dir).samples


def bare(samples: int, workers: int, root: Path) -> float:
    from synthfactory.recipe import load_recipe
    from synthfactory.shards import plan_shards

    recipe = load_recipe(RECIPE, samples=samples)
    jobs = [(recipe, plan, root / "release", root / "fragments") for plan in plan_shards(recipe.name, samples, recipe.shard_size)]
    started = time.perf_counter()
    if workers == 1:
        done = sum(_bare_shard(job) for job in jobs)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            done = sum(pool.map(_bare_shard, jobs, chunksize=1))
    elapsed = time.perf_counter() - started
    assert done == samples, done
    return elapsed


def flow(samples: int, workers: int, registry: Path, publish: bool) -> float:
    from flows.release import run_release

    if not registry.exists():
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(registry)], check=True)
    started = time.perf_counter()
    summary = run_release(str(RECIPE), str(registry), samples=samples, publish=publish, workers=workers)
    elapsed = time.perf_counter() - started
    assert summary.samples == samples, summary
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "release_throughput.json")
    args = parser.parse_args()

    from flows.release import prefect_api
    from synthfactory import settings
    from synthfactory.s3server import EmbeddedS3

    settings.apply_offline_defaults()
    scratch = Path(tempfile.mkdtemp(prefix="synthfactory-bench-"))
    results: dict[str, float] = {}
    with EmbeddedS3(scratch / "s3") as s3, prefect_api():
        config = s3.config
        os.environ.update(
            SYNTHFACTORY_S3_ENDPOINT=config.endpoint_url, SYNTHFACTORY_S3_BUCKET=config.bucket,
            AWS_ACCESS_KEY_ID=config.access_key, AWS_SECRET_ACCESS_KEY=config.secret_key,
        )
        flow(200, args.workers, scratch / "warmup", publish=True)  # server DB, imports, bucket
        results["bare_serial"] = bare(args.samples, 1, scratch / "bare1")
        results["bare_parallel"] = bare(args.samples, args.workers, scratch / "bare2")
        results["flow"] = flow(args.samples, args.workers, scratch / "flow", publish=False)
        results["flow_publish"] = flow(args.samples, args.workers, scratch / "flow_publish", publish=True)
    shutil.rmtree(scratch, ignore_errors=True)

    rates = {name: args.samples / seconds for name, seconds in results.items()}
    ratios = {
        "flow_vs_bare_serial": rates["flow"] / rates["bare_serial"],
        "flow_vs_bare_parallel": rates["flow"] / rates["bare_parallel"],
        "flow_publish_vs_bare_serial": rates["flow_publish"] / rates["bare_serial"],
        "flow_publish_vs_bare_parallel": rates["flow_publish"] / rates["bare_parallel"],
    }
    report = {
        "samples": args.samples,
        "workers": args.workers,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "seconds": {k: round(v, 2) for k, v in results.items()},
        "samples_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "target": "flow >= 0.90 x bare loop (goal 0.95)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name in results:
        print(f"{name:>14}: {results[name]:7.2f} s  {rates[name]:8.1f} samples/s")
    for name, value in ratios.items():
        print(f"{name:>30}: {value:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
