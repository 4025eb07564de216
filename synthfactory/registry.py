"""The data registry: a git + DVC repository whose tags are dataset releases.

DVC's data-registry pattern: each dataset is a dvc.yaml stage whose deps are the recipe
and the generator code and whose outs are ``data/<dataset>/``; dvc.lock pins their
hashes. A release commits dvc.yaml/dvc.lock (plus the git-tracked card and metrics),
pushes the data to the S3 remote *before* committing, and tags ``<dataset>@v<N>``, so a
tag never points at data missing from S3.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from synthfactory.drills import crash_point
from synthfactory.files import atomic_write, atomic_write_json, file_digest, says_disk_full
from synthfactory.storage import StorageConfig
from synthfactory.tags import ReleaseTag, first

logger = logging.getLogger("synthfactory.registry")
REMOTE_NAME = "storage"
#: the parts of a release tracked in DVC's cache (the rest is small and goes to git)
CACHED_OUTS = ("shards", "rejected", "manifest", "rejected.parquet", "validation", "report")
GIT_OUTS = ("README.md", "recipe.yaml")
METRICS_FILE = "metrics.json"
BOT_IDENTITY = {
    "GIT_AUTHOR_NAME": "synthfactory",
    "GIT_AUTHOR_EMAIL": "synthfactory@localhost",
    "GIT_COMMITTER_NAME": "synthfactory",
    "GIT_COMMITTER_EMAIL": "synthfactory@localhost",
}


class RegistryError(RuntimeError):
    """A git or DVC step failed; the message has the command and its error output."""


def tool_error_line(output: str) -> str:
    """The line of a failed git/DVC command that says what went wrong: DVC ends its output
    with a "Having any troubles?" footer, so the last line is not it."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "error:", "fatal:"))]
    return (errors or [line for line in lines if not line.startswith("Having any troubles?")] or [""])[-1]


class RegistryPathError(RegistryError):
    """The path given as a registry cannot be one (bad input, not a failed step)."""


@dataclass(frozen=True)
class Release:
    dataset: str
    version: int
    tag: str
    commit: str
    date: str
    metrics: dict[str, Any]
    push_retries: int = 0  # set by the publish that made it: S3 pushes that had to be retried


def dvc_executable() -> str:
    """The dvc next to this interpreter, so a venv works without being activated."""
    candidate = Path(sys.executable).with_name("dvc")
    return str(candidate) if candidate.exists() else "dvc"


