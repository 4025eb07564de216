"""Links a browser can open to a run's reports, never a file:// path that exists only on
the worker's disk: a published release's HTML report by a presigned S3 URL of its DVC
object; a failed gate's report and Data Docs (nothing is pushed) from the kept-reports
folder that `synthfactory server` serves next to the Prefect UI."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from synthfactory import settings
from synthfactory.files import file_digest
from synthfactory.storage import StorageConfig, dvc_object_key, minio_client

#: how long a shared link works: SigV4's longest
LINK_LIFETIME = timedelta(days=7)
#: the base URL under which `synthfactory server` serves `kept_reports_dir()` (it sets
#: this for its workers); unset, a kept report is linked by its path
REPORTS_URL_VAR = "SYNTHFACTORY_REPORTS_URL"
#: failed-gate reports kept per dataset, newest first (each is a copy of a stage's report)
KEPT_PER_DATASET = 20
#: what a failed gate keeps of its stage: the HTML report and the GX Data Docs it links
REPORT_FOLDERS = ("report", "validation")


@dataclass(frozen=True)
class SharedLink:
    url: str
    expires: datetime  # UTC

    def describe(self) -> str:
        return f"valid until {self.expires:%Y-%m-%d %H:%M} UTC"


def share_file(storage: StorageConfig, path: Path, content_type: str, lifetime: timedelta = LINK_LIFETIME) -> SharedLink:
    """A presigned GET of the DVC object that holds `path` (a file of a pushed release,
    stored by DVC under files/md5/<md5>), served as `content_type` so browsers render it."""
    key = dvc_object_key(storage, file_digest(path, "md5"))
    url = minio_client(storage).presigned_get_object(
        storage.bucket, key, expires=lifetime, response_headers={"response-content-type": content_type}
    )
    return SharedLink(url, datetime.now(timezone.utc) + lifetime)


def kept_reports_dir() -> Path:
    return settings.data_dir() / "reports"


def keep_failed_report(stage_dir: Path, dataset: str, run_id: str) -> Path:
    """Copy a failed gate's report and Data Docs out of the stage (which the next run
    reuses) to `kept_reports_dir()/dataset/run_id`; older copies beyond `KEPT_PER_DATASET`
    are removed. Returns the copy."""
    folder = kept_reports_dir() / dataset
    target = folder / run_id
    shutil.rmtree(target, ignore_errors=True)
    for name in REPORT_FOLDERS:
        if (stage_dir / name).is_dir():
            shutil.copytree(stage_dir / name, target / name)
    older = sorted((p for p in folder.iterdir() if p != target), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in older[KEPT_PER_DATASET - 1:]:
        shutil.rmtree(stale, ignore_errors=True)
    return target


def browser_link(path: Path) -> str:
    """The URL of a kept report file as `synthfactory server` serves it, else its file:// URI."""
    base = os.environ.get(REPORTS_URL_VAR)
    try:
        relative = path.resolve().relative_to(kept_reports_dir().resolve())
    except ValueError:
        relative = None
    if base and relative is not None:
        return f"{base.rstrip('/')}/{quote(relative.as_posix())}"
    return path.resolve().as_uri()
