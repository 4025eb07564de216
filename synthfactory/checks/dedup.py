"""Duplicates: exact (same payload bytes), near-duplicate images (perceptual hash within
a Hamming distance), near-duplicate captions (sentence-embedding cosine), within the
release and against the previous release of the dataset.

Duplicates inflate a dataset without adding information; the first sample of each
group is kept and the others are refused with the key they duplicate. The gate fails a
release whose duplicate rate exceeds `max_duplicate_rate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from synthfactory.checks.base import (
    CHECKS,
    CheckParams,
    DatasetCheck,
    DatasetView,
    Findings,
    PreviousRelease,
    Verdict,
)
from synthfactory.samples import Sample
from synthfactory.quality import near_duplicates as nd

IMAGE_PAYLOADS = ("png", "jpg", "jpeg", "webp")


class DedupParams(CheckParams):
    exact: bool = Field(True, description="refuse samples whose payload bytes repeat")
    image_max_distance: int | None = Field(
        4, ge=0, le=32, description="pHash Hamming distance counted as the same image; null: off"
    )
    text_min_similarity: float | None = Field(
        None, gt=0, le=1, description="caption cosine counted as the same text (MiniLM); null: off"
    )
    against_previous: bool = Field(True, description="also refuse duplicates of the previous release")
    max_duplicate_rate: float = Field(0.05, ge=0, le=1, description="refused duplicates / samples above this fails the gate")


def _hashes(manifest: pa.Table) -> tuple[list[int], np.ndarray]:
    """(row of each pHash, the pHashes as uint64) for the rows that have one."""
    column = manifest.column("phash").to_pylist() if "phash" in manifest.column_names else []
    rows = [i for i, h in enumerate(column) if h is not None]
    return rows, np.array([int(column[i], 16) for i in rows], dtype=np.uint64)


def _exact_duplicates(manifest: pa.Table) -> list[tuple[int, str]]:
    """(row, key of the first row with the same sha256) for every row whose sha256 an
    earlier row has, in row order. Counted by Arrow: no Python string per row."""
    digests = manifest.column("sha256")
    if len(digests) == 0:
        return []
    codes = pc.dictionary_encode(digests, null_encoding="encode").combine_chunks().indices
    codes = codes.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    _, first_row, inverse = np.unique(codes, return_index=True, return_inverse=True)
    first = first_row[inverse]
    repeats = np.flatnonzero(first != np.arange(len(codes)))
    if not len(repeats):
        return []
    kept = manifest.column("key").take(pa.array(first[repeats])).to_pylist()
    return list(zip(repeats.tolist(), kept))


@CHECKS.register("dedup")
class Dedup(DatasetCheck):
    Params = DedupParams
    version = "1"
    code = ("synthfactory.quality.near_duplicates",)
    columns = {"phash": pa.string()}
    params: DedupParams

    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        """The perceptual hash of each image, in the shard task where the work is parallel."""
        if self.params.image_max_distance is None:
            return [Verdict() for _ in samples]
        return [
            Verdict({"phash": f"{nd.perceptual_hash(s.files[s.payload]):016x}"} if s.payload in IMAGE_PAYLOADS else {})
            for s in samples
        ]

    def evaluate(self, data: DatasetView, previous: PreviousRelease | None) -> Findings:
        p = self.params
        manifest = data.manifest
        rows_total = manifest.num_rows
        key_column = manifest.column("key")
        every_key: list[str] = []

        def all_keys() -> list[str]:
            """Every key as a Python string, made only for the searches that index them all."""
            if rows_total and not every_key:
                every_key.extend(key_column.to_pylist())
            return every_key

        refused: dict[int, str] = {}
        counts = {"exact": 0, "image": 0, "text": 0, "previous": 0}

        def refuse(index: int, kind: str, reason: str) -> None:
            if index not in refused:
                refused[index] = reason
                counts[kind] += 1

        if p.exact:
            for i, kept_key in _exact_duplicates(manifest):
                refuse(i, "exact", f"exact duplicate of {kept_key}")
        if p.image_max_distance is not None:
            rows, hashes = _hashes(manifest)
            if rows:
                keys = all_keys()
                pairs = nd.hash_pairs(hashes, p.image_max_distance)
                for dropped, (kept, distance) in nd.duplicates_to_drop(len(hashes), pairs).items():
                    refuse(rows[dropped], "image", f"near-duplicate image of {keys[rows[kept]]} (pHash Hamming {distance})")
        if p.text_min_similarity is not None and rows_total:
            keys = all_keys()
            pairs = nd.similar_pairs(data.caption_embeddings, p.text_min_similarity)
            for dropped, (kept, similarity) in nd.duplicates_to_drop(len(keys), pairs).items():
                refuse(dropped, "text", f"near-duplicate caption of {keys[kept]} (cosine {similarity:.3f})")

        notes = []
        if p.against_previous and previous is not None:
            if previous.same_recipe:
                notes.append(f"{previous.tag} was made by the same recipe (a reproduction): not compared")
            elif previous.data is None:
                notes.append(
                    f"cross-release dedup skipped: {previous.tag}'s manifest is neither in the workspace "
                    "nor reachable on the DVC remote"
                )
            else:
                carried = self._against(data, previous, all_keys(), refuse)
                if carried:
                    notes.append(f"{carried} samples carried over unchanged from {previous.tag} "
                                 "(same key and bytes, e.g. a recipe that appends samples): not duplicates")
        rate = len(refused) / max(1, rows_total)
        indices = sorted(refused)
        refused_keys = key_column.take(pa.array(indices, type=pa.int64())).to_pylist() if indices else []
        return Findings(
            metrics={
                "duplicates_exact": counts["exact"],
                "duplicates_image": counts["image"],
                "duplicates_text": counts["text"],
                "duplicates_previous": counts["previous"],
                "duplicate_rate": round(rate, 4),
            },
            limits={"duplicate_rate": (None, p.max_duplicate_rate)},
            rejected={key: refused[i] for i, key in zip(indices, refused_keys)},
            notes=notes,
        )

    def _against(self, data: DatasetView, previous: PreviousRelease, keys: list[str], refuse) -> int:
        """Refuse new samples that duplicate the previous release's; a sample the new
        release carries over (same key, same bytes) is the same sample, not a copy.
        Returns how many were carried over."""
        p, old = self.params, previous.data
        assert old is not None
        old_keys = old.manifest.column("key").to_pylist()
        old_samples = set(zip(old_keys, old.manifest.column("sha256").to_pylist()))
        carried = {i for i, sample in enumerate(zip(keys, data.manifest.column("sha256").to_pylist()))
                   if sample in old_samples}

        def refuse_new(index: int, kind: str, reason: str) -> None:
            if index not in carried:
                refuse(index, kind, reason)

        if p.exact:
            seen = {d: k for d, k in zip(old.manifest.column("sha256").to_pylist(), old_keys)}
            for i, digest in enumerate(data.manifest.column("sha256").to_pylist()):
                if digest in seen:
                    refuse_new(i, "previous", f"exact duplicate of {previous.tag} sample {seen[digest]}")
        new_rows, new_hashes = _hashes(data.manifest)
        old_rows, old_hashes = _hashes(old.manifest)
        if p.image_max_distance is not None and new_rows and old_rows:
            for i, j, distance in nd.hash_matches(new_hashes, old_hashes, p.image_max_distance):
                refuse_new(new_rows[i], "previous",
                           f"near-duplicate image of {previous.tag} sample {old_keys[old_rows[j]]} (pHash Hamming {distance})")
        if p.text_min_similarity is not None and old_keys and keys:
            for i, j, similarity in nd.similar_matches(data.caption_embeddings, old.caption_embeddings, p.text_min_similarity):
                refuse_new(i, "previous", f"near-duplicate caption of {previous.tag} sample {old_keys[j]} (cosine {similarity:.3f})")
        return len(carried)
