"""Images from captions with a diffusers text-to-image pipeline (SynCLR's second stage).

The captions come from an upstream generator declared inside this one's params
(`captions: {kind: llm-captions, params: ...}`), so one recipe chains the two stages and
one shard task runs both on the same worker. Each caption gets `images_per_caption`
images; they share the caption's key as their group and have keys ``<caption key>-<j>``.

Every image has its own CPU `torch.Generator` seeded from (caption seed, j): the initial
latents, and so the image, do not depend on the batch or the device's RNG. Batches span
captions; on a GPU the pipeline runs in half precision with PyTorch's fused attention
(the diffusers default), a channels-last UNet (`channels_last`, on by default) and, if
asked, a compiled UNet (`compile`). A batch's images are PNG/JPEG-encoded on a background
thread while the next batch denoises (`overlap_encoding`; PIL's encoders release the
GIL): the bytes and their order are the same as encoding each batch in turn, and at most
one batch waits to be encoded.
"""

from __future__ import annotations

import io
import json
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from synthfactory import models
from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.plugins import PluginSpec
from synthfactory.samples import Rejection, Sample, SampleSlot, derive_seed


class TextToImageParams(GeneratorParams, models.ModelSettings):
    captions: PluginSpec = Field(description="the generator whose captions are drawn")
    model: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description="hub id or local dir")
    pipeline: str = Field("auto", description="diffusers pipeline class; auto: AutoPipelineForText2Image, "
                          "else the class the model's model_index.json declares")
    scheduler: str | None = Field(None, description="diffusers scheduler class; default: the model's own")
    compile: bool = Field(False, description="torch.compile the UNet (GPU; pays off on long runs)")
    channels_last: bool = Field(True, description="UNet in channels-last memory format on CUDA (usually faster "
                                "convolutions in half precision); ignored off CUDA")
    overlap_encoding: bool = Field(True, description="encode a batch's images on a background thread while the "
                                   "next batch denoises; the same bytes either way")
    images_per_caption: int = Field(4, ge=1, le=64)
    guidance_scale: float = Field(7.5, ge=0, le=50)
    steps: int = Field(50, ge=1, le=1000)
    height: int = Field(512, ge=8, le=4096)
    width: int = Field(512, ge=8, le=4096)
    batch_size: int = Field(16, ge=1, le=1024, description="images per pipeline call; whole captions only")
    image_format: Literal["png", "jpg"] = "png"

    @model_validator(mode="after")
    def _consistent(self) -> "TextToImageParams":
        if self.batch_size % self.images_per_caption:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of images_per_caption ({self.images_per_caption})"
            )
        for field, value, suffix in (("scheduler", self.scheduler, "Scheduler"), ("pipeline", self.pipeline, "Pipeline")):
            if value in (None, "auto"):
                continue
            import diffusers

            if not value.endswith(suffix) or not hasattr(diffusers, value):
                raise ValueError(f"{field} {value!r} is not a diffusers {suffix.lower()} class")
        return self


@models.load_once
def _load_pipeline(path: Path, pipeline: str, scheduler: str | None, device: str, dtype: str, compile: bool,
                   channels_last: bool = True) -> Any:
    import diffusers
    import torch

    diffusers.utils.logging.disable_progress_bar()  # per-component and per-step bars; ours counts shards
    diffusers.utils.logging.set_verbosity_error()  # e.g. "truncated to 77 tokens" on every long caption
    torch_dtype = models.torch_dtype(dtype, device)
    if pipeline != "auto":
        pipe = getattr(diffusers, pipeline).from_pretrained(path, dtype=torch_dtype)
    else:
        try:
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(path, dtype=torch_dtype)
        except ValueError:  # a pipeline the auto class does not map: load the class the model declares
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, dtype=torch_dtype)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if device.startswith("cuda"):
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if compile:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
    return pipe


