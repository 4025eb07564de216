"""The check plug-in interfaces: per sample, and per dataset.

A `SampleCheck` looks at a batch of generated samples and returns one verdict per
sample: the manifest columns it measured (a score) and, when the sample fails, the
reason. Like a datatrove filter step it is one small class with one abstract method.
Sample checks run inside the shard task, right after generation, so a model-backed check
(CLIP) batches on the same device and loads once per worker.

A `DatasetCheck` judges the staged release as a whole (duplicates across shards,
diversity against the previous release, balance): one abstract method returning
metrics, the limits the gate enforces on them, and the samples it refuses. It may also
measure per-sample columns in the shard task (a perceptual hash), where work is parallel.

Refused samples are never silently dropped: they are kept aside with the check's name
and the reason.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from synthfactory.plugins import Plugin, PluginParams, Registry
from synthfactory.samples import Sample
from synthfactory.shards import SHARDS_DIR, read_shard

if TYPE_CHECKING:
    import numpy as np


class CheckParams(PluginParams):
    """Base of every check's params model."""


@dataclass(frozen=True)
class Verdict:
    """A check's finding for one sample: measured columns, and a reason when it fails."""

    columns: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


class Check(Plugin):
    """What every check has besides a plug-in's: per-sample verdicts and column minimums."""

    #: True when the check reads the sample's image (a recipe without images is an error)
    needs_images: ClassVar[bool] = False

    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        """Per-sample verdicts, in the shard task; by default no columns and no refusals."""
        return [Verdict() for _ in samples]

    def column_minimums(self) -> dict[str, float]:
        """Lower bounds the validation gate re-asserts on the released manifest."""
        return {}


class SampleCheck(Check):
    """Subclass, declare `Params`, `columns` and `version`, implement `check`, register."""

    @abstractmethod
    def check(self, samples: Sequence[Sample]) -> list[Verdict]:
        """One verdict per sample, in order."""


@dataclass
class DatasetView:
    """A release's accepted samples as a dataset-level check sees them."""

    manifest: pa.Table
    labels: tuple[str, ...] | None = None  # the label set the generator promises
    root: Path | None = None  # the release directory (shards/), for checks that read payloads

    def payloads(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The payload bytes of `keys`, read from their shards (one pass per shard)."""
        if self.root is None:
            return {}
        wanted = set(keys)
        rows = self.manifest.select(["key", "shard", "payload"]).to_pylist()
        payload_of = {row["key"]: row["payload"] for row in rows if row["key"] in wanted}
        found: dict[str, bytes] = {}
        for shard in sorted({row["shard"] for row in rows if row["key"] in wanted}):
            for key, files in read_shard(self.root / SHARDS_DIR / shard):
                if key in payload_of:
                    found[key] = files[payload_of[key]]
        return found

    @cached_property
    def caption_embeddings(self) -> "np.ndarray":
        """Sentence embeddings of the captions, computed once and shared by every check."""
        from synthfactory.quality.near_duplicates import embed_texts

        return embed_texts(self.manifest.column("caption").to_pylist())

    def without(self, mask: pa.ChunkedArray | pa.Array) -> "DatasetView":
        """The view minus the rows in `mask`, keeping embeddings already computed."""
        import pyarrow.compute as pc

        keep = pc.invert(mask)
        view = DatasetView(self.manifest.filter(keep), self.labels, self.root)
        if "caption_embeddings" in self.__dict__:
            view.caption_embeddings = self.caption_embeddings[keep.to_numpy(zero_copy_only=False)]
        return view


@dataclass
class PreviousRelease:
    """The release this one replaces: its tag and metrics, and its samples (from the
    workspace, or its manifest from the DVC remote) for cross-release checks."""

    tag: str
    metrics: dict[str, Any]
    data: DatasetView | None
    #: made by the same resolved recipe: a reproduction, byte-identical by design
    same_recipe: bool = False


@dataclass
class Findings:
    """What a dataset-level check found."""

    #: figures for metrics.json and the report (`dvc metrics diff` compares them)
    metrics: dict[str, float]
    #: metric -> (min, max) the gate enforces; None leaves a side open
    limits: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    #: sample key -> reason, for samples the check refuses
    rejected: dict[str, str] = field(default_factory=dict)
    #: what the report should say besides the figures (e.g. a comparison that was skipped)
    notes: list[str] = field(default_factory=list)


class DatasetCheck(Check):
    """Subclass, declare `Params` and `version`, implement `evaluate`, register."""

    @abstractmethod
    def evaluate(self, data: DatasetView, previous: PreviousRelease | None) -> Findings:
        """Judge the staged release (and compare it with the previous one, if any)."""


CHECKS: Registry[Check] = Registry("check", "synthfactory.checks")
