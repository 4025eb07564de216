"""The generator plug-in interface.

A generator turns sample slots (index + per-sample seed) into samples. It is one small
class with one abstract method, `generate`, that takes a batch of slots so model-backed
generators can batch on the accelerator; the procedural one simply loops. A slot the
generator cannot fill becomes a `Rejection` with a reason, never a silent gap.

Output must be a pure function of (params, slot.seed): the same inputs give the same
bytes, which is what makes releases reproducible and shards resumable.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from synthfactory.models import UsesModel
from synthfactory.plugins import Plugin, PluginParams, Registry
from synthfactory.samples import Rejection, Sample, SampleSlot


class GeneratorParams(PluginParams):
    """Base of every generator's params model."""


class TransientGeneratorError(RuntimeError):
    """A failure worth retrying (flaky device, injected fault); the shard is retried."""


class Generator(Plugin):
    """Subclass, declare `Params`, `columns` and `version`, implement `generate`, register."""

    #: for a chained generator, the params field holding the upstream generator's spec;
    #: the instance exposes the built upstream generator under the same attribute name
    upstream: ClassVar[str | None] = None
    #: where a generator that pays per request keeps the answers it got, so a rerun pays
    #: nothing twice (set by the shard builder, beside the shard cache)
    response_cache: Path | None = None

    @abstractmethod
    def generate(self, slots: Sequence[SampleSlot]) -> Iterable[Sample | Rejection]:
        """Produce one sample or rejection per slot, in slot order."""

    def chain(self) -> list["Generator"]:
        """This generator and, for a chained one, its upstream generators."""
        if self.upstream is None:
            return [self]
        return [self, *getattr(self, self.upstream).chain()]

    def take_usage(self) -> dict[str, float]:
        """What generating used since the last call (requests, tokens, retries, cache hits),
        for the shard's record and the release's cost; nothing for a generator that calls
        no model."""
        return {}

    def makers(self) -> list[str]:
        """What makes the rows (generator kinds, then model ids), for the release's lineage."""
        names = []
        for link in self.chain():
            names.append(link.plugin_name)
            if isinstance(link, UsesModel):
                names.append(link.model.id)
        return names

    def parent_releases(self) -> list[str]:
        """Tags of the releases whose samples this one reuses (a mix's release components)."""
        return []

    def outputs_per_slot(self) -> int:
        """Samples each slot yields when nothing is rejected (k images per caption)."""
        return 1

    def labels(self) -> tuple[str, ...] | None:
        """The label set the validation gate expects, or None for unlabelled data."""
        return None

    def target_shares(self) -> dict[str, dict[str, float]]:
        """Column -> value -> the share of rows the generator aims for, which the gate
        tests the release against: by default each label equally often."""
        labels = self.labels()
        return {"label": dict.fromkeys(labels, 1 / len(labels))} if labels else {}

    def plan_problems(self, samples: int) -> list[str]:
        """What makes `samples` slots impossible to fill as declared (a mix asking a source
        for more records than it holds), one line each naming the field; checked at load."""
        return []

    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of every image, or None when samples have no image."""
        return None


GENERATORS: Registry[Generator] = Registry("generator", "synthfactory.generators")
