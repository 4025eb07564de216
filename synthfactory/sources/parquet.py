"""Parquet files of images: one file or a folder of them, one record per row.

The image column holds the encoded bytes, or a struct with a ``bytes`` field (how Hugging
Face's Image feature stores them); label and caption columns are optional. Reads decode
the few row groups they need (kept in a small cache), never a whole file per call.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
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
    record_key,
)

#: decoded row groups a source keeps: a sequential or batched read touches one or two
ROW_GROUP_CACHE = 4
#: magic numbers that name an image's format whatever the column says (a column may mix them)
IMAGE_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))


@dataclass(frozen=True)
class ImageColumns:
    """The columns a record is read from; None where the table has no such column."""

    image: str
    label: str | None
    caption: str | None

    def names(self) -> list[str]:
        return [name for name in (self.image, self.label, self.caption) if name is not None]


def image_columns(schema: pa.Schema, image: str, label: str | None, caption: str | None, where: str) -> ImageColumns:
    """The image column (it must be there and hold bytes), and the label and caption
    columns where the table has them."""
    if image not in schema.names:
        raise SourceError(f"image_column: {image!r} is not a column of {where} (it has {', '.join(schema.names)})")
    kind = schema.field(image).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        kind = kind.field("bytes").type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise SourceError(f"image_column: {image!r} of {where} holds {schema.field(image).type}, not image bytes")
    return ImageColumns(image, label if label in schema.names else None, caption if caption in schema.names else None)


def image_extension(data: bytes, declared: str) -> str:
    """The member name for image bytes: what their magic number says, else `declared`."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in IMAGE_MAGIC if data.startswith(magic)), declared)


def arrow_record(
    key: str, row: Mapping[str, Any], columns: ImageColumns, image_format: str, label_names: Sequence[str] | None = None,
) -> Record:
    """A record from one table row. With `label_names` (a ClassLabel) an int label is an
    index into them, and a negative one means unlabelled."""
    value = row[columns.image]
    image = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(image, bytes) or not image:
        path = value.get("path") if isinstance(value, dict) else None
        raise SourceError(f"record {key}: column {columns.image!r} holds no image bytes" + (f" (only a path, {path!r})" if path else ""))
    caption = row[columns.caption] if columns.caption else None
    if caption is not None and not isinstance(caption, str):
        raise SourceError(f"record {key}: caption column {columns.caption!r} holds {type(caption).__name__}, not text")
    label = row[columns.label] if columns.label else None
    if label_names is not None and isinstance(label, int):
        if label >= len(label_names):
            raise SourceError(f"record {key}: label {label} is not one of the {len(label_names)} class names")
        label = label_names[label] if label >= 0 else None
    files = {image_extension(image, image_format): image}
    if caption:
        files["txt"] = caption.encode()
    check_record_bytes(f"record {key}", sum(len(data) for data in files.values()))
    return Record(key, files, None if label is None else str(label), caption or "")


def parquet_files(target: Path, given: str) -> list[Path]:
    """The files `given` names: the folder's ``*.parquet`` files (sorted), or the file itself."""
    if not target.is_dir():
        return [target]
    files = sorted(path for path in target.iterdir() if path.suffix == ".parquet" and not path.name.startswith("."))
    if not files:
        raise SourceError(f"path: {given!r} holds no .parquet files")
    return files


def parquet_metadata(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"path: {path.name} is not a readable Parquet file ({exc})") from None


class ParquetParams(PinnedSourceParams):
    path: str = Field(min_length=1, description="a .parquet file or a folder of them, relative to the recipe")
    image_column: str = Field("image", min_length=1, description="encoded image bytes, or a struct with a `bytes` field")
    label_column: str | None = Field("label", description="int or string labels; a missing column means unlabelled")
    caption_column: str | None = Field("caption", description="caption text; a missing column means no captions")
    image_format: Literal["png", "jpg", "webp"] = Field(
        "png", description="the member name of bytes whose magic number names no format",
    )

    def current_revision(self, info: ValidationInfo) -> str:
        """Hash of the files; each must stay in the registry and have the image column."""
        target = data_path("path", self.path, info)
        files = parquet_files(target, self.path)
        for path in files:
            if target.is_dir():
                data_path("path", f"{self.path}/{path.name}", info, directory=False)
            image_columns(parquet_metadata(path).schema.to_arrow_schema(), self.image_column, None, None, path.name)
        return content_hash(files, target if target.is_dir() else target.parent)


