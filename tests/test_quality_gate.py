"""The quality gate and collapse guard: dedup, diversity vs the previous release, balance,
PII, all reported through GX, metrics.json (`dvc metrics diff`) and the release report."""

from __future__ import annotations

import io
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_recipe as recipe_file
import yaml
from PIL import Image

from synthfactory.checks import CHECKS, DatasetView, PreviousRelease
from synthfactory.generators import Sample, SampleSlot
from synthfactory.registry import DataRegistry, dvc_executable
from synthfactory.release.gate import GateFailedError
from synthfactory.shards import has_manifest, read_manifest

SUBJECTS = ["a fox", "an old lighthouse", "a red bicycle", "two herons", "a glass teapot", "a snow leopard",
            "a paper lantern", "a tugboat", "a cactus", "a violin", "a stone bridge", "a hot-air balloon"]
PLACES = ["at dawn", "in heavy rain", "on a crowded market street", "beside a frozen lake", "under neon signs",
          "in a quiet library", "on a windy cliff", "inside a greenhouse", "at the edge of a desert"]
STYLES = ["watercolour", "photograph", "pencil sketch", "oil painting", "isometric render", "film still"]


def varied_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(STYLES)} of {rng.choice(SUBJECTS)} {rng.choice(PLACES)}, {rng.randint(2, 99)} details"
            for _ in range(n)]


def noise_png(seed: int, size: int = 64) -> bytes:
    """A distinct image: smooth random blobs (pHash-distinct from other seeds)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def reencode(png: bytes, size: int | None = None, jpeg: bool = False) -> bytes:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if size:
        image = image.resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if jpeg else "PNG", quality=70)
    return buffer.getvalue()


def manifest_of(samples: list[Sample], check) -> pa.Table:
    import hashlib

    verdicts = check.check(samples)
    return pa.table({
        "key": [s.slot.key for s in samples],
        "caption": [s.caption for s in samples],
        "sha256": [hashlib.sha256(s.files[s.payload]).hexdigest() for s in samples],
        "phash": [v.columns.get("phash") for v in verdicts],
    })


def image_sample(i: int, png: bytes, caption: str) -> Sample:
    return Sample(SampleSlot(i, f"{i:010d}", i), caption, {"png": png}, "png")


UNRELATED = [
    "A red car parked on a quiet street",
    "Two children build a sandcastle at low tide",
    "An espresso machine on a marble counter",
    "Storm clouds gather over a wheat field",
    "A violinist tunes her instrument backstage",
    "Fresh bread cooling on a bakery rack",
    "A satellite dish pointed at the night sky",
    "Penguins huddle together on the ice",
]


def test_dedup_finds_exact_resized_and_reencoded_images():
    dedup = CHECKS.get("dedup").from_params({"image_max_distance": 6})
    originals = [noise_png(seed) for seed in range(40)]
    samples = [image_sample(i, png, f"image {i}") for i, png in enumerate(originals)]
    planted = {
        40: (originals[1], "exact duplicate of 0000000001"),
        41: (reencode(originals[2], size=48), "near-duplicate image of 0000000002 (pHash Hamming"),
        42: (reencode(originals[3], jpeg=True), "near-duplicate image of 0000000003 (pHash Hamming"),
    }
    samples += [image_sample(i, png, f"copy {i}") for i, (png, _) in planted.items()]
    findings = dedup.evaluate(DatasetView(manifest_of(samples, dedup)), None)

    assert set(findings.rejected) == {f"{i:010d}" for i in planted}, findings.rejected
    for i, (_, reason) in planted.items():
        assert findings.rejected[f"{i:010d}"].startswith(reason)
    assert findings.metrics["duplicates_exact"] == 1 and findings.metrics["duplicates_image"] == 2
    assert findings.metrics["duplicate_rate"] == round(3 / 43, 4)
    assert findings.limits["duplicate_rate"] == (None, 0.05)


def test_dedup_finds_paraphrased_captions():
    dedup = CHECKS.get("dedup").from_params({"image_max_distance": None, "exact": False, "text_min_similarity": 0.8})
    captions = [*UNRELATED, "A red automobile is parked on a calm street", "Penguins huddle together on the ice"]
    samples = [Sample(SampleSlot(i, f"{i:010d}", i), c, {"txt": c.encode()}, "txt") for i, c in enumerate(captions)]
    findings = dedup.evaluate(DatasetView(manifest_of(samples, dedup)), None)
    assert set(findings.rejected) == {"0000000008", "0000000009"}, findings.rejected
    assert findings.rejected["0000000008"].startswith("near-duplicate caption of 0000000000 (cosine 0.")
    assert findings.rejected["0000000009"] == "near-duplicate caption of 0000000007 (cosine 1.000)"


def test_dedup_against_the_previous_release():
    dedup = CHECKS.get("dedup").from_params({"image_max_distance": 6})
    old = [image_sample(i, noise_png(i), f"old {i}") for i in range(20)]
    new = [image_sample(i, noise_png(100 + i), f"new {i}") for i in range(20)]
    new[7] = image_sample(7, reencode(old[3].files["png"], size=80), "new 7")
    previous = PreviousRelease("pics@v1", {}, DatasetView(manifest_of(old, dedup)))
    findings = dedup.evaluate(DatasetView(manifest_of(new, dedup)), previous)
    assert findings.rejected == {"0000000007": findings.rejected["0000000007"]}
    assert "pics@v1 sample 0000000003" in findings.rejected["0000000007"]
    assert findings.metrics["duplicates_previous"] == 1

    same = PreviousRelease("pics@v1", {}, DatasetView(manifest_of(old, dedup)), same_recipe=True)
    reproduced = dedup.evaluate(DatasetView(manifest_of(old, dedup)), same)
    assert reproduced.rejected == {} and "same recipe" in reproduced.notes[0]

    # A recipe that appends samples carries the old ones over (same key, same bytes):
    # they are not duplicates, but a new sample copying an old one still is.
    appended = [*old, *(image_sample(20 + i, noise_png(200 + i), f"more {i}") for i in range(5))]
    appended[22] = image_sample(22, old[5].files["png"], "more 2")
    grown = dedup.evaluate(DatasetView(manifest_of(appended, dedup)), previous)
    assert list(grown.rejected) == ["0000000022"]
    assert grown.rejected["0000000022"] == "exact duplicate of 0000000005"  # found within the release first
    assert any("20 samples carried over unchanged from pics@v1" in note for note in grown.notes)


def write_recipe(path: Path, texts: list[str], samples: int, checks: list[dict], **extra) -> Path:
    return recipe_file(path, **{
        "name": "notes",
        "generator": {"kind": "text-list", "params": {"texts": texts}},
        "samples": samples,
        "shard_size": max(1, samples // 2),
        "validation": {"caption_length": {"min": 1, "max": 400}, "min_accept_rate": 0.5},
        "execution": {"runner": "thread", "workers": 1, "retries": 0},
        "checks": checks,
        **extra,
    })


def test_pii_is_rejected_counted_by_pattern_and_reported(tmp_path, prefect):
    from flows.release import run_release

    texts = varied_texts(16, seed=3) + [
        "write to jane.doe@example.com for the schedule",
        "call me on +1 415-555-0132 tonight",
        "card 4111 1111 1111 1111 expires soon",
        "server 192.168.10.24 is down, mail ops@example.org",
    ]
    recipe = write_recipe(tmp_path / "notes.yaml", texts, len(texts), [{"kind": "pii"}])
    summary = run_release(str(recipe), str(tmp_path / "registry"), publish=False)

    release = tmp_path / "registry" / "data" / "notes"
    rejected = pq.read_table(release / "rejected.parquet").to_pylist()
    reasons = {row["caption"]: row["reason"] for row in rejected if row["stage"] == "pii"}
    assert reasons == {
        texts[16]: "pii: email",
        texts[17]: "pii: phone",
        texts[18]: "pii: credit_card",
        texts[19]: "pii: email, ipv4",
    }
    assert summary.samples == 16
    metrics = json.loads((release / "metrics.json").read_text())
    assert metrics["rejected_by"] == {"pii": 4}
    report = (release / "report" / "index.html").read_text()
    assert "PII hits by pattern: email 2" in report
    manifest = read_manifest(release).column("caption").to_pylist()
    assert not any("@" in caption for caption in manifest)


def test_a_dataset_check_rewrites_only_the_manifest_partitions_of_shards_it_took_samples_from(tmp_path, prefect):
    """One partition per shard, an empty one for a shard that lost every sample; the
    partitions of untouched shards are their shard-cache fragments, byte for byte, so
    the next release uploads nothing for them."""
    from flows.release import run_release

    fresh = ["A lighthouse keeper climbs the spiral stairs", "Old maps spread across a wooden table"]
    texts = [*UNRELATED, *UNRELATED[:4], UNRELATED[4], fresh[0], UNRELATED[6], fresh[1]]  # shards of 4
    checks = [{"kind": "dedup", "params": {"image_max_distance": None, "max_duplicate_rate": 0.5}}]
    recipe = write_recipe(tmp_path / "notes.yaml", texts, len(texts), checks, shard_size=4)
    assert run_release(str(recipe), str(tmp_path / "registry"), publish=False).samples == 10

    release = tmp_path / "registry" / "data" / "notes"
    shards = [f"notes-{i:06d}" for i in range(4)]
    partitions = {p.stem: p for p in (release / "manifest").iterdir()}
    assert sorted(partitions) == shards
    captions = {shard: pq.read_table(path).column("caption").to_pylist() for shard, path in partitions.items()}
    assert captions == {shards[0]: UNRELATED[:4], shards[1]: UNRELATED[4:], shards[2]: [], shards[3]: fresh}
    cache = tmp_path / "registry" / ".synthfactory" / "shards" / "notes"
    for shard in shards[:2]:
        (fragment,) = cache.glob(f"*/{shard}.manifest.parquet")
        assert partitions[shard].read_bytes() == fragment.read_bytes()
    assert read_manifest(release).column("caption").to_pylist() == [*UNRELATED, *fresh]


def test_skewed_labels_fail_the_balance_check_naming_its_figure(tmp_path, prefect):
    from flows.release import run_release

    recipe = {
        "name": "skewed",
        "generator": {"kind": "procedural-shapes", "params": {
            "image_size": 32, "classes": ["circle", "square", "star"], "class_weights": [0.8, 0.1, 0.1]}},
        "samples": 300, "shard_size": 150, "seed": 3,
        "validation": {"share_significance": None},
        "execution": {"workers": 1, "retries": 0},
        "checks": [{"kind": "balance", "params": {"max_kl": 0.05, "attributes": ["background"]}}],
    }
    path = tmp_path / "skewed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(GateFailedError) as caught:
        run_release(str(path), str(tmp_path / "registry"), publish=False)
    message = str(caught.value)
    assert "nothing was published" in message
    assert "quality_metrics.balance_kl_divergence: expect_column_values_to_be_between failed" in message
    assert "(allowed ≤ 0.02303)" in message  # the figure and the limit: what chance allows at 300 rows (< max_kl)
    assert "balance_balance_background" not in message  # backgrounds are balanced; only labels are skewed
    assert not (tmp_path / "registry" / "data" / "skewed").exists()


@pytest.mark.slow
def test_collapse_guard_blocks_a_collapsed_release_and_dvc_metrics_diff_shows_the_move(tmp_path, storage_env, prefect):
    from flows.release import run_release

    registry = tmp_path / "registry"
    checks = [{"kind": "dedup", "params": {"image_max_distance": None, "max_duplicate_rate": 0.05}},
              {"kind": "diversity", "params": {"max_drop": 0.1}}]
    recipe = tmp_path / "notes.yaml"
    write_recipe(recipe, varied_texts(120, seed=1), 120, checks)
    assert run_release(str(recipe), str(registry)).tag == "notes@v1"

    collapsed = ["a fox at dawn", "a fox in the rain", "a red fox at dawn"]
    write_recipe(recipe, collapsed, 120, [{"kind": "diversity", "params": {"max_drop": 0.1}}],
                 validation={"caption_length": {"min": 1, "max": 400}, "min_accept_rate": 0.5})
    with pytest.raises(GateFailedError) as caught:
        run_release(str(recipe), str(registry))
    message = str(caught.value)
    assert "diversity_distinct_2" in message and "diversity_vendi" in message
    assert [r.tag for r in DataRegistry.existing(registry).releases()] == ["notes@v1"]  # nothing published

    write_recipe(recipe, varied_texts(120, seed=2), 120, checks)
    assert run_release(str(recipe), str(registry)).tag == "notes@v2"  # a healthy second release passes
    report = (registry / "data" / "notes" / "report" / "index.html").read_text()
    assert "compared with notes@v1" in report

    diff = subprocess.run([dvc_executable(), "metrics", "diff", "notes@v1", "notes@v2", "--json"],
                          cwd=registry, capture_output=True, text=True, check=True)
    changes = json.loads(diff.stdout)["data/notes/metrics.json"]
    assert "quality.diversity.vendi" in changes and "quality.diversity.distinct_2" in changes
    assert changes["quality.diversity.vendi"]["old"] != changes["quality.diversity.vendi"]["new"]


def test_image_vendi_score_falls_when_images_repeat(tmp_path):
    from synthfactory import tinymodels
    from synthfactory.shards import write_tar

    clip = tinymodels.write_tiny_clip(tmp_path / "clip")
    diversity = CHECKS.get("diversity").from_params({"embeddings": False, "image_model": str(clip)})

    def view(pngs: list[bytes], name: str) -> DatasetView:
        samples = [image_sample(i, png, f"image {i}") for i, png in enumerate(pngs)]
        write_tar(tmp_path / name / "shards" / "x.tar", samples)
        table = pa.table({"key": [s.slot.key for s in samples], "caption": [s.caption for s in samples],
                          "shard": ["x.tar"] * len(samples), "payload": ["png"] * len(samples)})
        return DatasetView(table, None, tmp_path / name)

    varied = diversity.evaluate(view([noise_png(i) for i in range(24)], "varied"), None).metrics["vendi_images"]
    collapsed = diversity.evaluate(view([noise_png(0)] * 24, "collapsed"), None).metrics["vendi_images"]
    assert collapsed < 1.01
    assert varied > collapsed + 0.1  # random tiny CLIP: features are close, but distinct images still spread


@pytest.mark.slow
def test_cross_release_dedup_in_a_fresh_clone_reads_the_previous_manifest_from_s3(tmp_path, storage_env, prefect):
    from flows.release import run_release

    checks = [{"kind": "dedup", "params": {"image_max_distance": None, "max_duplicate_rate": 0.5}}]
    first, second = UNRELATED[:4], [*UNRELATED[4:], UNRELATED[1]]
    registry = tmp_path / "registry"
    write_recipe(tmp_path / "notes.yaml", first, 4, checks)
    assert run_release(str(tmp_path / "notes.yaml"), str(registry)).tag == "notes@v1"

    clone = tmp_path / "clone"  # as CI sees it: git only, no data/ and no DVC cache
    subprocess.run(["git", "clone", "--quiet", str(registry), str(clone)], check=True)
    assert not has_manifest(clone / "data" / "notes")
    write_recipe(clone / "recipes" / "notes.yaml", second, 5, checks)
    summary = run_release(str(clone / "recipes" / "notes.yaml"), str(clone))

    assert summary.tag == "notes@v2" and summary.samples == 4
    rejected = pq.read_table(clone / "data" / "notes" / "rejected.parquet").to_pylist()
    assert [(r["caption"], r["reason"]) for r in rejected] == [
        (UNRELATED[1], "exact duplicate of notes@v1 sample 0000000001")]
    partitions = clone / "data" / "notes" / "manifest"  # the last shard's one sample was refused: an empty partition
    assert [pq.read_metadata(p).num_rows for p in sorted(partitions.iterdir())] == [2, 2, 0]
