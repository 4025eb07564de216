"""The generator plug-in interface.

A generator turns sample slots (index + per-sample seed) into samples. It is one small
class with one abstract method, `generate`, that takes a batch of slots so model-backed
generators can batch on the accelerator; the procedural one simply loops. A slot the
generator cannot fill becomes a `Rejection` with a reason, never a silent gap.

Output must be a pure function of (params, slot.seed): the same inputs give the same
bytes, which is what makes releases reproducible and shards resumable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from synthfactory.plugins import Registry


class GeneratorParams(BaseModel):
    """Base of every generator's params model: unknown keys are recipe errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class SampleSlot:
    """One sample to produce: its global index, WebDataset key and derived seed."""

    index: int
    key: str
    seed: int


@dataclass
class Sample:
    """A generated sample: the tar members plus the manifest fields it contributes.

    `files` maps a WebDataset extension (``png``, ``json``, ``txt``) to bytes;
    `payload` names the member whose sha256 identifies the sample's content.
    `columns` holds the generator's own manifest columns (declared in `Generator.columns`).
    """

    slot: SampleSlot
    caption: str
    files: dict[str, bytes]
    payload: str
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """A slot that produced no usable sample, kept with the reason."""

    slot: SampleSlot
    reason: str
    stage: str = "generate"


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

    def __init__(self, params: GeneratorParams) -> None:
        self.params = params

    @abstractmethod
    def generate(self, slots: Sequence[SampleSlot]) -> Iterable[Sample | Rejection]:
        """Produce one sample or rejection per slot, in slot order."""

    def labels(self) -> tuple[str, ...] | None:
        """The label set the validation gate expects, or None for unlabelled data."""
        return None

    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of every image, or None when samples have no image."""
        return None


GENERATORS: Registry[Generator] = Registry("generator", "synthfactory.generators")