def dvc_get(source: str, path: str, rev: str, out: Path, storage: StorageConfig | None) -> None:
    """`dvc get SOURCE PATH --rev REV -o OUT` with `storage`'s S3 settings (none: DVC's
    own, e.g. a public bucket); RegistryError with DVC's message if it fails."""
    env = {**os.environ, **(storage.subprocess_env() if storage else {})}
    argv = [dvc_executable(), "get", source, path, "--rev", rev, "-o", str(out)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise RegistryError(f"`dvc get {source} {path} --rev {rev}` failed:\n{detail}")


class DataRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        #: lock descriptors every DVC child inherits (see `lend_locks`)
        self._lent_fds: tuple[int, ...] = ()

    def lend_locks(self, fds: Sequence[int]) -> None:
        """Let DVC children hold the run's locks too: if the run is killed during a
        `dvc push` or `dvc commit`, the locks stay held until DVC exits, so no other run
        recovers or publishes under it. (Not git's: `git commit` may leave a detached
        `gc --auto` behind that would hold them for minutes; a killed git leaves at most
        lock files, which recovery removes.)"""
        self._lent_fds = tuple(fds)

    # -- setup -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> "DataRegistry":
        """Open a registry: the top of a git repo (DVC is initialised if missing).

        A path that does not exist becomes a new repo; an existing directory that is not
        a git repo's top level is refused rather than silently turned into one.
        """
        path = path.resolve()
        if path.exists():
            cls.existing(path)
        registry = cls(path)
        if not path.exists():
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                raise RegistryPathError(f"cannot create registry {path}: {exc.strerror or exc}") from None
            registry.git("init", "--quiet", "--initial-branch=main")
        if not (path / ".dvc").exists():
            registry.dvc("init")
            registry.git("commit", "--quiet", "-m", "Initialise DVC", "--", ".dvc", ".dvcignore")
        exclude = path / ".git" / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        existing = exclude.read_text() if exclude.exists() else ""
        if "/.synthfactory/" not in existing.splitlines():
            exclude.write_text(existing + "\n/.synthfactory/\n")
        return registry

    @classmethod
    def existing(cls, path: Path) -> "DataRegistry":
        """A registry that must already be there (for read-only commands)."""
        path = path.resolve()
        proc = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True
        ) if path.is_dir() else None
        if proc is None or proc.returncode != 0 or Path(proc.stdout.strip()).resolve() != path:
            raise RegistryPathError(
                f"registry {path} is not the top of a git repository: give a repo's root, or a new path to create one"
            )
        return cls(path)

    @property
    def scratch(self) -> Path:
        """Git-ignored working space on the registry's filesystem (atomic renames into data/)."""
        return self.root / ".synthfactory"

    def release_dir(self, dataset: str) -> Path:
        return self.root / "data" / dataset

    # -- commands --------------------------------------------------------------------
    @functools.cached_property
    def _identity_env(self) -> dict[str, str]:
        """A bot identity for commits where git has none configured (CI machines)."""
        if "GIT_AUTHOR_EMAIL" in os.environ:
            return {}
        proc = subprocess.run(["git", "config", "user.email"], cwd=self.root, capture_output=True, text=True)
        return {} if proc.stdout.strip() else BOT_IDENTITY

    def _run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, lend: bool = False) -> str:
        full_env = {**os.environ, **self._identity_env, **(env or {})}
        proc = subprocess.run(list(argv), cwd=self.root, env=full_env, capture_output=True, text=True,
                              pass_fds=self._lent_fds if lend else ())
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            command = " ".join([Path(argv[0]).name, *argv[1:]])
            if says_disk_full(detail):  # DVC's raw "unexpected error - [Errno 28]" says nothing useful
                raise RegistryError(f"`{command}` ran out of disk space (No space left on device) in {self.root}: "
                                    "free space on the disk of the registry and its DVC cache")
            raise RegistryError(f"`{command}` failed in {self.root}:\n{detail}")
        return proc.stdout

    def git(self, *args: str) -> str:
        return self._run(["git", *args])

    def dvc(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        return self._run([dvc_executable(), *args], env=env, lend=True)

    # -- releases --------------------------------------------------------------------
    def releases(self, dataset: str | None = None) -> list[Release]:
        out = self.git(
            "for-each-ref", f"refs/tags/{dataset}@v*" if dataset else "refs/tags/*@v*",
            "--format=%(refname:short)%09%(*objectname)%(objectname)%09%(creatordate:iso-strict)",
        )
        releases = []
        for line in out.splitlines():
            name, commit, date = line.split("\t")
            tag = ReleaseTag.parse(name)
            if tag is None or (dataset and tag.dataset != dataset):
                continue
            releases.append(Release(tag.dataset, tag.version, str(tag), commit[:40], date, self.release_metrics(tag) or {}))
        return sorted(releases, key=lambda r: (r.dataset, r.version))

    def release_metrics(self, tag: ReleaseTag | str) -> dict[str, Any] | None:
        """metrics.json of release `tag`; None when the tag or its metrics are missing."""
        tag = ReleaseTag.parse(str(tag))
        if tag is None:
            return None
        try:
            return json.loads(self.git("show", f"{tag}:data/{tag.dataset}/{METRICS_FILE}"))
        except (RegistryError, json.JSONDecodeError):
            return None

    def release_tags(self, dataset: str | None = None) -> list[ReleaseTag]:
        """Release tags in (dataset, version) order, without reading their metrics."""
        found = (ReleaseTag.parse(name) for name in self.git("tag", "--list", f"{dataset or '*'}@v*").split())
        return sorted(tag for tag in found if tag is not None and dataset in (None, tag.dataset))

    def tags(self, dataset: str | None = None) -> list[str]:
        return [str(tag) for tag in self.release_tags(dataset)]

    def latest_tag(self, dataset: str) -> str | None:
        tags = self.release_tags(dataset)
        return str(tags[-1]) if tags else None

    def tag_note(self, tag: str) -> dict[str, Any]:
        """The JSON summary a release wrote into its annotated tag ({} if none)."""
        body = self.git("for-each-ref", f"refs/tags/{tag}", "--format=%(contents:body)").strip()
        try:
            return json.loads(body) if body else {}
        except json.JSONDecodeError:
            return {}

    def push(self, remote: str, tags: Sequence[str]) -> None:
        """Push the current branch and `tags` to `remote` (a CI run's releases)."""
        branch = self._run(["git", "symbolic-ref", "--quiet", "--short", "HEAD"]).strip()
        self.git("push", "--quiet", remote, f"HEAD:refs/heads/{branch}", *(f"refs/tags/{tag}" for tag in tags))

    def remotes(self) -> list[str]:
        return self.git("remote").split()

    def next_tag(self, dataset: str) -> str:
        tags = self.release_tags(dataset)
        return str(tags[-1].next() if tags else first(dataset))

    def sync_file(self, source: Path, relative: str) -> str:
        """Make the registry hold `source` at `relative` (recipe, generator code); return the path."""
        target = self.root / relative
        if source.resolve() != target.resolve() and (
            not target.exists() or target.read_bytes() != source.read_bytes()
        ):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        return relative

    def configure_remote(self, storage: StorageConfig) -> None:
        """Point the default DVC remote at the bucket; endpoint and region are committed,
        credentials never are (they come from the environment)."""
        from dvc.config import Config

        config = Config(dvc_dir=str(self.root / ".dvc"), validate=False)
        with config.edit("repo") as conf:
            remote = {"url": storage.remote_url, "region": storage.region}
            if storage.endpoint_url:
                remote["endpointurl"] = storage.endpoint_url
            conf["remote"][REMOTE_NAME] = remote
            conf["core"]["remote"] = REMOTE_NAME

    def record_stage(self, dataset: str, command: str, deps: Sequence[str]) -> None:
        """(Re)declare the dataset's dvc.yaml stage: deps = recipe + code, outs = the release.
        Stages of other datasets that were never released (no dvc.lock entry, e.g. one an
        older factory checkout shipped) go: a plain `dvc pull` at a tag fails on them."""
        import yaml

        def stages(name: str) -> dict[str, Any]:
            path = self.root / name
            return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.exists() else {}

        locked = stages("dvc.lock")
        for stage in stages("dvc.yaml"):
            if stage != dataset and stage not in locked:
                self.dvc("remove", stage)
        out_root = f"data/{dataset}"
        argv = ["stage", "add", "--force", "--name", dataset]
        for dep in deps:
            argv += ["--deps", dep]
        for out in CACHED_OUTS:
            argv += ["--outs", f"{out_root}/{out}"]
        for out in GIT_OUTS:
            argv += ["--outs-no-cache", f"{out_root}/{out}"]
        argv += ["--metrics-no-cache", f"{out_root}/{METRICS_FILE}", command]
        self.dvc(*argv)

    def unstage(self, commit: str, paths: Sequence[str]) -> None:
        """Make the index hold `paths` as `commit` has them (the files are left alone)."""
        self.git("reset", "--quiet", commit, "--", *paths)

    def dvc_commit(self, dataset: str) -> None:
        """Record the release's data in dvc.lock and the DVC cache."""
        self.dvc("commit", "--force", dataset)

    def commit_and_tag(
        self,
        dataset: str,
        tag: str,
        storage: StorageConfig,
        paths: Sequence[str],
        message: str,
        tag_note: str,
        push_retry_delays: Sequence[float] = (2.0, 8.0),
    ) -> Release:
        """dvc push (retried) -> git commit -> tag, after `dvc_commit`: the tag comes last,
        so it never points at data missing from S3. Pushes are content-addressed, so a
        retry only uploads what is missing."""
        for attempt, delay in enumerate([*push_retry_delays, None]):
            try:
                self.dvc("push", dataset, env=storage.subprocess_env())
                break
            except RegistryError as failure:
                if delay is None:
                    raise
                logger.warning("dvc push of %s failed (attempt %d), retrying in %.0f s: %s", tag, attempt + 1, delay,
                               tool_error_line(str(failure)))
                time.sleep(delay)
        crash_point("pushed")
        self.git("add", "--", *paths)
        self.git("commit", "--quiet", "-m", message, "--", *paths)
        crash_point("committed")
        try:
            self.git("tag", "--annotate", tag, "-m", tag_note)
        except RegistryError:
            self.git("reset", "--quiet", "--soft", "HEAD^")
            raise
        released = next(r for r in self.releases(dataset) if r.tag == tag)
        return dataclasses.replace(released, push_retries=attempt)

    def snapshot(self, paths: Sequence[str]) -> "FileSnapshot":
        return FileSnapshot(self.root, paths)

    def lock(self) -> FileLock:
        """Serialises changes to one registry's workspace, dvc.lock and git."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.scratch / "registry.lock"))


class FileSnapshot:
    """The bytes (or absence) of some files, to put back exactly if a publish fails.

    Restoring from a snapshot rather than from git HEAD keeps a developer's uncommitted
    edits to the recipe or generator code when the registry is their checkout. A
    snapshot saved to disk survives a killed process, so the next run can roll back.
    """

    def __init__(self, root: Path, paths: Sequence[str], saved: dict[str, bytes | None] | None = None) -> None:
        self._root = root
        self._saved = saved if saved is not None else {
            p: (root / p).read_bytes() if (root / p).is_file() else None for p in paths
        }

    @property
    def paths(self) -> list[str]:
        return list(self._saved)

    def changed(self) -> dict[str, str | None]:
        """Paths whose file no longer holds the saved bytes (or is there when it was not),
        with the sha256 of what the file holds now (None: gone)."""
        current = {p: file_digest(self._root / p) for p in self._saved}
        return {p: digest for p, digest in current.items()
                if digest != (None if self._saved[p] is None else hashlib.sha256(self._saved[p]).hexdigest())}

    def restore(self) -> None:
        for relative, data in self._saved.items():
            target = self._root / relative
            if data is None:
                target.unlink(missing_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)

    def save(self, directory: Path) -> None:
        """Write the snapshot under `directory`, durably (files, then the index last) before
        the journal that points at it."""
        directory.mkdir(parents=True, exist_ok=True)
        index = {}
        for number, (relative, data) in enumerate(self._saved.items()):
            if data is not None:
                atomic_write(directory / str(number), data)
            index[relative] = None if data is None else str(number)
        atomic_write_json(directory / "index.json", index)

    @classmethod
    def load(cls, root: Path, directory: Path) -> "FileSnapshot":
        index = json.loads((directory / "index.json").read_text())
        return cls(root, [], {p: None if n is None else (directory / n).read_bytes() for p, n in index.items()})