@dataclass(frozen=True)
class ParquetFilePart:
    path: Path
    metadata: pq.FileMetaData
    columns: ImageColumns


@dataclass(frozen=True)
class RowGroup:
    """A row group: its file (position in the part list), number there, first row's number
    in the file, and first row's index in the source."""

    part: int
    group: int
    first_row: int
    start: int


@dataclass(frozen=True)
class ParquetIndex:
    parts: list[ParquetFilePart]
    groups: list[RowGroup]
    starts: list[int]  # each group's `start`, for bisecting
    size: int


@SOURCES.register("parquet")
class Parquet(Source):
    Params = ParquetParams
    version = "1"
    code = ("synthfactory.sources.base",)
    params: ParquetParams

    def __init__(self, params: ParquetParams) -> None:
        super().__init__(params)
        self._row_groups: OrderedDict[int, dict[str, list[Any]]] = OrderedDict()

    @functools.cached_property
    def _index(self) -> ParquetIndex:
        """Every file's footer (schema and row groups), read once per process."""
        params = self.params
        parts, groups, size = [], [], 0
        for number, path in enumerate(parquet_files(self.resolve(params.path), params.path)):
            metadata = parquet_metadata(path)
            schema = metadata.schema.to_arrow_schema()
            columns = image_columns(schema, params.image_column, params.label_column, params.caption_column, path.name)
            parts.append(ParquetFilePart(path, metadata, columns))
            first_row = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                groups.append(RowGroup(number, group, first_row, size))
                first_row += rows
                size += rows
            check_record_count(params.path, size)
        return ParquetIndex(parts, groups, [group.start for group in groups], size)

    def __len__(self) -> int:
        return self._index.size

    def read(self, indices: Sequence[int]) -> list[Record]:
        index = self._index
        records = []
        for position in indices:
            if not 0 <= position < index.size:
                raise IndexError(f"{self.params.path}: record {position} is outside 0..{index.size - 1}")
            number = bisect.bisect_right(index.starts, position) - 1
            group, row = index.groups[number], position - index.starts[number]
            part = index.parts[group.part]
            values = self._rows(number)
            key = record_key(f"{part.path.stem}/{group.first_row + row:010d}")
            cells = {name: column[row] for name, column in values.items()}
            records.append(arrow_record(key, cells, part.columns, self.params.image_format))
        return records

    def uri(self) -> str:
        return self.params.path

    def labels(self) -> tuple[str, ...] | None:
        found: set[str] = set()
        for part in self._index.parts:
            if part.columns.label is not None:
                with self._open(part) as file:
                    values = file.read(columns=[part.columns.label])
                found.update(str(value) for value in values.column(0).unique().to_pylist() if value is not None)
        return tuple(sorted(found)) or None

    def _rows(self, number: int) -> dict[str, list[Any]]:
        """Row group `number`'s columns as Python lists, through the cache."""
        if number in self._row_groups:
            self._row_groups.move_to_end(number)
            return self._row_groups[number]
        group = self._index.groups[number]
        part = self._index.parts[group.part]
        with self._open(part) as file:
            table = file.read_row_group(group.group, columns=part.columns.names())
        self._row_groups[number] = {name: table.column(name).to_pylist() for name in part.columns.names()}
        if len(self._row_groups) > ROW_GROUP_CACHE:
            self._row_groups.popitem(last=False)
        return self._row_groups[number]

    @staticmethod
    @contextlib.contextmanager
    def _open(part: ParquetFilePart) -> Iterator[pq.ParquetFile]:
        """The file, its footer taken from the index; read errors name it."""
        try:
            with pq.ParquetFile(part.path, metadata=part.metadata) as file:
                yield file
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{part.path.name}: cannot read it ({exc})") from None
