"""scikit-learn's 1,797 real handwritten digits as a source: the real side of "train on
synthetic, test on real" for the `digits` generator, stored in the same 32×32 PNG
convention (`synthfactory.digits`).

The train/test split and the `limit` ordering are seeded numpy permutations per class,
not scikit-learn's splitter, so the same params pick the same records on any machine and
with any scikit-learn version that ships the same data (the revision pins the data).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from synthfactory.digits import GRID, digit_image
from synthfactory.sources.base import SOURCES, PinnedSourceParams, Record, Source

CLASSES = tuple(str(d) for d in range(10))


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray, str]:
    """(grids, targets, revision), read once per process; the revision names the
    scikit-learn version and hashes the arrays, so changed data is never read silently.

    scikit-learn is imported here, not at module level: discovering sources imports every
    source module, and the import costs a second."""
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    grids = np.ascontiguousarray(digits.data.reshape(-1, GRID, GRID).astype(np.uint8))
    targets = np.ascontiguousarray(digits.target.astype("<i8"))
    digest = hashlib.sha256(grids.tobytes() + targets.tobytes()).hexdigest()[:16]
    return grids, targets, f"sklearn-{sklearn.__version__}:{digest}"


def _order(targets: np.ndarray, split: str, test_fraction: float, split_seed: int) -> np.ndarray:
    """Original indices of a split, class-balanced first: round r holds the r-th pick of
    every class, so any prefix (`limit`) keeps classes as even as the data allows.

    Each class is permuted once with the seed; its first round(n·test_fraction) records
    are the test split, the rest train."""
    rng = np.random.default_rng(split_seed)
    per_class = []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        n_test = round(len(members) * test_fraction)
        per_class.append({"test": members[:n_test], "train": members[n_test:], "all": members}[split])
    rounds = max(len(members) for members in per_class)
    return np.array([members[r] for r in range(rounds) for members in per_class if r < len(members)], dtype=np.int64)


class SklearnDigitsParams(PinnedSourceParams):
    license: str = Field("CC-BY-4.0", min_length=1, max_length=200, description="UCI Optical Recognition of Handwritten Digits")
    split: Literal["train", "test", "all"] = "all"
    test_fraction: float = Field(0.3, gt=0, lt=1, description="share of each class in the test split")
    split_seed: int = Field(0, description="seeds the per-class permutation of the split and the limit order")
    limit: int | None = Field(None, ge=1, description="the first N records of the split, classes balanced")

    def current_revision(self, info: ValidationInfo) -> str:
        """sklearn-<version>:<sha256 of the arrays, 16 hex digits>."""
        return _load()[2]

    @model_validator(mode="after")
    def _split_not_empty(self) -> "SklearnDigitsParams":
        if self.split != "all" and _order(_load()[1], self.split, self.test_fraction, self.split_seed).size == 0:
            raise ValueError(f"test_fraction: {self.test_fraction} leaves the {self.split} split empty")
        return self


@SOURCES.register("sklearn-digits")
class SklearnDigitsSource(Source):
    """The real 8×8 digits, one record per digit, key `digit-<original index>`."""

    Params = SklearnDigitsParams
    version = "1"
    code = ("synthfactory.digits",)
    params: SklearnDigitsParams

    def __init__(self, params: SklearnDigitsParams) -> None:
        super().__init__(params)
        order = _order(_load()[1], params.split, params.test_fraction, params.split_seed)
        #: original indices of this source's records, in record order (ascending: reading is sequential)
        self.original_indices = np.sort(order[: params.limit])

    def __len__(self) -> int:
        return len(self.original_indices)

    def read(self, indices: Sequence[int]) -> list[Record]:
        grids, targets, _ = _load()
        records = []
        for position in indices:
            if not 0 <= position < len(self):
                raise IndexError(f"index {position} out of range for {len(self)} records")
            original = int(self.original_indices[position])
            digit = str(targets[original])
            records.append(Record(
                key=f"digit-{original:04d}",
                files={"png": digit_image(grids[original])},
                label=digit,
                caption=f"a handwritten digit {digit}",
                meta={"index": original},
            ))
        return records

    def uri(self) -> str:
        return "sklearn.datasets.load_digits"

    def labels(self) -> tuple[str, ...]:
        return CLASSES
