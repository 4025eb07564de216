"""Operations benchmarks, side by side in one run on this machine:

  dask      shard fan-out on a local Dask cluster of 1 vs 2 worker processes
            (target: 2 workers >= 1.8x the samples/s of 1)
  resume    `synthfactory run` SIGKILLed once half the shards are durable, then rerun:
            shards whose work was lost (in flight at the kill) per worker (target <= 1)
  append    a published release, then the same recipe with 1 % more samples: shards
            generated and bytes uploaded to S3 by the second release (target <= 2 %)

The Prefect API (a local temporary server) and SeaweedFS are started once, before any
timing. Prints the figures; writes bench/results/operations.json.

    python bench/operations.py [--samples 20000] [--only dask,resume,append]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SYNTHFACTORY = str(Path(sys.executable).with_name("synthfactory"))


def shapes_recipe(path: Path, samples: int, shard_size: int, **execution) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "shapes.yaml").read_text())
    recipe.update(samples=samples, shard_size=shard_size, execution={"retries": 1, **execution})
    path.write_text(yaml.safe_dump(recipe))
    return path


def bench_dask(scratch: Path, samples: int) -> dict:
    """Generation wall time (the shard fan-out) on an existing Dask cluster of 1 and of 2
    worker processes, started and warmed (imports) before timing, fresh shard caches."""
    from distributed import Client, LocalCluster

    from flows.release import run_release

    shard_size = max(50, samples // 8)
    recipe = shapes_recipe(scratch / "dask.yaml", samples, shard_size)
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(2):
        for workers in (1, 2):  # interleaved: the machine is shared
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
                with Client(cluster) as client:
                    client.run(lambda: __import__("tasks.generate") and None)
                registry = scratch / f"dask-{workers}-{round_}"
                summary = run_release(str(recipe), str(registry), publish=False, dask_address=cluster.scheduler_address)
            metrics = json.loads((Path(summary.release_dir) / "metrics.json").read_text())
            seconds[workers].append(metrics["run"]["seconds"])
            bare = bare_pool(recipe, workers, scratch / f"bare-{workers}-{round_}")
            seconds.setdefault(-workers, []).append(bare)
    best = {workers: min(times) for workers, times in seconds.items()}
    return {
        "samples": samples,
        "shards": -(-samples // shard_size),
        "generate_seconds": {f"{w}_workers": [round(t, 2) for t in seconds[w]] for w in (1, 2)},
        "bare_pool_seconds": {f"{w}_processes": [round(t, 2) for t in seconds[-w]] for w in (1, 2)},
        "speedup_2_vs_1": round(best[1] / best[2], 3),
        "bare_pool_speedup_2_vs_1": round(best[-1] / best[-2], 3),
        "target": ">= 1.8 (the bare pool shows what this machine allows)",
    }


def _bare_shard(job: tuple) -> int:
    from synthfactory.release.build import make_shard

    recipe, plan, cache, key = job
    return make_shard(recipe, plan, cache, key).samples


def bare_pool(recipe_path: Path, processes: int, root: Path) -> float:
    """The same shards through make_shard on a plain spawn pool, without Prefect or Dask:
    the ceiling for the fan-out on this machine (pool started and warmed before timing)."""
    import multiprocessing

    from synthfactory.recipe import load_recipe
    from synthfactory.release.fingerprint import shard_keys
    from synthfactory.release.shard_cache import ShardCache
    from synthfactory.shards import plan_shards

    recipe = load_recipe(recipe_path)
    cache = ShardCache(root)
    plans = plan_shards(recipe.name, recipe.samples, recipe.shard_size)
    jobs = [(recipe, plan, cache, key) for plan, key in zip(plans, shard_keys(recipe, "bench", plans))]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_warm, range(processes))
        started = time.perf_counter()
        assert sum(pool.map(_bare_shard, jobs, chunksize=1)) > 0
        return time.perf_counter() - started


def _warm(_: int) -> None:
    import synthfactory.release.build  # noqa: F401


def bench_resume(scratch: Path, samples: int, prefect_url: str, env: dict[str, str]) -> dict:
    """Kill the whole process group once half the shards are in the cache; count the
    shards that were in flight (their staging dirs), then rerun and check what it did."""
    workers, shard_size = 2, max(50, samples // 40)  # 40 shards: a kill at 50 % lands mid-shard
    recipe = shapes_recipe(scratch / "resume.yaml", samples, shard_size, workers=workers)
    registry = scratch / "resume-registry"
    run_env = {**env, "PREFECT_API_URL": prefect_url}
    shards = -(-samples // shard_size)
    cache = registry / ".synthfactory" / "shards" / "shapes"
    proc = subprocess.Popen([SYNTHFACTORY, "run", str(recipe), "--registry", str(registry), "--no-publish"],
                            env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not cache.exists() or sum(not p.name.startswith(".") for p in cache.iterdir()) < shards // 2:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before half its shards were done (exit {proc.returncode})")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sum(not p.name.startswith(".") for p in cache.iterdir())
    in_flight = sum(p.name.startswith(".tmp-") for p in cache.iterdir())
    started = time.perf_counter()
    rerun = subprocess.run([SYNTHFACTORY, "run", str(recipe), "--registry", str(registry), "--no-publish"],
                           env=run_env, capture_output=True, text=True)
    rerun_seconds = time.perf_counter() - started
    if rerun.returncode != 0:
        raise SystemExit(rerun.stdout + rerun.stderr)
    metrics = json.loads((registry / "data" / "shapes" / "metrics.json").read_text())
    assert metrics["run"]["shards_reused"] == done, metrics["run"]
    return {
        "shards": shards,
        "workers": workers,
        "durable_at_kill": done,
        "in_flight_at_kill": in_flight,
        "lost_shards_per_worker": round(in_flight / workers, 2),
        "rerun_generated": metrics["run"]["shards_generated"],
        "rerun_reused": metrics["run"]["shards_reused"],
        "rerun_seconds": round(rerun_seconds, 2),
        "target": "lost shards per worker <= 1",
    }


def bench_append(scratch: Path, samples: int) -> dict:
    """Publish N samples, then N + 1 %: what the second release generated and uploaded."""
    from flows.release import run_release
    from synthfactory import settings
    from synthfactory.storage import minio_client

    storage = settings.resolve_storage()
    client = minio_client(storage)

    def stored() -> dict[str, int]:
        """S3 object -> size; DVC names objects by the md5 of their content."""
        objects = client.list_objects(storage.bucket, prefix=storage.prefix + "/", recursive=True)
        return {o.object_name: o.size for o in objects}

    shard_size = max(20, samples // 100)
    recipe = shapes_recipe(scratch / "append.yaml", samples, shard_size)
    registry = scratch / "append-registry"
    first = run_release(str(recipe), str(registry))
    before = stored()
    second = run_release(str(recipe), str(registry), samples=samples + samples // 100)
    new_objects = {name: size for name, size in stored().items() if name not in before}
    release_dir = registry / "data" / "shapes"
    part_of = {}  # md5 -> the release entry it belongs to (shards/, manifest/, validation/, ...)
    sizes: dict[str, int] = {}
    for path in (p for p in release_dir.rglob("*") if p.is_file()):
        entry = path.relative_to(release_dir).parts[0]
        part_of[hashlib.md5(path.read_bytes()).hexdigest()] = entry
        sizes[entry] = sizes.get(entry, 0) + path.stat().st_size
    uploaded_by: dict[str, int] = {}
    for name, size in new_objects.items():
        md5 = "".join(name.split("/")[-2:]).removesuffix(".dir")
        entry = part_of.get(md5, "directory listings")
        uploaded_by[entry] = uploaded_by.get(entry, 0) + size
    uploaded, release_bytes = sum(new_objects.values()), sum(sizes.values())
    total = second.shards_generated + second.shards_reused
    return {
        "first": first.tag,
        "second": second.tag,
        "samples": [samples, samples + samples // 100],
        "shards_generated": second.shards_generated,
        "shards_total": total,
        "shards_generated_pct": round(100 * second.shards_generated / total, 2),
        "shard_bytes_uploaded_pct": round(100 * uploaded_by.get("shards", 0) / sizes["shards"], 2),
        "bytes_uploaded": uploaded,
        "release_bytes": release_bytes,
        "bytes_uploaded_pct": round(100 * uploaded / release_bytes, 2),
        "uploaded_by_entry": dict(sorted(uploaded_by.items())),
        "release_bytes_by_entry": dict(sorted(sizes.items())),
        "target": "<= 2 % of shards and of bytes",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--only", default="dask,resume,append")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "operations.json")
    args = parser.parse_args()

    from prefect.settings import PREFECT_API_URL

    from flows.release import prefect_api
    from synthfactory import settings
    from synthfactory.s3server import EmbeddedS3

    settings.apply_offline_defaults()
    scratch = Path(tempfile.mkdtemp(prefix="synthfactory-ops-bench-"))
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    with EmbeddedS3(scratch / "s3") as s3, prefect_api():
        config = s3.config
        storage_env = dict(
            SYNTHFACTORY_S3_ENDPOINT=config.endpoint_url, SYNTHFACTORY_S3_BUCKET=config.bucket,
            AWS_ACCESS_KEY_ID=config.access_key, AWS_SECRET_ACCESS_KEY=config.secret_key,
        )
        os.environ.update(storage_env)
        parts = args.only.split(",")
        if "dask" in parts:
            report["dask"] = bench_dask(scratch, args.samples)
            print("dask:", json.dumps(report["dask"]))
        if "resume" in parts:
            report["resume"] = bench_resume(scratch, args.samples, PREFECT_API_URL.value(), dict(os.environ))
            print("resume:", json.dumps(report["resume"]))
        if "append" in parts:
            report["append"] = bench_append(scratch, args.samples)
            print("append:", json.dumps(report["append"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
