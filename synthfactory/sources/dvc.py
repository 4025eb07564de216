"""A path in another DVC (or plain git) repository at a git revision, read through
`dvc.api.DVCFileSystem`: a release of this registry, another team's data registry.

At recipe load `rev` (a tag, branch or commit) is pinned to its commit, so a moved tag
changes the recipe's fingerprint and a pinned revision that no longer matches is an error.
At first read the path is copied, at that commit, into a cache shared by processes and
runs (``$SYNTHFACTORY_SOURCE_CACHE``, else ``~/.cache/synthfactory/sources``), and read
there by the source of its `format`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from synthfactory import settings
from synthfactory.files import fsync_tree
from synthfactory.tags import ReleaseTag
from synthfactory.sources.base import (
    SOURCES,
    PinnedSourceParams,
    Record,
    Source,
    SourceError,
    SourceParams,
    data_path,
    registry_root,
)

CACHE_VAR = "SYNTHFACTORY_SOURCE_CACHE"
#: a repository named by URL; anything else is a folder inside the recipe's registry
REMOTE_REPO = re.compile(r"^(https?://|ssh://|git@[\w.-]+:)")
#: format params the dvc source sets itself
SET_BY_DVC = ("path", "license", "revision")

Format = Literal["webdataset", "image-folder", "parquet"]


def source_cache() -> Path:
    return Path(os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "synthfactory" / "sources")


def is_remote(repo: str) -> bool:
    return bool(REMOTE_REPO.match(repo))


@contextlib.contextmanager
def dvc_errors(what: str) -> Iterator[None]:
    """DVC's and git's failures (an object in neither the cache nor a remote: DVC's data
    index fails to load it) as one SourceError naming what was being done."""
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexError
    from scmrepo.exceptions import SCMError

    try:
        yield
    except (DvcException, DataIndexError, SCMError, OSError) as exc:
        raise SourceError(f"{what} ({type(exc).__name__}: {exc})") from None


def repository_files(repo: str, location: str, rev: str, remote_config: dict[str, str] | None = None) -> Any:
    """The repository's files at `rev`, as a DVCFileSystem (a remote repository is cloned)."""
    from dvc.api import DVCFileSystem

    with dvc_errors(f"repo: cannot open {repo!r} at {rev!r}"):
        return DVCFileSystem(location, rev=rev, remote_config=remote_config)


def checkout(repo: str, location: str, rev: str) -> tuple[str, Any]:
    """The commit `rev` names in the repository at `location`, and its files at that commit.
    A local repository's commit comes from git; a remote one's from its clone."""
    if is_remote(repo):
        files = repository_files(repo, location, rev)
        with dvc_errors(f"rev: cannot resolve {rev!r} in {repo}"):
            return files.repo.get_rev(), files
    found = subprocess.run(
        ["git", "-C", location, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
        capture_output=True, text=True,
    )
    if found.returncode != 0:
        raise SourceError(f"rev: {rev!r} is not a tag, branch or commit of {repo!r}")
    commit = found.stdout.strip()
    return commit, repository_files(repo, location, commit)


def is_tag(location: str, name: str) -> bool:
    """Whether `name` is a tag of the local repository at `location` (not a branch)."""
    found = subprocess.run(["git", "-C", location, "tag", "--list", name], capture_output=True, text=True)
    return found.returncode == 0 and found.stdout.strip() == name


def local_copy(repo: str, location: str, commit: str, path: str, remote_config: dict[str, str] | None = None) -> Path:
    """A folder holding `path` of the repository at `commit` (under its own name), copied
    once: into a private folder beside it, then renamed into place, so a reader never sees
    half a copy and concurrent first reads cannot mix."""
    entry = source_cache() / hashlib.sha256(f"{location}\0{commit}\0{path}".encode()).hexdigest()
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}-", dir=entry.parent))
    try:
        files = repository_files(repo, location, commit, remote_config)
        with dvc_errors(f"dvc:{repo}:{path}@{commit[:12]}: cannot copy it"):
            files.get(path, str(staging / PurePosixPath(path).name), recursive=True)
        fsync_tree(staging)
        try:
            staging.rename(entry)
        except OSError:
            if not entry.is_dir():  # else another process copied it first: the same commit, the same bytes
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


