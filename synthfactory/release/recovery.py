"""Crash recovery: the publish journal, and undoing what a killed run left behind.

A publish writes a journal into its work dir before it touches the registry: the saved
bytes of every file it may rewrite (and the hashes of what it writes there, so a
rollback never overwrites a file edited after the kill), the base commit, the planned
tag and the release entries it moves. A later run that finds the journal of a dead run rolls that publish
back (or, if its tag exists, recognises it as complete), and deletes dead runs' work
dirs; their finished shards stay in the shard cache, so the rerun only does the rest.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from synthfactory.files import atomic_write_json, flock_held
from synthfactory.registry import DataRegistry, FileSnapshot, RegistryError

logger = logging.getLogger(__name__)

#: in a run's work dir: the file its run holds a flock on, and the journal of a publish in progress
OWNER_FILE, JOURNAL_FILE, SNAPSHOT_DIR = "owner.lock", "publishing.json", "snapshot"
#: a work dir with no owner file yet is being created; older than this, it was abandoned
OWNERLESS_GRACE_S = 60.0


def write_journal(work_dir: Path, journal: dict[str, Any]) -> None:
    atomic_write_json(work_dir / JOURNAL_FILE, journal)


def close_journal(work_dir: Path) -> None:
    (work_dir / JOURNAL_FILE).unlink()


def _owner_alive(work_dir: Path) -> bool:
    """Does a live run hold the work dir's owner lock? (A dir still being created has no
    lock file yet.)"""
    if (work_dir / OWNER_FILE).exists():
        return flock_held(work_dir / OWNER_FILE)
    try:
        return time.time() - work_dir.stat().st_mtime < OWNERLESS_GRACE_S
    except OSError:
        return False


def recover_interrupted(registry: DataRegistry, wait: bool = True) -> list[str]:
    """Undo what killed runs left behind; returns what it did.

    Runs under the registry lock; with `wait=False` it does nothing while another run
    holds the lock (that run recovers before it publishes)."""
    from filelock import Timeout

    if not (registry.scratch / "work").exists():
        return []
    lock = registry.lock()
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return []
    try:
        return recover(registry)
    finally:
        lock.release()


def recover(registry: DataRegistry) -> list[str]:
    """recover_interrupted() for a caller that holds the registry lock."""
    done = []
    work_root = registry.scratch / "work"
    for work_dir in sorted(p for p in work_root.iterdir() if p.is_dir()) if work_root.exists() else []:
        if _owner_alive(work_dir):
            continue
        journal = work_dir / JOURNAL_FILE
        if journal.exists():
            entries = json.loads(journal.read_text())
            if "tag" in entries:
                _remove_git_locks_since(registry, journal.stat().st_mtime)
                done.append(_roll_back_publish(registry, work_dir, entries))
            else:  # a --no-publish run killed while swapping its release into data/
                _restore_release_entries(registry, work_dir, entries)
                done.append(f"{entries['dataset']}: put back the data/ entries an interrupted --no-publish run was replacing")
        shutil.rmtree(work_dir, ignore_errors=True)
    return done


def _remove_git_locks_since(registry: DataRegistry, started: float) -> None:
    """Remove the lock files a git killed with the run left (index, HEAD, refs, packed
    refs): those created after its journal, while it held the registry lock. An older
    lock is not the run's (a user's git): it is left, and git names it if it is in the way."""
    git_dir = registry.root / ".git"
    candidates = [git_dir / "index.lock", git_dir / "HEAD.lock", git_dir / "packed-refs.lock",
                  *(git_dir / "refs").rglob("*.lock")]
    for lock in candidates:
        try:
            if lock.stat().st_mtime >= started:
                lock.unlink()
                logger.info("removed %s, left by a git killed with an interrupted publish", lock)
        except FileNotFoundError:
            continue


def _roll_back_publish(registry: DataRegistry, work_dir: Path, journal: dict[str, Any]) -> str:
    tag, base = journal["tag"], journal["base_commit"]
    if tag in registry.tags(journal["dataset"]):
        return f"{tag}: the interrupted run had finished publishing"
    snapshot = FileSnapshot.load(registry.root, work_dir / SNAPSHOT_DIR)
    written = journal.get("written", {})
    edited = [path for path, now in snapshot.changed().items() if path in written and now not in (written[path], None)]
    if edited:
        raise RegistryError(
            f"an interrupted publish of {tag} would be rolled back, but {', '.join(edited)} changed since it was "
            f"killed (your edit?), and the rollback would overwrite it: move your version aside and rerun (the "
            f"rollback restores the files as they were before that publish), then put yours back"
        )
    head = registry.git("rev-parse", "HEAD").strip()
    if head != base:
        parent = registry.git("rev-parse", "HEAD^").strip()
        subject = registry.git("log", "-1", "--format=%s").strip()
        if parent != base or subject != journal["message"]:
            raise RegistryError(
                f"an interrupted publish of {tag} left {registry.root} at {head[:12]}, which is not its release "
                f"commit on {base[:12]}: inspect the repository, then delete {work_dir}"
            )
        registry.git("reset", "--quiet", "--soft", base)
    registry.unstage(base, [*snapshot.paths, f"data/{journal['dataset']}"])
    snapshot.restore()
    _restore_release_entries(registry, work_dir, journal)
    return f"{tag}: rolled back a publish interrupted at {head[:12]}"


def _restore_release_entries(registry: DataRegistry, work_dir: Path, journal: dict[str, Any]) -> None:
    """Put data/<dataset>/ back as it was before the swap: the previous entries set aside
    in the work dir return, the new ones go."""
    release_dir = registry.release_dir(journal["dataset"])
    previous = work_dir / "previous"
    for name in journal["names"]:
        current, original = release_dir / name, previous / name
        if name in journal["existing"] and not original.exists():
            continue  # never moved aside: still the previous release's
        if current.is_dir():
            shutil.rmtree(current)
        else:
            current.unlink(missing_ok=True)
        if original.exists():
            original.rename(current)
