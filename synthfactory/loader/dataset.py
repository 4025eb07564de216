"""The torch dataset over a shard source: each (rank, DataLoader worker) reads its share
of the shards in an epoch-seeded order, through the disk cache, decoding on the way out."""

from __future__ import annotations

import copy
import io
import json
import multiprocessing
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from synthfactory.loader.cache import DiskCache, Fetch
from synthfactory.loader.errors import LoaderError
from synthfactory.loader.sources import ShardRef, ShardSource
from synthfactory.shards import read_shard

DECODE_MODES = ("torch", "pil", "raw")
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp"})
#: the field built from the sample's JSON ``label``: the class index in the recipe's list
LABEL_FIELD = "label"


def consumer_index(rank: int, world_size: int, worker: int) -> int:
    """This consumer's number among world_size × workers: ranks vary fastest, so the
    round-robin remainder spreads over ranks (they differ by at most one shard)."""
    return worker * world_size + rank


def distributed_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank={rank} and world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
    return rank, world_size


def _decode_member(ext: str, data: bytes, mode: str) -> Any:
    if mode == "raw":
        return data
    if ext in IMAGE_EXTENSIONS:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
        if mode == "pil":
            return image
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())  # uint8, C×H×W
    if ext == "json":
        return json.loads(data)
    if ext == "txt":
        return data.decode()
    return data


class ShardDataset(IterableDataset):
    """Samples of a release or live run; see `load`. Call `set_epoch` before each epoch."""

    def __init__(
        self,
        source: ShardSource,
        *,
        decode: str,
        fields: tuple[str, ...] | None,
        classes: tuple[str, ...] | None,
        shuffle: bool,
        seed: int,
        shuffle_buffer: int,
        rank: int,
        world_size: int,
        cache: DiskCache | None,
    ) -> None:
        self.source = source
        self.shard_names = source.shard_names()
        self.decode, self.fields, self.classes = decode, fields, classes
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.cache = cache
        self._class_index = {name: i for i, name in enumerate(classes)} if classes else None
        # shared memory, so DataLoader workers (persistent ones included) see set_epoch
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    def __repr__(self) -> str:
        return (
            f"ShardDataset({self.source.label}, {len(self.shard_names)} shards, decode={self.decode!r}, "
            f"rank {self.rank}/{self.world_size})"
        )

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Shard order (and the shuffle buffer) are seeded by (seed, epoch)."""
        self._epoch.value = epoch

    def select(self, names: Sequence[str]) -> ShardDataset:
        """The same dataset over only the shards `names` (e.g. to hold some out)."""
        unknown = sorted(set(names) - set(self.shard_names))
        if unknown:
            raise LoaderError(f"unknown shard {unknown[0]!r}; this dataset has: {', '.join(self.shard_names)}")
        wanted = set(names)
        selected = copy.copy(self)
        selected.shard_names = [name for name in self.shard_names if name in wanted]
        selected._epoch = multiprocessing.Value("q", self.epoch, lock=False)
        return selected

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        consumers = self.world_size * workers
        consumer = consumer_index(self.rank, self.world_size, worker_id)
        epoch = self.epoch
        order = random.Random(f"{self.seed}:{epoch}") if self.shuffle else None
        raw = (
            sample
            for ref, stride, offset in self.source.schedule(self.shard_names, consumer, consumers, order)
            for sample in self._read(ref, stride, offset)
        )
        if self.shuffle_buffer > 1:
            raw = _buffer_shuffled(raw, self.shuffle_buffer, random.Random(f"{self.seed}:{epoch}:{consumer}"))
        for key, files, shard in raw:
            yield self._decoded(key, files, shard)

    def _read(self, ref: ShardRef, stride: int, offset: int) -> Iterator[tuple[str, dict[str, bytes], str]]:
        count = 0
        with self._stream(ref) as stream:
            for index, (key, files) in enumerate(read_shard(stream)):
                count += 1
                if index % stride == offset:
                    yield key, files, ref.name
        if ref.samples is not None and count != ref.samples:
            raise LoaderError(f"shard {ref.name} holds {count} samples, its feed entry says {ref.samples}")

    @contextmanager
    def _stream(self, ref: ShardRef) -> Iterator[Any]:
        """The shard's bytes: in place, from the cache, or fetched (and cached on the way
        when it fits; the entry is published only once the whole shard was read)."""
        cached = self.cache.open(ref.cache_key) if self.cache and ref.cache_key else None
        if cached is not None:
            with cached:
                yield cached
            return
        source, local = self.source.open(ref)
        with source:
            if local:
                yield source
                return
            size = source.seek(0, os.SEEK_END)
            source.seek(0)
            writer = self.cache.reserve(ref.cache_key, size) if self.cache and ref.cache_key else None
            fetch = Fetch(source, size, ref.name, ref.md5, writer)
            try:
                yield fetch
                fetch.finish()
            finally:
                if writer is not None:
                    writer.discard()

    def _decoded(self, key: str, files: dict[str, bytes], shard: str) -> dict[str, Any]:
        wanted = self.fields or (*files, LABEL_FIELD)
        sample: dict[str, Any] = {"__key__": key, "__shard__": shard}
        for field in wanted:
            if field in files:
                sample[field] = _decode_member(field, files[field], self.decode)
            elif field != LABEL_FIELD:
                raise LoaderError(
                    f"sample {key} of {shard} has no field {field!r}; it has: {', '.join([*sorted(files), LABEL_FIELD])}"
                )
        if LABEL_FIELD in wanted:
            truth = sample["json"] if isinstance(sample.get("json"), dict) else json.loads(files.get("json", b"{}"))
            label = truth.get(LABEL_FIELD)
            if label is not None:
                sample[LABEL_FIELD] = self._class_number(label, key, shard)
            elif self.fields is not None:
                raise LoaderError(f"sample {key} of {shard} has no label (no 'label' in its .json)")
        return sample

    def _class_number(self, label: str, key: str, shard: str) -> int | str:
        if self._class_index is None:
            return label
        try:
            return self._class_index[label]
        except KeyError:
            raise LoaderError(
                f"sample {key} of {shard} has label {label!r}, not one of the classes {', '.join(self.classes or ())}"
            ) from None


def _buffer_shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle within a sliding buffer of `size` samples (raw bytes, so it stays small)."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer
