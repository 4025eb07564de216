"""Shard format: WebDataset tar shards plus Parquet manifest fragments.

A shard is a tar of samples, each sample stored as members ``<key>.<ext>`` (``png``,
``json``, ``txt``), written in key order with fixed headers (mtime 0, uid 0, mode 0644)
so the same samples give the same bytes. Files are replaced atomically, so a reader never
sees a half-written shard. This is the floor of the house: it knows samples and Arrow
schemas, and nothing of plug-ins, recipes or orchestration.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from synthfactory.files import atomic_write
from synthfactory.samples import Rejection, Sample

#: release sub-directories: accepted samples, and samples a check refused (kept for inspection)
SHARDS_DIR, REJECTED_DIR = "shards", "rejected"
#: the release's one row per sample (what each shard holds, with its hashes): a directory
#: of one Parquet partition per shard, so a release that adds a shard stores one new file
MANIFEST_DIR = "manifest"
#: the single-file manifest of releases made before it was partitioned (still read)
LEGACY_MANIFEST = "manifest.parquet"
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
    "sample_sha256": pa.string(),
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


#: manifest rows per Parquet row group: a reader checking one shard decodes a few groups, not the file
MANIFEST_ROW_GROUP = 4096


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=MANIFEST_ROW_GROUP)
    return sink.getvalue().to_pybytes()


def sample_digest(files: Mapping[str, bytes]) -> str:
    """sha256 over every member of a sample (extension, length, bytes; in extension order):
    the manifest's ``sample_sha256``, which readers check each sample against, so a changed
    caption or label is caught as surely as a changed image."""
    digest = hashlib.sha256()
    for ext in sorted(files):
        data = files[ext]
        digest.update(f"{ext}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


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
            "sample_sha256": sample_digest(sample.files),
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


def manifest_record(shard: str, partitioned: bool = True) -> str:
    """Where, relative to the release directory, the manifest rows of shard `shard` are:
    its partition (named and zero-padded like the shard, so name order is shard order),
    or a legacy release's single file."""
    return f"{MANIFEST_DIR}/{Path(shard).stem}.parquet" if partitioned else LEGACY_MANIFEST


def manifest_file(release_dir: Path, shard: str) -> Path:
    """The file in `release_dir` that records shard `shard` (either layout)."""
    return release_dir / manifest_record(shard, partitioned=(release_dir / MANIFEST_DIR).is_dir())


def has_manifest(release_dir: Path) -> bool:
    """Whether `release_dir` holds a manifest, in either layout."""
    return (release_dir / MANIFEST_DIR).is_dir() or (release_dir / LEGACY_MANIFEST).is_file()


