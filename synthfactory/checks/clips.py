"""Video clips: motion, flicker and near-duplicate clips.

A world model learns dynamics from clips, so the failures that matter are clips without
dynamics (a stalled simulator renders the same frame: frozen), broken rendering (the
whole frame flashing bright and dark: flicker), the same clip twice (a repeated seed or
a copied episode).

- ``clip-motion`` (per clip, in the shard task): measures ``motion``, ``frozen_fraction``
  and ``flicker`` and refuses frozen and flickering clips.
- ``clip-dedup`` (per release): pHashes a few frames of each clip in the shard task, then
  refuses clips whose every hashed frame is within a Hamming distance of another clip's.

The rollout mix (actions, episode lengths, crashes) is judged by ``rollout-stats``.
"""

from __future__ import annotations

from collections.abc import Sequence

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from synthfactory.checks.base import (
    CHECKS,
    CheckParams,
    DatasetCheck,
    DatasetView,
    Findings,
    PreviousRelease,
    SampleCheck,
    Verdict,
)
from synthfactory.quality import near_duplicates as nd
from synthfactory.samples import Sample
from synthfactory.video import ClipFormatError, clip_format_of, decode_clip

#: what this module imports besides its own code (both checks declare all of it)
CODE = ("synthfactory.video", "synthfactory.quality.near_duplicates")


def _frames(sample: Sample) -> np.ndarray | None:
    """The sample's decoded clip, or None when its payload is not a clip."""
    fmt = clip_format_of(sample.payload)
    return None if fmt is None else decode_clip(sample.files[sample.payload], fmt)


# --- clip-motion ---------------------------------------------------------------------------


class ClipMotionParams(CheckParams):
    frozen_threshold: float = Field(
        0.001, ge=0, le=1, description="a frame pair whose mean absolute difference (0-1 scale) is below this is "
        "unchanged; identical frames decode identical through H.264, highway-env clips move >= 0.0027 per step")
    max_frozen_fraction: float = Field(
        0.5, gt=0, le=1, description="clips with at least this share of unchanged frame pairs are refused")
    max_flicker: float | None = Field(
        0.02, ge=0, le=1, description="clips whose flicker (mean brightness jump that reverses at once) "
        "exceeds this are refused; null: measure only")


def motion_figures(frames: np.ndarray, frozen_threshold: float) -> tuple[float, float, float, int, int]:
    """(motion, frozen_fraction, flicker, unchanged pairs, pairs) of T×H×W×3 uint8 frames.

    motion: mean over consecutive pairs of the mean absolute pixel difference (0-1).
    flicker: at each interior frame, the brightness step in and the step out; when they
    have opposite signs (a jump that comes back) the smaller of the two counts, else 0;
    averaged over the interior frames (0-1). A scene cut or a steady fade scores 0,
    alternating bright/dark frames score their brightness gap, one flash of size J in a
    T-frame clip scores J / (T - 2).
    """
    # one pair at a time, so a long high-resolution clip never needs a T-sized int16 copy
    diffs = np.array([np.abs(frames[t + 1].astype(np.int16) - frames[t]).mean() / 255 for t in range(len(frames) - 1)])
    unchanged = int((diffs < frozen_threshold).sum())
    brightness = frames.reshape(len(frames), -1).mean(axis=1) / 255
    steps = np.diff(brightness)
    reversals = np.where(steps[:-1] * steps[1:] < 0, np.minimum(np.abs(steps[:-1]), np.abs(steps[1:])), 0.0)
    return (
        float(diffs.mean()) if len(diffs) else 0.0,
        unchanged / len(diffs) if len(diffs) else 0.0,
        float(reversals.mean()) if len(reversals) else 0.0,
        unchanged,
        len(diffs),
    )


@CHECKS.register("clip-motion")
class ClipMotion(SampleCheck):
    """Refuses clips that do not move (a stalled simulator) and clips that flicker."""

    Params = ClipMotionParams
    version = "1"
    code = CODE
    columns = {"motion": pa.float32(), "frozen_fraction": pa.float32(), "flicker": pa.float32()}
    params: ClipMotionParams

    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        return [self._verdict(sample) for sample in samples]

    def _verdict(self, sample: Sample) -> Verdict:
        p = self.params
        try:
            frames = _frames(sample)
        except ClipFormatError as exc:
            return Verdict(reason=f"unreadable clip: {exc}")
        if frames is None:
            return Verdict()  # not a clip: nothing to measure
        motion, frozen, flicker, unchanged, pairs = motion_figures(frames, p.frozen_threshold)
        columns = {"motion": round(motion, 6), "frozen_fraction": round(frozen, 4), "flicker": round(flicker, 6)}
        if pairs and frozen >= p.max_frozen_fraction:
            return Verdict(columns, f"frozen clip: {unchanged} of {pairs} frame pairs unchanged")
        if p.max_flicker is not None and flicker > p.max_flicker:
            return Verdict(columns, f"flickering clip: {flicker:.4f} flicker > max_flicker {p.max_flicker:g} "
                           "(brightness jumps and returns)")
        return Verdict(columns)


