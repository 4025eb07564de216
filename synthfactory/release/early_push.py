"""Finished shards go to the DVC remote while later shards still generate, so the push
after the gate uploads only what needs every shard (listings, Data Docs, report).

Objects land where DVC 3 addresses them (`files/md5/<2>/<30>` under the remote), so
`dvc push` finds them there and skips them. Nothing names them until the release's
commit and tag, so a release still becomes visible whole or not at all; a run whose gate
fails leaves them unreferenced, for `dvc gc --cloud`. An early upload that fails is
counted and left to `dvc push`, which uploads whatever is missing.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from synthfactory.files import file_digest
from synthfactory.storage import StorageConfig, dvc_object_key, minio_client

log = logging.getLogger(__name__)


@dataclass
class EarlyPushed:
    files: int = 0
    bytes: int = 0
    present: int = 0  # already in the remote (an earlier release or run)
    failed: int = 0

    def describe(self) -> str:
        text = f"{self.files} shard files ({self.bytes / 1e6:.1f} MB) pushed while generating"
        if self.present:
            text += f", {self.present} already in the remote"
        return text + (f", {self.failed} failed (left to dvc push)" if self.failed else "")


class EarlyPush:
    """One background uploader per publishing run: a thread, so generation never waits."""

    def __init__(self, storage: StorageConfig) -> None:
        self._storage = storage
        self._client = minio_client(storage)
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="early-push")
        self._pending: list[Future[None]] = []
        self.pushed = EarlyPushed()

    def shard_ready(self, *files: Path) -> None:
        self._pending += [self._uploader.submit(self._put, path) for path in files]

    def _put(self, path: Path) -> None:
        try:
            md5 = file_digest(path, "md5")
            if md5 is None:
                return
            key = dvc_object_key(self._storage, md5)
            try:
                self._client.stat_object(self._storage.bucket, key)
                self.pushed.present += 1
                return
            except Exception:  # absent (or unreadable: the upload then tells)
                pass
            self._client.fput_object(self._storage.bucket, key, str(path))
            self.pushed.files += 1
            self.pushed.bytes += path.stat().st_size
        except Exception as exc:
            self.pushed.failed += 1
            log.warning("early push of %s failed, dvc push uploads it later: %s: %s", path.name, type(exc).__name__, exc)

    def finish(self) -> EarlyPushed:
        """Wait for the uploads in flight (the last shard's), then stop."""
        for future in self._pending:
            future.result()
        self._uploader.shutdown()
        return self.pushed

    def cancel(self) -> None:
        self._uploader.shutdown(wait=True, cancel_futures=True)
