"""A Hugging Face dataset written by `save_to_disk`: a Dataset, or one split of a DatasetDict,
read offline with `datasets.load_from_disk` (memory-mapped Arrow files).

Rows are read as Arrow, so an Image feature gives the bytes it stores (the original file's,
never a re-encode of a decoded PIL image); ClassLabel ints become their names.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field, ValidationInfo

from synthfactory.sources.base import (
    SOURCES,
    Record,
    Source,
    SourceError,
    PinnedSourceParams,
    check_record_count,
    content_hash,
    data_path,
)
from synthfactory.sources.parquet import ImageColumns, arrow_record, image_columns

#: what save_to_disk writes per Dataset: Arrow data files and JSON state
SAVED_SUFFIXES = (".arrow", ".json")


def dataset_folder(root: Path, given: str, split: str | None) -> Path:
    """The folder of the Dataset to read: `root`, or its `split` when `root` holds a DatasetDict."""
    listing = root / "dataset_dict.json"
    if listing.is_file():
        try:
            splits = [str(name) for name in json.loads(listing.read_text())["splits"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise SourceError(f"path: {given}/dataset_dict.json does not list the DatasetDict's splits") from None
        if split not in splits:
            problem = "is a DatasetDict: give a split" if split is None else f"has no split {split!r}"
            raise SourceError(f"split: {given!r} {problem}; it has {', '.join(splits)}")
        return root / split
    if split is not None:
        raise SourceError(f"split: {given!r} is a single Dataset, not a DatasetDict; drop split")
    if not (root / "state.json").is_file():
        raise SourceError(f"path: {given!r} is not a folder written by save_to_disk (no state.json or dataset_dict.json)")
    return root


class HFDatasetParams(PinnedSourceParams):
    path: str = Field(min_length=1, description="the folder save_to_disk wrote, relative to the recipe")
    split: str | None = Field(None, pattern=r"^\w+(\.\w+)*$", description="the split to read, when the folder holds a DatasetDict")
    image_column: str = Field("image", min_length=1, description="an Image feature, or encoded image bytes")
    label_column: str | None = Field("label", description="ClassLabel (read as its names), int or string; missing: unlabelled")
    caption_column: str | None = Field("text", description="caption text; a missing column means no captions")

    def current_revision(self, info: ValidationInfo) -> str:
        """Hash of the saved Arrow and JSON files of the Dataset read; each must stay in the
        registry, and the data must have the image column."""
        root = data_path("path", self.path, info, directory=True)
        folder = dataset_folder(root, self.path, self.split)
        check_state_file(folder, self.path)
        files = sorted(path for path in folder.iterdir() if path.suffix in SAVED_SUFFIXES)
        for path in files:
            data_path("path", f"{self.path}/{path.relative_to(root).as_posix()}", info, directory=False)
        data_files = [path for path in files if path.suffix == ".arrow"]
        if not data_files:
            raise SourceError(f"path: {self.path!r} holds no .arrow data files")
        try:
            with pa.memory_map(str(data_files[0])) as mapped, pa.ipc.open_stream(mapped) as stream:
                schema = stream.schema
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"path: {data_files[0].name} is not an Arrow file save_to_disk wrote ({exc})") from None
        image_columns(schema, self.image_column, None, None, self.path)
        return content_hash(files, root)


def check_state_file(folder: Path, given: str) -> None:
    """load_from_disk opens the data files state.json names: each must be a file of the
    folder itself (hashed into the revision), never a path leading elsewhere."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"path: {given!r} has no readable state.json ({exc})") from None
    for entry in state.get("_data_files", []) if isinstance(state, dict) else []:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise SourceError(f"path: {given!r} state.json names data file {name!r}; only files of the folder itself are read")
        if not (folder / name).is_file():
            raise SourceError(f"path: {given!r} state.json names {name!r}, which the folder lacks")


@dataclass(frozen=True)
class LoadedDataset:
    rows: Any  # a datasets.Dataset formatted as Arrow tables
    columns: ImageColumns
    label_names: tuple[str, ...] | None  # the ClassLabel's names, when the label column is one


@SOURCES.register("hf-datasets")
class HFDataset(Source):
    Params = HFDatasetParams
    version = "1"
    code = ("synthfactory.sources.base", "synthfactory.sources.parquet")
    params: HFDatasetParams

    @functools.cached_property
    def _loaded(self) -> LoadedDataset:
        """The dataset, memory-mapped once per process."""
        from datasets import ClassLabel, load_from_disk

        params = self.params
        folder = dataset_folder(self.resolve(params.path), params.path, params.split)
        check_state_file(folder, params.path)
        try:
            dataset = load_from_disk(str(folder))
        except (OSError, ValueError) as exc:
            raise SourceError(f"{params.path}: load_from_disk cannot read it ({exc})") from None
        check_record_count(params.path, len(dataset))
        columns = image_columns(dataset.data.schema, params.image_column, params.label_column, params.caption_column, params.path)
        feature = dataset.features.get(columns.label) if columns.label else None
        names = tuple(feature.names) if isinstance(feature, ClassLabel) else None
        return LoadedDataset(dataset.with_format("arrow", columns=columns.names()), columns, names)

    def __len__(self) -> int:
        return len(self._loaded.rows)

    def read(self, indices: Sequence[int]) -> list[Record]:
        loaded, indices = self._loaded, list(indices)
        for position in indices:
            if not 0 <= position < len(loaded.rows):
                raise IndexError(f"{self.params.path}: record {position} is outside 0..{len(loaded.rows) - 1}")
        if not indices:
            return []
        table = loaded.rows[indices]
        values = {name: table.column(name).to_pylist() for name in loaded.columns.names()}
        records = []
        for row, position in enumerate(indices):
            cells = {name: column[row] for name, column in values.items()}
            records.append(arrow_record(f"{position:010d}", cells, loaded.columns, "png", loaded.label_names))
        return records

    def uri(self) -> str:
        return self.params.path

    def labels(self) -> tuple[str, ...] | None:
        loaded = self._loaded
        if loaded.label_names is not None:
            return tuple(sorted(loaded.label_names))
        if loaded.columns.label is None:
            return None
        return tuple(sorted({str(value) for value in loaded.rows.unique(loaded.columns.label) if value is not None})) or None
