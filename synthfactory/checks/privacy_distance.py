"""Privacy distance: how close synthetic samples sit to the real data behind them.

A generator that memorised its training data reproduces real records (or nearly):
publishing those leaks them. For each synthetic sample this check finds the closest real
record (the distance to closest record, DCR) in a feature space where 0 means identical,
refuses the samples closer than `min_distance` with the record they copy, and fails the
gate when too many are. The DCR distribution and the nearest-neighbour distance ratio go
into the report; with a holdout (real records the generator never saw) the DCR median is
compared with that of fresh real data, the baseline that says what "close" means.

The real data is a source (read once per process: a pinned source does not change), or
the release's own rows whose `origin` is "real" (a mix of real and synthetic samples).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, ValidationInfo, field_validator

from synthfactory.checks.base import CHECKS, CheckParams, DatasetCheck, DatasetView, Findings, PreviousRelease
from synthfactory.checks.dedup import IMAGE_PAYLOADS
from synthfactory.quality.features import Metric, image_phash, image_pixels, nearest, text_embeddings
from synthfactory.sources.base import Source, build_source, resolve_source_spec

FeatureKind = Literal["pixels", "phash", "text"]
METRIC_OF: dict[FeatureKind, Metric] = {"pixels": "euclidean", "phash": "hamming", "text": "cosine"}
#: samples whose bytes are held at once (a release is read whole shards at a time, each once)
READ_BATCH = 512
QUANTILES = {"p05": 0.05, "q10": 0.10, "q25": 0.25, "median": 0.5, "q75": 0.75, "q90": 0.90}


@dataclass(frozen=True)
class RealSet:
    """Feature rows of a source's records, with the keys and labels that name them."""

    features: np.ndarray
    keys: tuple[str, ...]
    labels: tuple[str | None, ...]
    origin: str


def source_features(spec: dict[str, Any], recipe_dir: Path | None, kind: FeatureKind, pixel_size: int) -> RealSet:
    """The features of every record of a resolved source spec, computed once per process:
    a source at a pinned revision is immutable, and checks of every release read it."""
    return _source_features(json.dumps(spec, sort_keys=True), recipe_dir, kind, pixel_size)


@functools.lru_cache(maxsize=8)
def _source_features(spec_json: str, recipe_dir: Path | None, kind: FeatureKind, pixel_size: int) -> RealSet:
    source = build_source(json.loads(spec_json), recipe_dir)
    origin = str(source.origin())
    keys: list[str] = []
    labels: list[str | None] = []
    captions: list[str] = []
    parts = []
    for start in range(0, len(source), READ_BATCH):
        records = source.read(range(start, min(start + READ_BATCH, len(source))))
        keys += [record.key for record in records]
        labels += [record.label for record in records]
        if kind == "text":
            captions += [record.caption for record in records]
            continue
        images = []
        for record in records:
            member = next((ext for ext in IMAGE_PAYLOADS if ext in record.files), None)
            if member is None:
                raise ValueError(f"{origin}: record {record.key} has no image ({', '.join(IMAGE_PAYLOADS)})")
            images.append(record.files[member])
        parts.append(_image_features(images, kind, pixel_size))
    features = text_embeddings(captions) if kind == "text" else _stacked(parts, kind, pixel_size)
    features.setflags(write=False)  # shared by every caller of the cache
    return RealSet(features, tuple(keys), tuple(labels), origin)


def release_features(data: DatasetView, rows: np.ndarray, kind: FeatureKind, pixel_size: int) -> np.ndarray:
    """The features of the release's manifest `rows`, in that order: captions from the
    manifest, images from the shards a few whole shards at a time."""
    manifest = data.manifest
    if kind == "text":
        return text_embeddings(manifest.column("caption").take(rows).to_pylist())
    if not len(rows):
        return _image_features([], kind, pixel_size)
    positions, parts = [], []
    for batch in _shard_batches(manifest.column("shard").take(rows).to_pylist()):
        part = manifest.select(["key", "shard", "payload"]).take(rows[batch])
        keys = part.column("key").to_pylist()
        found = DatasetView(part, data.labels, data.root).payloads(keys)
        missing = [key for key in keys if key not in found]
        if missing:
            shard = part.column("shard")[keys.index(missing[0])].as_py()
            raise ValueError(f"sample {missing[0]} is in the manifest but not in shard {shard} under {data.root}")
        positions.append(batch)
        parts.append(_image_features([found[key] for key in keys], kind, pixel_size))
    features = _stacked(parts, kind, pixel_size)
    ordered = np.empty_like(features)
    ordered[np.concatenate(positions)] = features
    return ordered


