"""Lineage: generation depth from the makers' declared training data and reused releases,
the depth limits, and the diversity comparison along the lineage."""

from __future__ import annotations

import pytest

from synthfactory.recipe import Lineage, LineageModel, RecipeError
from synthfactory.release.lineage import LineageError, trace

RELEASES = {
    "digits@v1": {"lineage": {"depth": 1}, "quality": {"diversity": {"label_entropy": 1.0, "self_similarity": 0.2}}},
    "digits@v2": {"lineage": {"depth": 2}, "quality": {"diversity": {"label_entropy": 0.9}}},
    "old@v1": {},  # made before lineage was recorded: one generation
}


def test_a_generator_not_trained_on_anything_makes_depth_1():
    record = trace(Lineage(), ["procedural-shapes"], [], RELEASES.get, None)
    assert record.depth == 1 and record.parents == [] and record.figures == {"depth": 1}
    assert record.makers == [{"name": "procedural-shapes", "trained_on": [], "depth": 1}]


def test_a_real_only_mix_has_depth_0():
    assert trace(Lineage(), [], [], RELEASES.get, None).depth == 0


def test_a_model_trained_on_a_synthetic_release_makes_the_next_generation():
    settings = Lineage(models=(LineageModel(name="tiny-sd", trained_on=("digits@v2", "mnist")),))
    record = trace(settings, ["text-to-image", "tiny-sd"], [], RELEASES.get, None)
    assert record.depth == 3  # digits@v2 is depth 2; a model trained on it makes depth 3
    assert record.makers[1] == {"name": "tiny-sd", "trained_on": ["digits@v2", "mnist"], "depth": 3}
    assert [parent["tag"] for parent in record.parents] == ["digits@v2"]
    assert any("generation depth 3" in note for note in record.notes)  # warn_depth 2


def test_a_mix_inherits_the_depth_of_the_release_it_reuses():
    assert trace(Lineage(), [], ["digits@v2"], RELEASES.get, None).depth == 2
    assert trace(Lineage(), [], ["old@v1"], RELEASES.get, None).depth == 1


def test_max_depth_becomes_a_gate_limit_and_diversity_is_compared_with_parents():
    settings = Lineage(models=(LineageModel(name="digits", trained_on=("digits@v1",)),), max_depth=1,
                       max_diversity_drop=0.05)
    record = trace(settings, ["digits"], [], RELEASES.get, {"label_entropy": 0.8, "self_similarity": 0.21})
    assert record.figures["depth"] == 2 and record.limits["depth"] == (None, 1)
    assert record.figures["diversity_drop"] == pytest.approx(0.2)  # label_entropy 1.0 -> 0.8
    assert record.limits["diversity_drop"] == (None, 0.05)
    assert any("label_entropy" in note and "digits@v1" in note for note in record.notes)


def test_a_model_the_recipe_does_not_run_is_a_recipe_error_naming_the_makers():
    settings = Lineage(models=(LineageModel(name="tiny-sdd", trained_on=("digits@v1",)),), max_depth=1)
    with pytest.raises(LineageError, match=r"tiny-sdd is not a maker of this recipe; its makers are text-to-image, tiny-sd"):
        trace(settings, ["text-to-image", "tiny-sd"], [], RELEASES.get, None)


def test_a_missing_parent_release_is_a_recipe_error_naming_it():
    settings = Lineage(models=(LineageModel(name="digits", trained_on=("digits@v9",)),))
    with pytest.raises(LineageError, match="digits@v9") as error:
        trace(settings, ["digits"], [], RELEASES.get, None)
    assert isinstance(error.value, RecipeError)
