"""The video-continuation generator on a tiny random-weight Stable Video Diffusion, over
highway-env rollouts rendered at 64x32: k continuations per clip, grouped under the clip,
byte-identical on rerun, and the pipeline call built from the pipeline's signature."""

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from synthfactory import models, tinymodels
from synthfactory.generators import GENERATORS, Rejection, Sample
from synthfactory.generators import world_model
from synthfactory.samples import slot_for
from synthfactory.video import decode_clip

#: random policy, two clips 6 steps apart: episodes 2 and 3 of seed 3 crash before their
#: second clip, so the upstream rejects one clip of each (checked below, not assumed)
CLIPS = {
    "kind": "gym-rollouts",
    "params": {
        "env_kwargs": {"config": {"screen_width": 64, "screen_height": 32}},
        "clip_frames": 4,
        "clips_per_episode": 2,
        "stride": 6,
    },
}
SLOTS = [slot_for(3, 2), slot_for(3, 3)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's kernels are too small to share: on a busy 2-core machine a second
    intra-op thread makes a continuation up to ten times slower, never faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def svd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodels.write_tiny_stable_video_diffusion(tmp_path_factory.mktemp("tiny-svd"))


@pytest.fixture(scope="module")
def baseline(svd: Path) -> list[Sample | Rejection]:
    """The default continuation's output over SLOTS, made once for the module."""
    return list(continuation(svd).generate(SLOTS))


def continuation(svd: Path, **params: Any) -> Any:
    return GENERATORS.get("video-continuation").from_params(
        {"model": str(svd), "clips": CLIPS, "num_frames": 4, "steps": 2, "continuations": 2,
         "context_frames": 2, "batch_size": 4, **params})


def test_k_continuations_per_clip_grouped_under_the_clip(svd, baseline):
    generator = continuation(svd)
    generator.preflight()
    assert generator.outputs_per_slot() == 4
    upstream = list(GENERATORS.get("gym-rollouts").from_params(CLIPS["params"]).generate(SLOTS))
    clips = [item for item in upstream if isinstance(item, Sample)]
    assert clips and len(clips) < len(upstream), "the setup should give both clips and rejections"

    out = baseline
    rejections = {item.slot.key: item.reason for item in out if isinstance(item, Rejection)}
    assert rejections == {item.slot.key: item.reason for item in upstream if isinstance(item, Rejection)}
    samples = [item for item in out if isinstance(item, Sample)]
    assert [s.slot.key for s in samples] == [f"{c.slot.key}-{j}" for c in clips for j in range(2)]

    for clip in clips:
        pair = [s for s in samples if s.group == clip.slot.key]
        assert [s.slot.key for s in pair] == [f"{clip.slot.key}-0", f"{clip.slot.key}-1"]
        assert pair[0].files["mp4"] != pair[1].files["mp4"]  # own seeds, own noise
        assert pair[0].files["context.mp4"] == pair[1].files["context.mp4"]
        for sample in pair:
            assert sample.payload == "mp4" and sample.slot.index == clip.slot.index
            assert set(sample.files) == {"mp4", "context.mp4", "actions.npy", "txt", "json"}
            assert decode_clip(sample.files["mp4"]).shape == (4, 32, 64, 3)  # clip size, multiple of 8
            context = decode_clip(sample.files["context.mp4"]).astype(int)
            assert context.shape == (2, 32, 64, 3)
            assert np.abs(context - decode_clip(clip.files["mp4"])[:2].astype(int)).mean() < 8  # re-encoded
            actions = np.load(io.BytesIO(sample.files["actions.npy"]))
            np.testing.assert_array_equal(actions, np.load(io.BytesIO(clip.files["actions.npy"]))[:2])
            assert sample.files["txt"].decode() == sample.caption == clip.caption  # SVD takes no prompt
            columns = sample.columns
            assert set(columns) == set(generator.columns)
            for name in ("env", "policy", "episode", "episode_seed", "clip", "actions"):
                assert columns[name] == clip.columns[name]
            assert (columns["frames"], columns["width"], columns["height"]) == (4, 64, 32)
            assert columns["fps"] == clip.columns["fps"]
            assert columns["world_model"] == str(svd)
            assert columns["world_model_revision"].startswith("sha256:")
            assert columns["pipeline"] == "StableVideoDiffusionPipeline"
            assert (columns["steps"], columns["guidance_scale"], columns["context_frames"]) == (2, 3.0, 2)
            assert columns["context_key"] == clip.slot.key and columns["prompt"] == ""
            assert columns["video_seed"] == sample.slot.seed


@pytest.fixture(scope="module")
def lossless(svd: Path) -> list[Sample]:
    """The continuations over SLOTS with lossless frames (clip_format npy), made once."""
    return [s for s in continuation(svd, clip_format="npy").generate(SLOTS) if isinstance(s, Sample)]


def test_same_params_and_slots_give_the_same_bytes(svd, baseline, lossless):
    """Lossless frames, and the MP4s too (the encoder is a pure function of the frames)."""
    def files(samples: Any) -> list[tuple[str, dict[str, bytes]]]:
        return [(s.slot.key, s.files) for s in samples if isinstance(s, Sample)]

    first = files(lossless)
    assert {name for _, f in first for name in f} == {"frames.npy", "context.frames.npy", "actions.npy", "txt", "json"}
    assert files(continuation(svd, clip_format="npy").generate(SLOTS)) == first  # a fresh generator
    other = files(continuation(svd, clip_format="npy").generate([slot_for(4, 2), slot_for(4, 3)]))  # another seed
    assert other and not {f["frames.npy"] for _, f in other} & {f["frames.npy"] for _, f in first}
    assert files(continuation(svd).generate(SLOTS)) == files(baseline)


def test_continuations_do_not_depend_on_the_batch(svd, lossless):
    """Each continuation's generator draws its own noise; lossless frames differ at most
    by one level, from float rounding in batched kernels."""
    alone = [s for s in continuation(svd, batch_size=1, clip_format="npy").generate(SLOTS) if isinstance(s, Sample)]
    assert [s.slot.key for s in alone] == [s.slot.key for s in lossless] and len(alone) == 4
    for a, b in zip(alone, lossless, strict=True):
        difference = decode_clip(a.files["frames.npy"], "npy").astype(int) - decode_clip(b.files["frames.npy"], "npy")
        assert np.abs(difference).max() <= 1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("pipeline", "NotAPipeline", "pipeline 'NotAPipeline' is not a diffusers pipeline class"),
    ("pipeline", "StableDiffusionPipeline", "pipeline 'StableDiffusionPipeline' takes no image or video"),
    ("height", 36, "height (36) must be a multiple of 8"),
    ("prompt", "{caption} on {road}", "prompt may use only {caption}"),
    ("prompt", "{caption", "prompt may use only {caption}, not a lone brace"),
    ("prompt", "{caption:{caption.__class__}}", "prompt may use only {caption}, not {caption.__class__}"),
    ("prompt", "{caption:>500000000}", "prompt may use only {caption}, not {caption:>500000000}"),
    ("num_frames", 512, "batch_size × num_frames × height × width"),
    ("continuations", 17, "continuations"),
])
def test_bad_params_fail_at_validation_naming_the_field(svd, field, value, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        continuation(svd, **{field: value, **({"height": 2048, "width": 2048} if field == "num_frames" else {})})


class _PromptedImageToVideo:
    """Stands in for a prompt-taking image-to-video pipeline (LTX-style call signature)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, image=None, prompt=None, height=None, width=None, num_frames=None, frame_rate=None,
                 num_inference_steps=None, guidance_scale=None, generator=None, output_type=None):
        self.calls.append(dict(image=image, prompt=prompt, height=height, width=width, num_frames=num_frames,
                               frame_rate=frame_rate, guidance_scale=guidance_scale, generator=generator,
                               output_type=output_type))

        class Output:
            frames = np.stack([np.full((num_frames, height, width, 3), g.initial_seed() % 97 / 97, np.float32)
                               for g in generator])
        return Output()


class _VideoToWorld(_PromptedImageToVideo):
    """Stands in for a Cosmos video2world-style pipeline: takes an image or a video."""

    def __call__(self, image=None, video=None, prompt=None, height=None, width=None, num_frames=None, fps=None,
                 num_inference_steps=None, guidance_scale=None, generator=None, output_type=None):
        assert image is None and len(generator) == 1
        self.calls.append(dict(video=video, prompt=prompt, fps=fps))

        class Output:
            frames = [[_pil(height, width)] * num_frames]
        return Output()


def _pil(height: int, width: int) -> Any:
    import PIL.Image

    return PIL.Image.new("RGB", (width, height), (10, 20, 30))


def test_prompt_taking_pipelines_get_prompt_guidance_and_frame_rate(svd, monkeypatch):
    pipe = _PromptedImageToVideo()
    monkeypatch.setattr(world_model, "_load_pipeline", lambda *args: pipe)
    generator = continuation(svd, prompt="dashcam video: {caption}", guidance_scale=5.0, height=32, width=48,
                             batch_size=3, fps=5)
    samples = [s for s in generator.generate(SLOTS) if isinstance(s, Sample)]
    assert [len(call["image"]) for call in pipe.calls] == [3, 1]  # 4 continuations, batches of 3
    call = pipe.calls[0]
    assert call["prompt"][0].startswith("dashcam video: highway-fast-v0 rollout")
    assert (call["guidance_scale"], call["frame_rate"], call["num_frames"], call["height"], call["width"]) == (
        5.0, 5, 4, 32, 48)
    assert call["image"][0].size == (64, 32)  # the last context frame, as the clip has it
    assert call["output_type"] == "np"
    assert samples[0].columns["prompt"] == samples[0].caption == call["prompt"][0]
    assert samples[0].files["txt"].decode() == call["prompt"][0]
    assert samples[0].columns["pipeline"] == "_PromptedImageToVideo"
    assert (samples[0].columns["width"], samples[0].columns["height"], samples[0].columns["fps"]) == (48, 32, 5)
    assert decode_clip(samples[0].files["mp4"]).shape == (4, 32, 48, 3)


def test_video_taking_pipelines_get_the_context_frames_one_continuation_per_call(svd, monkeypatch):
    pipe = _VideoToWorld()
    monkeypatch.setattr(world_model, "_load_pipeline", lambda *args: pipe)
    samples = [s for s in continuation(svd, context_frames=3).generate(SLOTS) if isinstance(s, Sample)]
    assert len(pipe.calls) == len(samples) == 4
    assert len(pipe.calls[0]["video"]) == 3 and pipe.calls[0]["video"][0].size == (64, 32)
    assert pipe.calls[0]["fps"] == samples[0].columns["fps"]
    assert decode_clip(samples[0].files["mp4"]).shape == (4, 32, 64, 3)
    assert decode_clip(samples[0].files["context.mp4"]).shape == (3, 32, 64, 3)


def test_a_model_that_takes_no_frames_fails_naming_it(svd, monkeypatch):
    class TextToImage:
        def __call__(self, prompt=None, generator=None):
            raise AssertionError("not called")

    monkeypatch.setattr(world_model, "_load_pipeline", lambda *args: TextToImage())
    with pytest.raises(world_model.models.ModelError, match="loads as TextToImage, which takes no image or video"):
        list(continuation(svd).generate(SLOTS))


def test_clips_shorter_than_the_context_are_rejected_per_continuation(svd):
    out = list(continuation(svd, context_frames=5).generate(SLOTS[:1]))
    assert all(isinstance(item, Rejection) for item in out)
    assert [item.slot.key for item in out if "context_frames" in item.reason] == ["0000000002-0-0", "0000000002-0-1"]


WORLDMODEL = Path(__file__).resolve().parent.parent / "recipes" / "worldmodel.yaml"


@pytest.mark.slow
def test_worldmodel_recipe_releases_gates_and_publishes(svd, tmp_path, storage_env, prefect):
    """recipes/worldmodel.yaml through the release flow and DVC publish, on the tiny model."""
    import json

    from flows.release import run_release
    from synthfactory.loader import load
    from synthfactory.release.verify import verify_release
    from synthfactory.shards import read_manifest

    overrides = [
        f"generator.params.model={svd}", "generator.params.num_frames=4", "generator.params.steps=2",
        "generator.params.decode_chunk_size=4",
        "generator.params.clips.params.env_kwargs.config={screen_width: 64, screen_height: 32}",
        "generator.params.clips.params.clip_frames=4", "shard_size=3", "validation.min_accept_rate=0.3",
        "checks.0.params.max_flicker=null", "checks.0.params.max_frozen_fraction=1.0",  # random weights: noise
    ]
    registry = tmp_path / "registry"
    summary = run_release(str(WORLDMODEL), str(registry), samples=6, overrides=overrides)
    assert summary.tag == "worldmodel@v1"
    release = registry / "data" / "worldmodel"
    manifest = read_manifest(release).to_pandas()
    assert len(manifest) and (manifest.groupby("group").size() == 2).all()  # k = 2 per clip
    assert {"world_model", "world_model_revision", "video_seed", "context_key", "env", "policy", "motion",
            "frame_hashes"} <= set(manifest.columns)
    assert manifest["world_model_revision"].iloc[0].startswith("sha256:")
    checked, problems = verify_release(release)
    assert problems == [] and checked == len(manifest)
    metrics = json.loads((release / "metrics.json").read_text())
    assert set(metrics["quality"]) == {"clip-dedup", "lineage"}
    assert 'alt="filmstrip"' in (release / "report" / "index.html").read_text()
    clips = list(load("worldmodel", registry=registry, version=1, fields=["mp4", "context.mp4"], shuffle=False,
                      cache_dir=tmp_path / "cache"))
    assert len(clips) == len(manifest)
    assert tuple(clips[0]["mp4"].shape) == (4, 3, 32, 64) and tuple(clips[0]["context.mp4"].shape)[1:] == (3, 32, 64)


def test_upstreams_that_cannot_be_continued_fail_before_any_shard(svd):
    with pytest.raises(models.ModelError, match=r"context_frames \(5\) exceeds the upstream clips' clip_frames \(4\)"):
        continuation(svd, context_frames=5).preflight()
    shapes = {"kind": "procedural-shapes", "params": {}}
    with pytest.raises(models.ModelError, match="clips: procedural-shapes makes images, not clips"):
        continuation(svd, context_frames=1, clips=shapes).preflight()
