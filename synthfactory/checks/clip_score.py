"""CLIP score: how well an image matches its caption (Hessel et al. 2021, as torchmetrics
computes it: 100 × cosine of the CLIP embeddings, floored at 0).

Scores are computed in batches with transformers' `CLIPModel`, stored per sample in the
manifest (`clip_score`), and samples below `min_score` are refused with the score in the
reason and kept aside in rejected/.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pydantic import Field

from synthfactory import models
from synthfactory.checks.base import CHECKS, CheckParams, SampleCheck, Verdict
from synthfactory.samples import Sample

if TYPE_CHECKING:
    import numpy as np


class ClipScoreParams(CheckParams, models.ModelSettings):
    model: str = Field("openai/clip-vit-base-patch32", description="hub id or local dir of a CLIPModel")
    min_score: float = Field(0.0, ge=0, le=100, description="samples scoring below are refused")
    batch_size: int = Field(64, ge=1, le=4096)


@models.load_once
def _load_clip(path: Path, device: str, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(path, dtype=models.torch_dtype(dtype, device)).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


def image_embeddings(model: models.ResolvedModel, device: str, dtype: str, images: Sequence[bytes],
                     batch_size: int = 64) -> "np.ndarray":
    """L2-normalised CLIP image embeddings (float32), batched."""
    import numpy as np
    import torch
    from PIL import Image

    rows = []
    with models.explain_model_errors(model, device, "CLIP image embedding with"):
        clip, processor = _load_clip(model.path, device, dtype)
        for start in range(0, len(images), batch_size):
            batch = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start : start + batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device, clip.dtype)
            with torch.inference_mode():
                features = clip.get_image_features(pixel_values=pixels).pooler_output
            rows.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


@CHECKS.register("clip-score")
class ClipScore(models.UsesModel, SampleCheck):
    Params = ClipScoreParams
    version = "1"
    code = ("synthfactory.models",)
    columns = {"clip_score": pa.float32(), "clip_model": pa.string(), "clip_model_revision": pa.string()}
    needs_images = True
    model_role = "clip-score"
    params: ClipScoreParams

    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        scores: list[float] = []
        for start in range(0, len(samples), self.params.batch_size):
            scores += self._scores(samples[start : start + self.params.batch_size])
        provenance = {"clip_model": self.model.id, "clip_model_revision": self.model.revision}
        return [
            Verdict(
                {"clip_score": score, **provenance},
                None if score >= self.params.min_score else f"clip_score {score:.2f} < min_score {self.params.min_score}",
            )
            for score in scores
        ]

    def _scores(self, batch: Sequence[Sample]) -> list[float]:
        import torch

        images = image_embeddings(self.model, self.device, self.params.dtype, [s.files[s.payload] for s in batch], len(batch))
        with models.explain_model_errors(self.model, self.device, "CLIP scoring with"):
            model, processor = _load_clip(self.model.path, self.device, self.params.dtype)
            inputs = processor(
                text=[s.caption for s in batch], return_tensors="pt", padding=True, truncation=True,
                max_length=model.config.text_config.max_position_embeddings,
            ).to(self.device)
            with torch.inference_mode():
                text = model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).pooler_output
            text = torch.nn.functional.normalize(text.float(), dim=-1).cpu()
        scores = (100 * (torch.from_numpy(images) * text).sum(-1)).clamp(min=0)
        return [round(float(s), 4) for s in scores]

    def column_minimums(self) -> dict[str, float]:
        return {"clip_score": self.params.min_score}
