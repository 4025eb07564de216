"""Mix recipes: real sources and generators at set ratios, deterministic by seed, each
real record at most once, every sample carrying its origin; impossible mixes refused at
recipe load naming the component."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from synthfactory.generators import GENERATORS
from synthfactory.recipe import RecipeError, load_recipe
from synthfactory.release.bundle import plugins_of
from synthfactory.samples import Rejection, Sample, slot_for

REAL_TRAIN = {"kind": "sklearn-digits", "params": {"split": "train"}}


def mix_recipe(tmp_path: Path, components: list[dict[str, Any]], samples: int, **params: Any) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mixed", "samples": samples, "shard_size": 100,
        "generator": {"kind": "mix", "params": {"components": components, **params}},
    }))
    return path


def generate(recipe_path: Path, indices: range) -> list[Sample | Rejection]:
    recipe = load_recipe(recipe_path)
    return list(plugins_of(recipe).generator.generate([slot_for(recipe.seed, i) for i in indices]))


def test_weights_hold_exactly_per_block_and_records_are_drawn_once(tmp_path):
    path = mix_recipe(tmp_path, [{"source": REAL_TRAIN, "weight": 0.3}, {"generator": {"kind": "digits"}, "weight": 0.7}],
                      samples=1000, image_size=32)
    samples = generate(path, range(1000))
    assert all(isinstance(sample, Sample) for sample in samples)
    assert Counter(sample.columns["source"] for sample in samples) == {"sklearn-digits": 300, "digits": 700}
    real = [sample for sample in samples if sample.columns["origin"] == "real"]
    assert len({sample.columns["source_key"] for sample in real}) == 300  # without replacement
    assert {sample.columns["origin"] for sample in samples} == {"real", "synthetic"}
    first = real[0]
    assert first.columns["source_revision"].startswith("sklearn-") and first.columns["source_license"] == "CC-BY-4.0"
    assert json.loads(first.files["json"])["origin"] == "real" and first.columns["width"] == 32
    # the label comes with the record; the gate tests the achieved source shares
    assert first.columns["label"] in {str(d) for d in range(10)}
    assert plugins_of(load_recipe(path)).generator.target_shares() == {"source": {"sklearn-digits": 0.3, "digits": 0.7}}


def test_assignment_is_deterministic_by_seed_and_independent_of_sharding(tmp_path):
    components = [{"source": REAL_TRAIN, "weight": 1}, {"generator": {"kind": "digits"}, "weight": 1}]
    path = mix_recipe(tmp_path, components, samples=200)
    whole = [(s.columns["source"], s.columns["source_key"], s.files["png"]) for s in generate(path, range(200))]
    halves = [(s.columns["source"], s.columns["source_key"], s.files["png"])
              for part in (range(0, 70), range(70, 200)) for s in generate(path, part)]
    assert whole == halves
    reseeded = mix_recipe(tmp_path, components, samples=200, seed=7)
    assert [s.columns["source"] for s in generate(reseeded, range(200))] != [source for source, _, _ in whole]


def test_counts_must_add_up_to_the_samples(tmp_path):
    path = mix_recipe(tmp_path, [{"source": REAL_TRAIN, "count": 100}, {"generator": {"kind": "digits"}, "count": 300}],
                      samples=500)
    with pytest.raises(RecipeError, match=r"generator.params.components: counts add up to 400, but samples is 500"):
        load_recipe(path)


def test_a_source_asked_for_more_records_than_it_holds_is_refused_naming_it(tmp_path):
    small = {"kind": "sklearn-digits", "params": {"split": "train", "limit": 50}}
    path = mix_recipe(tmp_path, [{"source": small, "weight": 0.5}, {"generator": {"kind": "digits"}, "weight": 0.5}],
                      samples=1000)
    with pytest.raises(RecipeError, match=r"generator.params.components.0: sklearn-digits holds 50 records, "
                                          r"the mix needs 500 of them for 1000 samples"):
        load_recipe(path)


@pytest.mark.parametrize("component, problem", [
    ({"weight": 1}, "give exactly one of source, release, generator"),
    ({"source": REAL_TRAIN, "generator": {"kind": "digits"}, "weight": 1}, "give exactly one of source, release, generator"),
    ({"source": REAL_TRAIN}, "give exactly one of weight, count"),
    ({"source": {"kind": "no-such-source"}, "weight": 1}, "unknown source 'no-such-source'"),
    ({"release": "digits", "weight": 1}, "'digits' is not a release tag like digits@v1"),
    ({"generator": {"kind": "mix"}, "weight": 1}, "a mix cannot hold a mix"),
])
def test_a_bad_component_is_one_line_naming_it(tmp_path, component, problem):
    path = mix_recipe(tmp_path, [component, {"generator": {"kind": "digits"}, "weight": 1}], samples=10)
    with pytest.raises(RecipeError, match="generator.params.components.0") as error:
        load_recipe(path)
    assert problem in str(error.value)


def test_images_are_resized_to_the_mix_size_and_the_folder_licence_recorded(tmp_path):
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    for index in range(4):
        buffer = io.BytesIO()
        Image.new("RGB", (50, 40), (index * 60, 10, 10)).save(buffer, "JPEG")
        (folder / f"c{index}.jpg").write_bytes(buffer.getvalue())
    source = {"kind": "image-folder", "params": {"path": "photos", "license": "CC-BY-4.0"}}
    path = mix_recipe(tmp_path, [{"source": source, "weight": 1, "name": "photos"}], samples=4, image_size=32)
    samples = generate(path, range(4))
    assert {sample.columns["source_key"] for sample in samples} == {f"cat__c{i}" for i in range(4)}
    for sample in samples:
        assert "jpg" not in sample.files and Image.open(io.BytesIO(sample.files["png"])).size == (32, 32)
        assert (sample.columns["width"], sample.columns["height"], sample.payload) == (32, 32, "png")
    plugins = plugins_of(load_recipe(path))
    assert [origin.license for origin in plugins.origins()] == ["CC-BY-4.0"]
    assert plugins.generator.labels() == ("cat",)


def test_a_path_out_of_the_registry_is_refused(tmp_path):
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / ".git").mkdir()
    (tmp_path / "outside").mkdir()
    source = {"kind": "image-folder", "params": {"path": "../outside", "license": "CC0-1.0"}}
    recipe = mix_recipe(tmp_path / "registry", [{"source": source, "weight": 1}], samples=1)
    with pytest.raises(RecipeError, match=r"generator.params.components.0.*path.*inside the registry"):
        load_recipe(recipe)
    assert GENERATORS.get("mix").Params  # the registry holds the mix


def test_a_given_revision_does_not_skip_confinement_or_pinning(tmp_path):
    (tmp_path / "registry" / ".git").mkdir(parents=True)
    (tmp_path / "outside" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "outside" / "cat" / "a.png")
    out = {"kind": "image-folder", "params": {"path": "../outside", "license": "CC0-1.0", "revision": "anything"}}
    with pytest.raises(RecipeError, match=r"components.0.*inside the registry"):
        load_recipe(mix_recipe(tmp_path / "registry", [{"source": out, "weight": 1}], samples=1))
    inside = tmp_path / "registry" / "photos" / "cat"
    inside.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(inside / "a.png")
    stale = {"kind": "image-folder", "params": {"path": "photos", "license": "CC0-1.0", "revision": "sha256:0"}}
    with pytest.raises(RecipeError, match=r"components.0.*not the pinned sha256:0"):
        load_recipe(mix_recipe(tmp_path / "registry", [{"source": stale, "weight": 1}], samples=1))


def test_a_record_already_the_size_keeps_its_format_and_an_unreadable_one_is_rejected(tmp_path):
    folder = tmp_path / "photos" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.jpg", "JPEG")
    (folder / "b.png").write_bytes(b"not an image")
    source = {"kind": "image-folder", "params": {"path": "photos", "license": "CC0-1.0"}}
    path = mix_recipe(tmp_path, [{"source": source, "weight": 1, "name": "photos"}], samples=2, image_size=32)
    made = {item.slot.index: item for item in generate(path, range(2))}
    kept = [item for item in made.values() if isinstance(item, Sample)]
    rejected = [item for item in made.values() if isinstance(item, Rejection)]
    assert len(kept) == 1 and kept[0].payload == "jpg" and kept[0].files["jpg"][:3] == b"\xff\xd8\xff"
    assert "png" not in kept[0].files
    assert len(rejected) == 1 and rejected[0].reason.startswith("photos record cat__b: unreadable image")


def test_a_counts_mix_of_many_samples_assigns_in_linear_time(tmp_path):
    path = mix_recipe(tmp_path, [{"generator": {"kind": "digits"}, "count": 150_000},
                                 {"generator": {"kind": "procedural-shapes"}, "count": 50_000}], samples=200_000)
    mix = plugins_of(load_recipe(path)).generator
    ranks = [mix._assign(index) for index in range(0, 200_000)]  # quadratic: minutes; linear: about a second
    assert sorted(rank for component, rank in ranks if component == 1) == list(range(50_000))
