"""Diversity and the collapse guard.

Generators trained or prompted on their own output lose diversity release by release
(model collapse). This check measures caption distinct-1/2/3, self-similarity and the
Vendi score of caption embeddings, and label / concept coverage and entropy; each is
compared with the previous release, and a drop beyond `max_drop` (or a rise, for
self-similarity) fails the gate. Absolute floors can be set for a first release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from synthfactory import models
from synthfactory.checks.balance import counts
from synthfactory.checks.base import CHECKS, CheckParams, DatasetCheck, DatasetView, Findings, PreviousRelease
from synthfactory.checks.dedup import IMAGE_PAYLOADS
from synthfactory.quality import diversity as dv

if TYPE_CHECKING:
    import numpy as np

#: metrics where lower means more collapsed (the rest: higher means more collapsed)
HIGHER_IS_DIVERSE = ("distinct_1", "distinct_2", "distinct_3", "vendi", "vendi_images", "label_entropy",
                     "label_coverage", "concept_entropy", "concepts")


class DiversityParams(CheckParams):
    max_drop: float = Field(0.1, ge=0, le=1, description="largest relative fall vs the previous release")
    embeddings: bool = Field(True, description="Vendi score and self-similarity on caption embeddings (MiniLM)")
    sample: int = Field(
        2000, ge=10, le=1_000_000,
        description="captions measured (a seeded sample): distinct-n depends on how many texts it sees, "
        "so a fixed sample keeps releases of different sizes comparable; embeddings cost CPU",
    )
    floors: dict[str, float] = Field(default_factory=dict, description="absolute minimums, e.g. {distinct_2: 0.2}")
    image_model: str | None = Field(None, description="a CLIP model (hub id or dir): Vendi score of image embeddings")
    image_sample: int = Field(500, ge=2, le=100_000, description="images embedded for the image Vendi score")
    device: str = "auto"


@CHECKS.register("diversity")
class Diversity(DatasetCheck):
    Params = DiversityParams
    version = "1"
    code = (
        "synthfactory.models",
        "synthfactory.checks.balance",
        "synthfactory.checks.dedup",
        "synthfactory.checks.clip_score",
        "synthfactory.quality.diversity",
        "synthfactory.quality.near_duplicates",
    )
    params: DiversityParams

    def evaluate(self, data: DatasetView, previous: PreviousRelease | None) -> Findings:
        captions = data.manifest.column("caption")
        chosen = self._sample(len(captions))
        # only the sampled captions become Python strings (not a million of them)
        sampled = captions.to_pylist() if chosen is None else captions.take(chosen).to_pylist()
        metrics: dict[str, float] = {f"distinct_{n}": round(dv.distinct_n(sampled, n), 4) for n in (1, 2, 3)}
        if self.params.embeddings and len(captions) > 1:
            embeddings = self._embeddings(data, sampled, chosen)
            metrics["vendi"] = round(dv.vendi_score(embeddings), 3)
            metrics["self_similarity"] = round(dv.self_similarity(embeddings, len(embeddings)), 4)
        notes = []
        if self.params.image_model is not None:
            embeddings = self._image_embeddings(data)
            if len(embeddings) > 1:
                metrics["vendi_images"] = round(dv.vendi_score(embeddings), 3)
            else:
                notes.append("image Vendi score skipped: fewer than 2 images")
        columns = data.manifest.column_names
        if "label" in columns and data.manifest.num_rows:
            labels = counts(data.manifest.column("label"), keep_null=True)
            metrics["label_entropy"] = round(dv.label_entropy(labels, data.labels), 4)
            metrics["label_coverage"] = round(dv.coverage(labels, data.labels or sorted(labels)), 4)
        if "concept" in columns:
            concepts = counts(data.manifest.column("concept"), keep_null=True)
            metrics["concept_entropy"] = round(dv.label_entropy(concepts), 4)
            metrics["concepts"] = len(concepts)
        limits = {name: (floor, None) for name, floor in self.params.floors.items()}
        before = _previous_figures(previous, self.plugin_name)
        for name, value in metrics.items():
            if name not in before or name in self.params.floors:
                continue
            if name in HIGHER_IS_DIVERSE:
                limits[name] = (round(before[name] * (1 - self.params.max_drop), 4), None)
            else:
                limits[name] = (None, round(before[name] * (1 + self.params.max_drop), 4))
        if previous is not None and not before:
            notes.append(f"{previous.tag} has no diversity figures; nothing to compare with")
        return Findings(metrics=metrics, limits=limits, notes=notes)

    def preflight(self) -> None:
        if self.params.image_model is not None:
            models.resolve_model(self.params.image_model, role="diversity image")
            models.select_device(self.params.device)

    def _image_embeddings(self, data: DatasetView) -> "np.ndarray":
        """CLIP embeddings of a seeded sample of the release's images."""
        import numpy as np

        from synthfactory.checks.clip_score import image_embeddings

        keys = [key for key, payload in zip(data.manifest.column("key").to_pylist(),
                                            data.manifest.column("payload").to_pylist()) if payload in IMAGE_PAYLOADS]
        if len(keys) > self.params.image_sample:
            chosen = np.sort(np.random.default_rng(0).choice(len(keys), self.params.image_sample, replace=False))
            keys = [keys[i] for i in chosen]
        payloads = data.payloads(keys)
        model = models.resolve_model(self.params.image_model, role="diversity image")  # type: ignore[arg-type]
        device = models.select_device(self.params.device)
        return image_embeddings(model, device, "auto", [payloads[k] for k in keys if k in payloads])

    def _sample(self, n: int) -> "np.ndarray | None":
        import numpy as np

        if n <= self.params.sample:
            return None
        return np.sort(np.random.default_rng(0).choice(n, self.params.sample, replace=False))

    @staticmethod
    def _embeddings(data: DatasetView, sampled: list[str], chosen: "np.ndarray | None") -> "np.ndarray":
        """Vendi and self-similarity are dataset statistics: a sample estimates them, and
        embedding every caption on a CPU would cost more than generating them."""
        from synthfactory.quality.near_duplicates import embed_texts

        if "caption_embeddings" in vars(data):  # another check already embedded every caption
            return data.caption_embeddings if chosen is None else data.caption_embeddings[chosen]
        return embed_texts(sampled)


def _previous_figures(previous: PreviousRelease | None, check: str) -> dict[str, Any]:
    if previous is None:
        return {}
    return previous.metrics.get("quality", {}).get(check, {})
