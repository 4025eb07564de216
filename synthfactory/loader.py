"""Read a release (or a run in progress) as a stream of samples for training.

``load()`` gives a ``torch.utils.data.IterableDataset``; ``iter_samples()`` the same
samples as a plain iterator. Shards come from one of three places:

* a registry (a git + DVC repo, e.g. a ``git clone`` of the data registry): the release
  tag's shards are read through ``dvc.api.DVCFileSystem`` — straight from DVC's local
  cache when a ``dvc pull``/``fetch`` put them there, else streamed from the S3 remote
  (no full pull) while being copied into a bounded local cache;
* a release directory (``data/<dataset>/`` of a checkout, or a ``synthfactory pull`` /
  ``dvc get`` target): read in place;
* a live run (``live=True``): the shards a run in progress has made durable, in the
  order its feed lists them (see ``synthfactory.live``), reporting progress so a slow
  reader holds the run back.

Every consumer (DataLoader worker × distributed rank) computes the same epoch-seeded
shard order and takes its own share of it, so each sample is read exactly once per
epoch; with fewer shards than consumers, the consumers of a shard split its samples.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from synthfactory import settings
from synthfactory.live import FeedReader, default_consumer, read_feed
from synthfactory.registry import DataRegistry, RegistryError
from synthfactory.shards import SHARDS_DIR, read_shard, shard_name
from synthfactory.storage import ACCESS_KEY_VAR, ENDPOINT_VAR, SECRET_KEY_VAR, StorageError

DECODE_MODES = ("torch", "pil", "raw")
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp"})
#: the field built from the sample's JSON ``label``: the class index in the recipe's list
LABEL_FIELD = "label"
DEFAULT_CACHE_BYTES = 8 * 2**30
#: how often a live reader refreshes its progress file while reading or waiting
HEARTBEAT_S = 10.0
_COPY_CHUNK = 1 << 20


class LoaderError(ValueError):
    """A bad argument, a missing release or an unreadable shard; the message names it."""


def default_cache_dir() -> Path:
    """$SYNTHFACTORY_CACHE_DIR, else the user's cache directory (XDG)."""
    explicit = os.environ.get("SYNTHFACTORY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "synthfactory" / "shards"


# -- the bounded shard cache ----------------------------------------------------------


class ShardCache:
    """Shard files on local disk, at most `max_bytes` in all, shared by processes.

    Space is taken before a byte is written: under the cache lock a writer evicts the
    least recently read entries, then creates its temporary file at full size, so the
    files in the directory never add up to more than the bound. A reader holds a shared
    ``flock`` on an entry while it reads; eviction skips entries in use (and takes
    temporary files whose writer died), and a writer that finds no room streams the
    shard without caching it. Entries appear by atomic rename, so nobody reads half a file.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """The cache-wide lock (a fresh descriptor each time, so it is safe across fork)."""
        with open(self.root / ".lock", "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def __repr__(self) -> str:
        return f"ShardCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self._files())

    def open(self, key: str) -> BinaryIO | None:
        """The cached entry, pinned against eviction until closed; None on a miss."""
        path = self.root / key
        with self._lock():
            try:
                handle = open(path, "rb")
            except FileNotFoundError:
                return None
            fcntl.flock(handle, fcntl.LOCK_SH)  # never blocks: exclusive locks are taken under self._lock
            os.utime(path)  # recency for LRU
        return handle

    def reserve(self, key: str, size: int) -> CacheWriter | None:
        """A writer for `size` bytes of entry `key`, or None when they cannot fit now."""
        if size > self.max_bytes:
            return None
        with self._lock():
            if not self._make_room(size):
                return None
            part = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
            handle = open(part, "w+b")
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.truncate(size)  # the reservation: counted from now on
        return CacheWriter(self, key, part, handle)

    def _files(self) -> list[tuple[Path, int, float]]:
        found = []
        for entry in os.scandir(self.root):
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append((Path(entry.path), stat.st_size, stat.st_mtime))
        return found

    def _make_room(self, size: int) -> bool:
        """Evict until `size` more bytes fit: dead writers' files first, then least recently read."""
        files = self._files()
        free = self.max_bytes - sum(file_size for _, file_size, _ in files)
        for path, file_size, _ in sorted(files, key=lambda f: (not f[0].name.endswith(".part"), f[2])):
            if free >= size:
                break
            if path.name != ".lock" and self._remove_unused(path):
                free += file_size
        return free >= size

    @staticmethod
    def _remove_unused(path: Path) -> bool:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return True
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being read, or being written by a live process
            path.unlink()
            return True


class CacheWriter:
    """Fills one reserved entry; `commit` publishes it, `discard` gives the space back."""

    def __init__(self, cache: ShardCache, key: str, part: Path, handle: BinaryIO) -> None:
        self.cache, self.key, self.part, self._handle = cache, key, part, handle

    def write(self, data: bytes) -> None:
        self._handle.write(data)

    def commit(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        with self.cache._lock():
            target = self.cache.root / self.key
            if target.exists():  # another consumer cached it meanwhile
                self.part.unlink()
            else:
                os.replace(self.part, target)
            self._handle.close()

    def discard(self) -> None:
        if not self._handle.closed:
            self.part.unlink(missing_ok=True)
            self._handle.close()


class _Fetch:
    """A shard read from its source while being hashed and copied into the cache."""

    def __init__(self, source: BinaryIO, size: int, name: str, md5: str | None, writer: CacheWriter | None) -> None:
        self.source, self.size, self.name, self.md5, self.writer = source, size, name, md5, writer
        self.read_bytes = 0
        self._hash = hashlib.md5() if md5 else None

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.read_bytes += len(data)
        if self._hash is not None:
            self._hash.update(data)
        if self.writer is not None:
            self.writer.write(data)
        return data

    def finish(self) -> None:
        """Read what the tar reader left (end-of-archive padding), check, publish."""
        while self.read(_COPY_CHUNK):
            pass
        if self.read_bytes != self.size:
            raise LoaderError(f"shard {self.name}: read {self.read_bytes} bytes, expected {self.size}")
        if self._hash is not None and self._hash.hexdigest() != self.md5:
            raise LoaderError(f"shard {self.name}: content does not match its DVC md5 {self.md5}")
        if self.writer is not None:
            self.writer.commit()


# -- where shards come from -------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    """One shard: its name, where to read it, and what identifies its content.

    `cache_key` None means the file is local and immutable: it is read in place.
    """

    name: str
    location: str
    cache_key: str | None = None
    md5: str | None = None
    samples: int | None = None  # live feed: samples the run wrote (catches a short shard)


class _ReleaseDirectory:
    """Shards of a release directory on local disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    def shards(self) -> list[ShardRef]:
        return [ShardRef(p.name, str(p)) for p in sorted((self.path / SHARDS_DIR).glob("*.tar"))]

    def recipe_text(self) -> str | None:
        recipe = self.path / "recipe.yaml"
        return recipe.read_text() if recipe.exists() else None


class _DvcRelease:
    """A tagged release of a registry, read through DVC's filesystem at that tag.

    Each process (DataLoader workers included) opens its own DVC filesystem, with the S3
    settings of its environment (`settings.resolve_storage()`) passed as that in-memory
    DVC's remote config: credentials never go to os.environ, a config file, a pickled
    copy of this object or a message.
    """

    def __init__(self, registry: DataRegistry, dataset: str, tag: str) -> None:
        self.registry, self.dataset, self.tag = registry, dataset, tag
        self.label = f"{tag} in {registry.root}"
        self._fs_pid: tuple[int, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs_pid": None}  # DataLoader workers open their own

    def _fs(self) -> Any:
        from dvc.api import DVCFileSystem

        if self._fs_pid is None or self._fs_pid[0] != os.getpid():
            self._fs_pid = (os.getpid(), DVCFileSystem(str(self.registry.root), rev=self.tag, remote_config=_remote_config()))
        return self._fs_pid[1]

    @property
    def shards_path(self) -> str:
        return f"data/{self.dataset}/{SHARDS_DIR}"

    def shards(self) -> list[ShardRef]:
        """From the directory's DVC listing (its `.dir` object: DVC keeps it in its site
        cache index once fetched, so a warm restart needs no S3)."""
        with self._remote_errors(self.shards_path):
            found = self._fs().ls(self.shards_path, detail=True)
        return [
            ShardRef(Path(e["name"]).name, e["name"], cache_key=e["md5"], md5=e["md5"])
            for e in sorted(found, key=lambda e: e["name"])
            if e["name"].endswith(".tar")
        ]

    def recipe_text(self) -> str | None:
        try:
            return self._fs().read_text(f"data/{self.dataset}/recipe.yaml")
        except FileNotFoundError:
            return None

    def open(self, ref: ShardRef) -> tuple[BinaryIO, bool]:
        """(stream, local): local when DVC serves the object from its own cache."""
        with self._remote_errors(ref.location):
            stream = self._fs().open(ref.location)
        return stream, isinstance(stream, io.BufferedReader)

    @contextmanager
    def _remote_errors(self, path: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, NoCredentialsError

        try:
            yield
        except NoCredentialsError:
            raise LoaderError(
                f"cannot read {path} of {self.tag} from S3: no credentials; set {ACCESS_KEY_VAR} and "
                f"{SECRET_KEY_VAR} (and {ENDPOINT_VAR} for a non-AWS endpoint)"
            ) from None
        except FileNotFoundError:
            raise LoaderError(
                f"{path} of {self.tag}: not found (not tracked at that tag, or in neither DVC's cache nor the remote)"
            ) from None
        except (OSError, BotoCoreError) as exc:
            raise LoaderError(
                f"cannot read {path} of {self.tag} from S3 ({type(exc).__name__}: {exc}); check {ACCESS_KEY_VAR}, "
                f"{SECRET_KEY_VAR} and {ENDPOINT_VAR}"
            ) from None


def _remote_config() -> dict[str, str]:
    """The DVC remote settings of this environment's S3 (endpoint, region, credentials);
    empty when none is configured (DVC's cache may still hold every object)."""
    try:
        storage = settings.resolve_storage()
    except StorageError:
        return {}
    config = {"region": storage.region}
    if storage.endpoint_url:
        config["endpointurl"] = storage.endpoint_url
    if storage.access_key and storage.secret_key:
        config.update(access_key_id=storage.access_key, secret_access_key=storage.secret_key)
    return config


class _LiveRun:
    """The durable shards of a run in progress, as its feed announces them."""

    def __init__(self, registry_root: Path, dataset: str, poll_s: float, timeout_s: float, consumer: str) -> None:
        """Follow the run in progress; a trainer started first waits (up to `timeout_s`)
        for the run to start, rather than replaying a run that already finished."""
        deadline = time.monotonic() + timeout_s
        while (feed := read_feed(registry_root, dataset)) is None or feed.done:
            if time.monotonic() > deadline:
                raise LoaderError(
                    f"no running live feed for dataset {dataset!r} in {registry_root} within {timeout_s:g} s "
                    f"(live_timeout_s): start its run (it writes .synthfactory/live/{dataset}/feed.json); "
                    "a finished run is read as a release (version=…)"
                )
            time.sleep(poll_s)
        self.registry_root, self.dataset = registry_root, dataset
        self.classes = tuple(feed.classes) if feed.classes else None
        self.run_id, self.total_shards = feed.run_id, feed.total_shards
        self.poll_s, self.timeout_s, self.consumer = poll_s, timeout_s, consumer
        self.label = f"live run {feed.run_id} of {dataset} in {registry_root}"

    def planned_names(self) -> list[str]:
        return [shard_name(self.dataset, index) for index in range(self.total_shards)]

    def open(self, ref: ShardRef) -> tuple[BinaryIO, bool]:
        try:
            return open(ref.location, "rb"), False
        except FileNotFoundError:
            raise LoaderError(f"shard {ref.name} of {self.label} is gone from {ref.location}") from None


def _raise_if_failed(feed: Any) -> None:
    if feed.state == "failed":
        raise LoaderError(f"run {feed.run_id} of {feed.dataset} failed: {feed.message or 'no message'}")


# -- splitting work between consumers ---------------------------------------------------


def consumer_share(position: int, shards: int, consumer: int, consumers: int) -> tuple[int, int] | None:
    """Which samples of the shard at `position` (of `shards`) `consumer` reads, as
    (stride, offset) over the shard's samples, or None when it reads none of them.

    With at least as many shards as consumers each shard goes whole to one consumer
    (round robin); with fewer, the consumers of one shard take every stride-th sample.
    """
    if shards >= consumers:
        return (1, 0) if position % consumers == consumer else None
    if position != consumer % shards:
        return None
    return len(range(position, consumers, shards)), consumer // shards


def consumer_index(rank: int, world_size: int, worker: int) -> int:
    """This consumer's number among world_size × workers: ranks vary fastest, so the
    round-robin remainder spreads over ranks (they differ by at most one shard)."""
    return worker * world_size + rank


def _distributed_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
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


# -- decoding ---------------------------------------------------------------------------


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


def _classes_of(recipe_text: str | None) -> tuple[str, ...] | None:
    """The recipe's `generator.params.classes`, if it has one."""
    if not recipe_text:
        return None
    classes = ((yaml.safe_load(recipe_text) or {}).get("generator") or {}).get("params", {}).get("classes")
    return tuple(classes) if classes else None


# -- the dataset ------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """Samples of a release or live run; see `load`. Call `set_epoch` before each epoch."""

    def __init__(
        self,
        source: _ReleaseDirectory | _DvcRelease | _LiveRun,
        shards: list[ShardRef] | None,
        names: list[str],
        *,
        decode: str,
        fields: tuple[str, ...] | None,
        classes: tuple[str, ...] | None,
        shuffle: bool,
        seed: int,
        shuffle_buffer: int,
        rank: int,
        world_size: int,
        cache: ShardCache | None,
    ) -> None:
        self.source = source
        self._shards = {ref.name: ref for ref in shards} if shards is not None else None
        self.shard_names = names
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
    def live(self) -> bool:
        return isinstance(self.source, _LiveRun)

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
        raw = self._live_samples(consumer, consumers) if self.live else self._release_samples(consumer, consumers, epoch)
        if self.shuffle_buffer > 1:
            raw = _buffer_shuffled(raw, self.shuffle_buffer, random.Random(f"{self.seed}:{epoch}:{consumer}"))
        for key, files, shard in raw:
            yield self._decoded(key, files, shard)

    def _release_samples(self, consumer: int, consumers: int, epoch: int) -> Iterator[tuple[str, dict[str, bytes], str]]:
        order = list(self.shard_names)
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        for position, name in enumerate(order):
            share = consumer_share(position, len(order), consumer, consumers)
            if share is not None:
                yield from self._read(self._shards[name], *share)  # type: ignore[index]

    def _live_samples(self, consumer: int, consumers: int) -> Iterator[tuple[str, dict[str, bytes], str]]:
        """Follow the feed: take this consumer's share of the selected shards in feed
        order, report the feed position reached (every earlier shard is done for this
        consumer), and poll when caught up, until the run finishes."""
        live: _LiveRun = self.source  # type: ignore[assignment]
        reader = FeedReader(live.registry_root, live.dataset, consumer=f"{live.consumer}-{consumer}")
        selected = set(self.shard_names)
        position, selected_seen, reported = 0, 0, None
        last_news = last_report = time.monotonic()
        feed = None
        try:
            while True:
                if feed is None:  # read again after each shard read, and on each poll
                    feed = reader.feed()
                    if feed is None or feed.run_id != live.run_id:
                        raise LoaderError(f"the feed of {live.label} was replaced by another run")
                    _raise_if_failed(feed)
                if position < len(feed.shards):
                    entry = feed.shards[position]
                    share = None
                    if entry.name in selected:
                        share = consumer_share(selected_seen, len(selected), consumer, consumers)
                        selected_seen += 1
                    if share is not None:
                        reader.report(live.run_id, position)
                        ref = ShardRef(entry.name, entry.path, f"live-{live.run_id}-{entry.name}", samples=entry.samples)
                        for sample in self._read(ref, *share):
                            if time.monotonic() - last_report > HEARTBEAT_S:
                                reader.report(live.run_id, position)
                                last_report = time.monotonic()
                            yield sample
                        feed = None
                    position += 1
                    last_news = time.monotonic()
                    continue
                if position != reported or time.monotonic() - last_report > HEARTBEAT_S:
                    reader.report(live.run_id, position)
                    reported, last_report = position, time.monotonic()
                if feed.done:
                    return
                if time.monotonic() - last_news > live.timeout_s:
                    raise LoaderError(
                        f"{live.label}: no new shard for {live.timeout_s:.0f} s (live_timeout_s) after "
                        f"{len(feed.shards)} of {feed.total_shards}; is the run still alive?"
                    )
                time.sleep(live.poll_s)
                feed = None
        finally:
            reader.leave()

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
        if ref.cache_key is None:
            with open(ref.location, "rb") as local:
                yield local
            return
        cached = self.cache.open(ref.cache_key) if self.cache else None
        if cached is not None:
            with cached:
                yield cached
            return
        source, local = self.source.open(ref)  # type: ignore[union-attr]
        with source:
            if local:
                yield source
                return
            size = source.seek(0, os.SEEK_END)
            source.seek(0)
            writer = self.cache.reserve(ref.cache_key, size) if self.cache else None
            fetch = _Fetch(source, size, ref.name, ref.md5, writer)
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


# -- entry points -----------------------------------------------------------------------


def resolve_tag(registry: DataRegistry, dataset: str, version: int | str | None) -> str:
    """`version` (N, "vN", "<dataset>@vN", or None for the latest) as an existing tag."""
    releases = registry.tags(dataset)
    if not releases:
        known = sorted({tag.rpartition("@v")[0] for tag in registry.tags()})
        raise LoaderError(
            f"unknown dataset {dataset!r}: registry {registry.root} has no {dataset}@vN tag; "
            f"datasets released there: {', '.join(known) or 'none'}"
        )
    if version is None:
        return releases[-1]
    text = str(version)
    match = re.fullmatch(rf"(?:{re.escape(dataset)}@)?v?(\d+)", text)
    if not match:
        raise LoaderError(f"version={version!r}: give N, 'vN' or '{dataset}@vN'")
    tag = f"{dataset}@v{int(match.group(1))}"
    if tag not in releases:
        raise LoaderError(f"unknown version {version!r} of {dataset!r} in {registry.root}; released: {', '.join(releases)}")
    return tag


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
    """
    if decode not in DECODE_MODES:
        raise LoaderError(f"decode={decode!r}: choose one of {', '.join(DECODE_MODES)}")
    if fields is not None and (isinstance(fields, str) or not fields):
        raise LoaderError(f"fields={fields!r}: give a non-empty list such as ['png', 'label']")
    if shuffle_buffer < 0 or cache_bytes < 0:
        raise LoaderError(f"shuffle_buffer={shuffle_buffer} and cache_bytes={cache_bytes} must be >= 0")
    rank, world_size = _distributed_rank(rank, world_size)
    cache = ShardCache(Path(cache_dir) if cache_dir else default_cache_dir(), cache_bytes) if cache_bytes else None
    root = Path(registry).resolve()
    source: _ReleaseDirectory | _DvcRelease | _LiveRun
    shards: list[ShardRef] | None
    if live:
        if version is not None:
            raise LoaderError(f"version={version!r} with live=True: a live run is not a release yet; drop one")
        source = _LiveRun(root, dataset, poll_s, live_timeout_s, consumer or default_consumer())
        shards, names, recipe_text = None, source.planned_names(), None
    elif (root / SHARDS_DIR).is_dir():
        if version is not None:
            raise LoaderError(f"version={version!r} with release directory {root}: the directory is one version; drop it")
        source = _ReleaseDirectory(root)
        recipe_text = source.recipe_text()
        released_as = (yaml.safe_load(recipe_text) or {}).get("name") if recipe_text else None
        if released_as not in (None, dataset):
            raise LoaderError(f"dataset {dataset!r}: release directory {root} holds {released_as!r}")
        shards = source.shards()
        names = [ref.name for ref in shards]
    else:
        try:
            repo = DataRegistry.existing(root)
        except RegistryError as exc:
            raise LoaderError(f"registry={str(registry)!r}: {exc}; or give a release directory (one with {SHARDS_DIR}/)") from None
        source = _DvcRelease(repo, dataset, resolve_tag(repo, dataset, version))
        shards = source.shards()
        names = [ref.name for ref in shards]
        recipe_text = source.recipe_text()
    if not live and not names:
        raise LoaderError(f"{source.label} has no shards")
    return ShardDataset(
        source, shards, names,
        decode=decode,
        fields=tuple(fields) if fields is not None else None,
        classes=tuple(classes) if classes else (source.classes if live else _classes_of(recipe_text)),
        shuffle=shuffle, seed=seed, shuffle_buffer=shuffle_buffer,
        rank=rank, world_size=world_size, cache=cache,
    )  # fmt: skip


def iter_samples(dataset: str, version: int | str | None = None, registry: str | Path = ".", **options: Any) -> Iterator[dict[str, Any]]:
    """The samples of `load(...)` as a plain iterator, for code without a DataLoader."""
    return iter(load(dataset, version, registry, **options))
