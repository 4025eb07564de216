"""Durable, atomic file writes (the one way the factory replaces a file) and process
locks that die with their process.

A reader (a trainer following the live feed, a resumed run, a crash-recovery pass) sees
either the old bytes or the new ones, never half a file, and after a power cut the
rename is on disk together with the bytes it names.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Write `data` to a private sibling, fsync it, rename it over `path`, fsync the directory.

    `mode` sets the permissions before any byte is written (0o600 for files holding secrets).
    Concurrent writers of one path each use their own temporary file; the last rename wins.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)  # the umask must not widen it
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    """`data` as indented, key-sorted JSON (stable bytes for the same content)."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (before renaming it into place whole)."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [*(p for p in root.rglob("*") if p.is_dir()), root]:
        fsync_dir(directory)


def try_flock(path: Path) -> int | None:
    """Take an exclusive `flock` on `path` (created if missing): the open descriptor that
    holds it (close it to release), or None while another holds it. The kernel drops the
    lock when its process dies, however it dies: unlike a recorded pid, it cannot be
    mistaken for a live owner after a kill or a reused pid."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def flock_held(path: Path) -> bool:
    """Does some process hold a `flock` on `path`?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def file_digest(path: Path, algorithm: str = "sha256") -> str | None:
    """The hex digest of a file's bytes (sha256; md5 where DVC addresses content by it),
    None if there is no file."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, algorithm).hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def link_or_copy(source: Path, target: Path) -> None:
    """Put `source`'s bytes at `target`: a hard link (no copy), or a copy where links are
    impossible. Later steps replace such files, never edit them, so the source stays intact."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


#: how a full disk reads in a child tool's output (DVC, git), where no errno survives
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or anything it was raised from, is a full disk (ENOSPC, EDQUOT), also
    when it only survives as text (a failed DVC command, a shard error from a worker)."""
    for _ in range(20):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if says_disk_full(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def says_disk_full(output: str) -> bool:
    """Whether a tool's output (or an error message) reports a full disk."""
    return any(text in output for text in DISK_FULL_TEXTS)
