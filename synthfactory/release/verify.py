"""Checking a release's bytes against its manifest (a pulled copy, a release directory)."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

from synthfactory.shards import SHARDS_DIR, read_shard


def verify_release(release_dir: Path) -> tuple[int, list[str]]:
    """Re-hash every sample in the shards against the manifest: (samples checked, problems)."""
    try:
        manifest = pq.read_table(release_dir / "manifest.parquet", columns=["key", "shard", "payload", "sha256"]).to_pylist()
    except (OSError, ValueError) as exc:
        return 0, [f"cannot read {release_dir / 'manifest.parquet'}: {exc}"]
    expected = {row["key"]: row for row in manifest}
    problems, seen = [], 0
    for shard in sorted((release_dir / SHARDS_DIR).glob("*.tar")):
        try:
            samples = list(read_shard(shard))
        except (OSError, tarfile.TarError) as exc:
            problems.append(f"{shard.name}: unreadable tar ({exc})")
            continue
        for key, files in samples:
            row = expected.pop(key, None)
            if row is None:
                problems.append(f"{shard.name}: sample {key} is not in the manifest")
                continue
            seen += 1
            if row["shard"] != shard.name:
                problems.append(f"{key}: in {shard.name}, manifest says {row['shard']}")
            payload = files.get(row["payload"])
            if payload is None or hashlib.sha256(payload).hexdigest() != row["sha256"]:
                problems.append(f"{key}: payload .{row['payload']} does not match its sha256")
    problems += [f"{key}: in the manifest but in no shard" for key in sorted(expected)]
    return seen, problems