def _shard_batches(shards: list[str]) -> Iterator[np.ndarray]:
    """Positions grouped by shard, whole shards per batch of about READ_BATCH samples."""
    order = np.argsort(np.array(shards, dtype=object), kind="stable")
    ordered = [shards[i] for i in order]
    start = 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end - start >= READ_BATCH and ordered[end] != ordered[end - 1]):
            yield order[start:end]
            start = end


def _image_features(images: list[bytes], kind: FeatureKind, pixel_size: int) -> np.ndarray:
    return image_pixels(images, pixel_size) if kind == "pixels" else image_phash(images)


def _stacked(parts: list[np.ndarray], kind: FeatureKind, pixel_size: int) -> np.ndarray:
    return np.concatenate(parts) if parts else _image_features([], kind, pixel_size)


def normalised(distances: np.ndarray, kind: FeatureKind, pixel_size: int) -> np.ndarray:
    """Distances on one scale, 0 = identical, whatever the feature size: the RMS pixel
    difference (0..1), the share of pHash bits that differ, the cosine distance."""
    if kind == "pixels":
        return distances / pixel_size  # euclidean / sqrt(pixel_size²)
    if kind == "phash":
        return distances / 64
    return distances


def origin_mask(manifest: pa.Table, value: str) -> np.ndarray:
    """Rows whose `origin` is `value` (a mix release); with no origin column, every row
    is synthetic."""
    if "origin" not in manifest.column_names:
        return np.full(manifest.num_rows, value != "real")
    is_real = pc.fill_null(pc.equal(manifest.column("origin"), "real"), False).to_numpy(zero_copy_only=False)
    return is_real if value == "real" else ~is_real


def image_rows(manifest: pa.Table) -> np.ndarray:
    payloads = manifest.column("payload").to_pylist()
    return np.array([payload in IMAGE_PAYLOADS for payload in payloads], dtype=bool)


class PrivacyDistanceParams(CheckParams):
    real: dict[str, Any] | None = Field(
        None, description="the real data the generator learned from, as a source {kind, params}; "
        "null: the release's own rows whose origin is 'real'",
    )
    holdout: dict[str, Any] | None = Field(
        None, description="real records the generator never saw (a source): their distance to the real data "
        "is the baseline for dcr_ratio",
    )
    features: FeatureKind = Field(
        "pixels", description="pixels: RMS difference of size x size greyscale; phash: share of pHash bits "
        "that differ; text: caption cosine distance",
    )
    pixel_size: int = Field(16, ge=1, le=256, description="side of the greyscale images compared (features: pixels)")
    min_distance: float = Field(
        0.05, ge=0, le=2, description="a synthetic sample closer than this to a real record is a near copy: refused",
    )
    max_near_copy_share: float = Field(0.01, ge=0, le=1, description="near copies / synthetic samples above this fails the gate")
    min_dcr_p05: float | None = Field(None, ge=0, le=2, description="5th percentile of the distances below this fails the gate")

    @field_validator("real", "holdout", mode="before")
    @classmethod
    def _source(cls, value: Any, info: ValidationInfo) -> dict[str, Any] | None:
        return None if value is None else resolve_source_spec(info.field_name, value, info)


