"""The data registry: a git + DVC repository whose tags are dataset releases.

DVC's data-registry pattern: each dataset is a dvc.yaml stage whose deps are the recipe
and the generator code and whose outs are ``data/<dataset>/``; dvc.lock pins their
hashes. A release commits dvc.yaml/dvc.lock (plus the git-tracked card and metrics),
pushes the data to the S3 remote *before* committing, and tags ``<dataset>@v<N>``, so a
tag never points at data missing from S3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from synthfactory.storage import StorageConfig

REMOTE_NAME = "storage"
#: the parts of a release tracked in DVC's cache (the rest is small and goes to git)
CACHED_OUTS = ("shards", "manifest.parquet", "rejected.parquet", "validation")
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


@dataclass(frozen=True)
class Release:
    dataset: str
    version: int
    tag: str
    commit: str
    date: str
    metrics: dict[str, Any]


def dvc_executable() -> str:
    """The dvc next to this interpreter, so a venv works without being activated."""
    candidate = Path(sys.executable).with_name("dvc")
    return str(candidate) if candidate.exists() else "dvc"


class DataRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    # -- setup -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, clone_from: Path | None = None) -> "DataRegistry":
        """Open (or create) a registry: a git repo with DVC initialised.

        A missing path is cloned from `clone_from` (the factory repo) when given, else
        initialised empty; scratch state under .synthfactory/ is ignored locally.
        """
        path = path.resolve()
        if not path.exists() and clone_from is not None:
            subprocess.run(["git", "clone", "--quiet", str(clone_from), str(path)], check=True, capture_output=True)
        path.mkdir(parents=True, exist_ok=True)
        registry = cls(path)
        if not (path / ".git").exists():
            registry.git("init", "--quiet", "--initial-branch=main")
        if not (path / ".dvc").exists():
            registry.dvc("init", "--quiet")
            registry.git("commit", "--quiet", "-m", "Initialise DVC", "--", ".dvc", ".dvcignore")
        exclude = path / ".git" / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        existing = exclude.read_text() if exclude.exists() else ""
        if "/.synthfactory/" not in existing.splitlines():
            exclude.write_text(existing + "\n/.synthfactory/\n")
        return registry

    @property
    def scratch(self) -> Path:
        """Git-ignored working space on the registry's filesystem (atomic renames into data/)."""
        return self.root / ".synthfactory"

    def release_dir(self, dataset: str) -> Path:
        return self.root / "data" / dataset

    # -- commands --------------------------------------------------------------------
    def _run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        full_env = {**os.environ, **(env or {})}
        if "GIT_AUTHOR_EMAIL" not in full_env and not self._has_git_identity():
            full_env.update(BOT_IDENTITY)
        proc = subprocess.run(list(argv), cwd=self.root, env=full_env, capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()
            command = " ".join([Path(argv[0]).name, *argv[1:]])
            raise RegistryError(f"`{command}` failed in {self.root}:\n{detail}")
        return proc.stdout

    def _has_git_identity(self) -> bool:
        proc = subprocess.run(["git", "config", "user.email"], cwd=self.root, capture_output=True, text=True)
        return bool(proc.stdout.strip())

    def git(self, *args: str) -> str:
        return self._run(["git", *args])

    def dvc(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        return self._run([dvc_executable(), *args], env=env)

    # -- releases --------------------------------------------------------------------
    def releases(self, dataset: str | None = None) -> list[Release]:
        pattern = f"{dataset}@v*" if dataset else "*@v*"
        out = self.git(
            "for-each-ref", f"refs/tags/{pattern}",
            "--format=%(refname:short)%09%(*objectname)%(objectname)%09%(creatordate:iso-strict)",
        )
        releases = []
        for line in out.splitlines():
            tag, commit, date = line.split("\t")
            name, _, version = tag.rpartition("@v")
            if not version.isdigit():
                continue
            metrics_path = f"data/{name}/{METRICS_FILE}"
            try:
                metrics = json.loads(self.git("show", f"{tag}:{metrics_path}"))
            except (RegistryError, json.JSONDecodeError):
                metrics = {}
            releases.append(Release(name, int(version), tag, commit[:40], date, metrics))
        return sorted(releases, key=lambda r: (r.dataset, r.version))

    def next_version(self, dataset: str) -> int:
        return max((r.version for r in self.releases(dataset)), default=0) + 1

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
        """(Re)declare the dataset's dvc.yaml stage: deps = recipe + code, outs = the release."""
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

    def publish(
        self, dataset: str, storage: StorageConfig, paths: Sequence[str], message: str, tag_note: str
    ) -> Release:
        """dvc commit -> dvc push -> git commit -> tag. Push precedes the commit and tag."""
        env = storage.subprocess_env()
        self.dvc("commit", "--force", "--quiet", dataset)
        self.dvc("push", "--quiet", dataset, env=env)
        self.git("add", "--", *paths)
        self.git("commit", "--quiet", "-m", message, "--", *paths)
        version = self.next_version(dataset)
        tag = f"{dataset}@v{version}"
        self.git("tag", "--annotate", tag, "-m", tag_note)
        return next(r for r in self.releases(dataset) if r.tag == tag)

    def rollback(self, dataset: str, paths: Sequence[str]) -> None:
        """Undo an unfinished publish: tracked files back to HEAD, new files removed,
        the dataset's outs back to the last release's data."""
        tracked = set(self.git("ls-files", "--", *paths).split())
        if tracked:
            self.git("checkout", "HEAD", "--", *sorted(tracked))
        self.git("clean", "--quiet", "-f", "--", *paths)
        release_dir = self.release_dir(dataset)
        if f"data/{dataset}/{METRICS_FILE}" in tracked:
            self.dvc("checkout", "--force", "--quiet", dataset)
        elif release_dir.exists():
            shutil.rmtree(release_dir)

    def lock(self) -> FileLock:
        """Serialises publishes into one registry (dvc.lock and git are shared)."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.scratch / "registry.lock"))
