"""One table of every ratio and target figure the benchmarks measured.

Reads every bench/results/*.json present (written by the bench/*.py scripts; `make bench`
runs them, then this) and prints, for each figure: the benchmark, the figure, the value
measured, its target and whether it is met, with the date of each result and this
machine (CPUs, Python, platform). Targets are the ones each script states (its JSON's
`target`/`targets`, else its docstring); a figure without one is listed for context
(target "-"). A result file this script does not know is scanned for ratio/speedup
figures. Benchmarks of `make bench` with no result file are listed at the end.

    python bench/summary.py                  # plain table
    python bench/summary.py --markdown       # the same as a Markdown table (for the README)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
#: the scripts `make bench` runs, in order (digits_utility prints its table and writes no JSON)
MAKE_BENCH = ("release_throughput", "model_throughput", "operations", "loader_throughput", "served_throughput",
              "rollout_throughput", "digits_utility", "scale")


@dataclass(frozen=True)
class Target:
    op: str  # ">=", "<=", "=="
    value: float | bool
    unit: str = ""  # "%" or ""
    text: str = ""  # the number as the script wrote it ("0.90")

    def met(self, measured: Any) -> bool | None:
        if isinstance(self.value, bool) or isinstance(measured, bool):
            return bool(measured) == bool(self.value) if self.op == "==" else None
        if not isinstance(measured, (int, float)):
            return None
        return measured >= self.value if self.op == ">=" else measured <= self.value if self.op == "<=" else None

    def __str__(self) -> str:
        if isinstance(self.value, bool):
            return "yes" if self.value else "no"
        symbol = {">=": "≥", "<=": "≤", "==": "="}[self.op]
        return f"{symbol} {self.text or f'{self.value:g}'}{' %' if self.unit == '%' else ''}"


def parse_target(text: str | None, unit: str = "") -> Target | None:
    """The first `>= 0.90` / `<= 2 %` / `≥ 1.8` in a script's target text."""
    if not text:
        return None
    match = re.search(r"(>=|<=|≥|≤)\s*([0-9]*\.?[0-9]+)\s*(%?)", text)
    if not match:
        return None
    op = {"≥": ">=", "≤": "<="}.get(match.group(1), match.group(1))
    return Target(op, float(match.group(2)), match.group(3) or unit, match.group(2))


@dataclass(frozen=True)
class Row:
    bench: str
    figure: str
    value: Any
    target: Target | None = None
    date: str = ""

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value) if self.target is not None and self.value is not None else None


