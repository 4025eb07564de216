"""Rollout throughput: the factory's `gym-rollouts` release vs a bare Gymnasium loop, in one run.

Both make the clips of recipes/driving.yaml (highway-env, random policy) with the same
parallelism, the same episode seeds and the same clip encoder:
  bare     a spawn process pool of W workers; each makes whole shards of the recipe's
           shard_size episodes in a plain loop: gymnasium.make(env, render_mode="rgb_array",
           **env_kwargs), reset(seed=slot seed), action_space.seed, random actions,
           env.render() every step, clips cut as the recipe says, encoded with
           synthfactory.video.encode_clip, actions/rewards/obs/ego as .npy, one plain tar
           per shard
  factory  the release flow `synthfactory run recipes/driving.yaml --no-publish --samples N
           --workers W` into a fresh registry (run_release in-process, as `synthfactory run`
           calls it; --cli times the whole command as a subprocess instead), with the
           recipe's per-clip checks and gate, which the bare loop does not run

Episodes use the factory's seeds (synthfactory.samples.slot_for), so a crash ends the same
episode at the same step in both: the clip counts (and the clips' bytes) must match.
Rate = frames released / wall seconds. The Prefect API (a fresh local server, its own
PREFECT_HOME) is started once before any timing and its start-up reported as a fixed
cost; a small warm-up run of each precedes the timed rounds, which alternate the two
(order flipped each round) so machine drift hits both; medians are reported, and the
ratio of the fastest runs (other load only adds time). CPU seconds per run (this process,
its reaped children, and for the factory the Prefect server) say where the factory spends
more than the loop, whatever else the machine runs.

    python bench/rollout_throughput.py [--samples 64] [--workers 2] [--rounds 2] [--cli]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "driving.yaml"

_ENV: dict[str, Any] = {}  # one environment per bare worker process (as the factory keeps one per worker)


def _bare_env(env_id: str, kwargs_json: str) -> Any:
    key = f"{env_id} {kwargs_json}"
    if key not in _ENV:
        os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
        import gymnasium as gym
        import highway_env  # noqa: F401  (registers the highway envs)

        _ENV[key] = gym.make(env_id, render_mode="rgb_array", **json.loads(kwargs_json))
    return _ENV[key]


def _npy(array: Any) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _bare_shard(job: dict[str, Any]) -> dict[str, Any]:
    """One shard in a plain loop: roll out each episode, cut and encode its clips, tar them."""
    import numpy as np

    from synthfactory.video import encode_clip

    started = time.perf_counter()
    env = _bare_env(job["env"], job["env_kwargs"])
    config = getattr(env.unwrapped, "config", None) or {}
    fps = job["fps"] or int(config.get("policy_frequency") or env.metadata.get("render_fps") or 30)
    length, stride, clips, steps = job["clip_frames"], job["stride"], job["clips_per_episode"], job["steps"]
    members: list[tuple[str, dict[str, bytes]]] = []
    mp4_bytes: list[int] = []
    rejected = 0
    for key, seed in job["episodes"]:
        observation, _ = env.reset(seed=seed)
        env.action_space.seed(job["action_seeds"][key])
        frames, observations, ego, actions, rewards = [], [], [], [], []
        for _ in range(steps):
            frames.append(np.asarray(env.render(), dtype=np.uint8))
            observations.append(np.asarray(observation, dtype=np.float32))
            vehicle = env.unwrapped.vehicle
            ego.append((*map(float, vehicle.position), float(vehicle.speed), float(vehicle.heading)))
            action = env.action_space.sample()
            observation, reward, terminated, truncated, _ = env.step(action)
            actions.append(np.asarray(action, dtype=np.float32).reshape(-1))
            rewards.append(float(reward))
            if terminated or truncated:
                break
        for j in range(clips):
            start, stop = j * stride, j * stride + length
            if stop > len(actions):
                rejected += 1
                continue
            clip_actions = np.stack(actions[start:stop])
            clip_rewards = np.asarray(rewards[start:stop], dtype=np.float32)
            mp4 = encode_clip(np.stack(frames[start:stop]), fps, "mp4")
            meta = {"key": f"{key}-{j}", "episode": key, "episode_seed": seed, "clip": j, "step_start": start,
                    "step_end": stop - 1, "episode_steps": len(actions), "fps": fps,
                    "actions": clip_actions.reshape(-1).tolist(), "clip_return": float(clip_rewards.sum())}
            caption = f"{job['env']} rollout, random policy, episode {key} steps {start}-{stop - 1}"
            members.append((f"{key}-{j}", {
                "mp4": mp4,
                "actions.npy": _npy(clip_actions),
                "rewards.npy": _npy(clip_rewards),
                "obs.npy": _npy(np.stack(observations[start:stop])),
                "ego.npy": _npy(np.asarray(ego[start:stop], dtype=np.float32)),
                "json": json.dumps(meta, sort_keys=True).encode(),
                "txt": caption.encode(),
            }))
            mp4_bytes.append(len(mp4))
    out = Path(job["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        for key, files in members:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {
        "clips": len(members), "rejected": rejected, "frames": len(members) * length, "mp4_bytes": mp4_bytes,
        "sample_bytes": [sum(len(b) for b in files.values()) for _, files in members],
        "mp4_sha256": {key: hashlib.sha256(files["mp4"]).hexdigest() for key, files in members},
        "seconds": time.perf_counter() - started,
    }


def bare(samples: int, workers: int, root: Path) -> dict[str, Any]:
    from synthfactory.recipe import load_recipe
    from synthfactory.release.bundle import plugins_of
    from synthfactory.samples import derive_seed, slot_for
    from synthfactory.shards import plan_shards

    recipe = load_recipe(RECIPE, samples=samples)
    p = plugins_of(recipe).generator.params
    jobs = []
    for plan in plan_shards(recipe.name, samples, recipe.shard_size):
        slots = [slot_for(recipe.seed, i) for i in range(plan.start, plan.stop)]
        jobs.append({
            "env": p.env, "env_kwargs": json.dumps(p.env_kwargs, sort_keys=True), "fps": p.fps,
            "clip_frames": p.clip_frames, "stride": p.stride or p.clip_frames, "clips_per_episode": p.clips_per_episode,
            "steps": p.steps_needed(), "episodes": [(s.key, s.seed) for s in slots],
            "action_seeds": {s.key: derive_seed(s.seed, 1) for s in slots}, "out": str(root / plan.name),
        })
    started = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        shards = pool.map(_bare_shard, jobs, chunksize=1)
        pool.close()  # workers exit on the pool's sentinel; not terminate(): pygame's SDL
        pool.join()   # catches SIGTERM in them (turns it into a quit event), so they never end
    except BaseException:
        for process in pool._pool:  # the pool's own workers, which SIGTERM cannot stop
            process.kill()
        raise
    seconds = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    return {
        "seconds": seconds, "clips": sum(s["clips"] for s in shards), "rejected": sum(s["rejected"] for s in shards),
        "frames": sum(s["frames"] for s in shards),
        "mp4_bytes": [b for s in shards for b in s["mp4_bytes"]],
        "sample_bytes": [b for s in shards for b in s["sample_bytes"]],
        "mp4_sha256": {k: v for s in shards for k, v in s["mp4_sha256"].items()},
        "shard_seconds": [round(s["seconds"], 2) for s in shards],
    }


def _released(release_dir: Path) -> dict[str, Any]:
    """What a finished factory run released: clips, frames, sizes (from manifest and tars)."""
    from synthfactory.shards import read_manifest

    manifest = read_manifest(release_dir).to_pydict()
    mp4_bytes = []
    for shard in sorted((release_dir / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            mp4_bytes += [member.size for member in tar.getmembers() if member.name.endswith(".mp4")]
    return {
        "clips": len(manifest["key"]), "frames": sum(manifest["frames"]), "mp4_bytes": mp4_bytes,
        "sample_bytes": manifest["bytes"], "mp4_sha256": dict(zip(manifest["key"], manifest["sha256"])),
    }


def factory(samples: int, workers: int, registry: Path, cli: bool, overrides: list[str] | None = None) -> dict[str, Any]:
    from flows.release import run_release

    started = time.perf_counter()
    stages: dict[str, float] = {}
    if cli:
        command = [str(REPO / ".venv" / "bin" / "synthfactory"), "run", str(RECIPE), "--no-publish",
                   "--registry", str(registry), "--samples", str(samples), "--workers", str(workers)]
        for override in overrides or ():
            command += ["--set", override]
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        rejected = None
    else:
        summary = run_release(str(RECIPE), str(registry), samples=samples, publish=False, workers=workers,
                              overrides=overrides)
        seconds = time.perf_counter() - started
        stages, rejected = {k: round(v, 2) for k, v in summary.stage_seconds.items()}, summary.rejected
    result = {"seconds": seconds, "stage_seconds": stages, "rejected": rejected, **_released(registry / "data" / "driving")}
    shutil.rmtree(registry, ignore_errors=True)
    return result


def _cpu_now(server_pid: int | None) -> dict[str, float]:
    """CPU seconds so far: this process, its reaped children (pool workers, the gate
    process, a CLI run's whole tree) and the Prefect server (a detached process)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    server = 0.0
    if server_pid:
        try:
            stat = Path(f"/proc/{server_pid}/stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()
            server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return {"main": own.ru_utime + own.ru_stime, "children": children.ru_utime + children.ru_stime, "server": server}


def _measured(run: Any, server_pid: int | None) -> dict[str, Any]:
    """`run()`'s result with the CPU seconds it cost, by where they were spent."""
    before = _cpu_now(server_pid)
    result = run()
    after = _cpu_now(server_pid)
    cpu = {name: round(after[name] - before[name], 2) for name in before}
    cpu["total"] = round(sum(cpu.values()), 2)
    return {**result, "cpu_seconds": cpu}


def _server_pid() -> int | None:
    from synthfactory.local_api import prefect_home

    try:
        return int(json.loads((prefect_home() / "local-api.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _rates(run: dict[str, Any]) -> dict[str, float]:
    return {"frames_per_s": run["frames"] / run["seconds"], "clips_per_s": run["clips"] / run["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="episodes per timed run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each, interleaved")
    parser.add_argument("--cli", action="store_true", help="time `synthfactory run` as a subprocess (whole command)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rollout_throughput.json")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="synthfactory-rollout-bench-"))
    # A Prefect server of our own (a fresh database): its cold start-up is measured, and
    # other runs on this machine neither share it nor find it.
    os.environ["PREFECT_HOME"] = str(scratch / "prefect")
    os.environ.pop("PREFECT_API_URL", None)

    from synthfactory import settings

    settings.apply_offline_defaults()
    from flows.release import prefect_api
    from synthfactory.local_api import prefect_home, stop_local_api
    from synthfactory.recipe import load_recipe

    recipe = load_recipe(RECIPE, samples=args.samples)
    loads: list[float] = [os.getloadavg()[0]]
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "factory": []}
    fixed: dict[str, float] = {}
    try:
        started = time.perf_counter()
        with prefect_api():
            fixed["prefect_server_start_s"] = round(time.perf_counter() - started, 2)
            server = _server_pid()
            # 2 shards of 2: the process pool path, the server's database, imports (4 episodes
            # may lose more clips to crashes than the recipe's gate allows)
            warm_overrides = ["shard_size=2", "validation.min_accept_rate=0.1"]
            started = time.perf_counter()
            factory(4, args.workers, scratch / "warmup", args.cli, warm_overrides)
            fixed["factory_warmup_run_4_episodes_s"] = round(time.perf_counter() - started, 2)
            fixed["bare_warmup_run_4_episodes_s"] = round(bare(4, args.workers, scratch / "bare-warmup")["seconds"], 2)
            for round_ in range(args.rounds):
                order = ("bare", "factory") if round_ % 2 == 0 else ("factory", "bare")
                for label in order:
                    target = scratch / f"{label}-{round_}"
                    if label == "bare":  # the Prefect server's (idle) CPU is not the bare loop's
                        run = _measured(lambda: bare(args.samples, args.workers, target), None)
                    else:
                        run = _measured(lambda: factory(args.samples, args.workers, target, args.cli), server)
                    loads.append(os.getloadavg()[0])
                    runs[label].append(run)
                    rate = _rates(run)
                    print(f"round {round_ + 1} {label:>7}: {run['seconds']:7.2f} s  {run['clips']:4d} clips  "
                          f"{rate['frames_per_s']:7.1f} frames/s  {rate['clips_per_s']:6.2f} clips/s"
                          + (f"  stages {run['stage_seconds']}" if run.get("stage_seconds") else "")
                          + f"  cpu {run['cpu_seconds']}  load {loads[-1]:.2f}", flush=True)
    finally:
        stop_local_api(prefect_home())
        shutil.rmtree(scratch, ignore_errors=True)

    b0, f0 = runs["bare"][0], runs["factory"][0]
    same_clips = sorted(b0["mp4_sha256"]) == sorted(f0["mp4_sha256"])
    same_bytes = b0["mp4_sha256"] == f0["mp4_sha256"]
    medians: dict[str, dict[str, float]] = {}
    for label, values in runs.items():
        rates = [_rates(run) for run in values]
        medians[label] = {
            "seconds": round(statistics.median(run["seconds"] for run in values), 2),
            "frames_per_s": round(statistics.median(r["frames_per_s"] for r in rates), 2),
            "best_frames_per_s": round(max(r["frames_per_s"] for r in rates), 2),
            "clips_per_s": round(statistics.median(r["clips_per_s"] for r in rates), 3),
            "clips": values[0]["clips"],
            "frames": values[0]["frames"],
            "mp4_bytes_per_clip": round(statistics.mean(values[0]["mp4_bytes"]), 1),
            "sample_bytes_per_clip": round(statistics.mean(values[0]["sample_bytes"]), 1),
            "cpu_seconds": round(statistics.median(run["cpu_seconds"]["total"] for run in values), 2),
        }
    ratio = medians["factory"]["frames_per_s"] / medians["bare"]["frames_per_s"]
    # frames per CPU second, factory over bare: what the wall ratio tends to when CPU-bound
    # on an otherwise idle machine (other load on a busy one skews the wall ratio, not this)
    cpu_ratio = medians["bare"]["cpu_seconds"] / medians["factory"]["cpu_seconds"]
    # fastest run of each: other load on a shared machine only ever adds time
    best_ratio = medians["factory"]["best_frames_per_s"] / medians["bare"]["best_frames_per_s"]
    report = {
        "samples": args.samples,
        "episodes": args.samples,
        "workers": args.workers,
        "rounds": args.rounds,
        "factory_as": "cli subprocess" if args.cli else "run_release in-process",
        "recipe": {"path": str(RECIPE.relative_to(REPO)), "shard_size": recipe.shard_size,
                   "generator": recipe.generator.params, "checks": [c.kind for c in recipe.checks]},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_1min": [round(x, 2) for x in loads]},
        "fixed_costs_s": fixed,
        "median": medians,
        "ratio_factory_vs_bare": round(ratio, 3),
        "best_ratio_factory_vs_bare": round(best_ratio, 3),
        "cpu_ratio_factory_vs_bare": round(cpu_ratio, 3),
        "clip_counts_match": all(run["clips"] == b0["clips"] for run in runs["bare"] + runs["factory"]),
        "same_clip_keys": same_clips,
        "same_mp4_bytes": same_bytes,
        "runs": {label: [{"seconds": round(run["seconds"], 2), "clips": run["clips"], "frames": run["frames"],
                          "cpu_seconds": run["cpu_seconds"],
                          **({"stage_seconds": run["stage_seconds"]} if run.get("stage_seconds") else {}),
                          **({"shard_seconds": run["shard_seconds"]} if "shard_seconds" in run else {})}
                         for run in values] for label, values in runs.items()},
        "target": "factory >= 0.90 x bare loop",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print(f"\n{args.samples} episodes, {args.workers} workers, {args.rounds} rounds (medians); "
          f"prefect server start {fixed['prefect_server_start_s']} s (fixed, not in the rates)")
    print(f"{'':>8} {'seconds':>8} {'clips':>6} {'frames/s':>9} {'clips/s':>8} {'mp4 B/clip':>11} {'sample B/clip':>14} "
          f"{'CPU s':>7}")
    for label, m in medians.items():
        print(f"{label:>8} {m['seconds']:8.2f} {m['clips']:6d} {m['frames_per_s']:9.1f} {m['clips_per_s']:8.2f} "
              f"{m['mp4_bytes_per_clip']:11.0f} {m['sample_bytes_per_clip']:14.0f} {m['cpu_seconds']:7.1f}")
    print(f"ratio factory/bare (frames/s): median {ratio:.3f}, fastest runs {best_ratio:.3f} (target >= 0.90); "
          f"frames per CPU second: {cpu_ratio:.3f}")
    print(f"clips: bare {b0['clips']}, factory {f0['clips']}; same clip keys: {same_clips}; same mp4 bytes: {same_bytes}")
    print(f"load average (1 min) over the run: {', '.join(f'{x:.2f}' for x in loads)} on {os.cpu_count()} CPUs")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