@CHECKS.register("privacy-distance")
class PrivacyDistance(DatasetCheck):
    Params = PrivacyDistanceParams
    version = "1"
    code = ("synthfactory.quality.features", "synthfactory.quality.near_duplicates", "synthfactory.checks.dedup",
            "synthfactory.sources.base")
    params: PrivacyDistanceParams

    def reads(self) -> list[Source]:
        return [build_source(spec, self.recipe_dir) for spec in (self.params.real, self.params.holdout) if spec]

    def evaluate(self, data: DatasetView, previous: PreviousRelease | None) -> Findings:
        p = self.params
        manifest = data.manifest
        measured = np.ones(manifest.num_rows, dtype=bool) if p.features == "text" else image_rows(manifest)
        queries = np.flatnonzero(measured & origin_mask(manifest, "synthetic"))
        reference, names = self._reference(data, measured)
        metrics: dict[str, float] = {"samples": len(queries), "reference": len(reference)}
        if not len(queries):
            metrics |= {"near_copies": 0, "near_copy_share": 0.0}
            return Findings(metrics, {"near_copy_share": (None, p.max_near_copy_share)},
                            notes=["no synthetic samples to measure"])
        found, index = nearest(release_features(data, queries, p.features, p.pixel_size), reference, 2, METRIC_OF[p.features])
        distances = normalised(found, p.features, p.pixel_size)
        dcr, second = distances[:, 0], distances[:, 1]
        ratio = np.divide(dcr, second, out=np.ones_like(dcr), where=(second > 0) & np.isfinite(second))
        near = np.flatnonzero(dcr < p.min_distance)
        keys = manifest.column("key").take(queries[near]).to_pylist()
        rejected = {
            key: f"near copy of real sample {names[j][0]} from {names[j][1]} (distance {d:.4f} < {p.min_distance:g})"
            for key, j, d in zip(keys, index[near, 0], dcr[near])
        }
        quantiles = np.quantile(dcr, list(QUANTILES.values()))
        metrics |= {
            "dcr_min": round(float(dcr.min()), 4),
            **{f"dcr_{name}": round(float(q), 4) for name, q in zip(QUANTILES, quantiles)},
            "nndr_median": round(float(np.median(ratio)), 4),
            "near_copies": len(near),
            "near_copy_share": round(len(near) / len(queries), 4),
        }
        notes = [f"{len(queries):,} synthetic samples vs {len(reference):,} real ({p.features}): {len(near)} closer than "
                 f"{p.min_distance:g}, median distance {metrics['dcr_median']}"]
        if p.holdout is not None:
            notes.append(self._against_holdout(reference, metrics))
        limits: dict[str, tuple[float | None, float | None]] = {"near_copy_share": (None, p.max_near_copy_share)}
        if p.min_dcr_p05 is not None:
            limits["dcr_p05"] = (p.min_dcr_p05, None)
        return Findings(metrics, limits, rejected, notes)

    def _reference(self, data: DatasetView, measured: np.ndarray) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """(features, (key, origin) of each row) of the real data: the `real` source, or
        the release's rows whose origin is "real"."""
        p = self.params
        if p.real is not None:
            real = source_features(p.real, self.recipe_dir, p.features, p.pixel_size)
            return real.features, [(key, real.origin) for key in real.keys]
        manifest = data.manifest
        rows = np.flatnonzero(measured & origin_mask(manifest, "real"))
        if not len(rows):
            raise ValueError("real: null, and the release has no rows with origin 'real' to compare with; give a real source")
        columns = manifest.column_names
        keys = manifest.column("source_key" if "source_key" in columns else "key").take(rows).to_pylist()
        sources = manifest.column("source").take(rows).to_pylist() if "source" in columns else [None] * len(rows)
        revisions = (manifest.column("source_revision").take(rows).to_pylist() if "source_revision" in columns
                     else [None] * len(rows))
        names = [(key, _origin_text(source, revision)) for key, source, revision in zip(keys, sources, revisions)]
        return release_features(data, rows, p.features, p.pixel_size), names

    def _against_holdout(self, reference: np.ndarray, metrics: dict[str, float]) -> str:
        """The holdout's DCR median (fresh real data), and the synthetic one's ratio to it."""
        p = self.params
        assert p.holdout is not None
        holdout = source_features(p.holdout, self.recipe_dir, p.features, p.pixel_size)
        found, _ = nearest(holdout.features, reference, 1, METRIC_OF[p.features])
        baseline = float(np.median(normalised(found[:, 0], p.features, p.pixel_size)))
        metrics["holdout_dcr_median"] = round(baseline, 4)
        if baseline == 0:
            return f"holdout {holdout.origin} overlaps the real data (median distance 0): no ratio"
        ratio = metrics["dcr_ratio"] = round(metrics["dcr_median"] / baseline, 4)
        closer = ": synthetic samples sit closer to the real data than fresh real data does" if ratio < 1 else ""
        return f"holdout {holdout.origin} at median distance {baseline:.4f}, synthetic/holdout ratio {ratio}{closer}"


def _origin_text(source: str | None, revision: str | None) -> str:
    """A mix release's real row's source: the mix component's name, at its revision."""
    if source is None:
        return "this release"
    if revision is None or "@" in source:
        return source
    return f"{source}@{revision[:12]}"
