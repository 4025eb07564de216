"""Shard format: WebDataset tar shards plus Parquet manifest fragments.

A shard is a tar of samples, each sample stored as members ``<key>.<ext>`` (``png``,
``json``, ``txt``), written in key order with fixed headers (mtime 0, uid 0, mode 0644)
so the same samples give the same bytes. Files are replaced atomically, so a reader never
sees a half-written shard. This is the floor of the house: it knows samples and Arrow
schemas, and nothing of plug-ins, recipes or orchestration.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from synthfactory.files import atomic_write
from synthfactory.samples import Rejection, Sample

#: release sub-directories: accepted samples, and samples a check refused (kept for inspection)
SHARDS_DIR, REJECTED_DIR = "shards", "rejected"
#: what names a sample, in the manifest and in the list of rejected samples
SAMPLE_ID_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "shard": pa.string(),
    "index": pa.int64(),
    "seed": pa.int64(),
    "group": pa.string(),
    "caption": pa.string(),
}
#: columns every manifest has, whatever the generator
CORE_COLUMNS: dict[str, pa.DataType] = {
    **SAMPLE_ID_COLUMNS,
    "generator": pa.string(),
    "generator_version": pa.string(),
    "payload": pa.string(),
    "sha256": pa.string(),
    "bytes": pa.int64(),
}
REJECTED_SCHEMA = pa.schema({**SAMPLE_ID_COLUMNS, "stage": pa.string(), "reason": pa.string()})


def manifest_schema(*column_maps: Mapping[str, pa.DataType]) -> pa.Schema:
    """Core columns, then each map's in order (generator, then checks): fixed types, stable bytes."""
    columns = dict(CORE_COLUMNS)
    for extra in column_maps:
        columns.update(extra)
    return pa.schema(columns)


def shard_name(dataset: str, shard_index: int) -> str:
    return f"{dataset}-{shard_index:06d}.tar"


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds samples [start, stop)."""

    index: int
    name: str
    start: int
    stop: int


def plan_shards(dataset: str, samples: int, shard_size: int) -> list[ShardPlan]:
    return [
        ShardPlan(i, shard_name(dataset, i), start, min(start + shard_size, samples))
        for i, start in enumerate(range(0, samples, shard_size))
    ]


def tar_bytes(members: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """(key, {ext: bytes}) pairs as a deterministic USTAR tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in members:
            for ext in sorted(files):
                data = files[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_shard(
    stage_dir: Path,
    name: str,
    fragments_dir: Path,
    samples: list[Sample],
    rejections: list[Rejection],
    generator: str,
    generator_version: str,
    schema: pa.Schema,
) -> None:
    """Write shards/<name> (and rejected/<name> for refused samples that have content),
    then the manifest fragments: the shard's durable record of what it holds."""
    write_tar(stage_dir / SHARDS_DIR / name, samples)
    refused = [r.sample for r in rejections if r.sample is not None]
    if refused:
        write_tar(stage_dir / REJECTED_DIR / name, refused)
    rows: dict[str, list] = {column: [] for column in schema.names}
    for sample in samples:
        payload = sample.files[sample.payload]
        core = {
            "key": sample.slot.key,
            "shard": name,
            "index": sample.slot.index,
            "seed": sample.slot.seed,
            "group": sample.group or sample.slot.key,
            "caption": sample.caption,
            "generator": generator,
            "generator_version": generator_version,
            "payload": sample.payload,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "bytes": sum(len(b) for b in sample.files.values()),
        }
        for column, values in rows.items():
            values.append(core[column] if column in core else sample.columns.get(column))
    manifest = pa.table(rows, schema=schema)
    rejected = pa.table(
        {
            "key": [r.slot.key for r in rejections],
            "shard": [name] * len(rejections),
            "index": [r.slot.index for r in rejections],
            "seed": [r.slot.seed for r in rejections],
            "group": [(r.sample.group or r.slot.key) if r.sample else r.slot.key for r in rejections],
            "caption": [r.sample.caption if r.sample else None for r in rejections],
            "stage": [r.stage for r in rejections],
            "reason": [r.reason for r in rejections],
        },
        schema=REJECTED_SCHEMA,
    )
    fragments_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(fragment_path(fragments_dir, name, "manifest"), parquet_bytes(manifest))
    atomic_write(fragment_path(fragments_dir, name, "rejected"), parquet_bytes(rejected))


def write_tar(path: Path, samples: list[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tar_bytes((s.slot.key, s.files) for s in samples))


def set_aside(stage_dir: Path, name: str, keys: set[str]) -> None:
    """Move samples `keys` of shard `name` from shards/ to rejected/ (a dataset-level check
    refused them after the shard was written); both tars stay sorted by key."""
    shard = stage_dir / SHARDS_DIR / name
    aside = stage_dir / REJECTED_DIR / name
    kept, moved = [], []
    for key, files in read_shard(shard):
        (moved if key in keys else kept).append((key, files))
    if aside.exists():
        moved += list(read_shard(aside))
    aside.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(aside, tar_bytes(sorted(moved, key=lambda member: member[0])))
    atomic_write(shard, tar_bytes(kept))


def fragment_path(fragments_dir: Path, shard: str, kind: str) -> Path:
    return fragments_dir / f"{Path(shard).stem}.{kind}.parquet"


#: the largest file of one sample a shard may hold: a member is read whole into memory,
#: so a damaged or hostile shard must not name a size the reader would try to hold
MAX_MEMBER_BYTES = 1 << 30


class ShardFormatError(ValueError):
    """A shard that breaks the format's limits; the message names the member."""


def read_shard(source: Path | BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample, grouping consecutive members like WebDataset.
    `source` is a path or a binary stream (S3, a cache file), read front to back once."""
    key, files = None, {}
    opened = tarfile.open(fileobj=source, mode="r|") if hasattr(source, "read") else tarfile.open(source, mode="r|")
    with opened as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.rpartition("/")[2].partition(".")
            if stem != key and key is not None:
                yield key, files
                files = {}
            key = stem
            if member.size > MAX_MEMBER_BYTES:
                raise ShardFormatError(f"shard member {member.name} holds {member.size} bytes, more than {MAX_MEMBER_BYTES}")
            files[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if key is not None:
        yield key, files
