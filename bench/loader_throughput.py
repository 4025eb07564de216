"""Loader throughput: synthfactory.loader from S3 with a cold cache, from its warm cache,
and the webdataset library reading the same shards from local disk, in one run.

Variants, each timed in a fresh process (load + iterate every sample, decoding the same
fields the same way: PNG -> uint8 C×H×W tensor, JSON -> dict, text -> str, label -> int):
  loader_s3_cold     a `git clone` of the registry (no DVC cache), empty shard cache:
                     shards stream from S3 through DVC and are cached on the way
  loader_warm        the same, with the shard cache the cold run filled (no S3 reads);
                     every sample checked against the manifest: key, size, sha256 of
                     every member (the default, verify="sha256")
  loader_warm_sizes  the same with verify="size" (keys and sizes only, no hashing):
                     the difference to loader_warm is the cost of the hashing
  webdataset_local   wds.WebDataset(shards).decode("torchrgb8") on the release's files
  loader_local_dir   the loader reading that release directory in place

A shapes release of `--samples` samples is published once to an embedded SeaweedFS under
`--work` (kept, with its credentials, and reused by later runs). Prints the median
samples/s of `--repeats` interleaved repetitions, the peak RSS of each variant and the
warm / webdataset ratio; writes bench/results/loader_throughput.json.

    python bench/loader_throughput.py --samples 4000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "shapes.yaml"
VARIANTS = ("loader_s3_cold", "loader_warm", "loader_warm_sizes", "webdataset_local", "loader_local_dir")


def publish(work: Path, samples: int, shard_size: int) -> str:
    """The tag of a shapes release of `samples` in work/registry, published if missing."""
    marker = work / "release.json"
    wanted = {"samples": samples, "shard_size": shard_size}
    if marker.exists() and json.loads(marker.read_text())["wanted"] == wanted:
        return json.loads(marker.read_text())["tag"]
    from flows.release import run_release

    shutil.rmtree(work / "registry", ignore_errors=True)
    summary = run_release(str(RECIPE), str(work / "registry"), samples=samples, overrides=[f"shard_size={shard_size}"])
    marker.write_text(json.dumps({"wanted": wanted, "tag": summary.tag}))
    return summary.tag


def measure(variant: str, work: Path, tag: str) -> dict[str, float]:
    """One timed pass, in its own process so the peak RSS is this variant's. Imports come
    first, outside the timing, for every variant alike; setup (load(): registry, DVC
    listing) is inside it and also reported alone."""
    import dvc.api  # noqa: F401  (imported lazily by the loader on first use)
    import webdataset as wds

    from synthfactory.loader import iter_samples

    dataset = tag.partition("@")[0]
    release_dir = work / "registry" / "data" / dataset
    cache = work / "cache"
    if variant == "loader_s3_cold":
        shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    if variant in ("loader_s3_cold", "loader_warm", "loader_warm_sizes"):
        verify = "size" if variant == "loader_warm_sizes" else "sha256"
        samples = iter_samples(dataset, tag, work / "clone", shuffle=False, cache_dir=cache, verify=verify)
    elif variant == "loader_local_dir":
        samples = iter_samples(dataset, registry=release_dir, shuffle=False)
    else:
        classes = {name: i for i, name in enumerate(recipe_classes(release_dir))}
        shards = sorted(str(p) for p in (release_dir / "shards").glob("*.tar"))
        samples = iter(wds.WebDataset(shards, shardshuffle=False).decode("torchrgb8").map(
            lambda s: {**s, "label": classes[s["json"]["label"]]}
        ))  # fmt: skip
    setup = time.perf_counter() - started
    count = 0
    for sample in samples:
        assert sample["png"].shape[0] == 3 and isinstance(sample["label"], int)
        count += 1
    seconds = time.perf_counter() - started
    return {"samples": count, "seconds": seconds, "setup_s": setup, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def recipe_classes(release_dir: Path) -> list[str]:
    """The label list the loader takes from the release's recipe, for the webdataset side."""
    import yaml

    return yaml.safe_load((release_dir / "recipe.yaml").read_text())["generator"]["params"]["classes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / ".data" / "bench-loader")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loader_throughput.json")
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from synthfactory import settings

    settings.apply_offline_defaults()
    if args.measure:
        print(json.dumps(measure(args.measure, args.work, args.tag)))
        return

    from synthfactory.s3server import start_daemon, stop_daemon

    args.work.mkdir(parents=True, exist_ok=True)
    config = start_daemon(args.work / "s3")
    env = {
        **os.environ,
        "SYNTHFACTORY_S3_ENDPOINT": config.endpoint_url or "",
        "SYNTHFACTORY_S3_BUCKET": config.bucket,
        "AWS_ACCESS_KEY_ID": config.access_key or "",
        "AWS_SECRET_ACCESS_KEY": config.secret_key or "",
    }
    os.environ.update(env)
    try:
        tag = publish(args.work, args.samples, args.shard_size)
        shutil.rmtree(args.work / "clone", ignore_errors=True)
        subprocess.run(["git", "clone", "--quiet", str(args.work / "registry"), str(args.work / "clone")], check=True)
        runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:  # cold first: it empties the cache the warm run reads
                child = [sys.executable, __file__, "--measure", variant, "--tag", tag, "--work", str(args.work)]
                out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
                runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        stop_daemon(args.work / "s3")

    counts = {run["samples"] for variant_runs in runs.values() for run in variant_runs}
    assert len(counts) == 1, f"variants read different sample counts: {counts}"
    rates = {v: statistics.median(r["samples"] / r["seconds"] for r in runs[v]) for v in VARIANTS}
    peaks = {v: max(r["peak_rss_mb"] for r in runs[v]) for v in VARIANTS}
    ratio = rates["loader_warm"] / rates["webdataset_local"]
    hashing = rates["loader_warm"] / rates["loader_warm_sizes"]
    report = {
        "tag": tag,
        "samples": counts.pop(),
        "shard_size": args.shard_size,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "samples_per_s_median": {v: round(rate, 1) for v, rate in rates.items()},
        "samples_per_s_all": {v: [round(r["samples"] / r["seconds"], 1) for r in runs[v]] for v in VARIANTS},
        "setup_s_median": {v: round(statistics.median(r["setup_s"] for r in runs[v]), 3) for v in VARIANTS},
        "peak_rss_mb": {v: round(peak, 1) for v, peak in peaks.items()},
        "warm_vs_webdataset": round(ratio, 3),
        "sha256_vs_sizes_only": round(hashing, 3),
        "target": "warm >= 0.90 x webdataset",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['samples']} samples of {tag}, shards of {args.shard_size}, median of {args.repeats}")
    for variant in VARIANTS:
        print(f"{variant:>18}: {rates[variant]:8.1f} samples/s   peak RSS {peaks[variant]:6.0f} MB")
    print(f"{'warm / webdataset':>18}: {ratio:.3f} (target >= 0.90; warm checks sha256 of every sample)")
    print(f"{'sha256 / sizes':>18}: {hashing:.3f} (the cost of hashing every sample)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
