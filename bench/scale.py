"""A million samples: does a release keep its memory flat as it grows?

For each N in --sizes (default 10k, 100k, 1M), releases N shapes samples at 64 px through
the real command, in a fresh `git clone` of this repository used as the registry:

    synthfactory run recipes/shapes.yaml --samples N --no-publish --workers W --registry CLONE

(W = --workers, default the machine's cores), and reports for each N:

  wall time and samples/s    of the whole command (start-up, generation, stage, gate, materialize)
  stage seconds              generate / stage / validate / materialize, from the run's Prefect
                             artifact (the CLI's own summary), and metrics.json's `run` figures
  peak RSS                   of the flow process (the CLI), of the largest shard worker process,
                             of the gate process (GX) and of the whole tree at any one time

Peak RSS is measured from outside: a poller walks the CLI's process tree every --interval
seconds and keeps, per process, the largest VmHWM it read from /proc/<pid>/status (the
kernel's own high-water mark, so a process read at least once before it exits is exact).

Flat memory is judged from the figures:
  workers  the largest worker's peak at the largest N over that at the smallest: ~1
           (<= 1 + --worker-tolerance): a worker holds one shard at a time
  flow     may grow with N only by what is per sample (the manifest): its growth per extra
           sample is compared with the manifest's bytes per row (uncompressed Arrow size,
           from the parquet footer) and must stay within --row-allowance rows' worth (2: the
           manifest and one transient copy of it, e.g. while it is filtered or written); with
           three sizes or more, its growth per sample must not rise at the larger ones
The gate process (GX validating a pandas frame of the manifest) is reported beside them.

The dataset-level checks of the recipe (dedup, diversity, balance, and judge_dataset that
runs them as the stage does) are also timed alone at --check-sizes rows, on manifests
tiled from the largest release's (keys and sha256 made unique, so nothing is refused),
each size in a fresh process: best of 3 times, and the peak RSS each adds over the loaded
manifest. The time per row should not grow with the rows (quadratic work would grow it
with the rows' ratio).

The Prefect API is the CLI's own local server (started by a 200-sample warm-up before any
timing, in a PREFECT_HOME of its own, stopped at the end). Every process of a run imports
this checkout's code (--code clone: the clone's, i.e. the committed HEAD). Prints a table;
writes bench/results/scale.json (also after each size, so a cut-short run keeps what it
measured). Linux only (/proc).

    python bench/scale.py --sizes 10000,100000
    python bench/scale.py                                      # 10k, 100k, 1M (~12 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SYNTHFACTORY = str(Path(sys.executable).with_name("synthfactory"))
RECIPE = "recipes/shapes.yaml"
DATASET = "shapes"
MB = 1024 * 1024


# --- the process tree --------------------------------------------------------------------


def _status_kb(pid: int, fields: tuple[str, ...] = ("VmHWM", "VmRSS")) -> dict[str, int]:
    """The /proc/<pid>/status fields asked for, in kB ({} if the process is gone)."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in fields:
                    found[name] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return found


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    """Every process below `root` (psutil if installed, else a scan of /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            return []
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def role_of(cmdline: str, is_root: bool) -> str:
    """flow (the CLI), worker (a shard process of the pool), gate (the GX process), other."""
    if is_root:
        return "flow"
    if "resource_tracker" not in cmdline and ("spawn_main" in cmdline or "forkserver" in cmdline):
        return "worker"  # multiprocessing's children: the task runner's pool is a spawn one
    if "synthfactory.validation" in cmdline:
        return "gate"
    return "other"


class TreePoller(threading.Thread):
    """Reads VmHWM / VmRSS of `root` and every descendant every `interval` s; keeps the
    largest VmHWM per process (pid + start time) and the largest summed RSS of the tree."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.processes: dict[tuple[int, int], dict[str, Any]] = {}
        self.tree_rss_kb = 0
        self.polls = 0
        self.started = time.perf_counter()
        self.timeline: list[tuple[float, int, int, int]] = []  # (s, flow, workers, gate) RSS in kB
        self._done = threading.Event()

    def poll_once(self) -> None:
        total = 0
        by_role = {"flow": 0, "worker": 0, "gate": 0, "other": 0}
        for pid in [self.root, *_descendants(self.root)]:
            started = _start_ticks(pid)
            kb = _status_kb(pid)
            if started is None or not kb:
                continue
            entry = self.processes.get((pid, started))
            if entry is None:
                cmd = _cmdline(pid)
                entry = self.processes[(pid, started)] = {
                    "pid": pid, "role": role_of(cmd, pid == self.root), "cmd": cmd[:160], "hwm_kb": 0,
                }
            entry["hwm_kb"] = max(entry["hwm_kb"], kb.get("VmHWM", 0))
            total += kb.get("VmRSS", 0)
            by_role[entry["role"]] += kb.get("VmRSS", 0)
        self.tree_rss_kb = max(self.tree_rss_kb, total)
        self.timeline.append((time.perf_counter() - self.started, by_role["flow"], by_role["worker"], by_role["gate"]))
        self.polls += 1

    def run(self) -> None:
        while not self._done.is_set():
            self.poll_once()
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def peak_mb(self, role: str) -> float | None:
        peaks = [p["hwm_kb"] for p in self.processes.values() if p["role"] == role]
        return round(max(peaks) / 1024, 1) if peaks else None

    def count(self, role: str) -> int:
        return sum(p["role"] == role for p in self.processes.values())

    def rss_timeline(self, points: int = 120) -> dict[str, list[float]]:
        """RSS (MB) of the flow, of all workers together and of the gate over the run, at
        most `points` polls (evenly spaced), with the seconds since the start."""
        step = max(1, -(-len(self.timeline) // points))
        chosen = self.timeline[::step]
        return {name: [round(row[i] / 1024, 1) if i else round(row[0], 1) for row in chosen]
                for i, name in enumerate(("s", "flow_mb", "workers_mb", "gate_mb"))}


# --- one release ------------------------------------------------------------------------


def fresh_clone(target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True)
    return target


def stage_seconds(output: str) -> dict[str, float]:
    """generate / stage / validate / materialize seconds: from the run's Prefect artifact
    (the flow's own table), else from the timestamps of the flow's log lines."""
    view = re.search(r"View at (https?://[^/\s]+)/\S*/flow-run/([0-9a-f-]{36})", output)
    if view:
        try:
            request = urllib.request.Request(
                f"{view.group(1)}/api/artifacts/filter",
                data=json.dumps({"flow_runs": {"id": {"any_": [view.group(2)]}}, "artifacts": {"type": {"any_": ["markdown"]}},
                                 "sort": "CREATED_DESC"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                artifacts = json.loads(response.read())
            for artifact in artifacts:
                rows = re.findall(r"\| stage seconds: (\w+) \| ([0-9.]+) \|", artifact.get("data") or "")
                if rows:
                    return {stage: float(seconds) for stage, seconds in rows}
        except (OSError, ValueError):
            pass
    stamps: dict[str, float] = {}
    for line in output.splitlines():
        match = re.match(r"(\d\d):(\d\d):(\d\d\.\d+) \| \w+\s*\| Flow run .*? - (generated|staged|gate passed|written)", line)
        if match:
            h, m, s, event = match.groups()
            stamps.setdefault(event, int(h) * 3600 + int(m) * 60 + float(s))
    order = [("stage", "generated", "staged"), ("validate", "staged", "gate passed"), ("materialize", "gate passed", "written")]
    return {name: round((stamps[b] - stamps[a]) % 86400, 3) for name, a, b in order if a in stamps and b in stamps}


def manifest_of(release_dir: Path) -> Path:
    """The release's manifest: manifest.parquet, or a manifest/ directory of parquet parts."""
    single = release_dir / "manifest.parquet"
    return single if single.exists() else release_dir / "manifest"


def manifest_figures(manifest: Path) -> dict[str, Any]:
    """Rows, file bytes and uncompressed (Arrow) bytes of the manifest, from the footers."""
    import pyarrow.parquet as pq

    files = sorted(manifest.rglob("*.parquet")) if manifest.is_dir() else [manifest]
    rows = arrow = size = 0
    for file in files:
        meta = pq.ParquetFile(file).metadata
        rows += meta.num_rows
        arrow += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        size += file.stat().st_size
    return {"rows": rows, "file_bytes": size, "arrow_bytes": arrow,
            "file_bytes_per_row": round(size / max(1, rows), 1), "arrow_bytes_per_row": round(arrow / max(1, rows), 1)}


def release(samples: int, workers: int, clone: Path, env: dict[str, str], interval: float, log: Path,
            code: str = "checkout") -> dict[str, Any]:
    # Every process of the run imports one copy of the code: this checkout's (as installed),
    # or the clone's (the committed HEAD). Without PYTHONPATH the gate process, started as
    # `python -m synthfactory.validation` in the clone, would import the clone's.
    root = REPO if code == "checkout" else clone
    env = {**env, "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])}
    command = [SYNTHFACTORY, "run", RECIPE, "--samples", str(samples), "--no-publish", "--workers", str(workers),
               "--registry", str(clone)]
    load_before = os.getloadavg()[0]
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT)
        poller = TreePoller(proc.pid, interval)
        poller.start()
        code = proc.wait()
        wall = time.perf_counter() - started
        poller.stop()
    output = log.read_text(errors="replace")
    if code != 0:
        raise SystemExit(f"`{' '.join(command)}` failed (exit {code}):\n{output[-3000:]}")
    release_dir = clone / "data" / DATASET
    metrics = json.loads((release_dir / "metrics.json").read_text())
    run = metrics["run"]
    return {
        "samples": samples,
        "released": metrics["samples"],
        "rejected": metrics["rejected"],
        "shards": metrics["shards"],
        "wall_s": round(wall, 2),
        "samples_per_s": round(samples / wall, 1),
        "generation_samples_per_s": run.get("samples_per_s"),
        "stage_seconds": stage_seconds(output),
        "run": {k: run[k] for k in ("seconds", "worker_seconds", "worker_processes", "shards_generated", "retries") if k in run},
        "peak_rss_mb": {
            "flow": poller.peak_mb("flow"),
            "worker": poller.peak_mb("worker"),
            "gate": poller.peak_mb("gate"),
            "tree_at_once": round(poller.tree_rss_kb / 1024, 1),
        },
        "worker_processes_seen": poller.count("worker"),
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other work on the machine skews the times
        "polls": poller.polls,
        "manifest": manifest_figures(manifest_of(release_dir)),
        "rss_timeline": poller.rss_timeline(),
        "processes": sorted(({k: v for k, v in p.items()} | {"hwm_mb": round(p["hwm_kb"] / 1024, 1)}
                             for p in poller.processes.values()), key=lambda p: -p["hwm_kb"])[:12],
    }


# --- the dataset checks alone ---------------------------------------------------------------


def judge_child(manifest_path: Path, rows: int, repeats: int = 3) -> dict[str, Any]:
    """In a process of its own: tile the manifest to `rows` (unique keys and sha256), then
    time each dataset check of the recipe and judge_dataset as the stage runs it."""
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from synthfactory.checks import DatasetView
    from synthfactory.recipe import load_recipe
    from synthfactory.release.bundle import plugins_of
    from synthfactory.release.stage import judge_dataset
    from synthfactory.shards import REJECTED_SCHEMA

    source = pq.read_table(manifest_path)
    copies = -(-rows // source.num_rows)
    parts = []
    for copy in range(copies):
        part = source
        if copy:
            keys = pc.binary_join_element_wise(part.column("key"), pa.scalar(f"-t{copy}"), "")
            digests = pa.array([hashlib.sha256(f"{d}:{copy}".encode()).hexdigest() for d in part.column("sha256").to_pylist()])
            part = part.set_column(part.schema.get_field_index("key"), "key", keys)
            part = part.set_column(part.schema.get_field_index("sha256"), "sha256", digests)
        parts.append(part)
    manifest = pa.concat_tables(parts).slice(0, rows).combine_chunks()
    del parts, source
    plugins = plugins_of(load_recipe(REPO / RECIPE, samples=rows))
    scratch = Path(tempfile.mkdtemp(prefix="synthfactory-scale-judge-"))
    for check in plugins.dataset_checks:  # imports (scipy, ...) and first calls out of the timing
        check.evaluate(DatasetView(manifest.slice(0, 1000), plugins.labels(), scratch), None)
    seconds: dict[str, float] = {}
    peak_over: dict[str, float] = {}
    before = _status_kb(os.getpid())

    def measure(name: str, run: Any) -> None:
        """Best of `repeats` times (the machine may be shared); peak RSS over the start, first run."""
        times = []
        for attempt in range(repeats):
            start_kb = _reset_peak()
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
            if not attempt:
                peak_over[name] = round((_status_kb(os.getpid())["VmHWM"] - start_kb) / 1024, 1)
        seconds[name] = round(min(times), 3)

    def evaluate(check: Any) -> None:
        findings = check.evaluate(DatasetView(manifest, plugins.labels(), scratch), None)
        assert not findings.rejected, f"{check.plugin_name} refused {len(findings.rejected)} tiled rows"

    for check in plugins.dataset_checks:
        measure(check.plugin_name, lambda: evaluate(check))
    try:
        measure("judge_dataset", lambda: judge_dataset(plugins, scratch, manifest, REJECTED_SCHEMA.empty_table(), None))
    except TypeError as exc:  # its signature changed: the checks' own figures still stand
        print(f"judge_dataset not timed: {exc}", file=sys.stderr)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"rows": rows, "seconds": seconds, "peak_over_start_mb": peak_over,
            "rss_with_manifest_mb": round(before["VmRSS"] / 1024, 1),
            "manifest_arrow_mb": round(manifest.nbytes / MB, 1)}


def _reset_peak() -> int:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5); returns that RSS in kB."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb(os.getpid())["VmRSS"]


def time_checks(manifest: Path, sizes: list[int], env: dict[str, str]) -> dict[str, Any]:
    """The checks of this checkout's code, each size in a fresh process."""
    env = {**env, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])}
    results = {}
    for rows in sizes:
        child = [sys.executable, __file__, "--judge-child", str(manifest), "--judge-rows", str(rows)]
        done = subprocess.run(child, env=env, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"timing the checks at {rows} rows failed:\n{done.stderr[-3000:]}")
        results[str(rows)] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[str(rows)]
        print(f"checks at {rows:>9,} rows (manifest {r['manifest_arrow_mb']:.0f} MB): "
              + ", ".join(f"{k} {v:.2f} s +{r['peak_over_start_mb'].get(k, 0):.0f} MB" for k, v in r["seconds"].items()),
              flush=True)
    ratios = {}
    for small, large in zip(sizes, sizes[1:]):
        a, b = results[str(small)]["seconds"], results[str(large)]["seconds"]
        ratios[f"{small}->{large}"] = {k: round(b[k] / a[k], 1) if a.get(k) else None for k in b}
    return {"by_rows": results, "time_ratios": ratios,
            "note": "time ratio per step vs the ratio of rows: about equal is linear, its square quadratic"}


# --- judging -------------------------------------------------------------------------------


def judge(runs: list[dict[str, Any]], worker_tolerance: float = 0.1, row_allowance: float = 2.0) -> dict[str, Any]:
    """Flat memory: the worker's peak does not grow with N; the flow's grows by at most
    `row_allowance` manifest rows' worth per extra sample."""
    small, large = runs[0], runs[-1]
    verdict: dict[str, Any] = {"from": small["samples"], "to": large["samples"]}
    # a run of one shard makes it in the flow process: compare the smallest run with workers
    pooled = [r for r in runs if r["peak_rss_mb"]["worker"]]
    w0, w1 = (pooled[0]["peak_rss_mb"]["worker"], pooled[-1]["peak_rss_mb"]["worker"]) if len(pooled) > 1 else (None, None)
    if w0 and w1:
        verdict["worker_from"] = pooled[0]["samples"]
        verdict["worker_peak_ratio"] = round(w1 / w0, 3)
        verdict["worker_flat"] = w1 / w0 <= 1 + worker_tolerance
    extra = large["samples"] - small["samples"]
    row_bytes = large["manifest"]["arrow_bytes_per_row"]
    verdict["manifest_arrow_bytes_per_row"] = row_bytes
    for role in ("flow", "gate"):
        p0, p1 = small["peak_rss_mb"][role], large["peak_rss_mb"][role]
        if p0 is None or p1 is None or extra <= 0:
            continue
        per_sample = (p1 - p0) * MB / extra
        verdict[f"{role}_growth_bytes_per_sample"] = round(per_sample, 1)
        verdict[f"{role}_growth_manifest_rows_per_sample"] = round(per_sample / row_bytes, 2)
        verdict[f"{role}_peak_ratio"] = round(p1 / p0, 3)
    if "flow_growth_bytes_per_sample" in verdict:
        verdict["flow_per_sample_only"] = verdict["flow_growth_manifest_rows_per_sample"] <= row_allowance
    if len(runs) >= 3:  # growth per sample between consecutive sizes: linear keeps it about constant
        slopes = []
        for a, b in zip(runs, runs[1:]):
            slopes.append(round((b["peak_rss_mb"]["flow"] - a["peak_rss_mb"]["flow"]) * MB / (b["samples"] - a["samples"]), 1))
        verdict["flow_growth_bytes_per_sample_by_step"] = slopes
        verdict["flow_linear"] = slopes[-1] <= 1.5 * max(slopes[0], 1.0)  # no faster growth at the larger sizes
    verdict["worker_tolerance"], verdict["row_allowance"] = worker_tolerance, row_allowance
    verdict["flat"] = (bool(verdict.get("worker_flat")) and bool(verdict.get("flow_per_sample_only"))
                       and verdict.get("flow_linear", True))
    return verdict


def print_checks(checks: dict[str, Any]) -> None:
    rows = checks["by_rows"]
    names = list(next(iter(rows.values()))["seconds"])
    print(f"\ndataset checks alone (tiled manifests): seconds and peak MB over the loaded manifest")
    print(f"{'rows':>10} " + " ".join(f"{name:>22}" for name in names))
    for n, r in rows.items():
        print(f"{int(n):>10,} " + " ".join(
            f"{r['seconds'].get(name, float('nan')):10.2f} s {max(0.0, r['peak_over_start_mb'].get(name, float('nan'))):6.0f} MB"
            for name in names))
    for span, ratios in checks["time_ratios"].items():
        small, large = (int(x) for x in span.split("->"))
        print(f"  time ratio {small:,} -> {large:,} rows ({large / small:.0f}x): "
              + ", ".join(f"{k} {v}x" for k, v in ratios.items()))


def print_table(runs: list[dict[str, Any]], verdict: dict[str, Any] | None) -> None:
    print(f"\n{'samples':>9} {'wall s':>8} {'samples/s':>10} {'gen/s':>8} {'generate':>9} {'stage':>7} {'validate':>9} "
          f"{'materlz':>8} {'flow MB':>8} {'worker MB':>10} {'gate MB':>8} {'tree MB':>8} {'manifest B/row':>15}")
    for r in runs:
        s, p = r["stage_seconds"], r["peak_rss_mb"]

        def cell(value: Any, width: int, fmt: str = ".1f") -> str:
            return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

        print(f"{r['samples']:>9,} {r['wall_s']:8.1f} {r['samples_per_s']:10.1f} {cell(r['generation_samples_per_s'], 8)} "
              f"{cell(s.get('generate'), 9)} {cell(s.get('stage'), 7)} {cell(s.get('validate'), 9)} "
              f"{cell(s.get('materialize'), 8)} {cell(p['flow'], 8, '.0f')} {cell(p['worker'], 10, '.0f')} "
              f"{cell(p['gate'], 8, '.0f')} {cell(p['tree_at_once'], 8, '.0f')} "
              f"{r['manifest']['arrow_bytes_per_row']:9.0f} arrow")
    if verdict is None:
        return
    print(f"\nflat memory ({verdict['from']:,} -> {verdict['to']:,} samples):")
    if "worker_peak_ratio" in verdict:
        print(f"  worker peak ratio {verdict['worker_peak_ratio']:.3f} from {verdict['worker_from']:,} samples "
              f"(flat if <= {1 + verdict['worker_tolerance']:.2f}): "
              f"{'yes' if verdict['worker_flat'] else 'NO'}")
    if "flow_growth_bytes_per_sample" in verdict:
        print(f"  flow process grows {verdict['flow_growth_bytes_per_sample']:.0f} B per extra sample = "
              f"{verdict['flow_growth_manifest_rows_per_sample']:.2f} manifest rows "
              f"({verdict['manifest_arrow_bytes_per_row']:.0f} B each in Arrow; allowed <= {verdict['row_allowance']}): "
              f"{'per-sample only' if verdict['flow_per_sample_only'] else 'MORE than the manifest explains'}")
    if "flow_growth_bytes_per_sample_by_step" in verdict:
        print(f"  flow growth per sample by step: {verdict['flow_growth_bytes_per_sample_by_step']} B: "
              f"{'linear' if verdict['flow_linear'] else 'FASTER at the larger sizes'}")
    if "gate_growth_bytes_per_sample" in verdict:
        print(f"  gate (GX) process grows {verdict['gate_growth_bytes_per_sample']:.0f} B per extra sample = "
              f"{verdict['gate_growth_manifest_rows_per_sample']:.2f} manifest rows (a pandas frame of the manifest)")
    print(f"  flat memory: {'yes' if verdict['flat'] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma list of sample counts")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=200, help="samples of the untimed first run (0: none)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between polls of the process tree")
    parser.add_argument("--check-sizes", default="10000,100000,1000000",
                        help="comma list of rows to time the dataset checks alone at, tiled from the largest "
                        "release's manifest ('' skips it)")
    parser.add_argument("--worker-tolerance", type=float, default=0.1, help="worker peak ratio above 1 still flat")
    parser.add_argument("--row-allowance", type=float, default=2.0,
                        help="flow growth per extra sample allowed, in manifest rows (Arrow bytes per row): "
                        "the manifest itself and one transient copy of it (a filter, a write)")
    parser.add_argument("--code", choices=("checkout", "clone"), default="checkout",
                        help="run this checkout's code (uncommitted edits included) or the clone's (committed HEAD)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the clones and logs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    parser.add_argument("--judge-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--judge-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.judge_child:
        print(json.dumps(judge_child(args.judge_child, args.judge_rows)))
        return

    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    check_sizes = sorted(int(s) for s in args.check_sizes.split(",") if s.strip())
    scratch = args.work or Path(tempfile.mkdtemp(prefix="synthfactory-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    own_server = not env.get("PREFECT_API_URL")
    if own_server:  # the CLI starts its local server here, once; stopped at the end
        env["PREFECT_HOME"] = str(scratch / "prefect")
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": f"synthfactory run {RECIPE} --samples N --no-publish --workers {args.workers} (fresh git clone as registry)",
        "workers": args.workers,
        "code": args.code,
        "interval_s": args.interval,
    }
    try:
        if args.warmup:
            started = time.perf_counter()
            warm = release(args.warmup, args.workers, fresh_clone(scratch / "warmup"), env, args.interval,
                           scratch / "warmup.log", args.code)
            report["warmup"] = {"samples": args.warmup, "wall_s": round(time.perf_counter() - started, 2),
                                "peak_rss_mb": warm["peak_rss_mb"]}
            print(f"warm-up ({args.warmup} samples, starts the Prefect server): {report['warmup']['wall_s']} s", flush=True)
        largest_manifest = None
        for n in sizes:
            clone = fresh_clone(scratch / f"n{n}")
            result = release(n, args.workers, clone, env, args.interval, scratch / f"n{n}.log", args.code)
            runs.append(result)
            p = result["peak_rss_mb"]
            print(f"{n:>9,} samples: {result['wall_s']:.1f} s, {result['samples_per_s']:.0f} samples/s, "
                  f"stages {result['stage_seconds']}, peak RSS flow {p['flow']} MB, worker {p['worker']} MB, "
                  f"gate {p['gate']} MB ({result['worker_processes_seen']} workers seen, {result['polls']} polls)",
                  flush=True)
            if check_sizes:  # the largest release's manifest, for timing the checks alone
                source = manifest_of(clone / "data" / DATASET)
                largest_manifest = scratch / f"largest-{source.name}"
                shutil.rmtree(largest_manifest, ignore_errors=True)
                (shutil.copytree if source.is_dir() else shutil.copyfile)(source, largest_manifest)
            if not args.keep:
                shutil.rmtree(clone, ignore_errors=True)
            report["runs"] = runs  # what is measured so far survives a later failure
            report["verdict"] = judge(runs, args.worker_tolerance, args.row_allowance) if len(runs) > 1 else None
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        if check_sizes and largest_manifest is not None:
            report["checks"] = time_checks(largest_manifest, check_sizes, env)
    finally:
        if own_server:
            from synthfactory.local_api import stop_local_api

            stop_local_api(Path(env["PREFECT_HOME"]))
        if not args.keep and args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)

    print_table(runs, report.get("verdict"))
    if report.get("checks"):
        print_checks(report["checks"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
