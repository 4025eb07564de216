"""Links a browser can open to what a release pushed (its HTML report): presigned S3 URLs
of the DVC objects, so the Prefect UI links work from any machine that reaches the
store, with no file:// path that exists only on the worker's disk."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from synthfactory.storage import StorageConfig, minio_client

#: how long a shared link works: SigV4's longest
LINK_LIFETIME = timedelta(days=7)


@dataclass(frozen=True)
class SharedLink:
    url: str
    expires: datetime  # UTC

    def describe(self) -> str:
        return f"valid until {self.expires:%Y-%m-%d %H:%M} UTC"


def share_file(storage: StorageConfig, path: Path, content_type: str, lifetime: timedelta = LINK_LIFETIME) -> SharedLink:
    """A presigned GET of the DVC object that holds `path` (a file of a pushed release,
    stored by DVC under files/md5/<md5>), served as `content_type` so browsers render it."""
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    key = "/".join(filter(None, (storage.prefix, "files", "md5", md5[:2], md5[2:])))
    url = minio_client(storage).presigned_get_object(
        storage.bucket, key, expires=lifetime, response_headers={"response-content-type": content_type}
    )
    return SharedLink(url, datetime.now(timezone.utc) + lifetime)
