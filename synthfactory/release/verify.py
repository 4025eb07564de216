"""Checking a release's bytes against its manifest (a pulled copy, a release directory)."""

from __future__ import annotations

from pathlib import Path

from synthfactory.shards import MANIFEST, SHARDS_DIR, ManifestIndex, ShardFormatError, verified_samples


def verify_release(release_dir: Path) -> tuple[int, list[str]]:
    """Re-hash every member of every sample against the manifest, shard by shard:
    (samples that match, problems). A shard is named damaged at its first difference."""
    manifest = release_dir / MANIFEST
    try:
        index = ManifestIndex(manifest)
        listed = index.shards()
    except (OSError, ValueError) as exc:
        return 0, [f"{MANIFEST} is damaged: {exc}"]
    on_disk = {path.name: path for path in (release_dir / SHARDS_DIR).glob("*.tar")}
    problems, checked = [], 0
    for name in sorted(listed | set(on_disk)):
        if name not in on_disk:
            problems.append(f"{name}: in the manifest but not in {SHARDS_DIR}/")
            continue
        try:
            for _ in verified_samples(on_disk[name], index.samples(name), hashes=True):
                checked += 1
        except (OSError, ShardFormatError) as exc:
            problems.append(f"{name} is damaged: {exc}")
    return checked, problems
