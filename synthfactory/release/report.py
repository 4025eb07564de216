"""The human-readable release report: report/index.html, one self-contained page.

It shows what a reviewer needs to judge a synthetic release at a glance: a grid of
samples with their captions (a clip as a filmstrip of its frames), label / concept /
score histograms, every quality figure next to the previous release's and the gate's
limit, rejections by check and reason (PII by pattern), and the Great Expectations
verdict. Plots are matplotlib PNGs inlined as base64, so the page opens anywhere,
including from a `dvc pull`.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from synthfactory.checks.balance import counts
from synthfactory.files import atomic_write
from synthfactory.release.cost import describe_usage
from synthfactory.release.summary import Limit, Quality, RunStats, RunSummary
from synthfactory.shards import SHARDS_DIR, read_shard
from synthfactory.video import CLIP_MEMBER, ClipFormatError, clip_format_of, decode_clip

GRID_SAMPLES = 16
IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
FILMSTRIP_FRAMES = 8
FILMSTRIP_SIZE = (1024, 96)  # the strip is scaled to fit: a page of 16 clips stays small


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; plots only become PNG bytes
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _bar(title: str, counts: Counter, top: int = 25) -> str:
    plt = _pyplot()
    items = counts.most_common(top)
    figure, axes = plt.subplots(figsize=(7, 0.25 * len(items) + 1))
    axes.barh([str(k) for k, _ in reversed(items)], [v for _, v in reversed(items)], color="#4c78a8")
    axes.set_title(title)
    return _png(figure)


def _histogram(title: str, values: list[float]) -> str:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 2.5))
    axes.hist(values, bins=30, color="#4c78a8")
    axes.set_title(title)
    return _png(figure)


def _privacy_plot(figures: dict[str, float]) -> str:
    """Quantiles of each synthetic sample's distance to its closest real record, and the
    same for fresh real data (the holdout) when measured: copies sit at the far left."""
    plt = _pyplot()
    points = [(q, figures[name]) for q, name in ((0, "dcr_min"), (5, "dcr_p05"), (10, "dcr_q10"), (25, "dcr_q25"),
                                                  (50, "dcr_median"), (75, "dcr_q75"), (90, "dcr_q90")) if name in figures]
    figure, axes = plt.subplots(figsize=(7, 2.5))
    axes.plot([p for p, _ in points], [d for _, d in points], marker="o", color="#4c78a8", label="synthetic → real")
    if "holdout_dcr_median" in figures:
        axes.axhline(figures["holdout_dcr_median"], color="#999", linestyle="--", label="holdout real → real (median)")
    if "min_distance" in figures:
        axes.axhline(figures["min_distance"], color="#c44", linestyle=":", label="refused below")
    axes.set_xlabel("percentile of synthetic samples")
    axes.set_ylabel("distance to closest real record")
    axes.set_title("Privacy: distance to closest real record (DCR)")
    axes.legend(fontsize=8)
    return _png(figure)


def _utility_plot(figures: dict[str, float]) -> str:
    """Accuracy on held-out real data of the probe trained on each training set."""
    plt = _pyplot()
    bars = [(label, figures[name]) for label, name in (
        ("this release", "tstr_accuracy"), ("its synthetic rows", "synthetic_only_accuracy"),
        ("its real rows", "real_only_accuracy"), ("real training set", "trtr_accuracy")) if name in figures]
    figure, axes = plt.subplots(figsize=(7, 0.4 * len(bars) + 1))
    axes.barh([label for label, _ in reversed(bars)], [value for _, value in reversed(bars)], color="#4c78a8")
    for index, (_, value) in enumerate(reversed(bars)):
        axes.text(value, index, f" {value:.3f}", va="center", fontsize=8)
    axes.set_xlim(0, 1.08)
    axes.set_title("Utility: probe accuracy on held-out real data")
    return _png(figure)


def _lineage(lineage: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(m['name'])}</td><td>{html.escape(', '.join(m['trained_on']) or 'not declared (real data)')}</td>"
        f"<td>{m['depth']}</td></tr>" for m in lineage.get("makers", [])
    ) + "".join(
        f"<tr><td>reuses {html.escape(p['tag'])}</td><td></td><td>{p['depth']}</td></tr>" for p in lineage.get("parents", [])
    )
    table = f"<table><tr><th>maker / parent</th><th>trained on</th><th>depth</th></tr>{rows}</table>" if rows else ""
    return f"<p>Synthetic generation depth {lineage.get('depth', 0)} (0: real data only).</p>{table}"


def _filmstrip(data: bytes, clip_format: str) -> bytes | None:
    """Up to 8 evenly spaced frames of a clip side by side, as one PNG (None if unreadable)."""
    import numpy as np
    from PIL import Image

    try:
        frames = decode_clip(data, clip_format)
    except ClipFormatError:
        return None
    picked = np.unique(np.linspace(0, len(frames) - 1, min(FILMSTRIP_FRAMES, len(frames))).round().astype(int))
    strip = Image.fromarray(np.concatenate(list(frames[picked]), axis=1))
    strip.thumbnail(FILMSTRIP_SIZE)
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return buffer.getvalue()


def _grid(stage_dir: Path, manifest: pa.Table) -> str:
    """The first samples of the first shard, image or clip filmstrip (if any) and caption."""
    shards = sorted((stage_dir / SHARDS_DIR).glob("*.tar"))
    samples = list(itertools.islice(read_shard(shards[0]), GRID_SAMPLES)) if shards else []
    shown = manifest.filter(pc.is_in(manifest.column("key"), value_set=pa.array([key for key, _ in samples], type=manifest.column("key").type)))
    captions = dict(zip(shown.column("key").to_pylist(), shown.column("caption").to_pylist()))  # not a million of them
    cells = []
    for key, files in samples:
        image = next((ext for ext in IMAGE_TYPES if ext in files), None)
        clip = next((member for member in CLIP_MEMBER.values() if member in files), None)  # the sample's own clip
        strip = _filmstrip(files[clip], clip_format_of(clip)) if clip and not image else None
        picture = (
            f'<img src="data:{IMAGE_TYPES[image]};base64,{base64.b64encode(files[image]).decode()}">' if image
            else f'<img alt="filmstrip" src="data:image/png;base64,{base64.b64encode(strip).decode()}">' if strip
            else ""
        )
        caption = f'<figcaption><code>{key}</code> {html.escape(captions.get(key, ""))}</figcaption>'
        cells.append(f'<figure{" class=clip" if strip else ""}>{picture}{caption}</figure>')
    return f'<div class="grid">{"".join(cells)}</div>'


def _reason_kind(reason: str) -> str:
    """'near-duplicate image of 0000000012 (pHash Hamming 3)' -> 'near-duplicate image',
    'frozen clip: 7 of 7 frame pairs unchanged' -> 'frozen clip'."""
    return re.split(r" of | \(|\d", reason, maxsplit=1)[0].strip().rstrip(":") or reason


def _rejections(rejected: pa.Table) -> str:
    by_kind = Counter(zip(rejected.column("stage").to_pylist(), map(_reason_kind, rejected.column("reason").to_pylist())))
    pii = Counter(
        pattern
        for reason in rejected.column("reason").to_pylist()
        if reason.startswith("pii: ")
        for pattern in reason.removeprefix("pii: ").split(", ")
    )
    rows = "".join(f"<tr><td>{html.escape(s)}</td><td>{html.escape(k)}</td><td>{n}</td></tr>" for (s, k), n in by_kind.most_common())
    table = f"<table><tr><th>check</th><th>reason</th><th>samples</th></tr>{rows or '<tr><td colspan=3>none</td></tr>'}</table>"
    if pii:
        table += "<p>PII hits by pattern: " + ", ".join(f"{html.escape(p)} {n}" for p, n in pii.most_common()) + "</p>"
    return table


def _figures(quality: dict[str, dict[str, float]], previous: dict[str, dict[str, float]],
             limits: tuple[Limit, ...]) -> str:
    bounds = {name: (low, high) for name, low, high in limits}
    rows = []
    for check, figures in quality.items():
        for metric, value in figures.items():
            before = previous.get(check, {}).get(metric)
            low, high = bounds.get(f"{check}_{metric}", (None, None))
            ok = (low is None or value >= low) and (high is None or value <= high)
            limit = " … ".join("" if b is None else f"{b:g}" for b in (low, high)) if (low, high) != (None, None) else ""
            rows.append(
                f"<tr class={'ok' if ok else 'fail'}><td>{check}</td><td>{metric}</td><td>{value:g}</td>"
                f"<td>{'' if before is None else f'{before:g}'}</td><td>{limit}</td><td>{'✓' if ok else '✗'}</td></tr>"
            )
    header = "<tr><th>check</th><th>metric</th><th>this release</th><th>previous</th><th>limit</th><th></th></tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def render_report(
    stage_dir: Path,
    dataset: str,
    manifest: pa.Table,
    rejected: pa.Table,
    metrics: dict[str, Any],
    quality: Quality,
    gate_lines: list[str],
) -> Path:
    """Write stage_dir/report/index.html: the figures beside the previous release's and the limits."""
    sections = [f"<h1>{html.escape(dataset)} release report</h1>"]
    previous_tag = quality.previous
    sections.append(
        f"<p>{metrics['samples']} samples, {metrics['rejected']} rejected "
        f"({', '.join(f'{k}: {v}' for k, v in metrics.get('rejected_by', {}).items()) or 'none'}); "
        f"accept rate {metrics['accept_rate']}; compared with {html.escape(previous_tag or 'no previous release')}.</p>"
    )
    sections.append("<h2>Samples</h2>" + _grid(stage_dir, manifest))
    plots = []
    for column, title in (("label", "labels"), ("origin", "origin"), ("source", "sources"),
                          ("concept_source", "concept sources"), ("concept", "concepts (top 25)"), ("template", "templates")):
        if column in manifest.column_names:
            plots.append(_bar(title, counts(manifest.column(column))))
    if "clip_score" in manifest.column_names and manifest.num_rows:
        plots.append(_histogram("CLIP score", manifest.column("clip_score").to_pylist()))
    if plots:
        sections.append("<h2>Distributions</h2>" + "".join(plots))
    if quality.metrics:
        sections.append("<h2>Quality and diversity</h2>" + _figures(quality.metrics, quality.previous_metrics, quality.limits))
    if "privacy-distance" in quality.metrics:
        sections.append("<h2>Privacy</h2>" + _privacy_plot(quality.metrics["privacy-distance"]))
    if "utility" in quality.metrics:
        sections.append("<h2>Utility</h2>" + _utility_plot(quality.metrics["utility"]))
    if "lineage" in metrics:
        sections.append("<h2>Lineage</h2>" + _lineage(metrics["lineage"]))
    if quality.notes:
        sections.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in quality.notes) + "</ul>")
    if usage := describe_usage(metrics):
        sections.append(f"<h2>Cost and usage</h2><p>{html.escape(usage)}</p>")
    sections.append("<h2>Rejections</h2>" + _rejections(rejected))
    verdict = "".join(f"<li>{html.escape(line)}</li>" for line in gate_lines)
    sections.append(f'<h2>Validation gate</h2><ul>{verdict}</ul><p><a href="../validation/index.html">Great Expectations report</a></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px}.fail{background:#fdd}.grid{display:flex;flex-wrap:wrap}"
             "figure{width:160px;margin:4px;font-size:11px}figure img{width:156px}"
             "figure.clip{width:100%}figure.clip img{width:auto;max-width:100%}")
    page = f"<!doctype html><meta charset=utf-8><title>{html.escape(dataset)}</title><style>{style}</style>{''.join(sections)}"
    target = stage_dir / "report" / "index.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, page)
    return target


