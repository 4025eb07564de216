"""What happens next: video continuations of simulator clips from a diffusers video model.

A UniSim-style world-model stage. The clips come from an upstream generator declared in
this one's params (`clips: {kind: gym-rollouts, params: ...}`); for each clip the first
`context_frames` frames are the context, and a frame-conditioned video pipeline (Stable
Video Diffusion by default) draws `continuations` videos from them. Continuation ``j`` of
clip ``<key>`` has key ``<key>-<j>`` and the clip's key as its group, so the k futures of
one context can serve as positives (or as k samples of one predictive distribution).

What a sample holds:

- ``mp4`` (or ``frames.npy`` with ``clip_format: npy``), the payload: the generated frames
  only, exactly as the pipeline returns them, at the generated size (by default the
  clip's, rounded down to a multiple of 8). The context is not prefixed, so the payload
  (its digest, the checks that read it) is only what the model made, and the context
  keeps its own size. For SVD and most image-to-video models the first generated frame
  re-renders the conditioning frame (the last context frame).
- ``context.mp4`` (``context.frames.npy``): the context frames at the clip's own size, so a
  sample is a self-contained (context, continuation) pair.
- ``actions.npy``: the upstream clip's actions over the context span (``actions[t]``
  taken at context frame ``t``), when the upstream has them.
- ``txt``: the prompt the pipeline was given, or the clip's caption for a pipeline that
  takes no prompt (SVD); ``json``: the columns, key and caption.

Columns: the upstream clip's columns, unchanged (they describe the context clip: env,
policy, episode, its actions, return, …), except ``frames``, ``fps``, ``width`` and
``height``, which describe the generated video; plus this stage's own. Upstream
rejections pass through; a clip with fewer than `context_frames` frames is rejected once
per continuation.

Pipelines: the call is built from the pipeline's ``__call__`` signature. The context is
passed as ``image`` (the last context frame, as PIL) or, for a pipeline that takes a
``video`` (Cosmos video2world) and with more than one context frame, as ``video`` (the
context frames); a prompt only to a pipeline that takes one; SVD's min/max guidance and
micro-conditioning (fps, motion bucket, noise augmentation) only to SVD-like pipelines,
``guidance_scale`` to the rest. Image-conditioned calls batch `batch_size` continuations
(across clips); video-conditioned ones run one continuation per call.

Seeds: continuation ``j`` of a clip gets its own CPU `torch.Generator` seeded with
``derive_seed(clip seed mixed with the clip key, j)``. The key is mixed in because
`gym-rollouts` gives every clip of one episode the episode's seed; without it, clip 0
and clip 1 of an episode would start their continuations from the same noise. In a
batched call each continuation's generator draws its own noise, so which continuations
share a call changes a pixel by at most one level, not what is drawn. Like every model-backed
generator, the exact bytes are those of one device, dtype and torch thread count: kernels
sum in a different order on another (`batch_size` is part of the recipe; a CPU worker's
thread count is not).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from synthfactory import models
from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.plugins import PluginSpec
from synthfactory.samples import Rejection, Sample, SampleSlot, derive_seed
from synthfactory.video import CLIP_FORMATS, CLIP_MEMBER, clip_format_of, decode_clip, encode_clip

#: the member its context frames are stored in, per clip format
CONTEXT_MEMBER = {clip_format: f"context.{member}" for clip_format, member in CLIP_MEMBER.items()}


#: the most generated pixels one pipeline call may return (float32 frames on the host)
MAX_CALL_PIXELS = 1 << 30


class VideoContinuationError(models.ModelError):
    """A recipe whose world model or upstream cannot work together: bad input, not transient."""


def _call_parameters(pipeline_class: type) -> set[str]:
    return set(inspect.signature(pipeline_class.__call__).parameters)


def _conditioning(accepted: set[str], context_frames: int) -> Literal["image", "video"] | None:
    """How a pipeline with these call parameters takes the context, or None if it cannot."""
    if "video" in accepted and (context_frames > 1 or "image" not in accepted):
        return "video"
    if "image" in accepted:
        return "image"
    return None


class VideoContinuationParams(GeneratorParams, models.ModelSettings):
    clips: PluginSpec = Field(description="the generator whose clips are continued (usually gym-rollouts)")
    model: str = Field("stabilityai/stable-video-diffusion-img2vid-xt", description="hub id or local dir")
    pipeline: str = Field("auto", description="diffusers pipeline class; auto: the class the model's "
                          "model_index.json declares")
    prompt: str = Field("{caption}", max_length=2000, description="prompt template for pipelines that take one; "
                        "{caption} is the clip's caption")
    context_frames: int = Field(1, ge=1, le=256, description="leading frames of each clip the continuation "
                                "is conditioned on (image pipelines see the last of them)")
    continuations: int = Field(2, ge=1, le=16, description="videos drawn per clip (k)")
    num_frames: int | None = Field(None, ge=1, le=512, description="frames per continuation; default the model's")
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(3.0, ge=0, le=50, description="classifier-free guidance; for SVD the "
                                  "last frame's (max_guidance_scale)")
    min_guidance_scale: float = Field(1.0, ge=0, le=50, description="SVD: the first frame's guidance, "
                                      "ramping linearly to guidance_scale")
    height: int | None = Field(None, ge=8, le=4096, description="generated height; default the clip's, "
                                "rounded down to a multiple of 8")
    width: int | None = Field(None, ge=8, le=4096, description="generated width; default the clip's, "
                               "rounded down to a multiple of 8")
    fps: int | None = Field(None, ge=1, le=240, description="frame rate of the continuation (and the "
                            "pipeline's fps conditioning); default the clip's fps column, else 7")
    motion_bucket_id: int | None = Field(None, ge=0, le=1023, description="SVD: amount of motion; default 127")
    noise_aug_strength: float | None = Field(None, ge=0, le=1, description="SVD: noise added to the "
                                             "conditioning frame; default 0.02")
    decode_chunk_size: int | None = Field(None, ge=1, le=512, description="SVD: frames decoded at once; "
                                          "default all")
    batch_size: int = Field(1, ge=1, le=64, description="continuations per pipeline call (image conditioning)")
    clip_format: Literal[CLIP_FORMATS] = Field("mp4", description="mp4 (H.264, small) or npy (lossless frames)")  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _consistent(self) -> "VideoContinuationParams":
        for name, value in (("height", self.height), ("width", self.width)):
            if value is not None and value % 8:
                raise ValueError(f"{name} ({value}) must be a multiple of 8")
        if self.min_guidance_scale > self.guidance_scale:
            raise ValueError(f"min_guidance_scale ({self.min_guidance_scale}) must not exceed "
                             f"guidance_scale ({self.guidance_scale})")
        others = re.findall(r"\{[^{}]*\}", self.prompt.replace("{caption}", ""))
        if others or "{" in self.prompt.replace("{caption}", ""):  # filled by replace(), never str.format
            raise ValueError(f"prompt may use only {{caption}}, not {', '.join(others) or 'a lone brace'}")
        if self.num_frames and self.height and self.width:
            pixels = self.batch_size * self.num_frames * self.height * self.width
            if pixels > MAX_CALL_PIXELS:
                raise ValueError(f"batch_size × num_frames × height × width = {pixels} pixels per call; "
                                 f"at most {MAX_CALL_PIXELS}")
        if self.pipeline != "auto":
            import diffusers

            if not self.pipeline.endswith("Pipeline") or not hasattr(diffusers, self.pipeline):
                raise ValueError(f"pipeline {self.pipeline!r} is not a diffusers pipeline class")
            if _conditioning(_call_parameters(getattr(diffusers, self.pipeline)), self.context_frames) is None:
                raise ValueError(f"pipeline {self.pipeline!r} takes no image or video to continue from")
        return self


@models.load_once
def _load_pipeline(path: Path, pipeline: str, device: str, dtype: str) -> Any:
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # per-component and per-step bars; ours counts shards
    diffusers.utils.logging.set_verbosity_error()
    torch_dtype = models.torch_dtype(dtype, device)
    cls = diffusers.DiffusionPipeline if pipeline == "auto" else getattr(diffusers, pipeline)
    pipe = cls.from_pretrained(path, dtype=torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class _Clip:
    """An upstream clip sample and its decoded context."""

    sample: Sample
    context: np.ndarray  # context_frames × H × W × 3 uint8
    fps: int
    prompt: str
    seed: int  # the clip's seed, mixed with its key


def _clip_seed(sample: Sample) -> int:
    key = int.from_bytes(hashlib.blake2b(sample.slot.key.encode(), digest_size=7).digest(), "big")
    return derive_seed(sample.slot.seed, key)


def _uint8_video(video: Any) -> np.ndarray:
    """One generated video (T×H×W×3 floats in [0, 1], uint8, a tensor or PIL frames) as uint8."""
    if hasattr(video, "detach"):  # torch
        video = video.detach().float().cpu().numpy()
    if isinstance(video, list | tuple) and video and hasattr(video[0], "convert"):  # PIL frames
        video = np.stack([np.asarray(frame.convert("RGB")) for frame in video])
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise VideoContinuationError(f"the pipeline returned a {video.shape} video, not T×H×W×3 frames")
    return video


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


@GENERATORS.register("video-continuation")
class VideoContinuation(models.UsesModel, Generator):
    """k generated continuations per upstream clip, conditioned on its first frames."""

    Params = VideoContinuationParams
    upstream = "clips"
    model_role = "world"
    version = "1"
    code = ("synthfactory.models", "synthfactory.video")
    params: VideoContinuationParams

    @cached_property
    def clips(self) -> Generator:
        return GENERATORS.get(self.params.clips.kind).from_params(self.params.clips.params)

    @property
    def columns(self) -> dict[str, pa.DataType]:  # type: ignore[override]
        own = {
            "frames": pa.int32(),
            "fps": pa.int32(),
            "width": pa.int32(),
            "height": pa.int32(),
            "world_model": pa.string(),
            "world_model_revision": pa.string(),
            "pipeline": pa.string(),
            "steps": pa.int32(),
            "guidance_scale": pa.float32(),
            "video_seed": pa.int64(),
            "context_key": pa.string(),
            "context_frames": pa.int32(),
            "prompt": pa.string(),
        }
        return {**self.clips.columns, **own}

    def preflight(self) -> None:
        """The upstream makes clips long enough, and the model is there; a pipeline that
        cannot take frames fails when it loads, naming the model."""
        self.clips.preflight()
        clip_frames = getattr(self.clips.params, "clip_frames", None)
        if clip_frames is not None and clip_frames < self.params.context_frames:
            raise VideoContinuationError(f"context_frames ({self.params.context_frames}) exceeds the upstream "
                                         f"clips' clip_frames ({clip_frames}): no clip could be continued")
        if self.clips.image_size() is not None:
            raise VideoContinuationError(f"clips: {self.params.clips.kind} makes images, not clips; "
                                         "use a clip generator such as gym-rollouts")
        super().preflight()

    def outputs_per_slot(self) -> int:
        return self.params.continuations * self.clips.outputs_per_slot()

    def pipeline(self) -> Any:
        p = self.params
        return _load_pipeline(self.model.path, p.pipeline, self.device, p.dtype)

    @cached_property
    def _accepted(self) -> set[str]:
        """The loaded pipeline's call parameters; a pipeline that cannot be conditioned on
        frames (a text-to-image model under pipeline: auto) fails naming the model."""
        with models.explain_model_errors(self.model, self.device, "loading"):
            pipe = self.pipeline()
        accepted = _call_parameters(type(pipe))
        if _conditioning(accepted, self.params.context_frames) is None or "generator" not in accepted:
            raise models.ModelError(
                f"{self.model_role} model {self.model.id!r} loads as {type(pipe).__name__}, which takes no image "
                "or video to continue from; use an image-to-video model (e.g. Stable Video Diffusion)"
            )
        return accepted

    def generate(self, slots: Sequence[SampleSlot]) -> Iterator[Sample | Rejection]:
        p = self.params
        pending: list[_Clip] = []
        for item in self.clips.generate(slots):
            if isinstance(item, Rejection):
                yield item
                continue
            clip = self._context(item)
            if isinstance(clip, str):
                for j in range(p.continuations):
                    yield Rejection(self._slot(item, j), clip)
                continue
            pending.append(clip)
            if len(pending) * p.continuations >= p.batch_size:
                yield from self.draw(pending)
                pending = []
        if pending:
            yield from self.draw(pending)

    def _slot(self, clip: Sample, j: int) -> SampleSlot:
        return SampleSlot(clip.slot.index, f"{clip.slot.key}-{j}", derive_seed(_clip_seed(clip), j))

    def _context(self, sample: Sample) -> _Clip | str:
        """The clip's context frames, or why the clip cannot be continued."""
        clip_format = clip_format_of(sample.payload)
        if clip_format is None:
            raise VideoContinuationError(
                f"clips: {self.params.clips.kind} makes {sample.payload!r} samples, not clips (mp4 or frames.npy)"
            )
        frames = decode_clip(sample.files[sample.payload], clip_format)
        n = self.params.context_frames
        if len(frames) < n:
            return f"clip has {len(frames)} frames, fewer than context_frames ({n})"
        fps = self.params.fps or int(sample.columns.get("fps") or 0) or 7
        return _Clip(sample, frames[:n], fps, self.params.prompt.replace("{caption}", sample.caption), _clip_seed(sample))

    def _size(self, context: np.ndarray) -> tuple[int, int]:
        """(height, width) to generate at."""
        p = self.params
        height, width = context.shape[1:3]
        return p.height or max(8, height // 8 * 8), p.width or max(8, width // 8 * 8)

    def render(self, jobs: Sequence[tuple[_Clip, int]]) -> list[np.ndarray]:
        """One T×H×W×3 uint8 video per (clip, seed) job; the jobs share a generated size."""
        import PIL.Image
        import torch

        p = self.params
        accepted = self._accepted
        height, width = self._size(jobs[0][0].context)
        kwargs: dict[str, Any] = {
            "generator": [torch.Generator("cpu").manual_seed(seed) for _, seed in jobs],
            "output_type": "np",
        }
        kwargs.update({name: value for name, value in (("height", height), ("width", width),
                                                        ("num_inference_steps", p.steps)) if name in accepted})
        if p.num_frames is not None:
            kwargs["num_frames"] = p.num_frames
        if _conditioning(accepted, p.context_frames) == "video":
            (clip, _), = jobs  # one per call: pipelines take one conditioning video
            kwargs["video"] = [PIL.Image.fromarray(frame) for frame in clip.context]
        else:
            kwargs["image"] = [PIL.Image.fromarray(clip.context[-1]) for clip, _ in jobs]
        if "prompt" in accepted:
            kwargs["prompt"] = [clip.prompt for clip, _ in jobs]
        if "max_guidance_scale" in accepted:
            kwargs["max_guidance_scale"] = p.guidance_scale
            kwargs["min_guidance_scale"] = p.min_guidance_scale
        elif "guidance_scale" in accepted:
            kwargs["guidance_scale"] = p.guidance_scale
        optional = {
            "fps": jobs[0][0].fps,
            "frame_rate": jobs[0][0].fps,
            "motion_bucket_id": p.motion_bucket_id,
            "noise_aug_strength": p.noise_aug_strength,
            "decode_chunk_size": p.decode_chunk_size,
        }
        kwargs.update({name: value for name, value in optional.items() if value is not None and name in accepted})
        with models.explain_model_errors(self.model, self.device, "video continuation with"):
            frames = self.pipeline()(**kwargs).frames
        videos = [_uint8_video(video) for video in frames]
        if len(videos) != len(jobs):
            raise VideoContinuationError(f"{type(self.pipeline()).__name__} returned {len(videos)} videos "
                                         f"for {len(jobs)} continuations")
        return videos

    def draw(self, clips: list[_Clip]) -> Iterator[Sample]:
        """`continuations` samples per clip, grouped under the clip's key."""
        p = self.params
        jobs = [(clip, derive_seed(clip.seed, j)) for clip in clips for j in range(p.continuations)]
        per_call = p.batch_size if _conditioning(self._accepted, p.context_frames) == "image" else 1
        videos: list[np.ndarray] = []
        start = 0
        while start < len(jobs):  # a call's jobs share fps and size: split where they change
            chunk = [jobs[start]]
            while (len(chunk) < per_call and start + len(chunk) < len(jobs)
                   and self._same_call(jobs[start][0], jobs[start + len(chunk)][0])):
                chunk.append(jobs[start + len(chunk)])
            videos += self.render(chunk)
            start += len(chunk)
        pipeline = type(self.pipeline()).__name__
        takes_prompt = "prompt" in self._accepted
        shared = {id(clip): self._context_files(clip) for clip in clips}
        for n, ((clip, seed), video) in enumerate(zip(jobs, videos, strict=True)):
            yield self._sample(clip, n % p.continuations, seed, video, pipeline, takes_prompt, shared[id(clip)])

    def _same_call(self, a: _Clip, b: _Clip) -> bool:
        return a.fps == b.fps and self._size(a.context) == self._size(b.context)

    def _sample(self, clip: _Clip, j: int, seed: int, video: np.ndarray, pipeline: str, takes_prompt: bool,
                context_files: dict[str, bytes]) -> Sample:
        p = self.params
        source = clip.sample
        slot = SampleSlot(source.slot.index, f"{source.slot.key}-{j}", seed)
        caption = clip.prompt if takes_prompt else source.caption
        columns = {
            **source.columns,
            "frames": len(video),
            "fps": clip.fps,
            "width": video.shape[2],
            "height": video.shape[1],
            "world_model": self.model.id,
            "world_model_revision": self.model.revision,
            "pipeline": pipeline,
            "steps": p.steps,
            "guidance_scale": p.guidance_scale,
            "video_seed": seed,
            "context_key": source.slot.key,
            "context_frames": len(clip.context),
            "prompt": clip.prompt if takes_prompt else "",
        }
        files = {
            CLIP_MEMBER[p.clip_format]: encode_clip(video, clip.fps, p.clip_format),
            **context_files,
            "txt": caption.encode(),
            "json": json.dumps({**columns, "key": slot.key, "caption": caption}, sort_keys=True).encode(),
        }
        return Sample(slot, caption, files, payload=CLIP_MEMBER[p.clip_format], columns=columns,
                      group=source.slot.key)

    def _context_files(self, clip: _Clip) -> dict[str, bytes]:
        """The members every continuation of a clip shares: its context frames and their actions."""
        clip_format = self.params.clip_format
        context = clip.context
        if clip_format == "mp4" and (context.shape[1] % 2 or context.shape[2] % 2):
            context = context[:, : context.shape[1] // 2 * 2, : context.shape[2] // 2 * 2]  # H.264: even sizes
        files = {CONTEXT_MEMBER[clip_format]: encode_clip(context, clip.fps, clip_format)}
        if "actions.npy" in clip.sample.files:
            actions = np.load(io.BytesIO(clip.sample.files["actions.npy"]), allow_pickle=False)
            files["actions.npy"] = _npy(actions[: len(clip.context)])
        return files
