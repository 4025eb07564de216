"""The procedural generator and the shard format, without Prefect."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
from PIL import Image

from synthfactory.generators import GENERATORS, Rejection, Sample, SampleSlot
from synthfactory.release.build import build_shard
from synthfactory.release.bundle import plugins_of
from synthfactory.recipe import parse_recipe
from synthfactory.samples import slot_for
from synthfactory.shards import fragment_path, plan_shards, read_shard

RECIPE = parse_recipe({
    "name": "unit",
    "generator": {"kind": "procedural-shapes", "params": {"image_size": 48, "max_objects": 4}},
    "samples": 50,
    "shard_size": 20,
    "seed": 11,
})


def slots(n: int, seed: int = 11) -> list[SampleSlot]:
    return [slot_for(seed, i) for i in range(n)]


def test_generator_is_a_pure_function_of_params_and_seed():
    generator = plugins_of(RECIPE).generator
    first = list(generator.generate(slots(10)))
    again = list(GENERATORS.get("procedural-shapes")(generator.params).generate(slots(10)))
    assert [s.files for s in first] == [s.files for s in again]
    other_seed = list(generator.generate(slots(10, seed=12)))
    assert [s.files for s in first] != [s.files for s in other_seed]


def test_samples_carry_consistent_ground_truth():
    for sample in plugins_of(RECIPE).generator.generate(slots(30)):
        assert isinstance(sample, Sample)
        image = Image.open(io.BytesIO(sample.files["png"]))
        assert image.size == (48, 48)
        truth = json.loads(sample.files["json"])
        assert sample.files["txt"].decode() == sample.caption == truth["caption"]
        assert truth["label"] == sample.columns["label"] == truth["objects"][0]["class"]
        assert truth["label"] in sample.caption
        for box in sample.columns["bboxes"]:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48


def test_impossible_placement_is_rejected_with_a_reason():
    crowded = parse_recipe({
        "name": "crowded",
        "generator": {"kind": "procedural-shapes", "params": {"max_objects": 8, "max_overlap": 0.0, "placement_attempts": 1}},
        "samples": 40,
    })
    results = list(plugins_of(crowded).generator.generate(slots(40)))
    rejections = [r for r in results if isinstance(r, Rejection)]
    assert rejections, "eight objects with zero overlap in one attempt each should fail sometimes"
    assert all("could not place object" in r.reason for r in rejections)


def test_shards_are_deterministic_and_match_their_fragments(tmp_path):
    plan = plan_shards(RECIPE.name, RECIPE.samples, RECIPE.shard_size)
    assert [(p.start, p.stop) for p in plan] == [(0, 20), (20, 40), (40, 50)]
    result = build_shard(RECIPE, plan[2], tmp_path / "a", tmp_path / "fa")
    build_shard(RECIPE, plan[2], tmp_path / "b", tmp_path / "fb")
    tar_a, tar_b = tmp_path / "a" / "shards" / plan[2].name, tmp_path / "b" / "shards" / plan[2].name
    assert tar_a.read_bytes() == tar_b.read_bytes()
    assert result.samples + result.rejected == 10

    samples = list(read_shard(tar_a))
    manifest = pq.read_table(fragment_path(tmp_path / "fa", plan[2].name, "manifest")).to_pylist()
    assert [key for key, _ in samples] == [row["key"] for row in manifest]
    assert all(set(files) == {"png", "json", "txt"} for _, files in samples)
    assert [row["index"] for row in manifest] == list(range(40, 50))
    assert not list((tmp_path / "a").rglob(".*.tmp")), "temporary files must be renamed away"
