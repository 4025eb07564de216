"""The dataset checks count with Arrow instead of a Python object per row (a million-row
manifest would otherwise be a million strings, lists and dict entries at once); these
pin that the counts, their order and the refusals are those of the Python definitions,
across chunks and with nulls."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import pyarrow as pa
import pytest

from synthfactory.checks import CHECKS, DatasetView
from synthfactory.checks.balance import _values, counts
from synthfactory.quality import diversity as dv

WORDS = ["red", "green", "blue", "amber", "teal"]


def chunked(rows: list, kind: pa.DataType, cuts: tuple[int, ...] = (3, 7, 7, 20)) -> pa.ChunkedArray:
    bounds = [0, *(c for c in cuts if c < len(rows)), len(rows)]
    return pa.chunked_array([pa.array(rows[a:b], type=kind) for a, b in zip(bounds, bounds[1:])], type=kind)


def random_rows(seed: int, n: int = 60) -> dict[str, list]:
    rng = random.Random(seed)

    def maybe(value, p=0.15):
        return None if rng.random() < p else value

    return {
        "text": [maybe(rng.choice(WORDS)) for _ in range(n)],
        "number": [maybe(rng.randint(0, 4)) for _ in range(n)],
        "flag": [maybe(rng.random() < 0.3) for _ in range(n)],
        "lists": [maybe([rng.choice(WORDS) for _ in range(rng.randint(0, 3))]) for _ in range(n)],
        "lists_with_nulls": [maybe([maybe(rng.choice(WORDS)) for _ in range(rng.randint(0, 3))]) for _ in range(n)],
        "floats": [maybe(rng.choice([0.5, float("nan"), 0.0, -0.0])) for _ in range(n)],
    }


KINDS = {"text": pa.string(), "number": pa.int64(), "flag": pa.bool_(), "lists": pa.list_(pa.string()),
         "lists_with_nulls": pa.list_(pa.string()), "floats": pa.float64()}


def comparable(tally: Counter) -> list:
    """The items, NaN keys as one (each NaN Python makes is a key of its own)."""
    return [("nan" if isinstance(k, float) and math.isnan(k) else k, v) for k, v in tally.items()]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", list(KINDS))
def test_counts_are_the_python_counts_in_the_same_order(seed: int, name: str) -> None:
    rows = random_rows(seed)[name]
    column = chunked(rows, KINDS[name])
    got = counts(column)
    assert comparable(got) == comparable(Counter(_values(column.to_pylist())))
    values = [v for v in _values(column.to_pylist()) if v is not None]
    if name != "floats":  # (floats: a NaN per row is a value per row either way)
        assert list(got.items()) == list(Counter(_values(rows)).items())
        assert dv.balance_of_counts(got) == dv.attribute_balance(values)
    if not name.startswith("lists"):
        assert comparable(counts(column, keep_null=True)) == comparable(Counter(column.to_pylist()))


def test_tally_puts_none_where_counter_does() -> None:
    rows = ["b", "a", None, "c", "a", None, "b"]
    assert list(counts(chunked(rows, pa.string(), (2, 4)), keep_null=True).items()) == list(Counter(rows).items())
    assert list(counts(pa.chunked_array([[None, "x"]]), keep_null=True).items()) == [(None, 1), ("x", 1)]
    assert counts(pa.chunked_array([], type=pa.string()), keep_null=True) == Counter()


def test_exact_dedup_refuses_every_repeat_naming_the_first_across_chunks() -> None:
    rng = random.Random(0)
    digests = [hashlib.sha256(str(rng.randint(0, 30)).encode()).hexdigest() for _ in range(80)]
    digests[5] = digests[9] = digests[40] = None  # a missing digest repeats too, as in Python
    keys = [f"s{i:03d}" for i in range(80)]
    manifest = pa.table({"key": chunked(keys, pa.string(), (10, 11, 50)),
                         "sha256": chunked(digests, pa.string(), (3, 33, 60))})
    dedup = CHECKS.get("dedup").from_params({"image_max_distance": None, "max_duplicate_rate": 1.0})
    findings = dedup.evaluate(DatasetView(manifest), None)

    first: dict[str | None, int] = {}
    expected = {}
    for i, digest in enumerate(digests):
        if digest in first:
            expected[keys[i]] = f"exact duplicate of {keys[first[digest]]}"
        first.setdefault(digest, i)
    assert findings.rejected == expected and list(findings.rejected) == list(expected)
    assert findings.metrics["duplicates_exact"] == len(expected)
    assert findings.metrics["duplicate_rate"] == round(len(expected) / 80, 4)


def test_diversity_reads_only_its_sample_of_captions() -> None:
    captions = [f"caption number {i} of {i % 7} words" for i in range(50)]
    manifest = pa.table({"caption": chunked(captions, pa.string(), (10, 20)),
                         "label": chunked([WORDS[i % 5] for i in range(50)], pa.string())})
    diversity = CHECKS.get("diversity").from_params({"embeddings": False, "sample": 10})
    metrics = diversity.evaluate(DatasetView(manifest, tuple(WORDS)), None).metrics
    chosen = diversity._sample(50)
    sampled = [captions[i] for i in chosen]
    assert metrics["distinct_2"] == round(dv.distinct_n(sampled, 2), 4)
    assert metrics["label_entropy"] == 1.0 and metrics["label_coverage"] == 1.0
