"""Where a dataset's shards come from, behind one interface (`ShardSource`):

* `ReleaseDirectory`: a release directory on local disk (``data/<dataset>/`` of a
  checkout, or a ``synthfactory pull`` / ``dvc get`` target), read in place;
* `DvcRelease`: a tagged release of a registry, read through ``dvc.api.DVCFileSystem``
  at the tag: from DVC's local cache when it has the object, else streamed from S3;
* `LiveRun`: the shards a run in progress has made durable, in the order its feed
  lists them (see `synthfactory.live`), reporting progress so a slow reader holds the
  run back.

A source says which shards it has, plans which of them a consumer reads in an epoch
(`schedule`), opens one, and names the manifest file that says what each shard holds
(its partition, or a legacy release's single manifest; the loader checks every sample
against it before yielding it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import yaml

from synthfactory import settings
from synthfactory.files import atomic_write_json
from synthfactory.live import FeedReader, read_feed
from synthfactory.loader.errors import LoaderError
from synthfactory.registry import DataRegistry
from synthfactory.shards import LEGACY_MANIFEST, MANIFEST_DIR, SHARDS_DIR, has_manifest, manifest_file, manifest_record, shard_name
from synthfactory.storage import ACCESS_KEY_VAR, ENDPOINT_VAR, SECRET_KEY_VAR
from synthfactory.tags import version_of

#: how often a live reader refreshes its progress file while reading or waiting
HEARTBEAT_S = 10.0


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
    manifest: str | None = None  # live feed: the shard's own manifest fragment


#: a shard one consumer reads: (shard, stride, offset) over the shard's samples
Assignment = tuple[ShardRef, int, int]
#: what `open` returned: the source's own file (read in place), a local copy of it that
#: can be dropped and fetched again (DVC's cache), or a remote stream (read through the
#: loader's cache, its md5 checked)
Origin = Literal["source", "copy", "remote"]


class ShardSource(Protocol):
    label: str

    def shard_names(self) -> list[str]:
        """Every shard of the dataset (a live run: every shard it plans)."""

    def classes(self) -> tuple[str, ...] | None:
        """The recipe's label set, if it has one (labels become its indices)."""

    def schedule(self, names: Sequence[str], consumer: int, consumers: int, order: random.Random | None) -> Iterator[Assignment]:
        """The shards of `names` that `consumer` (of `consumers`) reads this epoch, in
        order; `order` shuffles them (None: as listed)."""

    def open(self, ref: ShardRef) -> tuple[BinaryIO, Origin]:
        """The shard's bytes and where they come from."""

    def manifest_ref(self, shard: str) -> ShardRef | None:
        """The manifest file that records shard `shard`, opened like a shard; None when
        each shard names its own (`ShardRef.manifest`)."""

    def drop_copy(self, ref: ShardRef, stream: BinaryIO) -> None:
        """Remove the damaged local copy `stream` (a "copy" origin), so the next `open`
        fetches the shard again."""


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


def _classes_of(recipe_text: str | None) -> tuple[str, ...] | None:
    """The recipe's `generator.params.classes`, if it has one."""
    if not recipe_text:
        return None
    classes = ((yaml.safe_load(recipe_text) or {}).get("generator") or {}).get("params", {}).get("classes")
    return tuple(classes) if classes else None


class _Release:
    """A finished release: every shard known up front, split round robin per epoch."""

    label: str

    def __init__(self, refs: list[ShardRef], recipe_text: str | None, manifests: dict[str, ShardRef]) -> None:
        """`manifests`: shard name -> the manifest file that records it."""
        self.refs = {ref.name: ref for ref in refs}
        self._manifests = manifests
        self._classes = _classes_of(recipe_text)
        self.recipe_name = (yaml.safe_load(recipe_text) or {}).get("name") if recipe_text else None

    def shard_names(self) -> list[str]:
        return list(self.refs)

    def classes(self) -> tuple[str, ...] | None:
        return self._classes

    def manifest_ref(self, shard: str) -> ShardRef:
        return self._manifests[shard]

    def schedule(self, names: Sequence[str], consumer: int, consumers: int, order: random.Random | None) -> Iterator[Assignment]:
        ordered = list(names)
        if order is not None:
            order.shuffle(ordered)
        for position, name in enumerate(ordered):
            share = consumer_share(position, len(ordered), consumer, consumers)
            if share is not None:
                yield self.refs[name], *share


