"""Release tags: ``<dataset>@v<N>``, the one parser of them.

Git tags name releases; users name versions as ``N``, ``vN`` or ``<dataset>@vN``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEPARATOR = "@v"
_TAG = re.compile(r"(?P<dataset>[a-z0-9][a-z0-9_-]{0,63})@v(?P<version>[1-9][0-9]{0,8})")
_VERSION = re.compile(r"v?(?P<version>[1-9][0-9]{0,8})")


@dataclass(frozen=True, order=True)
class ReleaseTag:
    dataset: str
    version: int

    def __str__(self) -> str:
        return f"{self.dataset}{SEPARATOR}{self.version}"

    @classmethod
    def parse(cls, text: str) -> ReleaseTag | None:
        """The tag `text` names, or None when it is not a release tag."""
        match = _TAG.fullmatch(text)
        return cls(match["dataset"], int(match["version"])) if match else None

    def next(self) -> ReleaseTag:
        return ReleaseTag(self.dataset, self.version + 1)


def first(dataset: str) -> ReleaseTag:
    return ReleaseTag(dataset, 1)


def version_of(text: str | int, dataset: str) -> int | None:
    """The version a user means by `text` for `dataset` (N, "vN" or "<dataset>@vN"), or None."""
    text = str(text)
    tag = ReleaseTag.parse(text)
    if tag is not None:
        return tag.version if tag.dataset == dataset else None
    match = _VERSION.fullmatch(text)
    return int(match["version"]) if match else None
