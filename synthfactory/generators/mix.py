"""Mix: a release built from real sources, earlier releases and generators at set ratios.

Phi-4, Gemma and Llama train on blends of synthetic and real data; this generator makes
such a blend a release like any other (sharded, checked, gated, versioned). Each
component is a real-data `source`, a `release` of this registry (`digits@v1`, read at its
tag through DVC), or a `generator` run now, with a `weight` (share of the rows) or a
`count` (rows per `sum(counts)` slots).

Which component fills a slot is deterministic by the mix `seed` and independent of
sharding: slots are dealt in blocks whose composition is the exact apportionment of the
weights, shuffled per block, so every full block holds the ratio exactly and a partial
last block holds it up to chance (the gate tests the achieved shares). Records of a
source are drawn without replacement in a seeded order, so a real record appears at
most once; a mix that asks a source for more records than it holds is a recipe error.

Every sample carries `origin` (real / synthetic), `source` (the component's name),
`source_revision` (the data's content hash or git revision), `source_key` (the record's
id there) and `source_license` (a source's licence), in the manifest and its JSON member. A record without a caption
(an image folder without sidecar texts) gets its label, else the component's name.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, ValidationInfo, field_validator, model_validator

from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.plugins import RECIPE_DIR, PluginParams, PluginSpec
from synthfactory.samples import Rejection, Sample, SampleSlot, derive_seed
from synthfactory.sources.base import Source, build_source, registry_root, resolve_source_spec
from synthfactory.tags import ReleaseTag

#: slots per block when components have weights: the ratio is exact per 1,000 slots
WEIGHT_BLOCK = 1000
IMAGE_MEMBERS = ("png", "jpg", "webp")
ORIGINS = ("real", "synthetic")


class MixComponent(PluginParams):
    """One part of a mix: exactly one of `source`, `release`, `generator`; a weight or a count."""

    release: str | None = Field(None, description="a release of this registry, e.g. digits@v1 (read at its tag)")
    source: dict[str, Any] | None = Field(None, description="a real-data source: {kind, params}")
    generator: dict[str, Any] | None = Field(None, description="a generator run now: {kind, params}")
    weight: float | None = Field(None, gt=0, description="share of the rows (weights are normalised)")
    count: int | None = Field(None, ge=1, description="rows per block of sum(counts) slots")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}$", description="the `source` column value")
    origin: Literal["real", "synthetic"] | None = Field(None, description="default: source -> real, else synthetic")

    @model_validator(mode="before")
    @classmethod
    def _release_as_source(cls, data: Any, info: ValidationInfo) -> Any:
        """`release: digits@v1` reads the release's shards at its tag through DVC, from the
        registry that holds the recipe."""
        if not isinstance(data, dict) or not data.get("release"):
            return data
        if not _loading(info):
            return data  # built from resolved params: the release was expanded when the recipe loaded
        tag = ReleaseTag.parse(str(data["release"]))
        if tag is None:
            raise ValueError(f"release: {data['release']!r} is not a release tag like digits@v1")
        base = Path(info.context[RECIPE_DIR]).resolve()
        spec = {"kind": "dvc", "params": {
            "repo": os.path.relpath(registry_root(base), base), "path": f"data/{tag.dataset}/shards", "rev": str(tag),
            "format": "webdataset", "license": f"see the {tag} dataset card",
        }}
        expanded = resolve_source_spec("release", spec, info)
        # a saved recipe read back holds the expansion; anything else beside `release` is a second source
        if data.get("generator") is not None or data.get("source") not in (None, expanded):
            raise ValueError("give exactly one of source, release, generator")
        return {**data, "source": expanded, "name": data.get("name") or str(tag), "origin": data.get("origin") or "synthetic"}

    @field_validator("source")
    @classmethod
    def _source(cls, value: Any, info: ValidationInfo) -> Any:
        """At recipe load every source is validated, confined and pinned afresh (a given
        revision is checked, never trusted); built from resolved params, it is taken as is."""
        if value is None or not _loading(info) or info.data.get("release"):
            return value  # (a release's expansion was validated just before)
        return resolve_source_spec("source", value, info)

    @field_validator("generator")
    @classmethod
    def _generator(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind == "mix":
            raise ValueError("generator: a mix cannot hold a mix; list its components here instead")
        try:
            params = GENERATORS.get(kind).Params.model_validate(value.get("params") or {}, context=info.context)
        except KeyError as exc:
            raise ValueError(f"generator.kind: {exc}") from None
        return {"kind": kind, "params": params.model_dump(mode="json")}

    @model_validator(mode="after")
    def _one_of_each(self) -> "MixComponent":
        given = [field for field in ("source", "generator") if getattr(self, field) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of source, release, generator")
        if (self.weight is None) == (self.count is None):
            raise ValueError("give exactly one of weight, count")
        return self

    @property
    def label(self) -> str:
        spec = self.source or self.generator or {}
        return self.name or spec["kind"]


class MixParams(GeneratorParams):
    components: tuple[MixComponent, ...] = Field(min_length=1, max_length=64)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="which slots each component fills, and which records")
    image_size: int | None = Field(None, ge=8, le=4096, description="resize every image to this square size; default: keep")

    @model_validator(mode="after")
    def _consistent(self) -> "MixParams":
        names = [component.label for component in self.components]
        if len(set(names)) != len(names):
            raise ValueError(f"components: names must differ, got {names}; set `name` on each")
        if len({component.count is None for component in self.components}) > 1:
            raise ValueError("components: give every component a weight, or every component a count")
        return self


@GENERATORS.register("mix")
class Mix(Generator):
    Params = MixParams
    version = "1"
    code = ("synthfactory.sources.base", "synthfactory.tags")
    columns = {
        "label": pa.string(),
        "origin": pa.string(),
        "source": pa.string(),
        "source_revision": pa.string(),
        "source_key": pa.string(),
        "source_license": pa.string(),
        "width": pa.int32(),
        "height": pa.int32(),
    }
    params: MixParams

    @functools.cached_property
    def parts(self) -> list[Source | Generator]:
        """Each component's reader: a source, or a generator built from its spec."""
        parts: list[Source | Generator] = []
        for component in self.params.components:
            if component.source is not None:
                parts.append(build_source(component.source, self.recipe_dir))
            else:
                generator = GENERATORS.get(component.generator["kind"]).from_params(component.generator["params"])
                generator.recipe_dir = self.recipe_dir
                parts.append(generator)
        return parts

    @functools.cached_property
    def block(self) -> np.ndarray:
        """Rows per block for each component: the counts, or the weights apportioned to
        `WEIGHT_BLOCK` by largest remainder."""
        components = self.params.components
        if components[0].count is not None:
            return np.array([component.count for component in components])
        weights = np.array([component.weight for component in components], dtype=float)
        exact = weights / weights.sum() * WEIGHT_BLOCK
        counts = np.floor(exact).astype(int)
        for index in np.argsort(-(exact - counts), kind="stable")[: WEIGHT_BLOCK - counts.sum()]:
            counts[index] += 1
        return counts

    def target_shares(self) -> dict[str, dict[str, float]]:
        total = self.block.sum()
        return {"source": {c.label: float(n / total) for c, n in zip(self.params.components, self.block, strict=True)}}

    def labels(self) -> tuple[str, ...] | None:
        label_sets = [part.labels() for part in self.parts]
        if any(labels is None for labels in label_sets):
            return None
        return tuple(sorted(set().union(*label_sets)))

    def image_size(self) -> tuple[int, int] | None:
        size = self.params.image_size
        return (size, size) if size else None

    def chain(self) -> list[Generator]:
        """The mix and its component generators (their code, usage and response caches)."""
        return [self, *(link for part in self.parts if isinstance(part, Generator) for link in part.chain())]

    def reads(self) -> list[Source]:
        return [part for part in self.parts if isinstance(part, Source)]

    def makers(self) -> list[str]:
        return [name for part in self.parts if isinstance(part, Generator) for name in part.makers()]  # not "mix"

    def parent_releases(self) -> list[str]:
        return [component.release for component in self.params.components if component.release]

    def plan_problems(self, samples: int) -> list[str]:
        """A source asked for more records than it holds, and counts that do not add up."""
        problems = []
        if self.params.components[0].count is not None and self.block.sum() != samples:
            problems.append(f"generator.params.components: counts add up to {self.block.sum()}, but samples is {samples}")
        for position, (component, part) in enumerate(zip(self.params.components, self.parts, strict=True)):
            if isinstance(part, Source):
                needed = self._rows_needed(position, samples)
                if needed > len(part):
                    problems.append(
                        f"generator.params.components.{position}: {component.label} holds {len(part)} records, "
                        f"the mix needs {needed} of them for {samples} samples; lower its share or the samples"
                    )
        return problems

    def preflight(self) -> None:
        for part in self.parts:
            part.preflight()

    def _rows_needed(self, position: int, samples: int) -> int:
        full, rest = divmod(samples, int(self.block.sum()))
        dealt, _ = _deal(self.params.seed, tuple(self.block.tolist()), full)
        return full * int(self.block[position]) + int(np.count_nonzero(dealt[:rest] == position))

    def _assign(self, index: int) -> tuple[int, int]:
        """(component, rank): slot `index` is that component's rank-th row."""
        block, offset = divmod(index, int(self.block.sum()))
        dealt, ranks = _deal(self.params.seed, tuple(self.block.tolist()), block)
        component = int(dealt[offset])
        return component, block * int(self.block[component]) + int(ranks[offset])

    def generate(self, slots: Sequence[SampleSlot]) -> Iterable[Sample | Rejection]:
        by_component: dict[int, list[tuple[SampleSlot, int]]] = {}
        for slot in slots:
            component, rank = self._assign(slot.index)
            by_component.setdefault(component, []).append((slot, rank))
        made: dict[int, Sample | Rejection] = {}
        for position, wanted in by_component.items():
            component, part = self.params.components[position], self.parts[position]
            if isinstance(part, Source):
                made.update(self._from_source(component, part, position, wanted))
            else:
                made.update(self._from_generator(component, part, [slot for slot, _ in wanted]))
        return [made[slot.index] for slot in slots]

    def _from_source(self, component: MixComponent, source: Source, position: int,
                     wanted: list[tuple[SampleSlot, int]]) -> dict[int, Sample | Rejection]:
        order = _record_order(self.params.seed, position, len(source))
        inside = [(slot, rank) for slot, rank in wanted if rank < len(order)]
        out: dict[int, Sample | Rejection] = {
            slot.index: Rejection(slot, f"{component.label} holds {len(order)} records; this slot needs record {rank + 1}")
            for slot, rank in wanted if rank >= len(order)
        }
        records = source.read([int(order[rank]) for _, rank in inside])
        origin = source.origin()
        for (slot, _), record in zip(inside, records, strict=True):
            try:
                out[slot.index] = self._sample(slot, component, "real", origin.revision, origin.license, record.key,
                                               record.label, record.caption, dict(record.files), None)
            except ImageError as exc:  # one bad file in a real dataset costs one sample, counted, not the shard
                out[slot.index] = Rejection(slot, f"{component.label} record {record.key}: {exc}")
        return out

    def _from_generator(self, component: MixComponent, generator: Generator,
                        slots: list[SampleSlot]) -> dict[int, Sample | Rejection]:
        out: dict[int, Sample | Rejection] = {}
        revision = f"{generator.plugin_name}@{generator.version}"
        for item in generator.generate(slots):
            if isinstance(item, Rejection):
                out[item.slot.index] = item
                continue
            label = item.columns.get("label")
            out[item.slot.index] = self._sample(item.slot, component, "synthetic", revision, None, item.slot.key,
                                                None if label is None else str(label), item.caption, dict(item.files),
                                                item.group)
        return out

    def _sample(self, slot: SampleSlot, component: MixComponent, default_origin: str, revision: str,
                license: str | None, key: str, label: str | None, caption: str, files: dict[str, bytes],
                group: str | None) -> Sample:
        origin = component.origin or default_origin
        image = next((ext for ext in IMAGE_MEMBERS if ext in files), None)
        width = height = None
        if image is not None:
            data, (width, height), resized = self._sized(files.pop(image))
            image = "png" if resized else image  # re-encoded as PNG; an image already the size keeps its bytes
            files[image] = data
        caption = caption or label or component.label  # the format needs a caption; a bare record has none
        files["txt"] = caption.encode()
        meta = json.loads(files["json"]) if "json" in files else {}
        provenance = {"origin": origin, "source": component.label, "source_revision": revision, "source_key": key,
                      "source_license": license}
        meta.update({"label": label, **provenance})
        files["json"] = json.dumps(meta, sort_keys=True).encode()
        return Sample(
            slot=slot,
            caption=caption,
            files=files,
            payload=image or "json",
            columns={"label": label, **provenance, "width": width, "height": height},
            group=group,
        )

    def _sized(self, data: bytes) -> tuple[bytes, tuple[int, int], bool]:
        """The image, resized to `image_size` when it differs (re-encoded as PNG), its size,
        and whether it was re-encoded. Raises ImageError for bytes that are no image."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
                wanted = self.params.image_size
                if not wanted or size == (wanted, wanted):
                    return data, size, False
                resized = image.convert("RGB").resize((wanted, wanted), Image.Resampling.LANCZOS)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"unreadable image: {exc}") from None
        buffer = io.BytesIO()
        resized.save(buffer, format="PNG", optimize=False)
        return buffer.getvalue(), (wanted, wanted), True


class ImageError(ValueError):
    """A record's image member cannot be read."""


def _loading(info: ValidationInfo) -> bool:
    """True while a recipe loads (its directory is in the context), not when a worker
    rebuilds the generator from the resolved params."""
    return RECIPE_DIR in (info.context or {})


@functools.lru_cache(maxsize=8)
def _deal(seed: int, composition: tuple[int, ...], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Component of each slot of block `block` (the block's composition, shuffled), and
    each slot's rank among its component's slots in the block: one pass, so a counts mix
    (one block of every sample) costs O(samples) per process, not O(samples) per slot."""
    order = np.repeat(np.arange(len(composition)), composition)
    dealt = np.random.default_rng(derive_seed(seed, block)).permutation(order)
    ranks = np.empty(len(dealt), dtype=np.int64)
    for component in range(len(composition)):
        where = np.flatnonzero(dealt == component)
        ranks[where] = np.arange(len(where))
    return dealt, ranks


@functools.lru_cache(maxsize=64)
def _record_order(seed: int, position: int, size: int) -> np.ndarray:
    """A source's records in the order the mix draws them (without replacement)."""
    return np.random.default_rng(derive_seed(seed, 2**32 + position)).permutation(size)
