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
from synthfactory.validation import (
    GateResult,
    GateSpec,
    ShareRule,
    prefetch_gx,
    share_table,
    validate_manifest,
    validate_staged,
)

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
        required_columns=tuple(make_manifest(["cat"]).columns),
        shares=(ShareRule("label", tuple((label, 1 / len(LABELS)) for label in LABELS)),),
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
    spec = make_spec(image_size=None, label_set=None, shares=(),
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
         ("label_balance", "label", "expect_column_values_to_be_in_set"),
         ("label_balance", "p_value", "expect_column_values_to_be_between")},
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
    # 50% / 25% / 25% of 300 rows: bird is 6 standard errors above 1/3; cat and dog
    # (3 below) are within what chance gives at significance 0.001 over 3 labels.
    labels = ["bird"] * 150 + ["cat"] * 75 + ["dog"] * 75

    result = validate_manifest(make_manifest(labels), make_spec(), tmp_path)

    assert failed(result) == {("label_balance", "p_value", "expect_column_values_to_be_between")}
    (outcome,) = result.failures
    assert (outcome.unexpected_count, outcome.element_count) == (1, 3)
    assert ("label_balance.p_value: expect_column_values_to_be_between failed — "
            "1 of 3 rows unexpected; e.g. [label='bird' p_value=2.894e-09 share=0.5 target=0.3333] "
            "(allowed ≥ 0.000333333)") in result.summary()


FIVE_SHAPES = ShareRule("label", tuple((shape, 0.2) for shape in ("circle", "hexagon", "square", "star", "triangle")))


def _draw(rows: int, weights: list[float], seed: int) -> pd.DataFrame:
    shapes = [shape for shape, _ in FIVE_SHAPES.targets]
    return pd.DataFrame({"label": np.random.default_rng(seed).choice(shapes, size=rows, p=weights)})


def _passes(table: pd.DataFrame, significance: float = 0.001) -> bool:
    return bool((table["p_value"] >= significance / len(table)).all())


def test_share_test_passes_a_fair_generator_at_any_size() -> None:
    # What `synthfactory run recipes/shapes.yaml --samples 100` met: shares such as 0.26 and
    # 0.15 of 100 rows are chance, not bias (a fixed ± 0.03 failed them).
    assert _passes(share_table(pd.DataFrame({"label": ["circle"] * 26 + ["square"] * 15 + ["star"] * 20
                                             + ["triangle"] * 19 + ["hexagon"] * 20}), FIVE_SHAPES))
    fair = [0.2] * 5
    for rows in (100, 1_000, 100_000):
        assert all(_passes(share_table(_draw(rows, fair, seed), FIVE_SHAPES)) for seed in range(10)), rows


def test_share_test_fails_a_skew_once_the_rows_can_show_it() -> None:
    skewed = [0.24, 0.19, 0.19, 0.19, 0.19]  # circle 4 points over its share
    assert _passes(share_table(_draw(100, skewed, 0), FIVE_SHAPES))  # 100 rows cannot tell
    assert not _passes(share_table(_draw(20_000, skewed, 0), FIVE_SHAPES))
    table = share_table(_draw(20_000, skewed, 0), FIVE_SHAPES).set_index("label")
    assert table.loc["circle", "p_value"] < 1e-6 and table.loc["circle", "target"] == 0.2


def test_a_value_with_no_target_share_fails_the_share_test() -> None:
    table = share_table(pd.DataFrame({"label": ["circle"] * 99 + ["zebra"]}), ShareRule("label", (("circle", 1.0),)))
    assert table.set_index("label").loc["zebra", "p_value"] == 0.0


def test_missing_class_fails_the_share_test_once_the_rows_can_show_it(tmp_path: Path) -> None:
    five = ("bird", "cat", "dog", "fish", "owl")
    spec = make_spec(label_set=five, shares=(ShareRule("label", tuple((label, 0.2) for label in five)),))

    result = validate_manifest(make_manifest(balanced_labels(label_set=five[:4])), spec, tmp_path)

    assert failed(result) == {("label_balance", "p_value", "expect_column_values_to_be_between")}
    assert "e.g. [label='owl' p_value=" in result.summary() and "share=0 target=0.2]" in result.summary()
    # At 20 rows a class of 10 % is absent by chance one run in eight: not a failure.
    ten = tuple(str(digit) for digit in range(10))
    small = share_table(pd.DataFrame({"label": [str(i % 9) for i in range(20)]}),
                        ShareRule("label", tuple((label, 0.1) for label in ten)))
    assert small.set_index("label").loc["9", "count"] == 0 and _passes(small)


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
    labels[:120] = ["bird"] * 120  # skewed: the balance expectation fails
    table = pa.Table.from_pandas(make_manifest(labels), preserve_index=False)
    staged = tmp_path / "staged" / "manifest"  # one partition per shard: the gate reads them as one table
    staged.mkdir(parents=True)
    for start in range(0, table.num_rows, 100):
        pq.write_table(table.slice(start, 100), staged / f"{table.column('shard')[start]}.parquet")
    expected = validate_manifest(make_manifest(labels), make_spec(), tmp_path / "here")

    prefetch_gx()
    assert validation._prefetched is not None
    result = validate_staged(staged.parent, make_spec(), tmp_path / "there")

    assert validation._prefetched is None  # used once
    assert not result.success
    assert [o.describe() for o in result.outcomes] == [o.describe() for o in expected.outcomes]
    assert (tmp_path / "there" / "index.html").exists() and (tmp_path / "there" / "result.json").exists()