def _get(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


# --- one extractor per benchmark: its JSON -> (figure, value, target) ---------------------

Figures = Iterator[tuple[str, Any, Target | None]]


def release_throughput(d: dict) -> Figures:
    ratios = d.get("ratios", {})
    targets = d.get("targets")
    if isinstance(targets, dict):  # {"flow_vs_bare": ">= 0.90", ...}, ratios named <prefix>_<samples>
        for name, value in ratios.items():
            prefixes = [p for p in targets if name == p or name.startswith(p + "_")]
            yield name, value, parse_target(targets[max(prefixes, key=len)]) if prefixes else None
    else:  # one "flow >= 0.90 x bare loop" for every flow ratio
        target = parse_target(d.get("target"))
        for name, value in ratios.items():
            yield name, value, target if name.startswith("flow") else None


def model_throughput(d: dict) -> Figures:
    # no target stated (gpu_throughput.py holds the same comparison to >= 0.95 at real model sizes)
    target = parse_target(d.get("target"))
    for stage in ("images_per_s", "captions_per_s"):
        if _get(d, f"{stage}.ratio") is not None:
            yield f"{stage.removesuffix('_per_s')} factory/bare", _get(d, f"{stage}.ratio"), target


def operations(d: dict) -> Figures:
    if "dask" in d:
        yield "dask speedup 2 vs 1 workers", _get(d, "dask.speedup_2_vs_1"), parse_target(_get(d, "dask.target"))
        yield "bare pool speedup 2 vs 1 (what the machine allows)", _get(d, "dask.bare_pool_speedup_2_vs_1"), None
    if "resume" in d:
        yield "lost shards per worker at a kill", _get(d, "resume.lost_shards_per_worker"), \
            parse_target(_get(d, "resume.target"))
    if "append" in d:
        target = parse_target(_get(d, "append.target"), "%")
        yield "append 1 %: shards generated (%)", _get(d, "append.shards_generated_pct"), target
        yield "append 1 %: shard bytes uploaded (%)", _get(d, "append.shard_bytes_uploaded_pct"), target
        yield "append 1 %: all bytes uploaded (%)", _get(d, "append.bytes_uploaded_pct"), None


def loader_throughput(d: dict) -> Figures:
    yield "warm loader / webdataset", d.get("warm_vs_webdataset"), parse_target(d.get("target"))
    yield "sha256 verify / sizes only", d.get("sha256_vs_sizes_only"), None


def served_throughput(d: dict) -> Figures:
    yield "tokens/s factory/bare", d.get("ratio"), parse_target(d.get("target"))


def rollout_throughput(d: dict) -> Figures:
    yield "frames/s factory/bare (median)", d.get("ratio_factory_vs_bare"), parse_target(d.get("target"))
    yield "frames/s factory/bare (fastest runs)", d.get("best_ratio_factory_vs_bare"), None
    yield "frames per CPU second factory/bare", d.get("cpu_ratio_factory_vs_bare"), None
    for flag in ("clip_counts_match", "same_clip_keys", "same_mp4_bytes"):
        if flag in d:
            yield flag.replace("_", " "), d[flag], Target("==", True)


def gate_cost(d: dict) -> Figures:
    yield "gate share of generation (%)", round(100 * d["gate_share_of_generation"], 2) \
        if "gate_share_of_generation" in d else None, Target("<=", 10.0, "%")


def quality_throughput(d: dict) -> Figures:
    for span, steps in d.get("time_ratios", {}).items():
        for step, ratio in steps.items():
            yield f"{step} time {span} (linear ≈ size ratio)", ratio, None


def gpu_throughput(d: dict) -> Figures:
    target = Target(">=", 0.95)  # the script's TARGET for factory/bare
    for row in _get(d, "images.rows") or []:
        if "ratio" in row:
            yield f"images {row['setting']}", row["ratio"], target
    for row in _get(d, "tokens.rows") or []:
        if "ratio_vs_greedy" in row:
            yield f"tokens {row['setting']} vs greedy", row["ratio_vs_greedy"], target
            yield f"tokens {row['setting']} vs sampled", row["ratio_vs_sampled"], None


def scale(d: dict) -> Figures:
    for run in d.get("runs", []):
        yield f"{run['samples']:,} samples: samples/s (whole command)", run.get("samples_per_s"), None
    if d.get("runs"):
        last = d["runs"][-1]
        peaks = last.get("peak_rss_mb", {})
        yield f"{last['samples']:,} samples: peak RSS MB flow / worker / gate", \
            " / ".join(f"{peaks.get(role) or 0:,.0f}" for role in ("flow", "worker", "gate")), None
    verdict = d.get("verdict") or {}
    span = f"{verdict.get('from', 0):,} -> {verdict.get('to', 0):,}"
    if "worker_peak_ratio" in verdict:
        yield f"worker peak RSS ratio {span}", verdict["worker_peak_ratio"], \
            Target("<=", round(1 + verdict.get("worker_tolerance", 0.1), 3))
    if "flow_growth_manifest_rows_per_sample" in verdict:
        yield f"flow RSS growth per sample, in manifest rows {span}", verdict["flow_growth_manifest_rows_per_sample"], \
            Target("<=", verdict.get("row_allowance", 2.0))
    if "gate_growth_manifest_rows_per_sample" in verdict:
        yield f"gate (GX) RSS growth per sample, in manifest rows {span}", verdict["gate_growth_manifest_rows_per_sample"], None
    if "flat" in verdict:
        yield "flat memory", verdict["flat"], Target("==", True)
    checks = d.get("checks") or {}
    for span, ratios in (checks.get("time_ratios") or {}).items():
        small, large = (int(x) for x in span.split("->"))
        if ratios.get("judge_dataset") is not None:  # per-row time growth: ~1 linear, = rows ratio if quadratic
            yield f"dataset checks time per row {small:,} -> {large:,} rows", \
                round(ratios["judge_dataset"] * small / large, 2), Target("<=", 2.0)


def generic(d: Any, prefix: str = "") -> Figures:
    """Any numeric figure named like a ratio or speedup, for result files not known here."""
    if isinstance(d, dict):
        for key, value in d.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and re.search(r"ratio|speedup|_vs_", name):
                yield name, value, None
            elif isinstance(value, (dict, list)):
                yield from generic(value, name)
    elif isinstance(d, list):
        for i, value in enumerate(d):
            yield from generic(value, f"{prefix}[{i}]")


EXTRACTORS: dict[str, Callable[[dict], Figures]] = {
    "release_throughput": release_throughput,
    "model_throughput": model_throughput,
    "operations": operations,
    "loader_throughput": loader_throughput,
    "served_throughput": served_throughput,
    "rollout_throughput": rollout_throughput,
    "gate_cost": gate_cost,
    "quality_throughput": quality_throughput,
    "gpu_throughput": gpu_throughput,
    "gpu_throughput_tiny": gpu_throughput,
    "scale": scale,
}


def collect(results: Path) -> tuple[list[Row], list[str]]:
    """Every figure of every result file, and the `make bench` scripts with none."""
    rows: list[Row] = []
    found = set()
    order = {name: i for i, name in enumerate(MAKE_BENCH)}  # make bench's order, then the others by name
    for path in sorted(results.glob("*.json"), key=lambda p: (order.get(p.stem, len(order)), p.stem)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            rows.append(Row(path.stem, f"unreadable: {exc}", None))
            continue
        found.add(path.stem)
        date = str(data.get("date", ""))[:10] if isinstance(data, dict) else ""
        date = date or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d")
        extract = EXTRACTORS.get(path.stem, generic)
        for figure, value, target in extract(data):
            if value is not None:
                rows.append(Row(path.stem, figure, value, target, date))
    return rows, [name for name in MAKE_BENCH if name not in found]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _met(row: Row) -> str:
    return "-" if row.met is None else "yes" if row.met else "NO"


def render(rows: list[Row], missing: list[str], markdown: bool) -> str:
    machine = f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = ("benchmark", "figure", "measured", "target", "met", "date")
    table = [(r.bench, r.figure, _value(r.value), str(r.target) if r.target else "-", _met(r), r.date) for r in rows]
    met = sum(r.met is True for r in rows)
    judged = sum(r.met is not None for r in rows)
    lines = []
    if markdown:
        lines += [f"Benchmark summary, {now}; machine: {machine}.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
        lines += ["", f"{met} of {judged} targets met."]
        if missing:
            lines.append(f"No results from: {', '.join(missing)}.")
    else:
        lines += [f"benchmark summary, {now}", f"machine: {machine}", ""]
        widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        lines += ["", f"{met} of {judged} targets met"]
        if missing:
            lines.append(f"no results from: {', '.join(missing)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of the result files")
    args = parser.parse_args()
    rows, missing = collect(args.results)
    if not rows and not missing:
        raise SystemExit(f"no results in {args.results}: run `make bench` (or a bench/*.py script) first")
    print(render(rows, missing, args.markdown))


if __name__ == "__main__":
    main()
