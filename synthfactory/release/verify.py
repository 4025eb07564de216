"""Checking a release's bytes against its manifest (a pulled copy, a release directory)."""

from __future__ import annotations

from pathlib import Path

from synthfactory.shards import SHARDS_DIR, ManifestIndex, ShardFormatError, manifest_file, read_manifest, verified_samples

#: how a problem with the manifest itself starts (the remedy is to pull the release again)
MANIFEST_DAMAGED = "the manifest is damaged"


def verify_release(release_dir: Path) -> tuple[int, list[str]]:
    """Re-hash every member of every sample against the manifest, shard by shard:
    (samples that match, problems). A shard is named damaged at its first difference."""
    try:
        listed = set(read_manifest(release_dir, columns=["shard"]).column("shard").to_pylist())
    except (OSError, ValueError) as exc:
        return 0, [f"{MANIFEST_DAMAGED}: {exc}"]
    on_disk = {path.name: path for path in (release_dir / SHARDS_DIR).glob("*.tar")}
    problems, checked = [], 0
    indexes: dict[Path, ManifestIndex] = {}  # one per file: a legacy release's single file is opened once
    for name in sorted(listed | set(on_disk)):
        if name not in on_disk:
            problems.append(f"{name}: in the manifest but not in {SHARDS_DIR}/")
            continue
        record = manifest_file(release_dir, name)
        if not record.is_file():
            problems.append(f"{name}: in {SHARDS_DIR}/ but not in the manifest")
            continue
        try:
            if record not in indexes:
                indexes[record] = ManifestIndex(record)
            expected = indexes[record].samples(name)
        except (OSError, ValueError) as exc:
            problems.append(f"{MANIFEST_DAMAGED} ({record.relative_to(release_dir)}, the record of {name}): {exc}")
            continue
        try:
            for _ in verified_samples(on_disk[name], expected, hashes=True):
                checked += 1
        except (OSError, ShardFormatError) as exc:
            problems.append(f"{name} is damaged: {exc}")
    return checked, problems
