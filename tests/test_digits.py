"""Real and rendered 8×8 digits in one storage convention: the `sklearn-digits` source,
the `digits` generator, and a train-on-synthetic, test-on-real sanity check."""

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from synthfactory.digits import GREY, IMAGE_SIZE, digit_image, grid_from_bitmap, grid_from_png
from synthfactory.generators.base import GENERATORS
from synthfactory.samples import slot_for
from synthfactory.sources.base import SOURCES

pytest.importorskip("sklearn")


def generate(count: int, recipe_seed: int = 1, **params):
    generator = GENERATORS.get("digits").from_params(params)
    return list(generator.generate([slot_for(recipe_seed, index) for index in range(count)]))


def digits_source(tmp_path, **params):
    """A source built as a recipe builds it: params validated with the recipe's directory."""
    cls = SOURCES.get("sklearn-digits")
    return cls(cls.Params.model_validate(params, context={"recipe_dir": tmp_path}))


def test_a_grid_is_stored_as_4x4_blocks_and_read_back_losslessly():
    grid = np.random.default_rng(0).integers(0, 17, size=(8, 8))
    png = digit_image(grid)
    image = Image.open(io.BytesIO(png))
    assert (image.mode, image.size) == ("L", (IMAGE_SIZE, IMAGE_SIZE))
    pixels = np.asarray(image)
    assert np.array_equal(pixels, np.kron(GREY[grid], np.ones((4, 4), dtype=np.uint8)))
    assert np.array_equal(grid_from_png(png), grid)
    assert digit_image(grid) == png


def test_bad_grids_and_images_are_refused():
    with pytest.raises(ValueError, match="shape"):
        digit_image(np.zeros((8, 7)))
    with pytest.raises(ValueError, match="17"):
        digit_image(np.full((8, 8), 17))
    noisy = np.asarray(Image.open(io.BytesIO(digit_image(np.full((8, 8), 8))))).copy()
    noisy[0, 0] += 1
    encoded = io.BytesIO()
    Image.fromarray(noisy).save(encoded, "PNG")
    with pytest.raises(ValueError, match="png"):
        grid_from_png(encoded.getvalue())


def test_grid_from_bitmap_counts_on_pixels_per_block():
    bitmap = np.zeros((32, 32), dtype=bool)
    bitmap[:4, :4] = True
    bitmap[4, 4:6] = True
    grid = grid_from_bitmap(bitmap)
    assert grid[0, 0] == 16 and grid[1, 1] == 2 and grid.sum() == 18


def test_generated_digits_are_deterministic_per_seed():
    first, again, other = generate(20), generate(20), generate(20, recipe_seed=2)
    assert [s.files for s in first] == [s.files for s in again]
    assert [s.files["png"] for s in first] != [s.files["png"] for s in other]
    assert len({s.files["png"] for s in first}) == 20


def test_generated_digits_follow_the_real_data_convention():
    samples = generate(200)
    generator = GENERATORS.get("digits").from_params({})
    assert generator.image_size() == (32, 32) and generator.labels() == tuple("0123456789")
    for sample in samples:
        grid = grid_from_png(sample.files["png"])  # raises unless 4×4 blocks of the 17 levels
        label = sample.columns["label"]
        assert sample.caption == f"a handwritten digit {label}" and sample.payload == "png"
        assert set(sample.columns) == set(generator.columns)
        assert json.loads(sample.files["json"])["label"] == label
        assert 150 <= grid.sum() <= 500  # on-pixels: the real digits hold 250..400
        assert grid.any(axis=1).sum() >= 7  # the digit fills the box's height
    assert set(Counter(s.columns["label"] for s in samples)) == set("0123456789")


def test_generator_params_are_checked():
    samples = generate(30, classes=["3", "8"])
    assert {s.columns["label"] for s in samples} == {"3", "8"}
    params = GENERATORS.get("digits").Params
    with pytest.raises(ValidationError, match="fonts: 'NoSuchFont' is not installed"):
        params.model_validate({"fonts": ["NoSuchFont"]})
    with pytest.raises(ValidationError, match="fonts: '../etc/passwd' is not installed"):
        params.model_validate({"fonts": ["../etc/passwd"]})
    with pytest.raises(ValidationError, match="classes: 'x' is not a digit"):
        params.model_validate({"classes": ["1", "x"]})
    with pytest.raises(ValidationError, match=r"ink: \(0.4, 0.2\)"):
        params.model_validate({"ink": [0.4, 0.2]})


