"""What a trainer reads is what was released: the loader and `validate` check every sample
against the manifest, and the shard cache verifies content before a reuse. Without servers."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from synthfactory.loader import LoaderError, iter_samples
from synthfactory.recipe import parse_recipe
from synthfactory.release.build import build_shard, make_shard
from synthfactory.release.shard_cache import ShardCache
from synthfactory.release.verify import MANIFEST_DAMAGED, verify_release
from synthfactory.shards import (
    LEGACY_MANIFEST,
    MANIFEST_DIR,
    SHARDS_DIR,
    fragment_path,
    manifest_file,
    manifest_record,
    parquet_bytes,
    plan_shards,
    read_manifest,
    read_shard,
)

RECIPE_FIELDS = {
    "name": "intact",
    "generator": {"kind": "procedural-shapes", "params": {"image_size": 24, "classes": ["circle", "square"]}},
    "samples": 60,
    "shard_size": 20,
    "seed": 5,
}
RECIPE = parse_recipe(RECIPE_FIELDS)


@pytest.fixture(scope="module", params=["partitioned", "legacy"])
def release(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release directory as `dvc get` leaves it: shards, manifest, recipe. The manifest
    as a release makes it (one partition per shard: the shard's fragment), or as one file,
    like a release made before it was partitioned: both must read the same."""
    root = tmp_path_factory.mktemp("release")
    fragments = root / "fragments"
    plans = plan_shards(RECIPE.name, RECIPE.samples, RECIPE.shard_size)
    for plan in plans:
        build_shard(RECIPE, plan, root / "intact", fragments)
    tables = [pq.read_table(fragment_path(fragments, plan.name, "manifest")) for plan in plans]
    if request.param == "legacy":
        (root / "intact" / LEGACY_MANIFEST).write_bytes(parquet_bytes(pa.concat_tables(tables)))
    else:
        (root / "intact" / MANIFEST_DIR).mkdir()
        for plan in plans:
            (root / "intact" / manifest_record(plan.name)).write_bytes(
                fragment_path(fragments, plan.name, "manifest").read_bytes())
    (root / "intact" / "recipe.yaml").write_text(yaml.safe_dump(RECIPE_FIELDS))
    return root / "intact"


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def damage(release: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of `release` with its second shard damaged `how`; (copy, damaged shard)."""
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(release, copy)
    shard = sorted((copy / SHARDS_DIR).glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    if how in ("txt", "json", "png"):  # one byte of the 5th sample's member, same size
        member = [m for m in members(shard) if m.name.endswith(f".{how}")][4]
        data[member.offset_data + member.size // 2] ^= 0x01
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header":  # the 7th member's header: its name and checksum
        member = members(shard)[6]
        data[member.offset : member.offset + 8] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    return copy, shard.name


def original_samples(release: Path) -> dict[str, dict[str, bytes]]:
    return {key: files for shard in sorted((release / SHARDS_DIR).glob("*.tar")) for key, files in read_shard(shard)}


@pytest.mark.parametrize("how", ["txt", "json", "png", "truncated", "header"])
def test_the_loader_yields_only_released_samples_and_names_a_damaged_shard(release: Path, tmp_path: Path, how: str) -> None:
    copy, shard = damage(release, tmp_path, how)
    originals = original_samples(release)
    yielded = []
    with pytest.raises(LoaderError, match=rf"shard {shard} of .* is damaged: "):
        for sample in iter_samples("intact", registry=copy, shuffle=False, decode="raw"):
            yielded.append(sample)
    assert yielded, "the first shard is intact and read first"
    for sample in yielded:
        assert {ext: sample[ext] for ext in ("json", "png", "txt")} == originals[sample["__key__"]]
    assert len(yielded) < len(originals)


def test_sizes_only_verification_still_catches_a_short_shard(release: Path, tmp_path: Path) -> None:
    copy, shard = damage(release, tmp_path, "truncated")
    with pytest.raises(LoaderError, match=rf"shard {shard} .* is damaged: (ends after|unreadable tar)"):
        list(iter_samples("intact", registry=copy, shuffle=False, decode="raw", verify="size"))
    with pytest.raises(LoaderError, match=r"verify='md5': choose one of sha256, size"):
        iter_samples("intact", registry=copy, verify="md5")


@pytest.mark.parametrize("how", ["txt", "json", "png", "truncated", "header"])
def test_verify_names_every_kind_of_damaged_shard(release: Path, tmp_path: Path, how: str) -> None:
    assert verify_release(release) == (60, [])
    copy, shard = damage(release, tmp_path, how)
    checked, problems = verify_release(copy)
    assert len(problems) == 1 and problems[0].startswith(f"{shard} is damaged: "), problems
    assert checked < 60


def test_validate_names_a_damaged_manifest_in_one_line(release: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "torn"
    shutil.copytree(release, copy)
    manifest = manifest_file(copy, f"{RECIPE.name}-000001.tar")  # a partition, or the legacy file
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    done = subprocess.run([sys.executable, "-m", "synthfactory.cli", "validate", str(copy)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert MANIFEST_DAMAGED in done.stderr and "pull the release again" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_shard_cache_entry_with_flipped_bytes_is_not_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ShardCache(tmp_path / "cache")
    plan = plan_shards(RECIPE.name, RECIPE.samples, RECIPE.shard_size)[0]
    made = make_shard(RECIPE, plan, cache, "k1")
    tar, _ = cache.shard_files("k1", plan.name)
    good = tar.read_bytes()
    assert make_shard(RECIPE, plan, cache, "k1").reused

    flipped = bytearray(good)
    flipped[len(flipped) // 3] ^= 0x01  # same size: a size check passes it
    tar.chmod(0o644)
    tar.write_bytes(bytes(flipped))
    again = make_shard(RECIPE, plan, cache, "k1")
    assert not again.reused and again.samples == made.samples
    assert tar.read_bytes() == good
    assert any("is damaged" in r.message and "does not match its recorded sha256" in r.message for r in caplog.records)


def test_the_manifest_reads_the_same_in_either_layout(release: Path) -> None:
    """Partitioned: one file per shard, named like it. Either layout: the reader gives the
    rows the shards' fragments hold, in shard order."""
    plans = plan_shards(RECIPE.name, RECIPE.samples, RECIPE.shard_size)
    fragments = [pq.read_table(fragment_path(release.parent / "fragments", plan.name, "manifest")) for plan in plans]
    if (release / MANIFEST_DIR).is_dir():
        assert sorted(p.name for p in (release / MANIFEST_DIR).iterdir()) == [
            Path(manifest_record(plan.name)).name for plan in plans]
    manifest = read_manifest(release)
    assert manifest.equals(pa.concat_tables(fragments))
    assert manifest.column("index").to_pylist() == list(range(RECIPE.samples))
    assert read_manifest(release, columns=["key"]).column_names == ["key"]


def test_manifests_record_every_member(release: Path) -> None:
    """`sample_sha256` covers caption and label too: the column the checks above rely on."""
    from synthfactory.shards import sample_digest

    rows = read_manifest(release, columns=["key", "sample_sha256"]).to_pylist()
    originals = original_samples(release)
    assert all(row["sample_sha256"] == sample_digest(originals[row["key"]]) for row in rows)
    changed = dict(originals[rows[0]["key"]], txt=b"another caption")
    assert sample_digest(changed) != rows[0]["sample_sha256"]
    assert json.loads(originals[rows[0]["key"]]["json"])  # the label lives in a member the digest covers


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_shard_reader_reads_what_tarfile_writes(tar_format: int) -> None:
    """Long names (pax or GNU records, the USTAR prefix), directories, empty members and
    sizes on and off the 512-byte boundary come out as tarfile itself reads them."""
    import io

    from synthfactory.shards import tar_members

    members = {f"{'d' * 120}/0001.png": b"x" * 512, "0001.txt": b"", "a/b/0002.json": b'{"label": "circle"}' * 40,
               "0002.ünïcode.txt": "ok".encode()}
    if tar_format == tarfile.USTAR_FORMAT:  # USTAR holds long names only as prefix/name
        members = {name.replace("d" * 120, "d" * 90): data for name, data in members.items()}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        directory = tarfile.TarInfo("a-directory")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    assert dict(tar_members(buffer)) == members


def test_the_shard_reader_refuses_a_damaged_header_and_a_short_member() -> None:
    import io

    from synthfactory.shards import ShardFormatError, tar_bytes, tar_members

    data = tar_bytes([("0001", {"txt": b"caption " * 100})])
    flipped = bytearray(data)
    flipped[130] ^= 0x01  # inside the size field: the checksum no longer matches
    with pytest.raises(ShardFormatError, match="does not match its checksum"):
        list(tar_members(io.BytesIO(bytes(flipped))))
    with pytest.raises(ShardFormatError, match=r"ends inside member 0001.txt \(88 of 800 bytes\)"):
        list(tar_members(io.BytesIO(data[:600])))
