"""Shard format: WebDataset tar shards plus Parquet manifest fragments.

A shard is a tar of samples, each sample stored as members ``<key>.<ext>`` (``png``,
``json``, ``txt``), written in key order with fixed headers (mtime 0, uid 0, mode 0644)
so the same samples give the same bytes. Shards are written to a temporary name, fsynced
and renamed, so a reader never sees a half-written shard.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthfactory.checks import Check
from synthfactory.generators import Generator, Rejection, Sample
from synthfactory.generators.base import derive_seed

#: release sub-directories: accepted samples, and samples a check refused (kept for inspection)
SHARDS_DIR, REJECTED_DIR = "shards", "rejected"
#: columns every manifest has, whatever the generator
CORE_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "shard": pa.string(),
    "index": pa.int64(),
    "seed": pa.int64(),
    "group": pa.string(),
    "caption": pa.string(),
    "generator": pa.string(),
    "generator_version": pa.string(),
    "payload": pa.string(),
    "sha256": pa.string(),
    "bytes": pa.int64(),
}
REJECTED_SCHEMA = pa.schema(
    {
        "key": pa.string(),
        "shard": pa.string(),
        "index": pa.int64(),
        "seed": pa.int64(),
        "group": pa.string(),
        "caption": pa.string(),
        "stage": pa.string(),
        "reason": pa.string(),
    }
)


def manifest_schema(generator: Generator, checks: Iterable[Check] = ()) -> pa.Schema:
    """Core columns, then the generator's, then each check's: fixed types, stable bytes."""
    columns = {**CORE_COLUMNS, **generator.columns}
    for check in checks:
        columns.update(check.columns)
    return pa.schema(columns)


def sample_key(index: int) -> str:
    """WebDataset key: fixed width so lexical order is sample order; no dots allowed."""
    return f"{index:010d}"


def sample_seed(recipe_seed: int, index: int) -> int:
    """Per-sample seed: a hash of (recipe seed, index), independent of sharding and workers."""
    return derive_seed(recipe_seed, index)


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


def _atomic_write(path: Path, data: bytes | None = None, table: pa.Table | None = None) -> None:
    """Write to a sibling temp file, fsync, rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    if table is not None:
        pq.write_table(table, tmp, compression="zstd")
    else:
        tmp.write_bytes(data or b"")
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def write_shard(
    stage_dir: Path,
    name: str,
    fragments_dir: Path,
    samples: list[Sample],
    rejections: list[Rejection],
    generator: Generator,
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
            "generator": generator.plugin_name,
            "generator_version": generator.version,
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
    _atomic_write(fragment_path(fragments_dir, name, "manifest"), table=manifest)
    _atomic_write(fragment_path(fragments_dir, name, "rejected"), table=rejected)


def write_tar(path: Path, samples: list[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, tar_bytes((s.slot.key, s.files) for s in samples))


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
    _atomic_write(aside, tar_bytes(sorted(moved, key=lambda member: member[0])))
    _atomic_write(shard, tar_bytes(kept))


def fragment_path(fragments_dir: Path, shard: str, kind: str) -> Path:
    return fragments_dir / f"{Path(shard).stem}.{kind}.parquet"


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
            files[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if key is not None:
        yield key, files