# --- clip-dedup ----------------------------------------------------------------------------


class ClipDedupParams(CheckParams):
    hashed_frames: int = Field(3, ge=1, le=8, description="evenly spaced frames hashed per clip (first … last)")
    max_distance: int = Field(
        4, ge=0, le=16, description="pHash Hamming distance within which two frames are the same; clips are "
        "near duplicates when every hashed frame is")
    max_duplicate_rate: float = Field(0.05, ge=0, le=1, description="refused clips / clips above this fails the gate")


def frame_hash(frame: np.ndarray) -> int:
    """64-bit pHash of one frame, packed as `quality.near_duplicates.perceptual_hash` packs it."""
    bits = imagehash.phash(Image.fromarray(frame)).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@CHECKS.register("clip-dedup")
class ClipDedup(DatasetCheck):
    """Near-duplicate clips across the release: the first (by key) is kept."""

    Params = ClipDedupParams
    version = "1"
    code = CODE
    columns = {"frame_hashes": pa.list_(pa.string())}
    params: ClipDedupParams

    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        """pHashes of the clip's first, middle and last frames (by default), in the shard task."""
        verdicts = []
        for sample in samples:
            try:
                frames = _frames(sample)
            except ClipFormatError:
                frames = None  # clip-motion names it; here there is nothing to hash
            if frames is None:
                verdicts.append(Verdict())
                continue
            picked = np.linspace(0, len(frames) - 1, self.params.hashed_frames).round().astype(int)
            verdicts.append(Verdict({"frame_hashes": [f"{frame_hash(frames[t]):016x}" for t in picked]}))
        return verdicts

    def evaluate(self, data: DatasetView, previous: PreviousRelease | None) -> Findings:
        """Equal hash tuples are grouped first (linear). The distinct ones are searched by the
        XOR of their first and last frame hashes: Hamming distance is subadditive under XOR,
        so clips within d on both frames have signatures within 2d, and one exact multi-index
        search (`hash_pairs`) finds every candidate, each then verified frame by frame. Two
        frames, not all k: the search slows steeply with its radius (100k clips at d = 4:
        about 3 s at radius 8, a minute at 12), and random signatures within 8 of 64 bits
        are rare (about one pair in 10^9), so few candidates need verifying."""
        p = self.params
        manifest = data.manifest
        if "frame_hashes" not in manifest.column_names:
            return Findings({}, notes=["no frame_hashes column (no clips): skipped"])
        keys = manifest.column("key").to_pylist()
        column = manifest.column("frame_hashes").to_pylist()
        rows = sorted((i for i, h in enumerate(column) if h and len(h) == p.hashed_frames), key=keys.__getitem__)
        refused: dict[int, str] = {}
        if rows:
            hashes = np.array([[int(h, 16) for h in column[i]] for i in rows], dtype=np.uint64)
            distinct, first, inverse = np.unique(hashes, axis=0, return_index=True, return_inverse=True)
            inverse = inverse.ravel()
            pairs = [(int(first[g]), j, 0) for j, g in enumerate(inverse.tolist()) if first[g] != j]
            ends = sorted({0, p.hashed_frames - 1})
            signatures = np.bitwise_xor.reduce(distinct[:, ends], axis=1)
            candidates = nd.hash_pairs(signatures, min(64, len(ends) * p.max_distance))
            if candidates:
                a, b = (np.array(side, dtype=np.int64) for side in list(zip(*candidates))[:2])
                distance = np.bitwise_count(distinct[a] ^ distinct[b]).max(axis=1)
                keep = distance <= p.max_distance
                pairs += [(min(x, y), max(x, y), d) for x, y, d in
                          zip(first[a[keep]].tolist(), first[b[keep]].tolist(), distance[keep].tolist())]
            for dropped, (kept, d) in nd.duplicates_to_drop(len(rows), sorted(pairs)).items():
                refused[rows[dropped]] = f"near-duplicate clip of {keys[rows[kept]]} (pHash Hamming {d})"
        rate = len(refused) / max(1, len(keys))
        return Findings(
            metrics={"duplicates": len(refused), "duplicate_rate": round(rate, 4)},
            limits={"duplicate_rate": (None, p.max_duplicate_rate)},
            rejected={keys[i]: reason for i, reason in sorted(refused.items())},
        )
