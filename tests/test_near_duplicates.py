"""Near-duplicate search: planted copies are found, independent items are not, the
sub-quadratic searches agree with brute force, and the caption model is the real one."""

from __future__ import annotations

import io
from itertools import combinations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from synthfactory.quality.near_duplicates import (
    duplicates_to_drop,
    embed_texts,
    hash_matches,
    hash_pairs,
    perceptual_hash,
    similar_matches,
    similar_pairs,
)

PLANTED = (3, 17, 42, 99, 150)


def _drawn(rng: np.random.Generator) -> Image.Image:
    """A smooth random background with a few random ellipses and rectangles on it."""
    image = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, 48, 2))
        box = (x0, y0, x0 + int(rng.integers(8, 32)), y0 + int(rng.integers(8, 32)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)(box, fill=fill)
    return image


def _encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def drawn_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [_drawn(rng) for _ in range(200)]


def _copies(image: Image.Image) -> list[bytes]:
    """The near-duplicates a pipeline meets: other resolutions and a lossy re-encode."""
    return [_encoded(image.resize((48, 48))), _encoded(image.resize((96, 96))), _encoded(image, "JPEG", quality=70)]


def test_planted_image_copies_are_the_only_pairs(drawn_images: list[Image.Image]) -> None:
    payloads = [_encoded(image) for image in drawn_images]
    groups = []
    for source in PLANTED:
        first = len(payloads)
        payloads += _copies(drawn_images[source])
        groups.append([source, first, first + 1, first + 2])
    hashes = np.array([perceptual_hash(p) for p in payloads], dtype=np.uint64)
    assert all(0 <= h < 2**64 for h in map(int, hashes))
    expected = {pair for group in groups for pair in combinations(group, 2)}

    pairs = hash_pairs(hashes, max_distance=6)

    assert {(i, j) for i, j, _ in pairs} == expected
    for i, j, distance in pairs:
        assert distance == bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 6


def test_copies_match_the_older_release(drawn_images: list[Image.Image]) -> None:
    old = np.array([perceptual_hash(_encoded(image)) for image in drawn_images], dtype=np.uint64)
    rng = np.random.default_rng(1)
    new_payloads = [_encoded(_drawn(rng)) for _ in range(30)]
    expected = set()
    for source in PLANTED:
        for copy in _copies(drawn_images[source]):
            expected.add((len(new_payloads), source))
            new_payloads.append(copy)
    new = np.array([perceptual_hash(p) for p in new_payloads], dtype=np.uint64)

    matches = hash_matches(new, old, max_distance=6)

    assert {(i, j) for i, j, _ in matches} == expected
    assert hash_matches(new, old[:0], max_distance=6) == []


def _brute_force(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(distances <= max_distance, 1))
    return sorted(zip(i.tolist(), j.tolist(), distances[i, j].tolist()))


@pytest.mark.parametrize("max_distance", [0, 3, 8, 12])
def test_hash_pairs_equals_brute_force(max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, 2**64, 2000, dtype=np.uint64, endpoint=False)
    for target in rng.choice(2000, 300, replace=False):
        flipped = int(hashes[rng.integers(2000)])
        for bit in rng.choice(64, int(rng.integers(0, 14)), replace=False):
            flipped ^= 1 << int(bit)
        hashes[target] = flipped
    hashes[10] = hashes[20] = hashes[30]  # exact repeats

    pairs = hash_pairs(hashes, max_distance)

    assert pairs == _brute_force(hashes, max_distance)
    assert (10, 20, 0) in pairs and (10, 30, 0) in pairs and (20, 30, 0) in pairs
    planted_near = sum(0 < d <= max_distance for _, _, d in pairs)
    assert max_distance == 0 or planted_near > 10  # the comparison is not vacuous


def test_hash_matches_equals_brute_force() -> None:
    rng = np.random.default_rng(5)
    old = rng.integers(0, 2**64, 1500, dtype=np.uint64, endpoint=False)
    new = np.concatenate([old[:100] ^ rng.integers(0, 2**8, 100, dtype=np.uint64), rng.integers(0, 2**64, 400, dtype=np.uint64)])
    distances = np.bitwise_count(new[:, None] ^ old[None, :])
    i, j = np.nonzero(distances <= 5)

    assert hash_matches(new, old, 5) == sorted(zip(i.tolist(), j.tolist(), distances[i, j].tolist()))


def test_paraphrased_captions_pair_and_unrelated_ones_do_not() -> None:
    captions = [
        "A red car parked on a quiet street",
        "A red automobile is parked on a calm street",
        "A bowl of soup on a wooden table",
        "A blue car parked on a busy street",
        "a photo of a dog running on the grass",
        "A bowl of soup on a wooden table",
    ]
    embeddings = embed_texts(captions)

    assert embeddings.shape == (6, 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert np.array_equal(embeddings[2], embeddings[5])
    pairs = similar_pairs(embeddings, threshold=0.8)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (2, 5)]
    assert pairs[0][2] == pytest.approx(float(embeddings[0] @ embeddings[1]), abs=1e-6)
    assert 0.8 <= pairs[0][2] < 0.95
    assert pairs[1][2] == 1.0
    assert embed_texts([]).shape == (0, 384)


@pytest.fixture(scope="module")
def planted_vectors() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """30k random unit vectors in 384-d; 300 of them are noisy copies (cosine ~0.9) of others."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((30_000, 384)).astype(np.float32)
    sources = rng.choice(15_000, 300, replace=False)
    copies = 15_000 + rng.choice(15_000, 300, replace=False)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[copies] = unit[sources] + 0.025 * rng.standard_normal((300, 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), sources, copies


def test_lsh_finds_planted_pairs_like_exact_search(planted_vectors) -> None:
    vectors, sources, copies = planted_vectors
    planted = {(int(a), int(b)) for a, b in zip(sources, copies)}
    assert np.einsum("ij,ij->i", vectors[sources], vectors[copies]).min() >= 0.86

    exact = similar_pairs(vectors[:20_000].copy(), 0.85, method="exact")
    approximate = similar_pairs(vectors, 0.85, method="lsh")

    found = {(i, j): s for i, j, s in approximate}
    assert len(planted & found.keys()) >= 0.95 * len(planted)
    assert found.keys() <= planted  # verified exactly: no false positives
    for (i, j), similarity in found.items():
        assert similarity == pytest.approx(float(vectors[i] @ vectors[j]), abs=1e-5)
    in_exact_range = {pair for pair in planted if pair[1] < 20_000}
    assert {(i, j) for i, j, _ in exact} == in_exact_range
    assert {pair for pair in found if pair[1] < 20_000} <= in_exact_range


def test_lsh_cross_release_matches(planted_vectors) -> None:
    vectors, sources, copies = planted_vectors
    matches = similar_matches(vectors[15_000:], vectors[:15_000], 0.85, method="lsh")

    found = {(15_000 + i, j) for i, j, _ in matches}
    planted = {(int(b), int(a)) for a, b in zip(sources, copies)}
    assert found <= planted
    assert len(found) >= 0.95 * len(planted)


def test_identical_rows_always_pair() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((25_000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[[5, 900, 24_999]] = vectors[100]

    pairs = similar_pairs(vectors, 0.999, method="lsh")

    identical = [(i, j, s) for i, j, s in pairs if {i, j} <= {5, 100, 900, 24_999}]
    assert identical == [(5, 100, 1.0), (5, 900, 1.0), (5, 24_999, 1.0), (100, 900, 1.0), (100, 24_999, 1.0),
                         (900, 24_999, 1.0)]


def test_duplicates_to_drop_keeps_the_first_of_a_chain() -> None:
    pairs = [(5, 9, 4), (2, 5, 3), (7, 8, 1)]  # 2~5~9 (2 and 9 not paired directly), 7~8

    dropped = duplicates_to_drop(10, pairs)

    assert dropped == {5: (2, 3), 9: (2, 4), 8: (7, 1)}
    assert duplicates_to_drop(10, reversed(pairs)) == dropped
    assert duplicates_to_drop(3, []) == {}