def run_markdown(summary: RunSummary, run: RunStats) -> str:
    """The run's figures as a markdown table (a Prefect artifact in the UI)."""
    title = summary.tag or f"{summary.dataset} (staged, not published)"
    rows = [
        ("samples", summary.samples),
        ("rejected", summary.rejected),
        *((f"rejected by {check}", count) for check, count in summary.rejected_by.items()),
        ("samples/s (generation)", summary.samples_per_s),
        ("shards generated", run.shards_generated),
        ("shards reused from the cache", run.shards_reused),
        ("shard retries", run.retries),
        ("S3 push retries", summary.push_retries),
        ("worker-seconds", run.worker_seconds),
        ("worker processes", run.worker_processes),
        *((f"device-seconds on {device}", seconds) for device, seconds in run.device_seconds.items()),
        *((f"stage seconds: {stage}", seconds) for stage, seconds in summary.stage_seconds.items()),
    ]
    lines = [f"## {title}", "", f"Gate: passed, {summary.expectations} expectations met.", "",
             *([f"Cost and usage: {summary.usage}.", ""] if summary.usage else []),
             "| figure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines) + f"\n\nRelease directory: `{summary.release_dir}`\n" + _pull_markdown(summary)


def skip_markdown(summary: RunSummary) -> str:
    """A skipped run's artifact: which release is current, and how to get it."""
    return (f"## {summary.dataset}: skipped\n\n{summary.tag} was made from these inputs (recipe, files it reads, "
            "plug-in code): nothing new was generated or tagged. Run with `force` to release again.\n"
            + _pull_markdown(summary))


def gate_failure_markdown(dataset: str, gate: Any, data_docs_url: str, report_url: str) -> str:
    """A failed gate's artifact: each failed expectation, with counts (a GateResult), and
    links to the Data Docs and the report of what was generated."""
    failed = "\n".join(f"- {outcome.describe()}" for outcome in gate.failures)
    return (f"## {dataset}: gate failed, nothing published\n\n{len(gate.failures)} of {len(gate.outcomes)} "
            f"expectations failed:\n\n{failed}\n\n[Great Expectations Data Docs]({data_docs_url}) · "
            f"[report of what was generated]({report_url})\n")


def _pull_markdown(summary: RunSummary) -> str:
    commands = summary.pull_commands()
    return ("\nGet it:\n\n```bash\n" + "\n".join(commands) + "\n```\n") if commands else ""
