"""Privacy distance and utility checks on real digits: generated digits written to shards
by the factory's shard writer, a real sklearn digit planted as an exact copy and as a
near copy, scored against the real train/test splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthfactory.checks import CHECKS, DatasetView, PreviousRelease
from synthfactory.digits import GREY, digit_image, grid_from_png
from synthfactory.generators import GENERATORS, Sample
from synthfactory.plugins import RECIPE_DIR
from synthfactory.quality import features
from synthfactory.quality.features import image_pixels, nearest
from synthfactory.recipe import RecipeError, parse_recipe
from synthfactory.samples import slot_for
from synthfactory.shards import fragment_path, manifest_schema, write_shard
from synthfactory.sources.base import SOURCES

TRAIN = {"kind": "sklearn-digits", "params": {"split": "train"}}
TEST = {"kind": "sklearn-digits", "params": {"split": "test"}}
GENERATED = 300


def make_check(kind: str, params: dict):
    """A check as the factory builds it: params resolved at recipe load (sources pinned), then built."""
    cls = CHECKS.get(kind)
    return cls.from_params(cls.Params.model_validate(params, context={RECIPE_DIR: Path.cwd()}).model_dump(mode="json"))


def pinned_source(spec: dict):
    """The source as a resolved recipe names it (its revision pinned)."""
    cls = SOURCES.get(spec["kind"])
    return cls(cls.Params.model_validate(spec["params"], context={RECIPE_DIR: Path.cwd()}))


def real_record(spec: dict, position: int):
    return pinned_source(spec).read([position])[0]


def near_copy(png: bytes) -> bytes:
    """The digit with one cell one level lighter or darker."""
    grid = grid_from_png(png)
    row, col = np.argwhere(grid < 16)[0]
    grid[row, col] += 1
    return digit_image(grid)


def planted(index: int, png: bytes, label: str, **columns) -> Sample:
    return Sample(slot_for(0, index), f"a handwritten digit {label}", {"png": png}, "png", {"label": label, **columns})


def write_release(root: Path, samples: list[Sample], extra: dict[str, pa.DataType] | None = None) -> DatasetView:
    """Two shards and their manifest, as the factory writes them."""
    generator = GENERATORS.get("digits")
    schema = manifest_schema(generator.columns, extra or {})
    half = len(samples) // 2
    tables = []
    for i, part in enumerate((samples[:half], samples[half:])):
        name = f"digits-{i:06d}.tar"
        write_shard(root, name, root / "fragments", part, [], "digits", "1", schema)
        tables.append(pq.read_table(fragment_path(root / "fragments", name, "manifest")))
    return DatasetView(pa.concat_tables(tables), tuple(str(d) for d in range(10)), root)


@pytest.fixture(scope="module")
def generated() -> list[Sample]:
    digits = GENERATORS.get("digits").from_params({})
    return list(digits.generate([slot_for(0, i) for i in range(GENERATED)]))


@pytest.fixture(scope="module")
def release(generated, tmp_path_factory):
    """(view, exact copy key, near copy key, the copied real records)."""
    exact_of, near_of = real_record(TRAIN, 5), real_record(TRAIN, 40)
    exact = planted(GENERATED, exact_of.files["png"], exact_of.label)
    near = planted(GENERATED + 1, near_copy(near_of.files["png"]), near_of.label)
    view = write_release(tmp_path_factory.mktemp("release"), [*generated[:150], exact, *generated[150:], near])
    return view, exact.slot.key, near.slot.key, exact_of, near_of


def test_pixels_of_a_stored_digit_are_its_grid():
    record = real_record(TRAIN, 0)
    grid = grid_from_png(record.files["png"])
    pixels = image_pixels([record.files["png"]], 8).reshape(8, 8)
    assert np.allclose(pixels * 255, GREY[grid], atol=1e-4)  # the 8x8 grid back, on the 0..1 scale


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "hamming"])
def test_nearest_is_brute_force_in_small_blocks(metric, monkeypatch):
    monkeypatch.setattr(features, "_BLOCK_BYTES", 4096)  # many query blocks
    rng = np.random.default_rng(1)
    if metric == "hamming":
        reference = rng.integers(0, 2**63, 300, dtype=np.uint64) << np.uint64(1)
        query = reference[:40] ^ np.uint64(1 << 63)
        brute = np.bitwise_count(query[:, None] ^ reference[None, :]).astype(float)
    else:
        reference, query = rng.random((300, 16)), rng.random((40, 16))
        query[7] = reference[123]
        if metric == "euclidean":
            brute = np.sqrt(((query[:, None] - reference[None]) ** 2).sum(-1))
        else:
            unit = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
            brute = 1 - unit(query) @ unit(reference).T
    distances, indices = nearest(query, reference, k=3, metric=metric)
    order = np.argsort(brute, axis=1, kind="stable")[:, :3]
    assert np.array_equal(indices, order)
    assert np.allclose(distances, np.take_along_axis(brute, order, axis=1), atol=1e-12)
    if metric != "hamming":
        assert distances[7, 0] == 0 and indices[7, 0] == 123
    padded, missing = nearest(query[:2], reference[:1], k=2, metric=metric)
    assert np.isinf(padded[:, 1]).all() and (missing[:, 1] == -1).all()


def test_privacy_refuses_exact_and_near_copies_naming_the_real_record(release):
    view, exact_key, near_key, exact_of, near_of = release
    check = make_check("privacy-distance", {"real": TRAIN, "holdout": TEST})
    findings = check.evaluate(view, None)

    origin = str(pinned_source(TRAIN).origin())
    near_distance = np.sqrt(np.mean((image_pixels([near_copy(near_of.files["png"])], 16)
                                     - image_pixels([near_of.files["png"]], 16)) ** 2))
    assert findings.rejected == {
        exact_key: f"near copy of real sample {exact_of.key} from {origin} (distance 0.0000 < 0.05)",
        near_key: f"near copy of real sample {near_of.key} from {origin} (distance {near_distance:.4f} < 0.05)",
    }
    m = findings.metrics
    assert m["samples"] == GENERATED + 2 and m["reference"] == 1258
    assert m["near_copies"] == 2 and m["near_copy_share"] == round(2 / (GENERATED + 2), 4)
    assert m["dcr_min"] == 0
    quantiles = [m[f"dcr_{q}"] for q in ("p05", "q10", "q25", "median", "q75", "q90")]
    assert quantiles == sorted(quantiles) and 0.05 < m["dcr_p05"] < m["dcr_median"] < 0.5
    assert 0 < m["nndr_median"] <= 1
    # fresh real digits sit closer to the training digits than rendered ones do
    assert 0.05 < m["holdout_dcr_median"] < m["dcr_median"]
    assert m["dcr_ratio"] == pytest.approx(m["dcr_median"] / m["holdout_dcr_median"], abs=1e-3)
    assert findings.limits == {"near_copy_share": (None, 0.01)}
    assert any("holdout sklearn-digits" in note for note in findings.notes)

    strict = make_check("privacy-distance", {"real": TRAIN, "min_dcr_p05": 0.5, "features": "phash"})
    hashed = strict.evaluate(view, None)
    assert exact_key in hashed.rejected and exact_of.key in hashed.rejected[exact_key]
    assert hashed.limits["dcr_p05"] == (0.5, None) and hashed.metrics["dcr_p05"] < 0.5


def test_mix_release_is_measured_against_its_own_real_rows(generated, tmp_path):
    """A mix release (as the `mix` generator writes it: origin, source = the component's name,
    source_revision, source_key) whose synthetic rows include a copy of one of its real rows."""
    train = pinned_source(TRAIN)
    origin = train.origin()
    real_rows = train.read(range(0, 600, 3))
    columns = {"origin": pa.string(), "source": pa.string(), "source_revision": pa.string(), "source_key": pa.string()}
    samples = [planted(1000 + i, r.files["png"], r.label, origin="real", source="real-digits",
                       source_revision=origin.revision, source_key=r.key) for i, r in enumerate(real_rows)]
    samples += [planted(i, s.files["png"], s.columns["label"], origin="synthetic") for i, s in enumerate(generated)]
    copy = planted(2000, real_rows[7].files["png"], real_rows[7].label, origin="synthetic")
    stray = planted(2001, generated[0].files["png"], "seven", origin="synthetic")
    view = write_release(tmp_path, [*samples, copy, stray], columns)

    privacy = make_check("privacy-distance", {}).evaluate(view, None)
    assert privacy.rejected == {
        copy.slot.key: f"near copy of real sample {real_rows[7].key} from real-digits@{origin.revision[:12]} (distance 0.0000 < 0.05)"
    }
    assert privacy.metrics["samples"] == GENERATED + 2 and privacy.metrics["reference"] == len(real_rows)

    utility = make_check("utility", {"test": TEST}).evaluate(view, None)
    m = utility.metrics
    assert m["ignored_samples"] == 1  # the label "seven" is not one the test set has
    assert m["train_samples"] == len(real_rows) + GENERATED + 1
    assert m["real_only_accuracy"] > 0.85 and m["synthetic_only_accuracy"] > 0.3
    assert m["tstr_accuracy"] > m["synthetic_only_accuracy"]


def test_utility_trains_on_the_release_and_tests_on_real_digits(release):
    view = release[0]
    check = make_check("utility", {"test": TEST, "train_real": TRAIN, "min_accuracy": 0.2})
    assert check.params.pixel_size == 8
    findings = check.evaluate(view, None)
    m = findings.metrics
    assert m["train_samples"] == GENERATED + 2 and m["test_samples"] == 539
    assert m["tstr_accuracy"] > 0.3  # chance is 0.1
    assert m["trtr_accuracy"] > 0.9 > m["tstr_accuracy"]
    assert "tstr_drop" not in m and "synthetic_only_accuracy" not in m
    assert findings.limits == {"tstr_accuracy": (0.2, None)}
    assert findings.notes == [
        f"trained a linear probe on {GENERATED + 2} samples, tested on 539 real samples from "
        f"{pinned_source(TEST).origin()}: {m['tstr_accuracy']:.3f} (train-on-real {m['trtr_accuracy']:.3f})"
    ]

    better = {"quality": {"utility": {"tstr_accuracy": m["tstr_accuracy"] + 0.2}}}
    previous = PreviousRelease("digits@v1", better, None)
    gated = make_check("utility", {"test": TEST, "max_drop": 0.05}).evaluate(view, previous)
    assert gated.metrics["tstr_drop"] == pytest.approx(0.2)
    low, high = gated.limits["tstr_drop"]
    assert low is None and gated.metrics["tstr_drop"] > high  # the gate fails this release


def test_cnn_probe_is_seeded_and_beats_chance(release):
    check = make_check("utility", {"test": TEST, "probe": "cnn", "pixel_size": 16, "epochs": 10, "max_train_samples": 250})
    first, again = check.evaluate(release[0], None).metrics, check.evaluate(release[0], None).metrics
    assert first == again
    assert first["train_samples"] == 250 and first["tstr_accuracy"] > 0.2


def test_recipe_errors_name_the_source_field():
    recipe = {
        "name": "digits",
        "generator": {"kind": "digits"},
        "samples": 10,
        "checks": [
            {"kind": "privacy-distance", "params": {"real": {"kind": "mnist-typo"}}},
            {"kind": "utility", "params": {"test": {"kind": "sklearn-digits", "params": {"split": "validation"}}}},
            {"kind": "utility", "params": {"probe": "cnn", "pixel_size": 2, "test": TEST}},
        ],
    }
    with pytest.raises(RecipeError) as failure:
        parse_recipe(recipe, "r.yaml")
    message = str(failure.value)
    assert "checks.0.params.real: real.kind: unknown source 'mnist-typo'; available:" in message
    assert "checks.1.params.test: test.params.split:" in message
    assert "pixel_size: the cnn probe pools twice and needs at least 4, got 2" in message