def read_manifest(release_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """The release's whole manifest in shard order: its partitions concatenated, or the
    single file of a release made before the manifest was partitioned (an older tag
    pulled with `dvc get` or checked out keeps working). FileNotFoundError if it has neither."""
    partitions = release_dir / MANIFEST_DIR
    if not partitions.is_dir():
        return pq.read_table(release_dir / LEGACY_MANIFEST, columns=columns)
    files = sorted(partitions.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{partitions} holds no manifest partition")
    return pa.concat_tables([pq.read_table(path, columns=columns) for path in files])


#: the largest file of one sample a shard may hold: a member is read whole into memory,
#: so a damaged or hostile shard must not name a size the reader would try to hold
MAX_MEMBER_BYTES = 1 << 30


class ShardFormatError(ValueError):
    """A shard that breaks the format's limits; the message names the member."""


class DamagedShardError(ShardFormatError):
    """A shard whose bytes are not the release's: unreadable, short, or a sample that differs."""


def read_shard(source: Path | BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample, grouping consecutive members like WebDataset.
    `source` is a path or a binary stream (S3, a cache file), read front to back once."""
    with contextlib.ExitStack() as stack:
        stream = source if hasattr(source, "read") else stack.enter_context(open(source, "rb"))  # type: ignore[arg-type]
        key, files = None, {}
        for name, data in tar_members(stream):  # type: ignore[arg-type]
            stem, _, ext = name.rpartition("/")[2].partition(".")
            if stem != key and key is not None:
                yield key, files
                files = {}
            key = stem
            files[ext] = data
        if key is not None:
            yield key, files


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file (and contiguous file, read as one)


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar stream (USTAR, with pax or GNU long
    names), front to back. A reader of its own rather than `tarfile`: about half the cost
    of reading a shard was tarfile's header objects. Raises ShardFormatError for a damaged
    header (its checksum), a member larger than MAX_MEMBER_BYTES or a tar cut short."""
    long_name: str | None = None
    while True:
        header = _read_exactly(stream, _BLOCK)
        if not header.strip(b"\0"):  # end of archive (or of a file cut between members)
            return
        if len(header) < _BLOCK:
            raise ShardFormatError(f"the tar ends inside a member header ({len(header)} of {_BLOCK} bytes)")
        if _octal(header[148:156], "checksum") != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardFormatError("a tar header does not match its checksum")
        size = _member_size(header)
        kind = header[156:157]
        name = long_name or _header_name(header)
        if size > MAX_MEMBER_BYTES:
            raise ShardFormatError(f"shard member {name} holds {size} bytes, more than {MAX_MEMBER_BYTES}")
        data = _read_exactly(stream, size)
        if len(data) < size:
            raise ShardFormatError(f"the tar ends inside member {name} ({len(data)} of {size} bytes)")
        _read_exactly(stream, -size % _BLOCK)
        long_name = None
        if kind in _REGULAR:
            yield name, data
        elif kind == b"L":  # GNU: the next member's long name
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax: the next member's attributes; only its path matters here
            long_name = _pax_path(data)
        # anything else (directories, links, pax globals) carries no sample


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the stream (a network stream may return less per read)."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    missing = size - len(data)
    while missing and (more := stream.read(missing)):
        parts.append(more)
        missing -= len(more)
    return b"".join(parts)


def _octal(field: bytes, what: str) -> int:
    try:
        return int(field.rstrip(b"\0 ").strip() or b"0", 8)
    except ValueError:
        raise ShardFormatError(f"a tar header has a damaged {what} field {field!r}") from None


def _member_size(header: bytes) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256, for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    return _octal(field, "size")


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header ("<length> path=<value>\\n" records)."""
    for record in records.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[5:].decode("utf-8", "surrogateescape")
    return None


@dataclass(frozen=True)
class ExpectedSample:
    """What the manifest records of one sample: enough to tell a damaged copy from the release."""

    key: str
    bytes: int
    sha256: str | None  # sample_digest of every member; None in releases made before it existed
    payload: str
    payload_sha256: str


def sample_problem(expected: ExpectedSample, key: str, files: Mapping[str, bytes], hashes: bool) -> str | None:
    """Why sample (`key`, `files`) is not the release's `expected` sample, or None. Keys and
    sizes are always compared; `hashes` also compares sha256 (every member where the
    manifest has ``sample_sha256``, else the payload)."""
    if key != expected.key:
        return f"sample {key} where the release has {expected.key}"
    size = sum(len(data) for data in files.values())
    if size != expected.bytes:
        return f"sample {key} holds {size} bytes, the release has {expected.bytes}"
    if not hashes:
        return None
    if expected.sha256 is not None:
        if sample_digest(files) != expected.sha256:
            return f"sample {key} does not match its sha256"
    elif expected.payload not in files or hashlib.sha256(files[expected.payload]).hexdigest() != expected.payload_sha256:
        return f"sample {key}: payload .{expected.payload} does not match its sha256"
    return None


class ManifestIndex:
    """A manifest read one shard at a time: only the row groups whose ``shard`` statistics
    can hold the shard are decoded, so checking a shard costs the same in any size of release."""

    _COLUMNS = ("shard", "key", "bytes", "sample_sha256", "payload", "sha256")

    def __init__(self, source: Path | BinaryIO) -> None:
        self._file = pq.ParquetFile(source)
        names = self._file.schema_arrow.names
        self._columns = [column for column in self._COLUMNS if column in names]
        shard_column = names.index("shard")
        self._groups = []
        for group in range(self._file.num_row_groups):
            stats = self._file.metadata.row_group(group).column(shard_column).statistics
            bounds = (stats.min, stats.max) if stats is not None and stats.has_min_max else None
            self._groups.append((group, bounds))

    def samples(self, shard: str) -> list[ExpectedSample]:
        """The samples the release has in `shard`, in shard order."""
        groups = [g for g, bounds in self._groups if bounds is None or bounds[0] <= shard <= bounds[1]]
        if not groups:
            return []
        rows = self._file.read_row_groups(groups, columns=self._columns).to_pylist()
        return [
            ExpectedSample(row["key"], row["bytes"], row.get("sample_sha256"), row["payload"], row["sha256"])
            for row in rows
            if row["shard"] == shard
        ]


def verified_samples(
    source: Path | BinaryIO, expected: Sequence[ExpectedSample] | None, hashes: bool
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`read_shard`, each sample checked against `expected` (the manifest's record of the
    shard) before it is passed on; DamagedShardError for an unreadable tar, a sample that
    differs, or a shard that holds more or fewer samples. `expected` None: only a
    readable tar is checked (a live feed that names no manifest)."""
    count = 0
    try:
        for key, files in read_shard(source):
            if expected is not None:
                if count >= len(expected):
                    raise DamagedShardError(f"sample {key} is one more than the {len(expected)} the release has")
                problem = sample_problem(expected[count], key, files, hashes)
                if problem:
                    raise DamagedShardError(problem)
            count += 1
            yield key, files
    except DamagedShardError:
        raise
    except ShardFormatError as exc:
        raise DamagedShardError(f"unreadable tar after {count} samples ({exc})") from None
    if expected is not None and count < len(expected):
        raise DamagedShardError(f"ends after {count} of its {len(expected)} samples")
