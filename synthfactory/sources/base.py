"""The source plug-in interface: real data a recipe reads (to mix into a release, to
measure synthetic samples against, to test a probe on).

A source is an indexed, read-only collection of records (an image folder, WebDataset
shards, a Parquet file, a saved Hugging Face dataset, a path in another DVC registry).
Like a generator it is one small class: `__len__` and `read(indices)`. Its params carry
the data's licence, and resolving them at recipe load pins the content (a hash of the
files, or the git revision of a DVC repo) into `revision`, so the resolved recipe, the
shard cache keys and the release fingerprint all change when the data does, and every
release records exactly what it read.

Paths in a recipe are untrusted: they must stay inside the registry that holds the
recipe (the nearest enclosing git or DVC repository, else the recipe's directory).
"""

from __future__ import annotations

import hashlib
import stat
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ModelWrapValidatorHandler, ValidationError, ValidationInfo, model_validator

from synthfactory.files import file_digest
from synthfactory.plugins import RECIPE_DIR, Plugin, PluginParams, PluginSpec, Registry, UnknownPluginError

#: the most records one source may hold (each has an index entry in memory)
MAX_RECORDS = 10_000_000
#: the most bytes one record may hold (an image, its caption and metadata)
MAX_RECORD_BYTES = 64 * 1024 * 1024


class SourceError(ValueError):
    """A source that cannot be read as declared; the message names the field or record."""


class SourceParams(PluginParams):
    """Base of every source's params: its licence, and the revision the data is read at."""

    license: str = Field(min_length=1, max_length=200, description="the data's licence (SPDX id or URL), recorded in the manifest and card")
    revision: str | None = Field(
        None, max_length=200,
        description="content hash (local data) or git revision (DVC); filled in at recipe load, and checked when given",
    )


class PinnedSourceParams(SourceParams):
    """Params of a source whose revision is read off its data (files, a repository) at
    recipe load: subclasses say how, in `current_revision`."""

    @model_validator(mode="wrap")
    @classmethod
    def _pin_revision(
        cls, data: Any, handler: ModelWrapValidatorHandler[PinnedSourceParams], info: ValidationInfo
    ) -> PinnedSourceParams:
        """At recipe load (the context names the recipe's directory) record the data's revision,
        checking a pinned one. Params without that context are resolved already: building a
        source from them must not read (or hash) its data again."""
        params = handler(data)
        if RECIPE_DIR not in (info.context or {}):
            return params
        return params.model_copy(update={"revision": pinned("revision", params.revision, params.current_revision(info))})

    @abstractmethod
    def current_revision(self, info: ValidationInfo) -> str:
        """The data's revision now (a content hash, a commit); confine paths with `data_path`."""


@dataclass(frozen=True)
class Record:
    """One real sample: its id in the source, WebDataset members, label and caption."""

    key: str  # stable id inside the source: a relative file path, a row number, a tar key
    files: dict[str, bytes]  # WebDataset members by extension ("png", "jpg", "txt", "json")
    label: str | None = None
    caption: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # other fields the source had (JSON-able)


@dataclass(frozen=True)
class Origin:
    """Where a source's records come from, for the manifest, the card and error messages."""

    kind: str
    uri: str
    revision: str
    license: str

    def __str__(self) -> str:
        scheme, _, digest = self.revision.rpartition(":")  # sha256:<hex>, sklearn-1.9.1:<hex>, a bare commit
        return f"{self.kind}:{self.uri}@{scheme + ':' if scheme else ''}{digest[:12]}"


class Source(Plugin):
    """Subclass, declare `Params` and `version`, implement `__len__`, `read` and `uri`, register."""

    @abstractmethod
    def __len__(self) -> int:
        """How many records the source holds."""

    @abstractmethod
    def read(self, indices: Sequence[int]) -> list[Record]:
        """The records at `indices` (0 ≤ i < len), in that order."""

    @abstractmethod
    def uri(self) -> str:
        """Where the data is, as the recipe names it (no absolute local paths: they leak layout)."""

    def labels(self) -> tuple[str, ...] | None:
        """The label set, when the records are labelled."""
        return None

    def origin(self) -> Origin:
        return Origin(self.plugin_name, self.uri(), self.params.revision or "unpinned", self.params.license)

    def records(self, batch: int = 256) -> Iterator[Record]:
        """Every record, in index order."""
        for start in range(0, len(self), batch):
            yield from self.read(range(start, min(start + batch, len(self))))

    def resolve(self, relative: str) -> Path:
        """A path from the params, against the recipe's directory."""
        return (self.recipe_dir or Path.cwd()) / relative


