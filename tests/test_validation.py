"""Release gate: a healthy manifest passes; each fault is caught and named with its count."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthfactory import validation
from synthfactory.validation import GateResult, GateSpec, prefetch_gx, validate_manifest, validate_staged

LABELS = ("bird", "cat", "dog")
ROWS = 300
SIZE = (64, 48)


@pytest.fixture(scope="module", autouse=True)
def gx_imported() -> None:
    """Import GX once for the module, so tests time only validation."""
    validation._load_gx()
    assert "great_expectations" in sys.modules


def make_manifest(labels: list[str]) -> pd.DataFrame:
    """A well-formed manifest with one row per entry of `labels`."""
    n = len(labels)
    return pd.DataFrame({
        "key": [f"{i:08d}" for i in range(n)],
        "shard": [f"shard-{i // 100:05d}" for i in range(n)],
        "index": np.arange(n, dtype="int64"),
        "caption": [f"a small {label}, sample {i}" for i, label in enumerate(labels)],
        "label": labels,
        "labels": [[label] for label in labels],
        "bboxes": [[[1, 2, 30, 40]] for _ in labels],
        "width": np.full(n, SIZE[0], dtype="int32"),
        "height": np.full(n, SIZE[1], dtype="int32"),
        "generator": "procedural",
        "generator_version": "1",
        "seed": np.arange(n, dtype="int64") + 7,
        "sha256": [f"{i:064x}" for i in range(n)],
    })


def balanced_labels(n: int = ROWS, label_set: tuple[str, ...] = LABELS) -> list[str]:
    return [label_set[i % len(label_set)] for i in range(n)]


def make_spec(**overrides: object) -> GateSpec:
    spec = GateSpec(
        expected_rows=(ROWS, ROWS),
        caption_length=(5, 100),
        image_size=SIZE,
        label_set=LABELS,
        balance_tolerance=0.05,
        required_columns=tuple(make_manifest(["cat"]).columns),
    )
    return dataclasses.replace(spec, **overrides)


def failed(result: GateResult) -> set[tuple[str, str | None, str]]:
    return {(outcome.table, outcome.column, outcome.expectation) for outcome in result.failures}


def test_healthy_manifest_passes_and_writes_data_docs(tmp_path: Path) -> None:
    result = validate_manifest(make_manifest(balanced_labels()), make_spec(), tmp_path / "report")

    assert result.success, result.summary()
    assert result.failures == ()
    assert result.summary() == f"all {len(result.outcomes)} expectations passed"
    assert {outcome.table for outcome in result.outcomes} == {"manifest", "label_balance"}
    index = (tmp_path / "report" / "index.html").read_text()
    assert "manifest_gate" in index and "label_balance_gate" in index
    results = json.loads((tmp_path / "report" / "result.json").read_text())
    assert results["success"] is True
    assert set(results["validations"]) == {"manifest", "label_balance"}


def test_text_only_spec_skips_image_and_label_checks(tmp_path: Path) -> None:
    manifest = make_manifest(balanced_labels()).drop(columns=["width", "height", "bboxes"])
    spec = make_spec(image_size=None, label_set=None, balance_tolerance=None,
                     required_columns=tuple(manifest.columns))

    result = validate_manifest(manifest, spec, tmp_path)

    assert result.success, result.summary()
    assert {outcome.table for outcome in result.outcomes} == {"manifest"}
    assert "expect_column_values_to_be_in_set" not in {outcome.expectation for outcome in result.outcomes}


def _set(column: str, rows: slice, value: object) -> Callable[[pd.DataFrame], None]:
    def mutate(manifest: pd.DataFrame) -> None:
        manifest.loc[manifest.index[rows], column] = value
    return mutate


def _copy_row_value(column: str) -> Callable[[pd.DataFrame], None]:
    def mutate(manifest: pd.DataFrame) -> None:
        manifest.loc[1, column] = manifest.loc[0, column]
    return mutate


FAULTS = {
    # name: (mutation, spec overrides, failing expectations, expected summary fragment)
    "duplicate sha256": (
        _copy_row_value("sha256"), {},
        {("manifest", "sha256", "expect_column_values_to_be_unique")},
        f"manifest.sha256: expect_column_values_to_be_unique failed — 2 of {ROWS} rows unexpected",
    ),
    "duplicate key": (
        _copy_row_value("key"), {},
        {("manifest", "key", "expect_column_values_to_be_unique")},
        f"manifest.key: expect_column_values_to_be_unique failed — 2 of {ROWS} rows unexpected",
    ),
    "caption too long": (
        _set("caption", slice(0, 3), "x" * 101), {},
        {("manifest", "caption", "expect_column_value_lengths_to_be_between")},
        f"manifest.caption: expect_column_value_lengths_to_be_between failed — 3 of {ROWS} rows unexpected",
    ),
    "caption too short": (
        _set("caption", slice(10, 12), "cat"), {},
        {("manifest", "caption", "expect_column_value_lengths_to_be_between")},
        f"manifest.caption: expect_column_value_lengths_to_be_between failed — 2 of {ROWS} rows unexpected",
    ),
    "wrong image size": (
        _set("width", slice(0, 4), 32), {},
        {("manifest", "width", "expect_column_values_to_be_in_set")},
        f"manifest.width: expect_column_values_to_be_in_set failed — 4 of {ROWS} rows unexpected; e.g. [32, 32, 32]",
    ),
    "label outside the set": (
        _set("label", slice(0, 15, 3), "zebra"), {},
        {("manifest", "label", "expect_column_values_to_be_in_set"),
         ("label_balance", "label", "expect_column_distinct_values_to_equal_set"),
         ("label_balance", "share", "expect_column_values_to_be_between")},
        f"manifest.label: expect_column_values_to_be_in_set failed — 5 of {ROWS} rows unexpected; e.g. ['zebra'",
    ),
    "too few rows": (
        lambda manifest: None, {"expected_rows": (1000, 5000)},
        {("manifest", None, "expect_table_row_count_to_be_between")},
        f"manifest: expect_table_row_count_to_be_between failed — observed {ROWS}",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_detected_and_counted(fault: str, tmp_path: Path) -> None:
    mutate, overrides, failing, summary_line = FAULTS[fault]
    manifest = make_manifest(balanced_labels())
    mutate(manifest)

    result = validate_manifest(manifest, make_spec(**overrides), tmp_path)

    assert not result.success
    assert failed(result) == failing
    assert summary_line in result.summary()


def test_skewed_labels_fail_balance_naming_the_class(tmp_path: Path) -> None:
    # 40% / 30% / 30%: only bird leaves 1/3 ± 0.05.
    labels = ["bird"] * 120 + ["cat"] * 90 + ["dog"] * 90

    result = validate_manifest(make_manifest(labels), make_spec(), tmp_path)

    assert failed(result) == {("label_balance", "share", "expect_column_values_to_be_between")}
    (outcome,) = result.failures
    assert (outcome.unexpected_count, outcome.element_count) == (1, 3)
    assert ("label_balance.share: expect_column_values_to_be_between failed — "
            "1 of 3 rows unexpected; e.g. [label='bird' share=0.4]") in result.summary()


def test_missing_class_fails_label_set(tmp_path: Path) -> None:
    # Four of five classes present, each within 1/5 ± 0.2: only the label set catches it.
    labels = balanced_labels(label_set=("bird", "cat", "dog", "fish"))
    spec = make_spec(label_set=("bird", "cat", "dog", "fish", "owl"), balance_tolerance=0.2)

    result = validate_manifest(make_manifest(labels), spec, tmp_path)

    assert failed(result) == {("label_balance", "label", "expect_column_distinct_values_to_equal_set")}
    assert ("label_balance.label: expect_column_distinct_values_to_equal_set failed — "
            "1 missing ['owl'], 0 unexpected []") in result.summary()


def test_missing_column_is_reported_not_raised(tmp_path: Path) -> None:
    manifest = make_manifest(balanced_labels()).drop(columns=["seed"])

    result = validate_manifest(manifest, make_spec(), tmp_path)

    assert ("manifest", None, "expect_table_columns_to_match_set") in failed(result)
    assert "manifest: expect_table_columns_to_match_set failed — 1 missing ['seed']" in result.summary()
    assert 'manifest.seed: expect_column_values_to_not_be_null failed — error: ' in result.summary()


def test_writes_only_into_report_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    validate_manifest(make_manifest(balanced_labels()), make_spec(), Path("report"))

    assert [path.name for path in workdir.iterdir()] == ["report"]
    assert (workdir / "report" / "index.html").is_file()


def test_manifest_is_not_retained_after_the_gate(tmp_path: Path) -> None:
    manifest = make_manifest(balanced_labels())
    alive = weakref.ref(manifest)

    validate_manifest(manifest, make_spec(), tmp_path)
    del manifest
    gc.collect()

    assert alive() is None


def test_the_prefetched_gate_process_gives_the_in_process_verdict(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = balanced_labels()
    labels[:40] = ["bird"] * 40  # skewed: the balance expectation fails
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pandas(make_manifest(labels), preserve_index=False), path)
    expected = validate_manifest(make_manifest(labels), make_spec(), tmp_path / "here")

    prefetch_gx()
    assert validation._prefetched is not None
    result = validate_staged(path, make_spec(), tmp_path / "there")

    assert validation._prefetched is None  # used once
    assert not result.success
    assert [o.describe() for o in result.outcomes] == [o.describe() for o in expected.outcomes]
    assert (tmp_path / "there" / "index.html").exists() and (tmp_path / "there" / "result.json").exists()
