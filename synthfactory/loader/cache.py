"""The loader's on-disk shard cache: bounded, least recently read out first, shared by
every DataLoader worker and rank on the machine; and the fetch that fills it."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from synthfactory.files import disk_full, fsync_dir
from synthfactory.loader.errors import LoaderError

DEFAULT_CACHE_BYTES = 8 * 2**30
log = logging.getLogger(__name__)
_COPY_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """$SYNTHFACTORY_CACHE_DIR, else the user's cache directory (XDG)."""
    explicit = os.environ.get("SYNTHFACTORY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "synthfactory" / "shards"


class DiskCache:
    """Shard files on local disk, at most `max_bytes` in all, shared by processes.

    Space is taken before a byte is written: under the cache lock a writer evicts the
    least recently read entries, then creates its temporary file at full size, so the
    files in the directory never add up to more than the bound. A reader holds a shared
    ``flock`` on an entry while it reads; eviction skips entries in use (and takes
    temporary files whose writer died), and a writer that finds no room streams the
    shard without caching it. Entries appear by atomic rename, so nobody reads half a file.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """The cache-wide lock (a fresh descriptor each time, so it is safe across fork)."""
        with open(self.root / ".lock", "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def __repr__(self) -> str:
        return f"DiskCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self._files())

    def open(self, key: str) -> BinaryIO | None:
        """The cached entry, pinned against eviction until closed; None on a miss."""
        path = self.root / key
        with self._lock():
            try:
                handle = open(path, "rb")
            except FileNotFoundError:
                return None
            fcntl.flock(handle, fcntl.LOCK_SH)  # never blocks: exclusive locks are taken under self._lock
            os.utime(path)  # recency for LRU
        return handle

    def drop(self, key: str) -> None:
        """Remove entry `key` (found damaged): the next reader fetches it again. Readers
        that have it open keep their (unlinked) file until they close it."""
        with self._lock():
            (self.root / key).unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def reserve(self, key: str, size: int) -> CacheWriter | None:
        """A writer for `size` bytes of entry `key`, or None when they cannot fit now."""
        if size > self.max_bytes:
            return None
        with self._lock():
            if not self._make_room(size):
                return None
            part = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
            handle = open(part, "w+b")
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.truncate(size)  # the reservation: counted from now on
        return CacheWriter(self, key, part, handle)

    def _files(self) -> list[tuple[Path, int, float]]:
        found = []
        for entry in os.scandir(self.root):
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append((Path(entry.path), stat.st_size, stat.st_mtime))
        return found

    def _make_room(self, size: int) -> bool:
        """Evict until `size` more bytes fit: dead writers' files first, then least recently read."""
        files = self._files()
        free = self.max_bytes - sum(file_size for _, file_size, _ in files)
        for path, file_size, _ in sorted(files, key=lambda f: (not f[0].name.endswith(".part"), f[2])):
            if free >= size:
                break
            if path.name != ".lock" and self._remove_unused(path):
                free += file_size
        return free >= size

    @staticmethod
    def _remove_unused(path: Path) -> bool:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return True
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being read, or being written by a live process
            path.unlink()
            return True


class CacheWriter:
    """Fills one reserved entry; `commit` publishes it, `discard` gives the space back."""

    def __init__(self, cache: DiskCache, key: str, part: Path, handle: BinaryIO) -> None:
        self.cache, self.key, self.part, self._handle = cache, key, part, handle

    def write(self, data: bytes) -> None:
        self._handle.write(data)

    def commit(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        with self.cache._lock():
            target = self.cache.root / self.key
            if target.exists():  # another consumer cached it meanwhile
                self.part.unlink()
            else:
                os.replace(self.part, target)
                fsync_dir(self.cache.root)
            self._handle.close()

    def discard(self) -> None:
        if not self._handle.closed:
            self.part.unlink(missing_ok=True)
            self._handle.close()


class Fetch:
    """A shard read from its source while being hashed and copied into the cache."""

    def __init__(self, source: BinaryIO, size: int, name: str, md5: str | None, writer: CacheWriter | None) -> None:
        self.source, self.size, self.name, self.md5, self.writer = source, size, name, md5, writer
        self.read_bytes = 0
        self._hash = hashlib.md5() if md5 else None

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.read_bytes += len(data)
        if self._hash is not None:
            self._hash.update(data)
        if self.writer is not None:
            try:
                self.writer.write(data)
            except OSError as exc:
                if not disk_full(exc):
                    raise
                log.warning("shard cache %s: the disk is full; %s is read without caching it", self.writer.cache.root, self.name)
                self.writer.discard()
                self.writer = None
        return data

    def finish(self) -> None:
        """Read what the tar reader left (end-of-archive padding), check, publish."""
        while self.read(_COPY_CHUNK):
            pass
        if self.read_bytes != self.size:
            raise LoaderError(f"shard {self.name}: read {self.read_bytes} bytes, expected {self.size}")
        if self._hash is not None and self._hash.hexdigest() != self.md5:
            raise LoaderError(f"shard {self.name}: content does not match its DVC md5 {self.md5}")
        if self.writer is not None:
            self.writer.commit()
