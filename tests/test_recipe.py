"""Recipes: every bad field is named, with its value, before any work."""

from __future__ import annotations

import pytest
import yaml

from synthfactory.recipe import RecipeError, load_recipe, parse_recipe
from synthfactory.release.fingerprint import recipe_digest

VALID = {
    "name": "shapes",
    "generator": {"kind": "procedural-shapes", "params": {"image_size": 64}},
    "samples": 100,
}


def error_of(data) -> str:
    with pytest.raises(RecipeError) as failure:
        parse_recipe(data, "r.yaml")
    return str(failure.value)


def with_(path: str, value):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


def test_valid_recipe_fills_in_generator_defaults():
    recipe = parse_recipe(VALID)
    assert recipe.generator.params["max_objects"] == 3
    assert recipe.shard_count == 1
    assert recipe_digest(recipe) == recipe_digest(parse_recipe(VALID))
    assert recipe_digest(recipe) != recipe_digest(parse_recipe(with_("seed", 1)))


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("generator.params.image_size", 0, "generator.params.image_size: must be ≥ 16, got 0"),
        ("samples", 0, "samples: must be ≥ 1, got 0"),
        ("shard_size", -5, "shard_size: must be ≥ 1, got -5"),
        ("name", "Bad Name", "name: must match"),
        ("generator.kind", "gan", "generator.kind: unknown generator 'gan'; available: digits, gym-rollouts, llm-captions, mix, procedural-shapes, text-list, text-to-image, video-continuation"),
        ("generator.params.classes", ["circle", "blob"], "generator.params.classes: unknown shape 'blob'"),
        ("generator.params.colour", "red", "generator.params.colour: is not a known field"),
        ("validation.min_accept_rate", 1.5, "validation.min_accept_rate: must be ≤ 1.0, got 1.5"),
        ("validation.caption_length", {"min": 50, "max": 10}, "validation.caption_length: min (50) must not exceed max (10)"),
        ("execution.retries", -1, "execution.retries: must be ≥ 0, got -1"),
    ],
)
def test_bad_field_is_named(path, value, expected):
    message = error_of(with_(path, value))
    assert message.startswith("r.yaml: invalid recipe")
    assert expected in message


def test_all_problems_are_reported_at_once():
    data = with_("samples", 0)
    data["generator"]["params"]["image_size"] = 8
    message = error_of(data)
    assert "samples: must be ≥ 1" in message and "generator.params.image_size: must be ≥ 16, got 8" in message


def test_class_weights_must_match_classes():
    message = error_of(with_("generator.params.class_weights", [1.0]))
    assert "class_weights has 1 values for 5 classes" in message


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"broken.yaml: line 2, column 1: not valid YAML"):
        load_recipe(broken)


def test_cli_overrides_are_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_recipe(path, samples=7, seed=3).samples == 7
    with pytest.raises(RecipeError, match="samples: must be ≥ 1, got 0"):
        load_recipe(path, samples=0)
