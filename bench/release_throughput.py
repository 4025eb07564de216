"""Release throughput: `synthfactory run` against a bare spawn process pool, as whole
commands, side by side in one run.

Variants, interleaved round by round (the machine is shared), each a fresh command:
  bare          bench/bare_pool.py: the same generator plug-in into plain tar shards
                through a spawn pool of the same worker count (the baseline)
  flow          `synthfactory run --no-publish` into a fresh clone (Prefect flow, shard
                cache, dataset checks, GX gate, data/<dataset>/)
  flow_publish  `synthfactory run` (+ DVC commit and push to the embedded S3, git commit, tag)

Targets: flow >= 0.90 and flow_publish >= 0.85 of the bare pool's samples/s; the
workers' CPU per shard <= 1.1x the bare loop's. The Prefect API (a local server) and
SeaweedFS start once, before any timing, as they run in a deployment. Prints the
medians; writes bench/results/release_throughput.json.

    python bench/release_throughput.py --samples 20000,100000 --rounds 3
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYNTHFACTORY = str(Path(sys.executable).with_name("synthfactory"))


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the command and the children it waited for, stdout)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}):\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, text


def bare(samples: int, workers: int, scratch: Path, env: dict[str, str]) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(dir=scratch))
    wall, cpu, text = timed([sys.executable, str(REPO / "bench" / "bare_pool.py"), str(REPO / "recipes" / "shapes.yaml"),
                             "--samples", str(samples), "--workers", str(workers), "--out", str(out)], REPO, env)
    shutil.rmtree(out)
    shard_cpu = json.loads(text.strip().splitlines()[-1])["shard_cpu_seconds"]
    return {"seconds": wall, "cpu_seconds": cpu, "shard_cpu_seconds": shard_cpu}


def flow(samples: int, workers: int, scratch: Path, env: dict[str, str], publish: bool) -> dict[str, float]:
    registry = Path(tempfile.mkdtemp(dir=scratch)) / "registry"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(registry)], check=True)
    argv = [SYNTHFACTORY, "run", "recipes/shapes.yaml", "--samples", str(samples), "--workers", str(workers),
            "--registry", str(registry)]
    wall, cpu, _ = timed(argv + ([] if publish else ["--no-publish"]), registry, env)
    run = json.loads((registry / "data" / "shapes" / "metrics.json").read_text())["run"]
    shutil.rmtree(registry.parent)
    return {"seconds": wall, "cpu_seconds": cpu, "shard_cpu_seconds": run["worker_cpu_seconds"],
            "generate_seconds": run["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="20000,100000", help="comma-separated sample counts")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "release_throughput.json")
    args = parser.parse_args()

    from flows.release import prefect_api
    from synthfactory import settings
    from synthfactory.s3server import EmbeddedS3

    settings.apply_offline_defaults()
    scratch = Path(tempfile.mkdtemp(prefix="synthfactory-bench-"))
    sizes = [int(n) for n in args.samples.split(",")]
    runs: dict[str, list[dict[str, float]]] = {}
    with EmbeddedS3(scratch / "s3") as s3, prefect_api():
        config = s3.config
        env = {**os.environ, "SYNTHFACTORY_S3_ENDPOINT": config.endpoint_url, "SYNTHFACTORY_S3_BUCKET": config.bucket,
               "AWS_ACCESS_KEY_ID": config.access_key, "AWS_SECRET_ACCESS_KEY": config.secret_key}
        flow(200, args.workers, scratch, env, publish=True)  # server database, bucket, disk caches
        for round_ in range(args.rounds):
            for samples in sizes:
                for name, measure in (("bare", lambda: bare(samples, args.workers, scratch, env)),
                                      ("flow", lambda: flow(samples, args.workers, scratch, env, publish=False)),
                                      ("flow_publish", lambda: flow(samples, args.workers, scratch, env, publish=True))):
                    figures = measure()
                    runs.setdefault(f"{name}_{samples}", []).append(figures)
                    print(f"round {round_ + 1} {name:>12} {samples:>7}: {figures['seconds']:6.2f} s wall, "
                          f"{figures['cpu_seconds']:6.2f} s CPU", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    median = {run: {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]} for run, rounds in runs.items()}
    ratios: dict[str, float] = {}
    for samples in sizes:
        base = median[f"bare_{samples}"]
        ratios[f"flow_vs_bare_{samples}"] = round(base["seconds"] / median[f"flow_{samples}"]["seconds"], 3)
        ratios[f"flow_publish_vs_bare_{samples}"] = round(base["seconds"] / median[f"flow_publish_{samples}"]["seconds"], 3)
        ratios[f"shard_cpu_vs_bare_{samples}"] = round(median[f"flow_{samples}"]["shard_cpu_seconds"] / base["shard_cpu_seconds"], 3)
    report = {
        "samples": sizes,
        "workers": args.workers,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
        "median": median,
        "ratios": ratios,
        "targets": {"flow_vs_bare": ">= 0.90", "flow_publish_vs_bare": ">= 0.85", "shard_cpu_vs_bare": "<= 1.10"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, value in ratios.items():
        print(f"{name:>28}: {value:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
