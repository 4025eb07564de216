"""Read a release (or a run in progress) as a stream of samples for training.

``load()`` gives a ``torch.utils.data.IterableDataset``; ``iter_samples()`` the same
samples as a plain iterator. Shards come from a registry at a release tag (through DVC:
its cache, else streamed from S3 into a bounded local cache), a release directory, or a
live run (see `sources`). Every consumer (DataLoader worker × distributed rank) computes
the same epoch-seeded shard order and takes its own share of it, so each sample is read
exactly once per epoch. `source_dataset()` reads a real-data source the same way and
`mix()` interleaves datasets at load time. Every one of them has `state_dict()` /
`load_state_dict()` (torchdata's `StatefulDataLoader` protocol), so a restarted job
continues an epoch where it stopped. This package imports the shard format, the registry
and the live feed; nothing of recipes or plug-ins (sources are duck-typed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from synthfactory.live import default_consumer
from synthfactory.loader.cache import DEFAULT_CACHE_BYTES, DiskCache, default_cache_dir
from synthfactory.loader.dataset import (
    DECODE_MODES, VERIFY_MODES, ResumableDataset, ShardDataset, SourceDataset, consumer_index, distributed_rank,
)
from synthfactory.loader.errors import LoaderError
from synthfactory.loader.mix import MixedDataset, mix
from synthfactory.loader.sources import DvcRelease, LiveRun, ReleaseDirectory, ShardSource, consumer_share, resolve_tag
from synthfactory.registry import DataRegistry, RegistryError
from synthfactory.shards import SHARDS_DIR

__all__ = [
    "DiskCache", "LoaderError", "MixedDataset", "ResumableDataset", "ShardDataset", "SourceDataset", "consumer_index",
    "consumer_share", "default_cache_dir", "iter_samples", "load", "mix", "source_dataset",
]


def _check_decoding(decode: str, fields: Sequence[str] | None) -> None:
    if decode not in DECODE_MODES:
        raise LoaderError(f"decode={decode!r}: choose one of {', '.join(DECODE_MODES)}")
    if fields is not None and (isinstance(fields, str) or not fields):
        raise LoaderError(f"fields={fields!r}: give a non-empty list such as ['png', 'label']")


def load(
    dataset: str,
    version: int | str | None = None,
    registry: str | Path = ".",
    *,
    decode: str = "torch",
    fields: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    cache_dir: str | Path | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    live: bool = False,
    poll_s: float = 0.5,
    live_timeout_s: float = 3600.0,
    consumer: str | None = None,
    verify: str = "sha256",
) -> ShardDataset:
    """A `torch.utils.data.IterableDataset` over release `dataset`@`version` of `registry`.

    `registry` is a registry repo (shards read through DVC at the release tag: DVC's
    cache, else streamed from S3 into the shard cache) or a release directory (read in
    place). `version`: N, "vN", "<dataset>@vN"; None = latest. With `live=True` it
    follows the run in progress in `registry` instead (see `synthfactory.live`), in feed
    order (`shuffle` does not apply), polling every `poll_s` when caught up and giving
    up after `live_timeout_s` without a new shard; `consumer` names its progress files.

    Samples are dicts: ``__key__``, ``__shard__``, one entry per tar member by extension
    and ``label`` (the class index in `classes`, default the recipe's
    ``generator.params.classes``, when the sample's JSON has a label). `decode`: "torch"
    (images as uint8 C×H×W tensors, JSON parsed, text as str), "pil" (images as RGB PIL
    images) or "raw" (bytes). `fields` limits the entries (and the decoding work).

    Each (rank, DataLoader worker) reads its share of the shards in an order seeded by
    (`seed`, epoch): every sample once per epoch. `rank`/`world_size` default to
    torch.distributed's, else $RANK / $WORLD_SIZE, else 0 / 1. `shuffle_buffer` > 1 also shuffles
    samples within a sliding buffer. `cache_bytes` bounds the shard cache in `cache_dir`
    (default `default_cache_dir()`); 0 turns caching off.

    Every sample is checked against the release's manifest before it is yielded: its key,
    its size and (`verify="sha256"`, the default) the sha256 of every member;
    `verify="size"` skips the hashing (see bench/loader_throughput.py for its cost). A
    shard that ends short or holds more is caught at its end. A damaged copy in the shard
    cache or DVC's cache is dropped and fetched again (counted in `.refetched`, logged);
    a damaged source (a release directory, S3, a live run) raises LoaderError naming the shard.

    `state_dict()` / `load_state_dict()` stop and continue an epoch mid-way (a live run:
    the shards already consumed are skipped); see `ShardDataset`.
    """
    _check_decoding(decode, fields)
    if verify not in VERIFY_MODES:
        raise LoaderError(f"verify={verify!r}: choose one of {', '.join(VERIFY_MODES)}")
    if shuffle_buffer < 0 or cache_bytes < 0:
        raise LoaderError(f"shuffle_buffer={shuffle_buffer} and cache_bytes={cache_bytes} must be >= 0")
    rank, world_size = distributed_rank(rank, world_size)
    cache = DiskCache(Path(cache_dir) if cache_dir else default_cache_dir(), cache_bytes) if cache_bytes else None
    root = Path(registry).resolve()
    source: ShardSource
    if live:
        if version is not None:
            raise LoaderError(f"version={version!r} with live=True: a live run is not a release yet; drop one")
        source = LiveRun(root, dataset, poll_s, live_timeout_s, consumer or default_consumer())
    elif (root / SHARDS_DIR).is_dir():
        if version is not None:
            raise LoaderError(f"version={version!r} with release directory {root}: the directory is one version; drop it")
        source = ReleaseDirectory(root)
        if source.recipe_name not in (None, dataset):
            raise LoaderError(f"dataset {dataset!r}: release directory {root} holds {source.recipe_name!r}")
    else:
        try:
            repo = DataRegistry.existing(root)
        except RegistryError as exc:
            raise LoaderError(f"registry={str(registry)!r}: {exc}; or give a release directory (one with {SHARDS_DIR}/)") from None
        source = DvcRelease(repo, dataset, resolve_tag(repo, dataset, version), cache.root if cache else None)
    if not source.shard_names():
        raise LoaderError(f"{source.label} has no shards")
    return ShardDataset(
        source,
        decode=decode,
        fields=tuple(fields) if fields is not None else None,
        classes=tuple(classes) if classes else source.classes(),
        shuffle=shuffle and not live, seed=seed, shuffle_buffer=shuffle_buffer,
        rank=rank, world_size=world_size, cache=cache, verify=verify,
    )  # fmt: skip


def source_dataset(
    source: Any,
    decode: str = "torch",
    fields: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> SourceDataset:
    """A `torch.utils.data.IterableDataset` over a real-data source (a
    `synthfactory.sources.Source`, or anything with ``len()`` and ``read(indices)`` giving
    records with key, files, label), to train on or `mix` with a release.

    Samples are shaped like `load`'s: ``__key__``, one entry per member decoded the same
    way (`decode`, `fields`), ``label`` as the index in `classes` (default the source's
    sorted labels) and ``__origin__`` (the source's origin, when it has one). Each epoch
    the records are permuted by (`seed`, epoch) unless `shuffle` is False, and each
    (rank, DataLoader worker) reads its range of that order.
    """
    _check_decoding(decode, fields)
    if not callable(getattr(source, "read", None)) or not callable(getattr(source, "__len__", None)):
        raise LoaderError(f"source={source!r}: give a real-data source (one with len() and read(indices))")
    if classes is None and callable(getattr(source, "labels", None)):
        classes = sorted(source.labels() or ())
    rank, world_size = distributed_rank(rank, world_size)
    return SourceDataset(
        source, decode=decode, fields=tuple(fields) if fields is not None else None, classes=tuple(classes) if classes else None,
        shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
    )


def iter_samples(dataset: str, version: int | str | None = None, registry: str | Path = ".", **options: Any) -> Iterator[dict[str, Any]]:
    """The samples of `load(...)` as a plain iterator, for code without a DataLoader."""
    return iter(load(dataset, version, registry, **options))
