"""A folder of image files, labelled by class folder like torchvision's ImageFolder.

Images keep their bytes (no re-encode). A caption comes from a sidecar ``<stem>.txt``
next to the image. Hidden files and folders (``.ipynb_checkpoints``) are skipped, so
tool droppings do not become classes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp"})

LabelsFrom = Literal["folder", "none"]


@dataclass(frozen=True)
class FolderImage:
    """One image of the folder: paths relative to the folder, in POSIX form."""

    relative: str
    caption_file: str | None
    label: str | None

    @property
    def key(self) -> str:
        return record_key(self.relative.rpartition(".")[0])

    def files(self) -> list[str]:
        return [self.relative] + ([self.caption_file] if self.caption_file else [])


def find_images(root: Path, given: str, labels_from: LabelsFrom) -> list[FolderImage]:
    """Every image below `root` (named `given` in the recipe), sorted by relative path.
    With labels_from=folder an image's label is its top folder below `root`."""
    def unreadable(exc: OSError) -> None:
        folder = (Path(given) / Path(exc.filename).relative_to(root)).as_posix()
        raise SourceError(f"path: cannot list {folder!r}: {exc.strerror}")

    found = []
    for folder, subfolders, names in os.walk(root, onerror=unreadable):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        present = set(names)
        inside = Path(folder).relative_to(root)
        for name in names:
            stem, dot, ext = name.rpartition(".")
            if name.startswith(".") or not dot or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            relative = (inside / name).as_posix()
            label = None
            if labels_from == "folder":
                if inside == Path("."):
                    raise SourceError(
                        f"labels_from: image {relative!r} lies directly in {given!r}, not in a class folder; "
                        "move it into one, or set labels_from: none"
                    )
                label = inside.parts[0]
            caption = f"{stem}.txt" if f"{stem}.txt" in present else None
            found.append(FolderImage(relative, (inside / caption).as_posix() if caption else None, label))
    found.sort(key=lambda image: image.relative)
    seen: dict[str, str] = {}
    for image in found:
        if image.key in seen:
            raise SourceError(f"path: {seen[image.key]!r} and {image.relative!r} in {given!r} are both record {image.key}; rename one")
        seen[image.key] = image.relative
    check_record_count(given, len(found))
    return found


class ImageFolderParams(PinnedSourceParams):
    path: str = Field(min_length=1, description="the folder of images, relative to the recipe")
    labels_from: LabelsFrom = Field(
        "folder", description="folder: an image's top folder below `path` is its label (ImageFolder); none: unlabelled",
    )

    def current_revision(self, info: ValidationInfo) -> str:
        """Hash of every image and caption file; each checked to stay in the registry (a
        symlink inside the folder may point anywhere)."""
        root = data_path("path", self.path, info, directory=True)
        files = [relative for image in find_images(root, self.path, self.labels_from) for relative in image.files()]
        for relative in files:
            data_path("path", f"{self.path}/{relative}", info, directory=False)
        return content_hash([root / relative for relative in files], root)


@SOURCES.register("image-folder")
class ImageFolder(Source):
    Params = ImageFolderParams
    version = "1"
    code = ("synthfactory.sources.base",)
    params: ImageFolderParams

    @functools.cached_property
    def _images(self) -> list[FolderImage]:
        """The folder's listing, made once per process (on first use)."""
        return find_images(self.resolve(self.params.path), self.params.path, self.params.labels_from)

    def __len__(self) -> int:
        return len(self._images)

    def read(self, indices: Sequence[int]) -> list[Record]:
        root = self.resolve(self.params.path)
        return [self._record(root, self._images[index]) for index in indices]

    def uri(self) -> str:
        return self.params.path

    def labels(self) -> tuple[str, ...] | None:
        if self.params.labels_from == "none":
            return None
        return tuple(sorted({image.label for image in self._images if image.label is not None}))

    def _record(self, root: Path, image: FolderImage) -> Record:
        where = f"{self.params.path}/{image.relative}"
        try:
            check_record_bytes(where, sum((root / relative).stat().st_size for relative in image.files()))
            files = {member_extension(image.relative.rpartition(".")[2]): (root / image.relative).read_bytes()}
            caption = ""
            if image.caption_file:
                files["txt"] = (root / image.caption_file).read_bytes()
                caption = member_text(where, f"its caption {image.caption_file!r}", files["txt"])
        except OSError as exc:
            raise SourceError(f"{where}: cannot read it: {exc.strerror or exc}") from None
        return Record(image.key, files, image.label, caption)
