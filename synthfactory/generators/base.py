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
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from synthfactory.plugins import Registry
from synthfactory.samples import Rejection, Sample, SampleSlot


class GeneratorParams(BaseModel):
    """Base of every generator's params model: unknown keys are recipe errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TransientGeneratorError(RuntimeError):
    """A failure worth retrying (flaky device, injected fault); the shard is retried."""


class Generator(ABC):
    """Subclass, declare `Params`, `columns` and `version`, implement `generate`, register."""

    Params: ClassVar[type[GeneratorParams]]
    #: the name the generator is registered under (set by `GENERATORS.register`)
    plugin_name: ClassVar[str]
    #: bump when the output for the same params and seed changes
    version: ClassVar[str]
    #: modules besides the plug-in's own whose code shapes its output; hashed into every
    #: shard's cache key, the release's dvc.yaml deps and its inputs fingerprint
    code: ClassVar[tuple[str, ...]] = ()
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