class DvcParams(PinnedSourceParams):
    repo: str = Field(
        min_length=1, description="a git URL (https://, ssh://, git@host:path), or a repository folder relative to the recipe",
    )
    path: str = Field(min_length=1, description="the data's path inside the repository")
    rev: str = Field(min_length=1, max_length=200, description="a tag, branch or commit; pinned to its commit at recipe load")
    format: Format = Field(description="how the data at `path` is laid out: the source that reads it")
    options: dict[str, Any] = Field(default_factory=dict, description="that source's own params (labels_from, image_column, ...)")

    @field_validator("path")
    @classmethod
    def _inside_repository(cls, path: str) -> str:
        parts = PurePosixPath(path).parts
        if path.startswith("/") or ".." in parts or all(part == "." for part in parts):
            raise ValueError(f"{path!r} must be a relative path inside the repository, without '..'")
        return path

    @model_validator(mode="after")
    def _check_options(self) -> DvcParams:
        self.format_params(PurePosixPath(self.path).name)
        return self

    def format_params(self, path: str) -> SourceParams:
        """The params of the `format` source reading `path` (the local copy), from `options`."""
        reserved = sorted(set(self.options) & set(SET_BY_DVC))
        if reserved:
            raise ValueError(f"options: {', '.join(reserved)} is set by the dvc source; drop it from options")
        try:
            return SOURCES.get(self.format).Params.model_validate({**self.options, "path": path, "license": self.license})
        except ValidationError as exc:
            raise ValueError("; ".join(
                f"options.{'.'.join(map(str, error['loc']))}: {error['msg'].removeprefix('Value error, ')}" for error in exc.errors()
            )) from None

    def current_revision(self, info: ValidationInfo) -> str:
        """The commit `rev` names; the repository folder must be in the registry, and
        `path` in the repository at that commit."""
        if is_remote(self.repo):
            location = self.repo
        else:
            folder = data_path("repo", self.repo, info, directory=True)
            if not ((folder / ".git").exists() or (folder / ".dvc").is_dir()):
                raise ValueError(f"repo: {self.repo!r} is not a git or DVC repository (it has no .git or .dvc)")
            location = str(folder)
        commit, files = checkout(self.repo, location, self.rev)
        with dvc_errors(f"path: cannot look up {self.path!r} in {self.repo!r} at {self.rev!r}"):
            if not files.exists(self.path):
                raise ValueError(f"path: {self.path!r} is not in {self.repo!r} at {self.rev!r}")
        return commit


@SOURCES.register("dvc")
class Dvc(Source):
    Params = DvcParams
    version = "1"
    code = (
        "synthfactory.sources.base",
        "synthfactory.sources.image_folder",
        "synthfactory.sources.parquet",
        "synthfactory.sources.webdataset",
    )
    params: DvcParams

    @functools.cached_property
    def _copy_source(self) -> Source:
        """The `format` source over the local copy, made on first use in each process."""
        params = self.params
        location = params.repo if is_remote(params.repo) else str(self.resolve(params.repo).resolve())
        commit = params.revision or checkout(params.repo, location, params.rev)[0]
        name = PurePosixPath(params.path).name
        source = SOURCES.get(params.format)(params.format_params(name))
        # this registry's own releases live in the factory's S3: read them with its settings,
        # but only at a release tag, whose DVC config the factory wrote (a branch could name
        # another endpoint, and DVC would send our key there)
        own = (not is_remote(params.repo) and Path(location) == registry_root(self.recipe_dir or Path.cwd()).resolve()
               and ReleaseTag.parse(params.rev) is not None and is_tag(location, params.rev))
        source.recipe_dir = local_copy(params.repo, location, commit, params.path,
                                       settings.dvc_remote_config() if own else None)
        return source

    def __len__(self) -> int:
        return len(self._copy_source)

    def read(self, indices: Sequence[int]) -> list[Record]:
        return self._copy_source.read(indices)

    def uri(self) -> str:
        return f"dvc:{self.params.repo}:{self.params.path}"

    def labels(self) -> tuple[str, ...] | None:
        return self._copy_source.labels()
