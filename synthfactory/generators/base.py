"""The generator plug-in interface.

A generator turns sample slots (index + per-sample seed) into samples. It is one small
class with one abstract method, `generate`, that takes a batch of slots so model-backed
generators can batch on the accelerator; the procedural one simply loops. A slot the
generator cannot fill becomes a `Rejection` with a reason, never a silent gap.

Output must be a pure function of (params, slot.seed): the same inputs give the same
bytes, which is what makes releases reproducible and shards resumable.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from synthfactory.plugins import Registry


class GeneratorParams(BaseModel):
    """Base of every generator's params model: unknown keys are recipe errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginSpec(BaseModel):
    """A plug-in as a recipe names it: registry name + params (validated by the plug-in)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class SampleSlot:
    """One sample to produce: its global index, WebDataset key and derived seed.

    A generator that makes several outputs per slot (k images per caption) gives each
    its own slot with the same index, a key suffix and a seed derived with `derive_seed`.
    """

    index: int
    key: str
    seed: int


@dataclass
class Sample:
    """A generated sample: the tar members plus the manifest fields it contributes.

    `files` maps a WebDataset extension (``png``, ``json``, ``txt``) to bytes;
    `payload` names the member whose sha256 identifies the sample's content.
    `columns` holds the generator's own manifest columns (declared in `Generator.columns`).
    `group` ties together samples made from one prompt (k images of a caption), so
    contrastive training can draw positives from a group; by default a sample is alone.
    """

    slot: SampleSlot
    caption: str
    files: dict[str, bytes]
    payload: str
    columns: dict[str, Any] = field(default_factory=dict)
    group: str | None = None


@dataclass(frozen=True)
class Rejection:
    """A slot that produced no usable sample, kept with the reason (and the sample itself
    when one was made and a check refused it, so users can inspect what the gate dropped)."""

    slot: SampleSlot
    reason: str
    stage: str = "generate"
    sample: Sample | None = None


def derive_seed(parent: int, child: int) -> int:
    """A 63-bit seed from (parent seed, child index), independent of batching and workers."""
    digest = hashlib.blake2b(b"%d:%d" % (parent, child), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


class TransientGeneratorError(RuntimeError):
    """A failure worth retrying (flaky device, injected fault); the shard is retried."""


class Generator(ABC):
    """Subclass, declare `Params`, `columns` and `version`, implement `generate`, register."""

    Params: ClassVar[type[GeneratorParams]]
    #: the name the generator is registered under (set by `GENERATORS.register`)
    plugin_name: ClassVar[str]
    #: bump when the output for the same params and seed changes
    version: ClassVar[str]
    #: the generator's own manifest columns and their Arrow types (fixed schema = stable bytes)
    columns: ClassVar[dict[str, pa.DataType]] = {}
    #: for a chained generator, the params field holding the upstream generator's spec;
    #: the instance exposes the built upstream generator under the same attribute name
    upstream: ClassVar[str | None] = None

    def __init__(self, params: GeneratorParams) -> None:
        self.params = params

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "Generator":
        """Build from already-resolved params (as stored in a loaded recipe)."""
        return cls(cls.Params.model_validate(params))

    @abstractmethod
    def generate(self, slots: Sequence[SampleSlot]) -> Iterable[Sample | Rejection]:
        """Produce one sample or rejection per slot, in slot order."""

    def chain(self) -> list["Generator"]:
        """This generator and, for a chained one, its upstream generators."""
        if self.upstream is None:
            return [self]
        return [self, *getattr(self, self.upstream).chain()]

    def preflight(self) -> None:
        """Fail fast, before any shard runs, on inputs that cannot work (missing model weights)."""

    def outputs_per_slot(self) -> int:
        """Samples each slot yields when nothing is rejected (k images per caption)."""
        return 1

    def labels(self) -> tuple[str, ...] | None:
        """The label set the validation gate expects, or None for unlabelled data."""
        return None

    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of every image, or None when samples have no image."""
        return None


GENERATORS: Registry[Generator] = Registry("generator", "synthfactory.generators")
