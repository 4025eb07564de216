"""What a generator makes: sample slots in, samples or rejections out.

The vocabulary shared by the shard format (which writes these) and the plug-ins (which
produce them); plain dataclasses, so the format imports no plug-in machinery.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


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
    `columns` holds the plug-ins' own manifest columns.
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


def sample_key(index: int) -> str:
    """WebDataset key: fixed width so lexical order is sample order; no dots allowed."""
    return f"{index:010d}"


def slot_for(recipe_seed: int, index: int) -> SampleSlot:
    """Sample `index` of a recipe: its key and a seed independent of sharding and workers."""
    return SampleSlot(index, sample_key(index), derive_seed(recipe_seed, index))