def test_preflight_names_a_font_this_worker_lacks():
    """Recipes are validated where they are loaded; a worker without the font fails first."""
    cls = GENERATORS.get("digits")
    generator = cls(cls.Params.model_construct(**{**cls.Params().model_dump(), "fonts": ("GoneSans",)}))
    with pytest.raises(ValueError, match="fonts: 'GoneSans' is not installed"):
        generator.preflight()


def test_pillow_font_renders_in_the_same_convention():
    for sample in generate(10, fonts=["pillow-aileron"]):
        assert sample.columns["font"] == "pillow-aileron"
        grid_from_png(sample.files["png"])


def test_source_pins_its_revision_at_recipe_load(tmp_path):
    cls = SOURCES.get("sklearn-digits")
    params = cls.Params.model_validate({}, context={"recipe_dir": tmp_path})
    assert params.revision.startswith("sklearn-") and params.license == "CC-BY-4.0"
    again = cls.Params.model_validate({"revision": params.revision}, context={"recipe_dir": tmp_path})
    assert again.revision == params.revision
    with pytest.raises(ValidationError, match="revision: the data is at"):
        cls.Params.model_validate({"revision": "sklearn-0.0:0000"}, context={"recipe_dir": tmp_path})
    with pytest.raises(ValidationError, match="test_fraction"):
        cls.Params.model_validate({"split": "test", "test_fraction": 0.001}, context={"recipe_dir": tmp_path})


def test_source_split_is_stratified_disjoint_and_stable(tmp_path):
    everything = digits_source(tmp_path)
    train, test = digits_source(tmp_path, split="train"), digits_source(tmp_path, split="test")
    assert len(everything) == 1797
    assert not set(train.original_indices) & set(test.original_indices)
    assert sorted([*train.original_indices, *test.original_indices]) == list(range(1797))
    labels = lambda source: Counter(r.label for r in source.records())  # noqa: E731
    totals, test_counts = labels(everything), labels(test)
    assert all(test_counts[d] == round(totals[d] * 0.3) for d in totals)
    assert np.array_equal(digits_source(tmp_path, split="test").original_indices, test.original_indices)
    assert not np.array_equal(digits_source(tmp_path, split="test", split_seed=1).original_indices, test.original_indices)


def test_source_limit_keeps_classes_balanced(tmp_path):
    hundred = digits_source(tmp_path, split="train", limit=100)
    assert len(hundred) == 100 and set(Counter(r.label for r in hundred.records()).values()) == {10}
    odd = digits_source(tmp_path, split="train", limit=25)
    counts = Counter(r.label for r in odd.records()).values()
    assert len(odd) == 25 and max(counts) - min(counts) <= 1
    assert set(odd.original_indices) <= set(hundred.original_indices)


def test_source_records_hold_the_real_grids(tmp_path):
    from sklearn.datasets import load_digits

    real = load_digits()
    source = digits_source(tmp_path, split="test", limit=20)
    records = source.read(range(len(source)))
    for record in records:
        index = record.meta["index"]
        assert record.key == f"digit-{index:04d}" and record.label == str(real.target[index])
        assert record.caption == f"a handwritten digit {record.label}"
        assert np.array_equal(grid_from_png(record.files["png"]), real.images[index].astype(int))
    assert source.uri() == "sklearn.datasets.load_digits" and source.labels() == tuple("0123456789")
    with pytest.raises(IndexError):
        source.read([20])


def test_a_classifier_trained_on_synthetic_digits_reads_real_ones(tmp_path):
    """Train on synthetic, test on real: far above chance (0.1) with a linear model."""
    from sklearn.linear_model import LogisticRegression

    synthetic = generate(500)
    features = np.stack([grid_from_png(s.files["png"]).ravel() for s in synthetic])
    model = LogisticRegression(max_iter=2000).fit(features, [s.columns["label"] for s in synthetic])
    real = digits_source(tmp_path, limit=500).records()
    real_features, real_labels = zip(*((grid_from_png(r.files["png"]).ravel(), r.label) for r in real))
    accuracy = model.score(np.stack(real_features), real_labels)
    assert accuracy > 0.5, accuracy
