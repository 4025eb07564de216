"""Feature matrices of samples, and an exact nearest-neighbour search over them.

The privacy-distance and utility checks compare a release with real data in the same
feature space: downscaled pixels (what a memorised copy keeps), perceptual hashes (robust
to re-encoding), caption embeddings. Plain functions over bytes and arrays, so the checks
own where the bytes come from (shards, a source).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from PIL import Image

from synthfactory.quality.near_duplicates import embed_texts, perceptual_hash

Metric = Literal["euclidean", "hamming", "cosine"]
METRICS: tuple[Metric, ...] = ("euclidean", "hamming", "cosine")
#: bytes of one block of query-to-reference distances (float64); the product that fills
#: it is the only other array of that size, so a search holds < 256 MB at a time
_BLOCK_BYTES = 96 * 1024 * 1024


def image_pixels(images: Iterable[bytes], size: int) -> np.ndarray:
    """(n, size*size) float32 greyscale in [0, 1], area-averaged to size x size. The box
    filter runs in float, so an image made of k x k blocks (an 8x8 digit stored at 32x32)
    reduced by k gives back its grid exactly (up to the 0-255 scale)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rows = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            grey = image.convert("L").convert("F").resize((size, size), Image.Resampling.BOX)
        rows.append(np.asarray(grey, dtype=np.float32).ravel() / np.float32(255))
    return np.stack(rows) if rows else np.zeros((0, size * size), dtype=np.float32)


def image_phash(images: Iterable[bytes]) -> np.ndarray:
    """(n,) uint64 perceptual hashes: near copies that were re-encoded or resized stay close."""
    return np.array([perceptual_hash(data) for data in images], dtype=np.uint64)


def text_embeddings(texts: Sequence[str]) -> np.ndarray:
    """(n, 384) float32 L2-normalised MiniLM embeddings (cosine = dot product)."""
    return embed_texts(list(texts))


def nearest(query: np.ndarray, reference: np.ndarray, k: int = 2, metric: Metric = "euclidean") -> tuple[np.ndarray, np.ndarray]:
    """The k nearest reference rows of each query row: (distances[n, k] float64, indices[n, k]).

    Exact brute force, a block of query rows at a time so memory stays bounded whatever
    the sizes (a block of query x reference distances stays under ~100 MB). "euclidean"
    and "cosine" (1 - cosine similarity) take (n, d) rows, "hamming" (bits that differ)
    (n,) uint64 hashes. Equal distances come out in reference order (which of more than k
    equally near rows are returned is unspecified); where the reference has fewer than k
    rows the rest are inf with index -1. Euclidean distances are recomputed directly for
    the rows found, so an identical row is at exactly 0.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    query, reference = _prepared(query, metric, "query"), _prepared(reference, metric, "reference")
    if metric != "hamming" and query.shape[1] != reference.shape[1]:
        raise ValueError(f"query rows have {query.shape[1]} features, reference rows {reference.shape[1]}")
    n, m = len(query), len(reference)
    distances = np.full((n, k), np.inf)
    indices = np.full((n, k), -1, dtype=np.int64)
    if n == 0 or m == 0:
        return distances, indices
    found = min(k, m)
    squared_norms = np.einsum("ij,ij->i", reference, reference) if metric == "euclidean" else None
    width = query.shape[1] if metric == "euclidean" else 0  # the rows found are compared again
    rows = max(1, _BLOCK_BYTES // (8 * (m + found * width)))
    for lo in range(0, n, rows):
        block_query = query[lo : lo + rows]
        block = _distance_block(block_query, reference, metric, squared_norms)
        if found < m:
            candidates = np.argpartition(block, found - 1, axis=1)[:, :found]
        else:
            candidates = np.broadcast_to(np.arange(m), block.shape)
        if metric == "euclidean":
            exact = np.sqrt(((block_query[:, None, :] - reference[candidates]) ** 2).sum(axis=2))
        elif metric == "cosine":
            exact = np.clip(np.take_along_axis(block, candidates, axis=1), 0.0, 2.0)  # rounding can step outside
        else:
            exact = np.take_along_axis(block, candidates, axis=1).astype(np.float64)
        order = np.lexsort((candidates, exact), axis=1)
        distances[lo : lo + len(block_query), :found] = np.take_along_axis(exact, order, axis=1)
        indices[lo : lo + len(block_query), :found] = np.take_along_axis(candidates, order, axis=1)
    return distances, indices


def _prepared(rows: np.ndarray, metric: Metric, name: str) -> np.ndarray:
    """uint64 hashes for hamming; float64 rows (unit length for cosine) otherwise."""
    rows = np.asarray(rows)
    if metric == "hamming":
        if rows.ndim != 1:
            raise ValueError(f"{name}: hamming takes a 1-D array of uint64 hashes, got shape {rows.shape}")
        return rows.astype(np.uint64, copy=False)
    if rows.ndim != 2:
        raise ValueError(f"{name}: {metric} takes a 2-D array of feature rows, got shape {rows.shape}")
    rows = rows.astype(np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        rows /= np.where(norms > 0, norms, 1.0)  # a zero row stays zero: distance 1 to everything
    return rows


def _distance_block(query: np.ndarray, reference: np.ndarray, metric: Metric, squared_norms: np.ndarray | None) -> np.ndarray:
    """Distances (squared, for euclidean: the same order, a sqrt less) of a query block to
    every reference row, built in place in one array."""
    if metric == "hamming":
        return np.bitwise_count(query[:, None] ^ reference[None, :])
    block = query @ reference.T
    if metric == "cosine":
        return np.subtract(1.0, block, out=block)
    block *= -2.0
    block += np.einsum("ij,ij->i", query, query)[:, None]
    block += squared_norms[None, :]
    return block
