"""The torch datasets: over a shard source (each (rank, DataLoader worker) reads its share
of the shards in an epoch-seeded order, through the disk cache, decoding on the way out)
and over a real-data source (its share of the records). Both can stop and continue an
epoch mid-way (`ResumableDataset`)."""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
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
#: the layout of `ResumableDataset.state_dict()`; bumped when it changes
STATE_VERSION = 1
#: records a `SourceDataset` asks its source for at once
READ_BATCH = 64


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


def _decoded_members(files: dict[str, bytes], wanted: Sequence[str], mode: str, where: str) -> dict[str, Any]:
    """The `wanted` members of a sample, decoded (`label` is built by the caller)."""
    members = {}
    for field in wanted:
        if field in files:
            members[field] = _decode_member(field, files[field], mode)
        elif field != LABEL_FIELD:
            raise LoaderError(f"{where} has no field {field!r}; it has: {', '.join([*sorted(files), LABEL_FIELD])}")
    return members


def _class_number(label: str, class_index: dict[str, int] | None, where: str) -> int | str:
    if class_index is None:
        return label
    try:
        return class_index[label]
    except KeyError:
        raise LoaderError(f"{where} has label {label!r}, not one of the classes {', '.join(class_index)}") from None


class ResumableDataset(IterableDataset):
    """An epoch-seeded dataset whose consumers can stop mid-epoch and continue there.

    `state_dict()` says how far this consumer (rank × DataLoader worker) got in its epoch;
    after `load_state_dict(state)` the next iteration continues that epoch where it
    stopped. This is torchdata's `StatefulDataLoader` protocol: it calls both on the
    dataset inside each worker. A subclass names what identifies it (`identity`), what
    its progress counts (`_start_of`), and advances the progress `_start()` returns.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        # shared memory, so DataLoader workers (persistent ones included) see set_epoch
        self._epoch = multiprocessing.Value("q", 0, lock=False)
        self._progress: dict[str, Any] | None = None  # of the iteration under way (or last run) here
        self._loaded: dict[str, Any] | None = None  # a state the next iteration continues

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """The order is seeded by (seed, epoch). A loaded state of another epoch is
        dropped (that epoch starts from its beginning); one of this epoch is kept, so
        ``load_state_dict(s); set_epoch(s["epoch"])`` continues it. Loading a state
        does not set the epoch: keep calling set_epoch before each epoch as usual."""
        self._epoch.value = epoch
        if self._loaded is not None and self._loaded["epoch"] != epoch:
            self._loaded = None
        if self._progress is not None and self._progress["epoch"] != epoch:
            self._progress = None

    def identity(self) -> dict[str, Any]:
        """What a state must have been saved from (compared on load)."""
        raise NotImplementedError

    def _start_of(self, epoch: int) -> dict[str, Any]:
        """The progress of a consumer that has read nothing of `epoch` yet."""
        return {"epoch": epoch, "finished": False}

    def _consumer(self) -> tuple[int, int]:
        """(this consumer's index, how many there are): ranks × DataLoader workers."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        return consumer_index(self.rank, self.world_size, worker_id), self.world_size * workers

    def state_dict(self) -> dict[str, Any]:
        """Where this consumer is in its epoch, as plain JSON-able values."""
        if self._loaded is not None:
            return copy.deepcopy(self._loaded)
        consumer, consumers = self._consumer()
        progress = self._progress if self._progress is not None else self._start_of(self.epoch)
        return {"version": STATE_VERSION, "dataset": self.identity(), "consumer": consumer, "consumers": consumers,
                **copy.deepcopy(progress)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue `state`'s epoch where it stopped on the next iteration; LoaderError for
        a state of another dataset, seed, world size or DataLoader worker count."""
        self._check(state)
        self._loaded = copy.deepcopy(state)

    def _check(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise LoaderError(f"state version {found!r}: {type(self).__name__} reads version {STATE_VERSION} states")
        saved = state.get("dataset") if isinstance(state.get("dataset"), dict) else {}
        for name, value in self.identity().items():
            if saved.get(name) != value:
                raise LoaderError(f"state of another dataset: its {name} is {saved.get(name)!r}, this one's is {value!r}")
        consumer, consumers = self._consumer()
        if (state.get("consumer"), state.get("consumers")) != (consumer, consumers):
            raise LoaderError(
                f"state of consumer {state.get('consumer')} of {state.get('consumers')} (ranks × DataLoader workers); "
                f"this is consumer {consumer} of {consumers}: resume with the same world_size and num_workers"
            )
        missing = sorted(set(self._start_of(0)) - set(state))
        if missing:
            raise LoaderError(f"state lacks {', '.join(missing)}")

    def _start(self) -> tuple[int, int, dict[str, Any]]:
        """(consumer, consumers, progress) of an iteration starting now: the loaded
        state's progress, else the start of the epoch. The iteration advances it."""
        consumer, consumers = self._consumer()
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded["epoch"] != self.epoch:
            # StatefulDataLoader loads the checkpoint's state when iteration starts, after the
            # training loop's set_epoch: a state of an earlier epoch does not carry into this one
            log.warning("a loaded state of epoch %s is not continued: this iteration is epoch %s "
                        "(call set_epoch(%s) to continue that epoch)", loaded["epoch"], self.epoch, loaded["epoch"])
            loaded = None
        if loaded is not None:
            self._check(loaded)  # again: a state loaded here and pickled into a worker is another consumer's
            progress = copy.deepcopy({name: loaded[name] for name in self._start_of(0)})
        else:
            progress = self._start_of(self.epoch)
        self._progress = progress
        return consumer, consumers, progress


class ShardDataset(ResumableDataset):
    """Samples of a release or live run; see `load`. Call `set_epoch` before each epoch.

    Its state is the epoch and, for each consumer, the shards of its share done and the
    samples taken from the current one: a restart reads none of the shards done and
    decodes none of the samples taken. With a shuffle buffer, the count of samples
    yielded: the same (seed, epoch) order is replayed up to there, undecoded.
    """

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
        super().__init__(rank, world_size)
        self.source = source
        self.hashes = verify == "sha256"
        #: (pid, manifest file, its index): the file last read, opened per process (a legacy
        #: release's single manifest serves every shard; a partition, one)
        self._index: tuple[int, ShardRef, ManifestIndex] | None = None
        # shared like the epoch; unlocked, since a lock made here could not cross to workers
        # of another start method (forkserver), and a drop is rare enough not to race
        self._refetched = multiprocessing.Value("q", 0, lock=False)
        self._select(source.shard_names())
        self.decode, self.fields, self.classes = decode, fields, classes
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.cache = cache
        self._class_index = {name: i for i, name in enumerate(classes)} if classes else None

    def __repr__(self) -> str:
        return (
            f"ShardDataset({self.source.label}, {len(self.shard_names)} shards, decode={self.decode!r}, "
            f"rank {self.rank}/{self.world_size})"
        )

    def _select(self, names: list[str]) -> None:
        """Read only shards `names`; their digest tells a state of another selection (computed
        here, once: a mix asks for the state after every sample)."""
        self.shard_names = names
        self._selection = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        return {"kind": "shards", "source": self.source.label, "shards": len(self.shard_names), "selection": self._selection,
                "seed": self.seed, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer}

    def _start_of(self, epoch: int) -> dict[str, Any]:
        return {**super()._start_of(epoch), "shard": 0, "taken": 0, "yielded": 0}

    def select(self, names: Sequence[str]) -> ShardDataset:
        """The same dataset over only the shards `names` (e.g. to hold some out)."""
        unknown = sorted(set(names) - set(self.shard_names))
        if unknown:
            raise LoaderError(f"unknown shard {unknown[0]!r}; this dataset has: {', '.join(self.shard_names)}")
        wanted = set(names)
        selected = copy.copy(self)
        selected._select([name for name in self.shard_names if name in wanted])
        selected._epoch = multiprocessing.Value("q", self.epoch, lock=False)
        selected._progress = selected._loaded = None
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
        return self._samples(*self._start())

    def _samples(self, consumer: int, consumers: int, progress: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if progress["finished"]:
            return
        epoch = progress["epoch"]
        order = random.Random(f"{self.seed}:{epoch}") if self.shuffle else None
        assignments = self.source.schedule(self.shard_names, consumer, consumers, order)
        if self.shuffle_buffer > 1:
            raw = (sample for ref, stride, offset in assignments for sample in self._read(ref, stride, offset))
            mixed = _buffer_shuffled(raw, self.shuffle_buffer, random.Random(f"{self.seed}:{epoch}:{consumer}"))
            for key, files, shard in itertools.islice(mixed, progress["yielded"], None):
                sample = self._decoded(key, files, shard)
                progress["yielded"] += 1
                yield sample
        else:
            for position, (ref, stride, offset) in enumerate(assignments):
                if position < progress["shard"]:
                    continue  # done before a restart: not read
                for key, files, shard in self._read(ref, stride, offset, progress["taken"]):
                    sample = self._decoded(key, files, shard)
                    progress["taken"] += 1
                    progress["yielded"] += 1
                    yield sample
                progress.update(shard=position + 1, taken=0)
        progress["finished"] = True

    @property
    def refetched(self) -> int:
        """Damaged local copies (shard cache, DVC cache) this dataset dropped and fetched again."""
        return self._refetched.value

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}  # each process opens the manifest itself

    def _read(self, ref: ShardRef, stride: int, offset: int, taken: int = 0) -> Iterator[tuple[str, dict[str, bytes], str]]:
        """The consumer's share of shard `ref`, every sample checked against the release
        before it is passed on, less the first `taken` of the share (passed on before a
        restart). A damaged local copy is dropped and the shard fetched again, resuming
        after the samples already passed on; a damaged source raises."""
        expected = self._expected(ref)
        passed = offset + (taken - 1) * stride + 1 if taken else 0
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
        manifest = self.source.manifest_ref(ref.name)
        if manifest is None:
            return None
        if self._index is None or self._index[:2] != (os.getpid(), manifest):
            self._index = (os.getpid(), manifest, self._open_manifest(manifest))
        return self._index[2].samples(ref.name)

    def _open_manifest(self, ref: ShardRef) -> ManifestIndex:
        """A manifest file of the release, checked against its DVC md5 (a damaged local copy is
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
        where = f"sample {key} of {shard}"
        sample: dict[str, Any] = {"__key__": key, "__shard__": shard, **_decoded_members(files, wanted, self.decode, where)}
        if LABEL_FIELD in wanted:
            truth = sample["json"] if isinstance(sample.get("json"), dict) else json.loads(files.get("json", b"{}"))
            label = truth.get(LABEL_FIELD)
            if label is not None:
                sample[LABEL_FIELD] = _class_number(label, self._class_index, where)
            elif self.fields is not None:
                raise LoaderError(f"{where} has no label (no 'label' in its .json)")
        return sample


class SourceDataset(ResumableDataset):
    """Records of a real-data source as samples shaped like `ShardDataset`'s; see
    `source_dataset`. The source is duck-typed (``len()`` and ``read(indices)``), so
    this package needs nothing of the source plug-ins.

    Each epoch the record indices are permuted by (seed, epoch) (or kept in order) and
    each consumer reads its contiguous range of that order; its state is the epoch and
    the records of its range taken: a restart reads none of them again.
    """

    def __init__(
        self,
        source: Any,
        *,
        decode: str,
        fields: tuple[str, ...] | None,
        classes: tuple[str, ...] | None,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        super().__init__(rank, world_size)
        self.source = source
        self.decode, self.fields, self.classes = decode, fields, classes
        self.shuffle, self.seed = shuffle, seed
        self._class_index = {name: i for i, name in enumerate(classes)} if classes else None
        self.origin = str(source.origin()) if callable(getattr(source, "origin", None)) else None
        self.label = self.origin or type(source).__name__

    def __repr__(self) -> str:
        return f"SourceDataset({self.label}, {len(self.source)} records, rank {self.rank}/{self.world_size})"

    def identity(self) -> dict[str, Any]:
        return {"kind": "source", "source": self.label, "records": len(self.source), "seed": self.seed, "shuffle": self.shuffle}

    def _start_of(self, epoch: int) -> dict[str, Any]:
        return {**super()._start_of(epoch), "taken": 0}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._samples(*self._start())

    def _samples(self, consumer: int, consumers: int, progress: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if progress["finished"]:
            return
        count = len(self.source)
        if self.shuffle:
            order = np.random.default_rng(random.Random(f"{self.seed}:{progress['epoch']}").getrandbits(64)).permutation(count)
        else:
            order = np.arange(count)
        share = order[consumer * count // consumers : (consumer + 1) * count // consumers]
        for start in range(progress["taken"], len(share), READ_BATCH):
            for record in self.source.read(share[start : start + READ_BATCH].tolist()):
                sample = self._decoded(record)
                progress["taken"] += 1
                yield sample
        progress["finished"] = True

    def _decoded(self, record: Any) -> dict[str, Any]:
        where = f"record {record.key} of {self.label}"
        wanted = self.fields or (*record.files, LABEL_FIELD)
        sample: dict[str, Any] = {"__key__": record.key, **_decoded_members(record.files, wanted, self.decode, where)}
        if self.origin is not None:
            sample["__origin__"] = self.origin
        if LABEL_FIELD in wanted:
            if record.label is not None:
                sample[LABEL_FIELD] = _class_number(record.label, self._class_index, where)
            elif self.fields is not None:
                raise LoaderError(f"{where} has no label")
        return sample


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
