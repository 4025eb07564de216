"""The torch dataset over a shard source: each (rank, DataLoader worker) reads its share
of the shards in an epoch-seeded order, through the disk cache, decoding on the way out."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from synthfactory.loader.cache import DiskCache, Fetch
from synthfactory.loader.errors import LoaderError
from synthfactory.loader.sources import ShardRef, ShardSource
from synthfactory.shards import ExpectedSample, ManifestIndex, ShardFormatError, verified_samples
from synthfactory.video import clip_format_of, decode_clip

DECODE_MODES = ("torch", "pil", "raw")
#: what each sample is checked against the release by: sha256 of every member, or sizes only
VERIFY_MODES = ("sha256", "size")
log = logging.getLogger(__name__)
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
    if clip_format := clip_format_of(ext):  # a clip's frames: T×C×H×W uint8 (torch), T×H×W×3 (pil: numpy)
        frames = decode_clip(data, clip_format)
        return torch.from_numpy(frames.transpose(0, 3, 1, 2).copy()) if mode == "torch" else frames
    if ext.endswith(".npy"):  # actions, rewards, observations, ego state
        array = np.load(io.BytesIO(data), allow_pickle=False)
        return torch.from_numpy(array) if mode == "torch" else array
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
        verify: str = "sha256",
    ) -> None:
        self.source = source
        self.hashes = verify == "sha256"
        self._index: tuple[int, ManifestIndex] | None = None  # (pid, the release's manifest), opened per process
        # shared like the epoch; unlocked, since a lock made here could not cross to workers
        # of another start method (forkserver), and a drop is rare enough not to race
        self._refetched = multiprocessing.Value("q", 0, lock=False)
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

    def split(self, holdout: int) -> tuple[ShardDataset, ShardDataset]:
        """(the rest, the last `holdout` shards by name): a held-out set that is the same
        whatever the epoch, worker or rank, and for a live run once its shards exist."""
        if not 0 < holdout < len(self.shard_names):
            raise LoaderError(f"holdout={holdout}: {self!r} has {len(self.shard_names)} shards; "
                              f"hold out 1 to {len(self.shard_names) - 1}")
        names = sorted(self.shard_names)
        return self.select(names[:-holdout]), self.select(names[-holdout:])

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

    @property
    def refetched(self) -> int:
        """Damaged local copies (shard cache, DVC cache) this dataset dropped and fetched again."""
        return self._refetched.value

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}  # each process opens the manifest itself

    def _read(self, ref: ShardRef, stride: int, offset: int) -> Iterator[tuple[str, dict[str, bytes], str]]:
        """The consumer's share of shard `ref`, every sample checked against the release
        before it is passed on. A damaged local copy is dropped and the shard fetched
        again, resuming after the samples already passed on; a damaged source raises."""
        expected = self._expected(ref)
        passed = 0
        for attempt in (1, 2):
            with self._stream(ref) as (stream, drop):
                try:
                    for index, (key, files) in enumerate(verified_samples(stream, expected, self.hashes)):
                        if index < passed:
                            continue
                        passed += 1
                        if index % stride == offset:
                            yield key, files, ref.name
                except ShardFormatError as exc:
                    if drop is None or attempt == 2:
                        raise LoaderError(f"shard {ref.name} of {self.source.label} is damaged: {exc}") from None
                    self._drop_damaged(ref, drop, exc)
                    continue
            if ref.samples is not None and passed != ref.samples:
                raise LoaderError(f"shard {ref.name} holds {passed} samples, its feed entry says {ref.samples}")
            return

    def _drop_damaged(self, ref: ShardRef, drop: Callable[[], None], problem: Exception) -> None:
        log.warning("the local copy of %s (%s) is damaged: %s; dropped, fetching it again", ref.name, self.source.label, problem)
        drop()
        self._refetched.value += 1

    def _expected(self, ref: ShardRef) -> list[ExpectedSample] | None:
        """What the release says shard `ref` holds (None: a live feed naming no manifest)."""
        if ref.manifest is not None:
            try:
                return ManifestIndex(Path(ref.manifest)).samples(ref.name)
            except (OSError, ValueError) as exc:
                raise LoaderError(f"shard {ref.name}: cannot read its manifest fragment {ref.manifest} ({exc})") from None
        manifest = self.source.manifest_ref()
        if manifest is None:
            return None
        if self._index is None or self._index[0] != os.getpid():
            self._index = (os.getpid(), self._open_manifest(manifest))
        return self._index[1].samples(ref.name)

    def _open_manifest(self, ref: ShardRef) -> ManifestIndex:
        """The release's manifest, checked against its DVC md5 (a damaged local copy is
        dropped and fetched again, like a shard), read from a local file where there is one."""
        for attempt in (1, 2):
            with self._stream(ref) as (stream, drop):
                if isinstance(stream, Fetch):
                    data, local = stream.read(), None  # the md5 is checked as the fetch finishes
                else:
                    data, local = None, Path(stream.name)
                    if ref.md5 is not None and hashlib.file_digest(stream, "md5").hexdigest() != ref.md5:
                        problem = ShardFormatError(f"{ref.name} does not match its md5 {ref.md5}")
                        if drop is None or attempt == 2:
                            raise LoaderError(f"{ref.name} of {self.source.label} is damaged: {problem}") from None
                        self._drop_damaged(ref, drop, problem)
                        continue
            if local is None and self.cache and ref.cache_key and self.cache.path(ref.cache_key).exists():
                local = self.cache.path(ref.cache_key)
            try:
                return ManifestIndex(local if local is not None else io.BytesIO(data))  # type: ignore[arg-type]
            except (OSError, ValueError) as exc:
                raise LoaderError(f"{ref.name} of {self.source.label} is damaged: {exc}") from None
        raise AssertionError("unreachable")

    @contextmanager
    def _stream(self, ref: ShardRef) -> Iterator[tuple[Any, Callable[[], None] | None]]:
        """(bytes of `ref`, how to drop them if damaged): from the loader's cache, a local
        copy, in place (nothing to drop), or fetched (and cached on the way when it fits;
        the entry is published only once the whole shard was read and its md5 matched)."""
        cached = self.cache.open(ref.cache_key) if self.cache and ref.cache_key else None
        if cached is not None:
            with cached:
                yield cached, lambda: self.cache.drop(ref.cache_key)  # type: ignore[union-attr,arg-type]
            return
        source, origin = self.source.open(ref)
        with source:
            if origin != "remote":
                yield source, (lambda: self.source.drop_copy(ref, source)) if origin == "copy" else None
                return
            size = source.seek(0, os.SEEK_END)
            source.seek(0)
            writer = self.cache.reserve(ref.cache_key, size) if self.cache and ref.cache_key else None
            fetch = Fetch(source, size, ref.name, ref.md5, writer)
            try:
                yield fetch, None
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
