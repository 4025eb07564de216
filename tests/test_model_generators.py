"""Model-backed generators on tiny random-weight models built here from configs and
loaded through the same `from_pretrained(path)` code real checkpoints use (no downloads).

SynCLR's chain: LLM captions -> diffusion images (k per caption) -> CLIP score gate -> DVC release.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthfactory import models, tinymodels
from synthfactory.generators import Rejection, Sample, SampleSlot
from synthfactory.release.build import build_shard
from synthfactory.release.bundle import plugins_of
from synthfactory.recipe import RecipeError, load_recipe
from synthfactory.samples import slot_for
from synthfactory.shards import plan_shards, read_manifest, read_shard

REPO = Path(__file__).resolve().parent.parent
SYNCLR = REPO / "recipes" / "synclr.yaml"
INSTRUCTIONS = REPO / "recipes" / "instructions.yaml"
PROVENANCE = (
    "concept", "concept_source", "template", "examples", "caption_model", "caption_model_revision", "caption_seed",
    "image_model", "image_model_revision", "scheduler", "steps", "guidance_scale", "image_seed", "caption_key",
    "clip_score", "clip_model", "clip_model_revision",
)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tinymodels.write_all(tmp_path_factory.mktemp("tiny-models"))


def synclr_overrides(tiny: dict[str, Path], min_score: float = 0.0) -> list[str]:
    """The published recipe, pointed at the tiny models and shrunk to CPU size."""
    return [
        f"generator.params.model={tiny['sd']}",
        f"generator.params.captions.params.model={tiny['llm']}",
        f"checks.0.params.model={tiny['clip']}",
        f"checks.0.params.min_score={min_score}",
        "generator.params.height=64",
        "generator.params.width=64",
        "generator.params.steps=2",
        "generator.params.batch_size=8",
        "generator.params.captions.params.max_new_tokens=24",
        "generator.params.captions.params.batch_size=4",
        "validation.caption_length.min=1",
        "validation.min_accept_rate=0.05",
        "checks.1.params.max_duplicate_rate=1.0",  # random weights: captions are noise, duplicates happen
        f"checks.2.params.image_model={tiny['clip']}",  # Vendi score of CLIP image embeddings
        "checks.3.params.max_kl=100",  # a handful of captions cannot follow the concept weights
        "checks.3.params.min_attribute_balance=0",
        "shard_size=3",
        "execution.workers=2",
        "execution.retry_backoff_s=0.1",
    ]


def slots(recipe, count: int) -> list[SampleSlot]:
    return [slot_for(recipe.seed, i) for i in range(count)]


def test_captions_follow_the_synclr_scheme_and_do_not_depend_on_the_batch(tiny):
    def captions(batch_size: int) -> list[Sample | Rejection]:
        recipe = load_recipe(SYNCLR, overrides=[
            *synclr_overrides(tiny), f"generator.params.captions.params.batch_size={batch_size}"])
        return list(plugins_of(recipe).generator.captions.generate(slots(recipe, 12)))

    batched, alone = captions(6), captions(1)
    assert [getattr(x, "caption", x) for x in batched] == [getattr(x, "caption", x) for x in alone]
    samples = [x for x in batched if isinstance(x, Sample)]
    assert samples, "twelve prompts should give at least one caption"
    for sample in samples:
        columns = sample.columns
        assert columns["template"] in {"concept", "background", "relation"}
        assert len(columns["examples"]) == 3
        assert all(e.startswith(columns["template"] + "-") for e in columns["examples"])
        assert (columns["background"] is not None) == (columns["template"] == "background")
        assert (columns["relation"] is not None) == (columns["template"] == "relation")
        assert columns["caption_model_revision"].startswith("sha256:")
        assert columns["caption_seed"] == sample.slot.seed
        assert "\n" not in sample.caption and sample.caption == sample.caption.strip()


def test_prompt_holds_three_examples_then_the_query(tiny):
    recipe = load_recipe(SYNCLR, overrides=synclr_overrides(tiny))
    llm = plugins_of(recipe).generator.captions
    prompt = llm.prompt(slots(recipe, 1)[0])
    lines = prompt.text.split("\n")
    assert len(lines) == 4 and all(" --> " in line for line in lines[:3])
    assert lines[3].endswith("-->") and lines[3].startswith(prompt.fields["concept"])


def test_concept_sources_are_sampled_by_weight(tiny):
    recipe = load_recipe(SYNCLR, overrides=synclr_overrides(tiny))
    llm = plugins_of(recipe).generator.captions
    drawn = [llm.prompt(slot).source for slot in slots(recipe, 4000)]
    share = drawn.count("imagenet-1k") / len(drawn)
    assert 0.43 < share < 0.51, share  # 0.47 ± ~5 sigma
    assert drawn.count("flowers") < drawn.count("cars")  # 0.03 vs 0.05


def test_shard_is_byte_identical_on_rerun_and_groups_k_images_per_caption(tiny, tmp_path):
    recipe = load_recipe(SYNCLR, samples=3, overrides=synclr_overrides(tiny, min_score=1.0))
    plan = plan_shards(recipe.name, recipe.samples, recipe.shard_size)[0]
    first = build_shard(recipe, plan, tmp_path / "a", tmp_path / "fa")
    build_shard(recipe, plan, tmp_path / "b", tmp_path / "fb")
    for sub in ("shards", "rejected"):
        a, b = tmp_path / "a" / sub / plan.name, tmp_path / "b" / sub / plan.name
        assert a.exists() == b.exists()
        if a.exists():
            assert a.read_bytes() == b.read_bytes()

    manifest = pq.read_table(tmp_path / "fa" / "synclr-000000.manifest.parquet").to_pylist()
    rejected = pq.read_table(tmp_path / "fa" / "synclr-000000.rejected.parquet").to_pylist()
    clip_refused = [r for r in rejected if r["stage"] == "clip-score"]
    assert first.samples == len(manifest) and first.rejected == len(rejected)
    # every caption accepted by the LLM stage became 4 images, each kept or refused by CLIP
    captions = {r["group"] for r in manifest} | {r["group"] for r in clip_refused}
    assert len(manifest) + len(clip_refused) == 4 * len(captions)
    for row in manifest:
        assert row["key"].startswith(row["group"] + "-") and row["caption_key"] == row["group"]
        assert row["clip_score"] >= 1.0
        assert all(row[column] is not None for column in PROVENANCE)
    for row in clip_refused:
        assert "< min_score 1.0" in row["reason"] and row["caption"]
    images = dict(read_shard(tmp_path / "a" / "shards" / plan.name))
    assert set(images) == {row["key"] for row in manifest}
    assert all(Image.open(io.BytesIO(files["png"])).size == (64, 64) for files in images.values())
    if clip_refused:  # kept aside, not dropped
        kept_aside = dict(read_shard(tmp_path / "a" / "rejected" / plan.name))
        assert set(kept_aside) == {r["key"] for r in clip_refused}


@pytest.mark.slow
def test_synclr_recipe_releases_end_to_end(tiny, tmp_path, storage_env, prefect):
    from flows.release import run_release
    from synthfactory.release.verify import verify_release

    registry = tmp_path / "registry"
    summary = run_release(str(SYNCLR), str(registry), samples=6, overrides=synclr_overrides(tiny, min_score=1.0))

    assert summary.tag == "synclr@v1"
    release = registry / "data" / "synclr"
    manifest = read_manifest(release).to_pandas()
    assert set(PROVENANCE) <= set(manifest.columns)
    assert manifest.groupby("group").size().max() <= 4
    assert (manifest["clip_score"] >= 1.0).all()
    assert manifest["image_model"].iloc[0] == str(tiny["sd"])
    assert manifest["guidance_scale"].iloc[0] == 2.5
    checked, problems = verify_release(release)
    assert problems == [] and checked == len(manifest)
    rejected = pq.read_table(release / "rejected.parquet").to_pandas()
    assert summary.rejected == len(rejected)
    # the recipe's concept lists travel with the release so `dvc repro` can rerun it
    assert (registry / "recipes" / "synclr" / "imagenet1k.txt").exists()
    dvc_yaml = (registry / "dvc.yaml").read_text()
    assert "recipes/synclr/examples.yaml" in dvc_yaml and "synthfactory/generators/llm_captions.py" in dvc_yaml
    assert "--set" in dvc_yaml
    metrics = json.loads((release / "metrics.json").read_text())
    assert set(metrics["quality"]) == {"dedup", "diversity", "balance", "lineage"} and metrics["quality"]["diversity"]["vendi"] >= 1
    assert 1 <= metrics["quality"]["diversity"]["vendi_images"] <= len(manifest)
    assert (release / "report" / "index.html").exists()
    card = (release / "README.md").read_text()
    assert f"image model: `{tiny['sd']}` at revision `sha256:" in card
    assert "caption model: `" in card and "clip-score model: `" in card


@pytest.mark.slow
def test_text_only_recipe_runs_alone(tiny, tmp_path, prefect):
    from flows.release import run_release

    overrides = [f"generator.params.model={tiny['llm']}", "generator.params.max_new_tokens=16",
                 "validation.caption_length.min=1", "validation.min_accept_rate=0.5", "shard_size=8",
                 "checks.1.params.max_duplicate_rate=1.0"]
    summary = run_release(str(INSTRUCTIONS), str(tmp_path / "registry"), samples=16, publish=False, overrides=overrides)
    manifest = read_manifest(tmp_path / "registry" / "data" / "instructions").to_pandas()
    assert summary.samples == len(manifest) > 0
    assert set(manifest["template"]) <= {"question", "task"}
    assert "image_model" not in manifest.columns and (manifest["payload"] == "txt").all()


def test_missing_weights_fail_before_any_work_naming_the_model(tmp_path, tiny, monkeypatch):
    from synthfactory.release.job import ReleaseRequest, prepare

    missing = tmp_path / "no-such-model"
    overrides = (f"generator.params.captions.params.model={tiny['llm']}", f"generator.params.model={missing}")
    with pytest.raises(models.ModelError, match=f"image model '{missing}': no such directory"):
        prepare(ReleaseRequest(str(SYNCLR), str(tmp_path / "registry"), publish=False, overrides=overrides))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub ids of the published recipe, none of them cached here
    with pytest.raises(models.ModelError) as caught:
        prepare(ReleaseRequest(str(SYNCLR), str(tmp_path / "registry"), publish=False))
    message = str(caught.value)
    assert "'meta-llama/Llama-2-7b-hf'" in message and "not in the Hugging Face cache" in message
    assert "hf download meta-llama/Llama-2-7b-hf" in message
    assert not (tmp_path / "registry").exists(), "nothing is written when a model is missing"


def test_cli_reports_missing_weights_in_one_line(tmp_path, tiny):
    import subprocess
    import sys

    cli = str(Path(sys.executable).with_name("synthfactory"))
    result = subprocess.run(
        [cli, "run", str(SYNCLR), "--no-publish", "--registry", str(tmp_path / "r"),
         "--set", f"generator.params.captions.params.model={tiny['llm']}",
         "--set", f"generator.params.model={tmp_path / 'gone'}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "image model" in result.stderr and "gone" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_unloadable_weights_fail_the_shard_once_with_the_model_named(tiny, tmp_path, prefect, caplog):
    import shutil

    from flows.release import run_release
    from synthfactory.release.build import ShardFailedError

    broken = tmp_path / "sd-without-unet-weights"
    shutil.copytree(tiny["sd"], broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    overrides = [*synclr_overrides(tiny), f"generator.params.model={broken}", "execution.retries=3",
                 "execution.retry_backoff_s=5", "execution.workers=1"]
    with pytest.raises(ShardFailedError) as caught:
        run_release(str(SYNCLR), str(tmp_path / "registry"), samples=3, publish=False, overrides=overrides)
    message = str(caught.value)
    assert "synclr-000000.tar failed (not retried)" in message  # retrying would fail the same way
    log = caplog.text  # the shard task's Prefect log (one shard: it runs in the flow's process)
    assert "cannot load the weights" in log and "Retry 1/3" not in log
    assert f"image generation with {broken}: cannot load the weights" in message


def test_a_local_dir_without_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="no config.json or model_index.json"):
        models.resolve_model(str(tmp_path / "empty"), role="caption")


def test_device_selection(monkeypatch):
    monkeypatch.delenv(models.DEVICE_ENV, raising=False)
    assert models.select_device("auto") == "cpu"  # no accelerator here
    assert models.select_device("cpu") == "cpu"
    with pytest.raises(models.ModelError, match="'cuda' is not available"):
        models.select_device("cuda")
    with pytest.raises(models.ModelError, match="not one of"):
        models.select_device("tpu")
    monkeypatch.setenv(models.DEVICE_ENV, "cuda:1")
    with pytest.raises(models.ModelError, match="'cuda:1' is not available"):
        models.select_device("auto")


def test_out_of_memory_becomes_an_actionable_error(tiny):
    import torch

    model = models.resolve_model(str(tiny["sd"]), role="image")
    with pytest.raises(models.ModelError, match="ran out of memory.*lower batch_size"):
        with models.explain_model_errors(model, "cpu", "image generation with"):
            torch.empty(2**62, dtype=torch.uint8)  # a real allocation failure


@pytest.mark.parametrize("override, expected", [
    ("generator.params.batch_size=6", "generator.params: batch_size (6) must be a multiple of images_per_caption (4)"),
    ("generator.params.scheduler=FastScheduler", "scheduler 'FastScheduler' is not a diffusers scheduler class"),
    ("generator.params.pipeline=FluxPipe", "pipeline 'FluxPipe' is not a diffusers pipeline class"),
    ("generator.params.captions.params.examples_per_prompt=9", "generator.params.captions.params: template 'concept' has 5 examples"),
    ("generator.params.captions.params.concepts.0.file=missing.txt", "generator.params.captions.params.concepts.0: file: cannot read 'missing.txt'"),
    ("generator.params.captions.params.temperature=-1", "generator.params.captions.params.temperature: must be ≥ 0"),
    ("generator.params.captions.kind=gpt", "generator.params.captions.kind: unknown generator 'gpt'"),
    ("checks.0.params.min_score=-1", "checks.0.params.min_score: must be ≥ 0"),
])
def test_bad_model_recipe_fields_are_named(override, expected):
    with pytest.raises(RecipeError) as caught:
        load_recipe(SYNCLR, overrides=[override])
    assert expected in str(caught.value)


def test_clip_score_needs_a_generator_that_makes_images():
    with pytest.raises(RecipeError, match="checks.0.kind: clip-score scores images, but generator llm-captions makes none"):
        load_recipe(INSTRUCTIONS, overrides=["checks=[{kind: clip-score}]"])


def test_recipe_scheduler_replaces_the_models_own(tiny):
    recipe = load_recipe(SYNCLR, overrides=[
        *synclr_overrides(tiny), "generator.params.scheduler=EulerAncestralDiscreteScheduler"])
    images = plugins_of(recipe).generator
    caption = Sample(slots(recipe, 1)[0], "a red bicycle", {"txt": b"a red bicycle"}, "txt")
    first, second = list(images.draw([caption])), list(images.draw([caption]))
    assert {s.columns["scheduler"] for s in first} == {"EulerAncestralDiscreteScheduler"}
    assert [s.files["png"] for s in first] == [s.files["png"] for s in second]  # ancestral noise is seeded too
    assert len({s.files["png"] for s in first}) == 4


@pytest.mark.slow
def test_a_hub_id_loads_from_the_hf_cache_offline_pinned_to_its_commit(tiny, tmp_path):
    """The path real users take: a hub id already in HF_HUB_CACHE, HF_HUB_OFFLINE=1."""
    import os
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--synthfactory--tiny-llm"
    shutil.copytree(tiny["llm"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    cli = str(Path(sys.executable).with_name("synthfactory"))
    result = subprocess.run(
        [cli, "run", str(INSTRUCTIONS), "--samples", "4", "--no-publish", "--workers", "1",
         "--registry", str(tmp_path / "registry"), "--set", "generator.params.model=synthfactory/tiny-llm",
         "--set", "generator.params.max_new_tokens=8", "--set", "validation.caption_length.min=1",
         "--set", "validation.min_accept_rate=0.25"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = read_manifest(tmp_path / "registry" / "data" / "instructions").to_pylist()
    assert {row["caption_model"] for row in manifest} == {"synthfactory/tiny-llm"}
    assert {row["caption_model_revision"] for row in manifest} == {commit}
