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
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthfactory.generators import Generator, Rejection, Sample

#: columns every manifest has, whatever the generator
CORE_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "shard": pa.string(),
    "index": pa.int64(),
    "seed": pa.int64(),
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
        "stage": pa.string(),
        "reason": pa.string(),
    }
)


def manifest_schema(generator: type[Generator]) -> pa.Schema:
    return pa.schema({**CORE_COLUMNS, **generator.columns})


def sample_key(index: int) -> str:
    """WebDataset key: fixed width so lexical order is sample order; no dots allowed."""
    return f"{index:010d}"


def sample_seed(recipe_seed: int, index: int) -> int:
    """Per-sample seed: a hash of (recipe seed, index), independent of sharding and workers."""
    digest = hashlib.blake2b(b"%d:%d" % (recipe_seed, index), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


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


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(sample.files):
                data = sample.files[ext]
                info = tarfile.TarInfo(f"{sample.slot.key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_shard(
    path: Path,
    fragments_dir: Path,
    samples: list[Sample],
    rejections: list[Rejection],
    generator: type[Generator],
) -> None:
    """Write the tar, then its manifest fragments (the shard's durable record of what it holds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, tar_bytes(samples))
    rows = {name: [] for name in manifest_schema(generator).names}
    for sample in samples:
        payload = sample.files[sample.payload]
        core = {
            "key": sample.slot.key,
            "shard": path.name,
            "index": sample.slot.index,
            "seed": sample.slot.seed,
            "caption": sample.caption,
            "generator": generator.plugin_name,
            "generator_version": generator.version,
            "payload": sample.payload,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "bytes": sum(len(b) for b in sample.files.values()),
        }
        for name, column in rows.items():
            column.append(core[name] if name in core else sample.columns.get(name))
    manifest = pa.table(rows, schema=manifest_schema(generator))
    rejected = pa.table(
        {
            "key": [r.slot.key for r in rejections],
            "shard": [path.name] * len(rejections),
            "index": [r.slot.index for r in rejections],
            "seed": [r.slot.seed for r in rejections],
            "stage": [r.stage for r in rejections],
            "reason": [r.reason for r in rejections],
        },
        schema=REJECTED_SCHEMA,
    )
    fragments_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(fragment_path(fragments_dir, path.name, "manifest"), table=manifest)
    _atomic_write(fragment_path(fragments_dir, path.name, "rejected"), table=rejected)


def fragment_path(fragments_dir: Path, shard: str, kind: str) -> Path:
    return fragments_dir / f"{Path(shard).stem}.{kind}.parquet"


def read_shard(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample, grouping consecutive members like WebDataset."""
    key, files = None, {}
    with tarfile.open(path, mode="r") as tar:
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