SOURCES: Registry[Source] = Registry("source", "synthfactory.sources")


def build_source(spec: PluginSpec | dict[str, Any], recipe_dir: Path | None) -> Source:
    """The source a resolved spec names, reading paths relative to `recipe_dir`."""
    spec = spec if isinstance(spec, PluginSpec) else PluginSpec.model_validate(spec)
    source = SOURCES.get(spec.kind).from_params(spec.params)
    source.recipe_dir = recipe_dir
    return source


def registry_root(recipe_dir: Path) -> Path:
    """The registry holding a recipe: the nearest enclosing git or DVC repository, else the
    recipe's directory. Data paths must stay inside it."""
    for folder in (recipe_dir, *recipe_dir.parents):
        if (folder / ".git").exists() or (folder / ".dvc").is_dir():
            return folder
    return recipe_dir


def data_path(field_name: str, relative: str, info: ValidationInfo, *, directory: bool | None = None) -> Path:
    """The file or folder `relative` names, confined to the recipe's registry: an absolute
    path, `..` out of it or a symlink leading out would publish what the worker can read."""
    base = Path((info.context or {}).get(RECIPE_DIR, ".")).resolve()
    root = registry_root(base)
    path = (base / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        raise ValueError(f"{field_name}: {relative!r} must be a relative path inside the registry {root}")
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"{field_name}: cannot read {relative!r}: {exc.strerror or exc}") from None
    if directory is True and not stat.S_ISDIR(mode):
        raise ValueError(f"{field_name}: {relative!r} is not a directory")
    if directory is False and not stat.S_ISREG(mode):
        raise ValueError(f"{field_name}: {relative!r} is not a regular file")
    return path


def record_key(name: str) -> str:
    """`name` (a relative path without extension, a tar key, a row id) as a WebDataset key:
    a key ends at the first dot, and a slash would make it a folder."""
    return name.replace("/", "__").replace(".", "_")


def member_extension(ext: str) -> str:
    """A file extension as a WebDataset member name: lower case, jpeg spelled jpg."""
    ext = ext.lower()
    return "jpg" if ext == "jpeg" else ext


def check_record_count(uri: str, count: int) -> None:
    if count > MAX_RECORDS:
        raise SourceError(f"{uri}: holds {count} records, more than the {MAX_RECORDS} a source may")


def check_record_bytes(record: str, size: int) -> None:
    if size > MAX_RECORD_BYTES:
        raise SourceError(f"{record}: holds {size} bytes, more than the {MAX_RECORD_BYTES} a record may")


def member_text(record: str, member: str, data: bytes) -> str:
    """A text member (a caption, a class name; a member or a sidecar file) without the
    whitespace around it."""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SourceError(f"{record}: {member} is not UTF-8 text") from None


def content_hash(files: Sequence[Path], root: Path) -> str:
    """sha256 over (relative path, file digest) of `files`: the local data's revision."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.relative_to(root).as_posix()}\0{file_digest(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def pinned(field_name: str, given: str | None, actual: str) -> str:
    """The revision to record: `actual`, unless the recipe pinned another (then it is an error:
    the data changed since the recipe was written)."""
    if given is not None and given != actual:
        raise ValueError(f"{field_name}: the data is at {actual}, not the pinned {given}: it changed; update or drop revision")
    return actual


def resolve_source_spec(field_name: str, value: Any, info: ValidationInfo) -> dict[str, Any]:
    """Validate a source spec nested in another plug-in's params ({kind, params}) with the
    source's own Params and the recipe's context: the resolved spec, revision pinned."""
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        raise ValueError(f"{field_name}: give a source as {{kind: …, params: {{…}}}}; kinds: {', '.join(SOURCES.names())}")
    try:
        cls = SOURCES.get(value["kind"])
    except UnknownPluginError as exc:
        raise ValueError(f"{field_name}.kind: {exc}") from None
    extra = set(value) - {"kind", "params"}
    if extra:
        raise ValueError(f"{field_name}: unknown keys {', '.join(sorted(extra))}")
    try:
        params = cls.Params.model_validate(value.get("params") or {}, context=info.context)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, (field_name, 'params', *item['loc'])))}: {item['msg'].removeprefix('Value error, ')}"
            for item in exc.errors()
        )
        raise ValueError(problems) from None
    return {"kind": value["kind"], "params": params.model_dump(mode="json")}
