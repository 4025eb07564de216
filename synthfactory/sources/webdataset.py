"""WebDataset tar shards: a folder of ``*.tar`` files (a release's ``data/<dataset>/shards``)
or one tar.

Members group into samples by WebDataset key: the member's path up to the first dot of
its file name; the rest is the extension. The label is a ``cls`` member, else the
``label`` field of the ``json`` member (the factory's own shards carry it there); the
caption is the ``txt`` member. The index (each sample's members' offsets and sizes) is
made once from the tar headers; reads then seek straight to the members.
"""

from __future__ import annotations

import contextlib
import functools
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydantic import Field, ValidationInfo

from synthfactory.sources.base import (
    SOURCES,
    Record,
    Source,
    SourceError,
    PinnedSourceParams,
    check_record_bytes,
    check_record_count,
    content_hash,
    data_path,
    member_extension,
    member_text,
    record_key,
)


def shard_files(target: Path, given: str) -> list[Path]:
    """The shards `given` names: the folder's ``*.tar`` files (sorted), or the file itself."""
    if not target.is_dir():
        return [target]
    shards = sorted(path for path in target.iterdir() if path.suffix == ".tar" and not path.name.startswith("."))
    if not shards:
        raise SourceError(f"path: {given!r} holds no .tar shards")
    return shards


@dataclass(frozen=True)
class TarSample:
    """Where one sample's members lie: its shard (position in the shard list), its key
    there, and each member's (offset, size) by extension."""

    shard: int
    key: str
    members: dict[str, tuple[int, int]]


def tar_index(shard: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """Each sample's members in `shard` by WebDataset key, in tar order, from the headers
    alone (tarfile seeks past the data). Members without an extension carry no sample."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = posixpath.normpath(member.name).rpartition("/")
                stem, dot, ext = name.partition(".")
                if not stem or not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                members = samples.setdefault(key, {})
                ext = member_extension(ext)
                if ext in members:
                    raise SourceError(f"{shard.name}: sample {key} has two .{ext} members")
                members[ext] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as exc:
        raise SourceError(f"{shard.name}: not a readable tar ({exc})") from None
    return samples


class WebDatasetParams(PinnedSourceParams):
    path: str = Field(min_length=1, description="a folder of .tar shards, or one .tar, relative to the recipe")

    def current_revision(self, info: ValidationInfo) -> str:
        """Hash of the shards; each checked to stay in the registry."""
        target = data_path("path", self.path, info)
        shards = shard_files(target, self.path)
        if target.is_dir():
            for shard in shards:
                data_path("path", f"{self.path}/{shard.name}", info, directory=False)
        return content_hash(shards, target if target.is_dir() else target.parent)


@SOURCES.register("webdataset")
class WebDataset(Source):
    Params = WebDatasetParams
    version = "1"
    code = ("synthfactory.sources.base",)
    params: WebDatasetParams

    @functools.cached_property
    def _shards(self) -> list[Path]:
        return shard_files(self.resolve(self.params.path), self.params.path)

    @functools.cached_property
    def _samples(self) -> list[TarSample]:
        """Every sample's member locations, shard by shard, made once per process."""
        samples: list[TarSample] = []
        shard_of: dict[str, int] = {}  # record key -> shard, to refuse a sample in two places
        for number, shard in enumerate(self._shards):
            for key, members in tar_index(shard).items():
                record = record_key(key)
                if record in shard_of:
                    other = self._shards[shard_of[record]].name
                    raise SourceError(f"{shard.name}: sample {key} is record {record}, which {other} holds too")
                shard_of[record] = number
                check_record_bytes(f"{shard.name}: sample {key}", sum(size for _, size in members.values()))
                samples.append(TarSample(number, key, members))
            check_record_count(self.params.path, len(samples))
        return samples

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, indices: Sequence[int]) -> list[Record]:
        wanted = [self._samples[index] for index in indices]
        with self._streams() as stream:
            return [self._record(sample, stream(sample)) for sample in wanted]

    def uri(self) -> str:
        return self.params.path

    @functools.cached_property
    def _labels(self) -> tuple[str, ...] | None:
        """Read from the small cls and json members only."""
        found: set[str] = set()
        with self._streams() as stream:
            for sample in self._samples:
                members = {ext: self._member(sample, ext, stream(sample)) for ext in ("cls", "json") if ext in sample.members}
                label = self._label(sample, members)
                if label is not None:
                    found.add(label)
        return tuple(sorted(found)) or None

    def labels(self) -> tuple[str, ...] | None:
        return self._labels

    def _record(self, sample: TarSample, stream: BinaryIO) -> Record:
        files = {ext: self._member(sample, ext, stream) for ext in sample.members}
        caption = member_text(self._where(sample), "its txt member", files["txt"]) if "txt" in files else ""
        return Record(record_key(sample.key), files, self._label(sample, files), caption)

    def _member(self, sample: TarSample, ext: str, stream: BinaryIO) -> bytes:
        offset, size = sample.members[ext]
        stream.seek(offset)
        data = stream.read(size)
        if len(data) < size:
            raise SourceError(f"{self._where(sample)}: its .{ext} member is cut short ({len(data)} of {size} bytes); the shard changed")
        return data

    def _label(self, sample: TarSample, files: dict[str, bytes]) -> str | None:
        """The `cls` member, else the json member's `label` field."""
        if "cls" in files:
            return member_text(self._where(sample), "its cls member", files["cls"]) or None
        if "json" not in files:
            return None
        try:
            label = json.loads(files["json"]).get("label")
        except (ValueError, AttributeError):
            raise SourceError(f"{self._where(sample)}: its json member is not a JSON object") from None
        return None if label is None else str(label)

    @contextlib.contextmanager
    def _streams(self) -> Iterator[Callable[[TarSample], BinaryIO]]:
        """A sample's shard, opened on first need and kept open until the end of the block."""
        with contextlib.ExitStack() as stack:
            opened: dict[int, BinaryIO] = {}

            def stream(sample: TarSample) -> BinaryIO:
                if sample.shard not in opened:
                    shard = self._shards[sample.shard]
                    try:
                        opened[sample.shard] = stack.enter_context(open(shard, "rb"))
                    except OSError as exc:
                        raise SourceError(f"{shard.name}: cannot read it: {exc.strerror or exc}") from None
                return opened[sample.shard]

            yield stream

    def _where(self, sample: TarSample) -> str:
        return f"{self._shards[sample.shard].name}: sample {sample.key}"