class ReleaseDirectory(_Release):
    """Shards of a release directory on local disk, read in place."""

    def __init__(self, path: Path) -> None:
        recipe = path / "recipe.yaml"
        if not has_manifest(path):
            raise LoaderError(
                f"release directory {path} has no manifest ({MANIFEST_DIR}/ or {LEGACY_MANIFEST}): nothing to check its shards against"
            )
        shards = sorted((path / SHARDS_DIR).glob("*.tar"))
        records = {shard.name: manifest_file(path, shard.name) for shard in shards}
        super().__init__(
            [ShardRef(shard.name, str(shard)) for shard in shards],
            recipe.read_text() if recipe.exists() else None,
            {name: ShardRef(record.relative_to(path).as_posix(), str(record)) for name, record in records.items()},
        )
        self.label = str(path)

    def open(self, ref: ShardRef) -> tuple[BinaryIO, Origin]:
        try:
            return open(ref.location, "rb"), "source"
        except FileNotFoundError:
            raise LoaderError(f"{ref.name} of {self.label} is missing") from None

    def drop_copy(self, ref: ShardRef, stream: BinaryIO) -> None:
        raise AssertionError("a release directory is read in place: it has no copies")


class DvcRelease(_Release):
    """A tagged release of a registry, read through DVC's filesystem at that tag.

    Each process (DataLoader workers included) opens its own DVC filesystem, with the S3
    settings of its environment (`settings.resolve_storage()`) passed as that in-memory
    DVC's remote config: credentials never go to os.environ, a config file, a pickled
    copy of this object or a message.
    """

    def __init__(self, registry: DataRegistry, dataset: str, tag: str, listing_dir: Path | None = None) -> None:
        """`listing_dir` keeps what the tag's DVC listing said (shards, md5s, recipe),
        named by the tag's commit: a warm restart then opens no DVC repo at all."""
        self.registry, self.dataset, self.tag = registry, dataset, tag
        self.label = f"{tag} in {registry.root}"
        self._fs_pid: tuple[int, Any] | None = None
        commit = registry.git("rev-parse", "--verify", "--end-of-options", f"{tag}^{{commit}}").strip()
        saved = listing_dir / f".listing-{dataset}-{commit}.json" if listing_dir else None
        listing = _read_listing(saved) if saved else None
        if listing is None:
            listing = self._listing()
            if saved:
                atomic_write_json(saved, {"listing": listing, "sha256": _listing_digest(listing)})
        refs = [ShardRef(name, f"data/{dataset}/{SHARDS_DIR}/{name}", cache_key=md5, md5=md5) for name, md5 in listing["shards"]]
        records = listing["manifest"]
        partitioned = LEGACY_MANIFEST not in records
        manifests = {}
        for ref in refs:
            record = manifest_record(ref.name, partitioned)
            md5 = records.get(record)  # none: the shard has no partition, and reading it says so
            manifests[ref.name] = ShardRef(record, f"data/{dataset}/{record}", cache_key=md5, md5=md5)
        super().__init__(refs, listing["recipe"], manifests)

    def _listing(self) -> dict[str, Any]:
        """The shards (name, md5), the md5 of each manifest file (its partitions, or a legacy
        release's single file) and the recipe at the tag, from DVC (its index keeps the
        `.dir` listings, so a warm restart needs no S3)."""
        release = f"data/{self.dataset}"
        shards_path, partitions_path = f"{release}/{SHARDS_DIR}", f"{release}/{MANIFEST_DIR}"
        with self._remote_errors(shards_path):
            found = self._fs().ls(shards_path, detail=True)
            if self._fs().isdir(partitions_path):
                records = {f"{MANIFEST_DIR}/{Path(e['name']).name}": e["md5"] for e in self._fs().ls(partitions_path, detail=True)}
            else:
                records = {LEGACY_MANIFEST: self._fs().info(f"{release}/{LEGACY_MANIFEST}")["md5"]}
        try:
            recipe_text = self._fs().read_text(f"{release}/recipe.yaml")
        except FileNotFoundError:
            recipe_text = None
        shards = [[Path(e["name"]).name, e["md5"]] for e in sorted(found, key=lambda e: e["name"]) if e["name"].endswith(".tar")]
        return {"shards": shards, "manifest": records, "recipe": recipe_text}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs_pid": None}  # DataLoader workers open their own

    def _fs(self) -> Any:
        from dvc.api import DVCFileSystem

        if self._fs_pid is None or self._fs_pid[0] != os.getpid():
            self._fs_pid = (os.getpid(), DVCFileSystem(str(self.registry.root), rev=self.tag, remote_config=settings.dvc_remote_config()))
        return self._fs_pid[1]

    def open(self, ref: ShardRef) -> tuple[BinaryIO, Origin]:
        """A copy when DVC serves the object from its own cache, else streamed from S3."""
        with self._remote_errors(ref.location):
            stream = self._fs().open(ref.location)
        return stream, "copy" if isinstance(stream, io.BufferedReader) else "remote"

    def drop_copy(self, ref: ShardRef, stream: BinaryIO) -> None:
        """Remove the object from DVC's cache: DVC then streams it from the remote."""
        Path(stream.name).unlink(missing_ok=True)
        self._fs_pid = None  # a fresh filesystem, whose index has not seen the object

    @contextmanager
    def _remote_errors(self, path: str) -> Iterator[None]:
        """S3 and DVC failures as one LoaderError naming what to fix; DVC wraps S3's refusal
        of a listing (a clone without DVC's index) in its own DataIndexDirError."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        from dvc_data.index.index import DataIndexDirError

        try:
            yield
        except (OSError, BotoCoreError, ClientError, DataIndexDirError) as exc:
            causes = _causes(exc)
            if any(isinstance(cause, NoCredentialsError) for cause in causes):
                raise LoaderError(
                    f"cannot read {path} of {self.tag} from S3: no credentials; set {ACCESS_KEY_VAR} and "
                    f"{SECRET_KEY_VAR} (and {ENDPOINT_VAR} for a non-AWS endpoint)"
                ) from None
            refused = next((c for c in causes if isinstance(c, PermissionError) or _auth_error_code(c)), None)
            if refused is not None:
                raise LoaderError(
                    f"cannot read {path} of {self.tag}: S3 refused the credentials ({_auth_error_code(refused) or 'access denied'}); "
                    f"check {ACCESS_KEY_VAR} and {SECRET_KEY_VAR} for {ENDPOINT_VAR}'s endpoint"
                ) from None
            if isinstance(exc, FileNotFoundError):
                raise LoaderError(
                    f"{path} of {self.tag}: not found (not tracked at that tag, or in neither DVC's cache nor the remote)"
                ) from None
            innermost = causes[-1]
            raise LoaderError(
                f"cannot read {path} of {self.tag} from S3 ({type(innermost).__name__}: {innermost}); check "
                f"{ACCESS_KEY_VAR}, {SECRET_KEY_VAR} and {ENDPOINT_VAR}"
            ) from None


#: S3 error codes that mean the credentials are wrong or lack the right
_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"})


def _auth_error_code(exc: BaseException) -> str | None:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    return code if code in _AUTH_CODES else None


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from, outermost first."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain and len(chain) < 20:
        chain.append(nxt)
    return chain


def _listing_digest(listing: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def _read_listing(path: Path) -> dict[str, Any] | None:
    """A saved listing, if it is there, intact and names the manifest's files (one saved
    before the manifest was partitioned has only `manifest_md5`); else it is made again."""
    try:
        saved = json.loads(path.read_text())
        intact = _listing_digest(saved["listing"]) == saved["sha256"]
        return saved["listing"] if intact and "manifest" in saved["listing"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_tag(registry: DataRegistry, dataset: str, version: int | str | None) -> str:
    """`version` (N, "vN", "<dataset>@vN", or None for the latest) as an existing tag."""
    releases = registry.tags(dataset)
    if not releases:
        known = sorted({tag.dataset for tag in registry.release_tags()})
        raise LoaderError(
            f"unknown dataset {dataset!r}: registry {registry.root} has no {dataset}@vN tag; "
            f"datasets released there: {', '.join(known) or 'none'}"
        )
    if version is None:
        return releases[-1]
    number = version_of(version, dataset)
    if number is None:
        raise LoaderError(f"version={version!r}: give N, 'vN' or '{dataset}@vN'")
    tag = f"{dataset}@v{number}"
    if tag not in releases:
        raise LoaderError(f"unknown version {version!r} of {dataset!r} in {registry.root}; released: {', '.join(releases)}")
    return tag


class LiveRun:
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
        self._classes = tuple(feed.classes) if feed.classes else None
        self.run_id, self.total_shards = feed.run_id, feed.total_shards
        self.poll_s, self.timeout_s, self.consumer = poll_s, timeout_s, consumer
        self.label = f"live run {feed.run_id} of {dataset} in {registry_root}"

    def shard_names(self) -> list[str]:
        return [shard_name(self.dataset, index) for index in range(self.total_shards)]

    def classes(self) -> tuple[str, ...] | None:
        return self._classes

    def open(self, ref: ShardRef) -> tuple[BinaryIO, Origin]:
        try:
            return open(ref.location, "rb"), "remote"  # the run's scratch space: copied into the cache as it is read
        except FileNotFoundError:
            raise LoaderError(f"shard {ref.name} of {self.label} is gone from {ref.location}") from None

    def manifest_ref(self, shard: str) -> None:
        return None  # each feed entry names its shard's manifest fragment

    def drop_copy(self, ref: ShardRef, stream: BinaryIO) -> None:
        raise AssertionError("a live run's shards are read from the run itself: they have no copies")

    def schedule(self, names: Sequence[str], consumer: int, consumers: int, order: random.Random | None) -> Iterator[Assignment]:
        """Follow the feed: this consumer's share of the selected shards in feed order
        (`order` does not apply), reporting the feed position reached (every earlier
        shard is done for this consumer) as the run's back-pressure signal, and polling
        when caught up, until the run finishes."""
        reader = FeedReader(self.registry_root, self.dataset, consumer=f"{self.consumer}-{consumer}")
        progress = _Progress(reader, self.run_id)
        selected = set(names)
        position, selected_seen = 0, 0
        last_news = time.monotonic()
        try:
            while True:
                feed = reader.feed()
                if feed is None or feed.run_id != self.run_id:
                    raise LoaderError(f"the feed of {self.label} was replaced by another run")
                if feed.state == "failed":
                    raise LoaderError(f"run {feed.run_id} of {feed.dataset} failed: {feed.message or 'no message'}")
                if position < len(feed.shards):
                    while position < len(feed.shards):
                        entry = feed.shards[position]
                        if entry.name in selected:
                            share = consumer_share(selected_seen, len(selected), consumer, consumers)
                            selected_seen += 1
                            if share is not None:
                                progress.at(position)
                                yield ShardRef(entry.name, entry.path, f"live-{self.run_id}-{entry.name}",
                                               samples=entry.samples, manifest=entry.manifest), *share
                        position += 1
                    last_news = time.monotonic()
                    continue
                progress.at(position)
                if feed.done:
                    return
                if time.monotonic() - last_news > self.timeout_s:
                    raise LoaderError(
                        f"{self.label}: no new shard for {self.timeout_s:.0f} s (live_timeout_s) after "
                        f"{len(feed.shards)} of {feed.total_shards}; is the run still alive?"
                    )
                time.sleep(self.poll_s)
        finally:
            progress.stop()
            reader.leave()


class _Progress:
    """A live reader's position, reported when it moves and every `HEARTBEAT_S` from a
    thread (also while a long shard is being read), so the run knows the reader is alive."""

    def __init__(self, reader: FeedReader, run_id: str) -> None:
        self.reader, self.run_id = reader, run_id
        self.position: int | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="live-heartbeat", daemon=True)
        self._thread.start()

    def at(self, position: int) -> None:
        with self._lock:
            if position != self.position:
                self.position = position
                self.reader.report(self.run_id, position)

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            with self._lock:
                if self.position is not None:
                    self.reader.report(self.run_id, self.position)

    def stop(self) -> None:
        self._stopped.set()
