"""Diversity and balance measures for generated datasets.

A generator that collapses repeats itself: its texts reuse the same n-grams, its embeddings
bunch together and its labels or attributes pile onto a few values. Each function here
measures one of those symptoms; all are plain functions over in-memory data.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_VENDI_CHUNK_ROWS = 8192


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams (distinct-n, Li et al. 2016), in [0, 1].

    Repetitive text reuses n-grams, so the ratio drops as a generator collapses. Tokens are
    the lower-cased whitespace-split words; n-grams never span two texts. Returns 0.0 when
    no text has n tokens.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.lower().split()
        grams = list(zip(*(tokens[i:] for i in range(n))))
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def _as_matrix(embeddings: np.ndarray) -> np.ndarray:
    matrix = np.asarray(embeddings)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array, got shape {matrix.shape}")
    return matrix


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64; a zero row has no direction, so it is an error."""
    rows = rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("embeddings contain an all-zero row; cosine similarity is undefined")
    return rows / norms


def self_similarity(embeddings: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Mean pairwise cosine similarity between distinct rows, in [-1, 1].

    A healthy generator spreads its outputs out; as it collapses onto a few modes the rows
    point the same way and the mean cosine rises towards 1. At most `sample` rows, drawn
    without replacement with `seed`, are used (all rows when there are fewer). The diagonal
    is excluded via sum_{i != j} <u_i, u_j> = ||sum_i u_i||^2 - m for unit rows u, so the
    cost is O(m * d) rather than O(m^2 * d).
    """
    matrix = _as_matrix(embeddings)
    n = matrix.shape[0]
    if n > sample:
        matrix = matrix[np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))]
    m = matrix.shape[0]
    if m < 2:
        raise ValueError("self_similarity needs at least two rows (and sample >= 2)")
    total = _unit_rows(matrix).sum(axis=0)
    return float((total @ total - m) / (m * (m - 1)))


def vendi_score(embeddings: np.ndarray) -> float:
    """Vendi score (Friedman & Dieng 2023) with the cosine kernel: the effective number of modes.

    It is exp of the Shannon entropy of the eigenvalues of K/n, K the n x n cosine-similarity
    matrix; it is 1 when all rows are identical and k for k equal-sized orthogonal clusters,
    at most min(n, d). K/n = X X^T / n for the unit rows X shares its non-zero eigenvalues
    with the d x d matrix X^T X / n, which is accumulated in row chunks: O(n * d^2) time and
    O(d^2) extra memory, so a million rows is fine.
    """
    matrix = _as_matrix(embeddings)
    n, d = matrix.shape
    gram = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, _VENDI_CHUNK_ROWS):
        chunk = _unit_rows(matrix[start : start + _VENDI_CHUNK_ROWS])
        gram += chunk.T @ chunk
    eigenvalues = np.clip(np.linalg.eigvalsh(gram / n), 0.0, None)
    probabilities = eigenvalues[eigenvalues > 0] / eigenvalues.sum()
    return float(np.exp(-np.sum(probabilities * np.log(probabilities))))


def _shares(counts: Mapping[str, int], expected: Sequence[str] | None) -> dict[str, float]:
    """Share of each label over the observed labels plus any expected ones (missing = 0)."""
    if any(count < 0 for count in counts.values()):
        raise ValueError("counts must be non-negative")
    labels = dict.fromkeys([*counts, *(expected or ())])
    total = sum(counts.values())
    return {label: (counts.get(label, 0) / total if total else 0.0) for label in labels}


def _normalised_entropy(shares: Sequence[float]) -> float:
    """Shannon entropy divided by its maximum log(k); 0.0 for fewer than two categories or no data."""
    if len(shares) < 2 or not any(shares):
        return 0.0
    entropy = -sum(p * math.log(p) for p in shares if p > 0)
    return entropy / math.log(len(shares))


def label_entropy(counts: Mapping[str, int], expected: Sequence[str] | None = None) -> float:
    """Label-distribution entropy normalised to [0, 1]; 1 means every label has the same count.

    The maximum is taken over the expected label set (plus any unexpected labels observed,
    which keep their mass rather than being dropped), so a missing expected label lowers the
    score. Without `expected`, the labels in `counts` (zero counts included) are the set.
    Returns 0.0 when there are no rows or fewer than two labels.
    """
    return _normalised_entropy(list(_shares(counts, expected).values()))


def coverage(counts: Mapping[str, int], expected: Sequence[str]) -> float:
    """Share of the expected labels that occur at least once; a collapsed generator drops classes."""
    if not expected:
        raise ValueError("coverage needs a non-empty expected label set")
    wanted = set(expected)
    return sum(1 for label in wanted if counts.get(label, 0) > 0) / len(wanted)


def kl_divergence(counts: Mapping[str, int], target: Mapping[str, float]) -> float:
    """KL(observed || target) in nats: how far the label mix drifted from the one asked for.

    `target` holds non-negative weights and is normalised to sum to 1; labels absent from it
    have probability 0. An observed label with target probability 0 makes the divergence
    infinite: that is raised as a ValueError naming the label (an infinity would silently
    pass or fail threshold checks depending on their direction). Also raises when there are
    no observed rows or the target weights are all zero.
    """
    if any(weight < 0 for weight in target.values()):
        raise ValueError("target weights must be non-negative")
    target_total = sum(target.values())
    if target_total <= 0:
        raise ValueError("target weights sum to zero")
    observed = _shares(counts, None)
    if not any(observed.values()):
        raise ValueError("no observed rows: KL divergence is undefined")
    divergence = 0.0
    for label, p in observed.items():
        if p == 0:
            continue
        q = target.get(label, 0.0) / target_total
        if q == 0:
            raise ValueError(f"label {label!r} is observed but has target probability 0 (KL is infinite)")
        divergence += p * math.log(p / q)
    return divergence


def share_extremes(counts: Mapping[str, int], expected: Sequence[str] | None = None) -> tuple[float, float]:
    """(smallest, largest) label share: a quick read on the rarest and the dominant class.

    Labels in `expected` missing from `counts` count as share 0. Returns (0.0, 0.0) when
    there are no labels or no rows.
    """
    shares = list(_shares(counts, expected).values())
    return (min(shares), max(shares)) if shares else (0.0, 0.0)


def attribute_balance(values: Sequence[Any]) -> float:
    """Normalised entropy of a categorical column (1 = all observed values equally common).

    Catches a generator that keeps choosing the same attribute (colour, style, ...). None
    values are ignored; values must be hashable. Returns 0.0 for a column with fewer than two
    distinct values, which is what a collapsed column looks like.
    """
    return balance_of_counts(Counter(value for value in values if value is not None))


def balance_of_counts(counts: Mapping[Any, int]) -> float:
    """`attribute_balance` of the values tallied in `counts` (a None key is not a value)."""
    tally = [count for value, count in counts.items() if value is not None]
    total = sum(tally)
    return _normalised_entropy([count / total for count in tally])


def chance_kl(significance: float, categories: int, rows: int) -> float:
    """The largest KL(observed || target) a sample of `rows` drawn from the target reaches
    with probability 1 − `significance` (G-test: 2·rows·KL ~ χ² with categories − 1 dof)."""
    from scipy.stats import chi2

    return float(chi2.ppf(1 - significance, categories - 1)) / (2 * max(rows, 1))