def encode_image(image: Any, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@GENERATORS.register("text-to-image")
class TextToImage(models.UsesModel, Generator):
    Params = TextToImageParams
    upstream = "captions"
    model_role = "image"
    version = "1"
    code = ("synthfactory.models",)
    params: TextToImageParams

    @cached_property
    def captions(self) -> Generator:
        return GENERATORS.get(self.params.captions.kind).from_params(self.params.captions.params)

    @property
    def columns(self) -> dict[str, pa.DataType]:  # type: ignore[override]
        own = {
            "image_model": pa.string(),
            "image_model_revision": pa.string(),
            "scheduler": pa.string(),
            "steps": pa.int32(),
            "guidance_scale": pa.float32(),
            "image_seed": pa.int64(),
            "caption_key": pa.string(),
            "width": pa.int32(),
            "height": pa.int32(),
        }
        return {**self.captions.columns, **own}

    def preflight(self) -> None:
        self.captions.preflight()
        super().preflight()

    def outputs_per_slot(self) -> int:
        return self.params.images_per_caption * self.captions.outputs_per_slot()

    def image_size(self) -> tuple[int, int]:
        return self.params.width, self.params.height

    def pipeline(self) -> Any:
        p = self.params
        return _load_pipeline(self.model.path, p.pipeline, p.scheduler, self.device, p.dtype, p.compile,
                              p.channels_last)

    def render(self, captions: Sequence[str], seeds: Sequence[int]) -> list[Any]:
        """One PIL image per seed; seeds are grouped by caption, images_per_caption each."""
        import torch

        p = self.params
        with models.explain_model_errors(self.model, self.device, "image generation with"):
            return self.pipeline()(
                prompt=list(captions),
                num_images_per_prompt=p.images_per_caption,
                num_inference_steps=p.steps,
                guidance_scale=p.guidance_scale,
                height=p.height,
                width=p.width,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                output_type="pil",
            ).images

    def generate(self, slots: Sequence[SampleSlot]) -> Iterator[Sample | Rejection]:
        """Samples and rejections in the order a batch-by-batch loop yields them: a caption's
        rejection as soon as it is seen, a batch's images once they are drawn and encoded.

        With `overlap_encoding`, batch n's images are encoded on one background thread
        while batch n+1 denoises; its samples, and the rejections seen after its last
        caption, are yielded once batch n+1 is drawn (or at the end). At most one batch's
        encoding is pending."""
        per_batch = self.params.batch_size // self.params.images_per_caption
        if not self.params.overlap_encoding:
            yield from self._serial(slots, per_batch)
            return
        # what is drawn but not yet yielded: one batch's encoding, then rejections seen after it
        waiting: deque[Future[list[Sample]] | Rejection] = deque()

        def drain() -> Iterator[Sample | Rejection]:
            while waiting:
                head = waiting.popleft()
                if isinstance(head, Future):
                    yield from head.result()
                else:
                    yield head

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-encode") as encoder:
            try:
                pending: list[Sample] = []
                for item in self.captions.generate(slots):
                    if isinstance(item, Rejection):
                        if waiting:
                            waiting.append(item)  # after the batch still being encoded
                        else:
                            yield item
                        continue
                    pending.append(item)
                    if len(pending) == per_batch:
                        drawn = self._render_batch(pending)  # the device works while the encoder does
                        yield from drain()
                        waiting.append(encoder.submit(self._package, *drawn))
                        pending = []
                if pending:
                    drawn = self._render_batch(pending)
                    yield from drain()
                    waiting.append(encoder.submit(self._package, *drawn))
                yield from drain()
            finally:
                for item in waiting:  # stopped early or failed: do not encode what nobody will read
                    if isinstance(item, Future):
                        item.cancel()

    def _serial(self, slots: Sequence[SampleSlot], per_batch: int) -> Iterator[Sample | Rejection]:
        pending: list[Sample] = []
        for item in self.captions.generate(slots):
            if isinstance(item, Rejection):
                yield item
                continue
            pending.append(item)
            if len(pending) == per_batch:
                yield from self.draw(pending)
                pending = []
        if pending:
            yield from self.draw(pending)

    def draw(self, captions: list[Sample]) -> Iterator[Sample]:
        """images_per_caption image samples per caption sample, grouped under the caption key."""
        yield from self._package(*self._render_batch(captions))

    def _render_batch(self, captions: list[Sample]) -> tuple[list[Sample], list[int], list[Any], str]:
        """The device's part of a batch: its captions, image seeds, PIL images and scheduler name."""
        k = self.params.images_per_caption
        seeds = [derive_seed(c.slot.seed, j) for c in captions for j in range(k)]
        images = self.render([c.caption for c in captions], seeds)
        return captions, seeds, images, type(self.pipeline().scheduler).__name__

    def _package(self, captions: list[Sample], seeds: list[int], images: list[Any], scheduler: str) -> list[Sample]:
        """The CPU's part: encode each image and build its sample (thread-safe: touches no model)."""
        p = self.params
        k = p.images_per_caption
        samples = []
        for n, (image, seed) in enumerate(zip(images, seeds, strict=True)):
            caption = captions[n // k]
            slot = SampleSlot(caption.slot.index, f"{caption.slot.key}-{n % k}", seed)
            columns = {
                **caption.columns,
                "image_model": self.model.id,
                "image_model_revision": self.model.revision,
                "scheduler": scheduler,
                "steps": p.steps,
                "guidance_scale": p.guidance_scale,
                "image_seed": seed,
                "caption_key": caption.slot.key,
                "width": image.width,
                "height": image.height,
            }
            files = {
                p.image_format: encode_image(image, p.image_format),
                "txt": caption.caption.encode(),
                "json": json.dumps(columns, sort_keys=True).encode(),
            }
            samples.append(
                Sample(slot, caption.caption, files, payload=p.image_format, columns=columns, group=caption.slot.key)
            )
        return samples
