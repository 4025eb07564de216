"""Diversity, balance and PII measures on inputs whose answers are known."""

import math
import random

import numpy as np
import pytest

from synthfactory.quality.diversity import (
    attribute_balance,
    coverage,
    distinct_n,
    kl_divergence,
    label_entropy,
    self_similarity,
    share_extremes,
    vendi_score,
)
from synthfactory.quality.privacy import PII_PATTERNS, find_pii


def test_distinct_n_exact_values() -> None:
    texts = ["The cat sat", "the CAT ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 tokens
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["a b", "c d"], 2) == 1.0  # 2 bigrams: none spans the two texts
    assert distinct_n(["one", ""], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_collapsed_texts_have_lower_distinct_2() -> None:
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(300)]
    varied = [" ".join(rng.choices(vocabulary, k=8)) for _ in range(200)]
    collapsed = varied[:10] * 20
    assert distinct_n(varied, 2) > 0.9
    assert distinct_n(collapsed, 2) < 0.1
    assert distinct_n(collapsed, 2) == pytest.approx(distinct_n(varied[:10], 2) / 20)


def _vendi_via_kernel(x: np.ndarray) -> float:
    """Reference: eigenvalues of the full n x n cosine kernel over n."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    eigenvalues = np.clip(np.linalg.eigvalsh(unit @ unit.T / len(x)), 0.0, None)
    p = eigenvalues[eigenvalues > 0] / eigenvalues.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def test_vendi_dxd_matches_nxn_kernel() -> None:
    x = np.random.default_rng(0).normal(size=(300, 16))
    score = vendi_score(x)
    assert score == pytest.approx(_vendi_via_kernel(x), rel=1e-6)
    assert 1.0 < score <= 16.0


def test_vendi_accumulates_over_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import synthfactory.quality.diversity as diversity

    x = np.random.default_rng(1).normal(size=(250, 8)).astype(np.float32)
    whole = vendi_score(x)
    monkeypatch.setattr(diversity, "_VENDI_CHUNK_ROWS", 64)
    assert vendi_score(x) == pytest.approx(whole, rel=1e-9)


def test_identical_embeddings_score_one() -> None:
    x = np.tile(np.arange(1.0, 9.0), (50, 1))
    assert vendi_score(x) == pytest.approx(1.0, abs=1e-6)
    assert self_similarity(x) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 5, 12])
def test_orthogonal_clusters_give_vendi_k(k: int) -> None:
    rng = np.random.default_rng(k)
    d = 32
    centres = np.eye(d)[:k] * 3.0
    x = np.repeat(centres, 40, axis=0) + rng.normal(scale=1e-3, size=(40 * k, d))
    assert vendi_score(x) == pytest.approx(k, rel=1e-2)
    # 40*k rows, each cluster's 40*39 ordered pairs have cosine ~1, all other pairs ~0.
    n = 40 * k
    assert self_similarity(x) == pytest.approx(k * 40 * 39 / (n * (n - 1)), abs=1e-3)


def test_self_similarity_matches_pairwise_mean_and_samples() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 5)) + 1.0
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosine = unit @ unit.T
    expected = (cosine.sum() - np.trace(cosine)) / (60 * 59)
    assert self_similarity(x) == pytest.approx(expected, rel=1e-9)

    big = rng.normal(size=(5000, 64))
    assert abs(self_similarity(big, sample=500, seed=3)) < 0.01
    assert self_similarity(big, sample=500, seed=3) == self_similarity(big, sample=500, seed=3)
    assert self_similarity(big, sample=500, seed=3) != self_similarity(big, sample=500, seed=4)


def test_embedding_input_errors() -> None:
    with pytest.raises(ValueError, match="all-zero row"):
        vendi_score(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        vendi_score(np.zeros(4))
    with pytest.raises(ValueError, match="two rows"):
        self_similarity(np.ones((1, 3)))


def test_label_entropy_and_coverage() -> None:
    uniform = {"a": 5, "b": 5, "c": 5}
    assert label_entropy(uniform) == pytest.approx(1.0)
    assert label_entropy(uniform, ["a", "b", "c"]) == pytest.approx(1.0)
    missing_d = label_entropy(uniform, ["a", "b", "c", "d"])
    assert missing_d == pytest.approx(math.log(3) / math.log(4))
    assert missing_d < 1.0
    assert label_entropy({"a": 90, "b": 10}) < 0.5
    assert label_entropy({"a": 7}) == 0.0
    assert label_entropy({}) == 0.0
    assert coverage(uniform, ["a", "b", "c"]) == 1.0
    assert coverage({"a": 5, "b": 0}, ["a", "b", "c", "d"]) == 0.25


def test_kl_divergence() -> None:
    assert kl_divergence({"a": 50, "b": 50}, {"a": 1.0, "b": 1.0}) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence({"a": 25, "b": 75}, {"a": 0.25, "b": 0.75}) == pytest.approx(0.0, abs=1e-12)
    skewed = kl_divergence({"a": 90, "b": 10}, {"a": 0.5, "b": 0.5})
    assert skewed == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    assert skewed > 0.1
    with pytest.raises(ValueError, match="'c'"):
        kl_divergence({"a": 5, "c": 1}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="no observed rows"):
        kl_divergence({}, {"a": 1.0})


def test_share_extremes() -> None:
    assert share_extremes({"a": 1, "b": 3}) == pytest.approx((0.25, 0.75))
    assert share_extremes({"a": 1, "b": 3}, expected=["a", "b", "c"]) == pytest.approx((0.0, 0.75))
    assert share_extremes({}) == (0.0, 0.0)


def test_attribute_balance() -> None:
    assert attribute_balance(["red", "blue", None, "red", "blue"]) == pytest.approx(1.0)
    assert attribute_balance(["red"] * 9 + ["blue"]) < 0.5
    assert attribute_balance(["red"] * 10) == 0.0
    assert attribute_balance([None, None]) == 0.0


PII_SENTENCES = {
    "email": "Reach me at jane.doe+news@example.co.uk for details.",
    "phone": "Call +1 415-555-0132 after lunch.",
    "credit_card": "Paid with 4111 1111 1111 1111 yesterday.",
    "ssn": "Her SSN is 123-45-6789 on file.",
    "ipv6": "The server listens on 2001:db8::8a2e:370:7334 now.",
    "ipv4": "Requests came from 192.168.1.10.",
    "long_digits": "Account number 987654321 was closed.",
}


def test_table_names() -> None:
    assert [p.name for p in PII_PATTERNS] == list(PII_SENTENCES)


@pytest.mark.parametrize(("name", "sentence"), PII_SENTENCES.items())
def test_each_pattern_detected(name: str, sentence: str) -> None:
    assert find_pii(sentence) == [name]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("(415) 555-0132", "phone"),
        ("415.555.0132", "phone"),
        ("+44 20 7946 0958", "phone"),
        ("+1 (415) 555-0132", "phone"),
        ("+14155550132", "phone"),
        ("4111-1111-1111-1111", "credit_card"),
        ("5500000000000004", "credit_card"),
        ("3782 822463 10005", "credit_card"),
        ("::1", "ipv6"),
        ("fe80::1", "ipv6"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "ipv6"),
        ("::ffff:192.0.2.1", "ipv6"),
        ("ip=10.0.0.255", "ipv4"),
    ],
)
def test_pattern_formats(text: str, name: str) -> None:
    assert find_pii(f"see {text} here") == [name]


@pytest.mark.parametrize("number", ["1234567890123456", "1234 5678 9012 3456", "4111111111111112"])
def test_luhn_invalid_card_is_long_digits_not_card(number: str) -> None:
    assert find_pii(f"Card {number} declined.") == ["long_digits"]


def test_invalid_ssn_is_long_digits_not_ssn() -> None:
    assert find_pii("Ref 000-12-3456 and 666-12-3456.") == ["long_digits"]


def test_several_kinds_in_table_order() -> None:
    text = "Card 5500 0000 0000 0004 from 10.0.0.1; mail ops@example.com or call 415-555-0132."
    assert find_pii(text) == ["email", "phone", "credit_card", "ipv4"]


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 the price was $19.99 for a 1920x1080 screen running v1.2.3, meeting at 12:30.",
        "A $1,299.99 laptop with a 3840x2160 panel, released 2024-03-04 at 10:30:15.",
        "Pi is 3.14159265358979 and the population is 1,234,567,890.",
        "Use std::vector, not a::b; MAC 00:1A:2B:3C:4D:5E; ratio 16:9; build 1.2.3.",
        "Invalid address 256.300.1.1 on 2024-01-15.",
        "A quiet street at dusk with two dogs and a red bicycle.",
    ],
)
def test_no_false_positives(text: str) -> None:
    assert find_pii(text) == []


def test_balance_kl_limit_is_what_chance_allows_at_the_row_count() -> None:
    import numpy as np
    import pyarrow as pa

    from synthfactory.checks import CHECKS, DatasetView

    shapes = ("circle", "hexagon", "square", "star", "triangle")
    balance = CHECKS.get("balance").from_params({"attributes": []})

    def judged(rows: int, weights: list[float]) -> tuple[float, float]:
        labels = np.random.default_rng(0).choice(shapes, size=rows, p=weights)
        findings = balance.evaluate(DatasetView(pa.table({"label": labels}), shapes), None)
        return findings.metrics["kl_divergence"], findings.limits["kl_divergence"][1]

    kl, limit = judged(100, [0.2] * 5)  # a fair run of 100: KL ~0.02 is chance (a fixed 0.01 failed it)
    assert kl <= limit and limit == pytest.approx(18.467 / 200, rel=1e-3)
    skewed = [0.24, 0.19, 0.19, 0.19, 0.19]
    kl, limit = judged(100, skewed)
    assert kl <= limit  # 100 rows cannot show a 4-point skew
    kl, limit = judged(50_000, skewed)
    assert kl > limit  # 50,000 can
