"""Content-addressed shard cache: the durable record that makes runs resumable.

A shard's key (`fingerprint.shard_keys`) hashes everything that shapes its bytes: the
resolved recipe (minus the sample count and the run settings), the code, and the
shard's sample range. A shard is generated into a private temporary directory,
fsynced, then renamed to ``<key>/`` in one step: an entry either exists whole or not at all. A rerun of the same release (after a crash,
a kill, a failed gate or publish) finds its finished shards here and only generates the
rest; a recipe that appends samples reuses every full shard it shares with the last one.

Entry layout (the same as a release, so staging only hard-links files)::

    <key>/shards/<name>.tar           accepted samples
    <key>/rejected/<name>.tar         refused samples with content (optional)
    <key>/<stem>.manifest.parquet     manifest fragment
    <key>/<stem>.rejected.parquet     rejected fragment
    <key>/result.json                 counts and timings, plus each file's size and sha256
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from synthfactory.files import file_digest, fsync_dir, fsync_tree, link_or_copy
from synthfactory.shards import REJECTED_DIR, SHARDS_DIR, fragment_path

RESULT_FILE = "result.json"
log = logging.getLogger(__name__)


class ShardCache:
    """The finished shards of one dataset in one registry."""

    def __init__(self, root: Path, responses: Path | None = None) -> None:
        self.root = Path(root)
        #: served-model answers, kept across releases (pruning shards never drops them)
        self.responses = Path(responses) if responses else None

    def entry(self, key: str) -> Path:
        return self.root / key

    def staging_dir(self, key: str) -> Path:
        """A private directory to generate into (unique per attempt, never a visible entry)."""
        path = self.root / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def lookup(self, key: str, *, hashes: bool = True) -> dict[str, Any] | None:
        """The recorded result of a finished entry, or None. An entry whose files differ from
        the recorded sizes or (with `hashes`, before a reuse) sha256 — disk damage, a hand
        edit — is discarded, with a warning, and regenerated."""
        entry = self.entry(key)
        try:
            result = json.loads((entry / RESULT_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        problem = _damage(entry, result.get("files"), hashes)
        if problem:
            log.warning("shard cache entry %s is damaged (%s): discarded, the shard is made again", entry, problem)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return result

    def commit(self, staging: Path, key: str, result: dict[str, Any]) -> Path:
        """Record `result` with the size and sha256 of each staged file, flush, and rename the
        staging directory into place. If another attempt committed the same key first, keep theirs."""
        files = {p.relative_to(staging).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
                 for p in sorted(staging.rglob("*")) if p.is_file()}
        (staging / RESULT_FILE).write_text(json.dumps({**result, "files": files}, sort_keys=True))
        fsync_tree(staging)
        entry = self.entry(key)
        try:
            os.rename(staging, entry)
        except OSError:  # the same shard finished twice (a retry raced a slow attempt)
            shutil.rmtree(staging, ignore_errors=True)
            if self.lookup(key, hashes=False) is None:
                raise
        fsync_dir(self.root)
        return entry

    def shard_files(self, key: str, name: str) -> tuple[Path, Path]:
        """(accepted-samples tar, manifest fragment) of shard `name` in entry `key`."""
        entry = self.entry(key)
        return entry / SHARDS_DIR / name, fragment_path(entry, name, "manifest")

    def link_into(self, key: str, name: str, stage_dir: Path) -> None:
        """Put the entry's tars into a release being staged: hard links (no copy), or a
        copy where links are impossible. Later steps replace files, never edit them, so
        the entry's bytes stay intact. An entry that lost a file it recorded fails loudly."""
        entry = self.entry(key)
        result = self.lookup(key, hashes=False)  # the run's reuse of it checked the content
        if result is None:
            raise FileNotFoundError(f"shard {name}: its cache entry {entry} is gone or damaged; rerun to regenerate it")
        for sub in (SHARDS_DIR, REJECTED_DIR):
            source = entry / sub / name
            if f"{sub}/{name}" in result["files"]:
                target = stage_dir / sub / name
                target.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(source, target)

    def prune(self, keep: set[str]) -> int:
        """Remove entries (and abandoned staging dirs) not in `keep`; returns how many.
        Called after a release, so the cache holds one release's shards per dataset."""
        removed = 0
        if not self.root.exists():
            return 0
        for path in self.root.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed


def _damage(entry: Path, files: Any, hashes: bool) -> str | None:
    """What is wrong with the entry's files against their record, or None."""
    if not isinstance(files, dict) or not files:
        return "no record of its files"
    for name, recorded in files.items():
        path = entry / name
        if not isinstance(recorded, dict):
            return "recorded without hashes (an older format)"
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return f"{name} is missing"
        if size != recorded["bytes"]:
            return f"{name} holds {size} bytes, recorded {recorded['bytes']}"
        if hashes and file_digest(path) != recorded["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None
