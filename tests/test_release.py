"""End to end on real parts: recipe -> Prefect flow -> shards -> GX gate -> DVC release in S3."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe

from flows.release import run_release
from synthfactory.registry import DataRegistry, dvc_executable
from synthfactory.release.build import ShardFailedError
from synthfactory.files import file_digest
from synthfactory.release.gate import GateFailedError
from synthfactory.release.verify import verify_release
from synthfactory.shards import read_manifest
from synthfactory.storage import StorageConfig, StorageError, dvc_object_key, minio_client

pytestmark = pytest.mark.slow


def bucket_objects(storage: StorageConfig) -> list[str]:
    client = minio_client(storage)
    return [o.object_name for o in client.list_objects(storage.bucket, prefix=storage.prefix, recursive=True)]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_release_round_trip_through_s3(tmp_path, storage_env, prefect):
    recipe = write_recipe(tmp_path / "tiny.yaml")
    registry = tmp_path / "registry"

    summary = run_release(str(recipe), str(registry))

    assert summary.tag == "tiny@v1"
    assert summary.samples + summary.rejected == 240
    release_dir = registry / "data" / "tiny"
    assert (release_dir / "validation" / "index.html").exists()
    assert "inputs fingerprint" in (release_dir / "README.md").read_text().lower()
    lock = yaml.safe_load((registry / "dvc.lock").read_text())
    deps = {d["path"] for d in lock["stages"]["tiny"]["deps"]}
    assert {"recipes/tiny.yaml", "synthfactory/generators/procedural.py", "synthfactory/shards.py",
            "synthfactory/samples.py", "synthfactory/release/build.py"} <= deps
    assert all(d.get("md5") for d in lock["stages"]["tiny"]["deps"])
    assert git(registry, "status", "--porcelain") == ""
    assert bucket_objects(storage_env), "dvc push put nothing in S3"

    # A consumer: fresh clone at the tag, dvc pull, bytes equal the manifest hashes.
    clone = tmp_path / "consumer"
    git(tmp_path, "clone", "--quiet", "--branch", "tiny@v1", str(registry), str(clone))
    subprocess.run([dvc_executable(), "pull", "--quiet"], cwd=clone, env={**os.environ, **storage_env.subprocess_env()}, check=True)
    checked, problems = verify_release(clone / "data" / "tiny")
    assert problems == []
    assert checked == summary.samples == read_manifest(clone / "data" / "tiny", columns=["key"]).num_rows
    shards = sorted(p.stem for p in (clone / "data" / "tiny" / "shards").glob("*.tar"))
    assert sorted(p.stem for p in (clone / "data" / "tiny" / "manifest").iterdir()) == shards  # one partition each

    # dvc get --rev works without a clone.
    got = tmp_path / "got"
    subprocess.run(
        [dvc_executable(), "get", str(registry), "data/tiny", "--rev", "tiny@v1", "-o", str(got)],
        env={**os.environ, **storage_env.subprocess_env()}, check=True, capture_output=True,
    )
    assert verify_release(got) == (checked, [])

    # The shards open with the webdataset library and HF datasets, same sample count.
    import webdataset as wds
    from datasets import load_dataset

    shards = sorted(str(p) for p in (got / "shards").glob("*.tar"))
    assert sum(1 for _ in wds.WebDataset(shards, shardshuffle=False)) == checked
    hf = load_dataset("webdataset", data_files={"train": shards}, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == checked
    assert {"png", "json", "txt"} <= set(hf.column_names)

    # A second release of the same dataset gets the next version; both are listed.
    second = run_release(str(recipe), str(registry), seed=8)
    assert second.tag == "tiny@v2"
    listed = DataRegistry(registry).releases("tiny")
    assert [r.tag for r in listed] == ["tiny@v1", "tiny@v2"]
    assert listed[0].metrics["samples"] == summary.samples


def test_same_recipe_gives_the_same_bytes(tmp_path, prefect):
    """Whatever the worker count and so the order shards finish in, in worker processes."""
    recipe = write_recipe(tmp_path / "tiny.yaml", execution={"runner": "process", "workers": 2, "retries": 0})
    outputs = []
    for run, workers in (("a", 1), ("b", 2)):
        summary = run_release(str(recipe), str(tmp_path / run), publish=False, workers=workers)
        release_dir = Path(summary.release_dir)
        outputs.append({p.relative_to(release_dir).as_posix(): p.read_bytes()
                        for p in sorted(release_dir.rglob("*")) if p.is_file() and p.suffix in {".tar", ".parquet"}})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 4 + 4 + 1  # four shards, their manifest partitions, rejected


def test_failing_gate_publishes_nothing(tmp_path, storage_env, prefect):
    recipe = write_recipe(tmp_path / "tiny.yaml", validation={"caption_length": {"min": 10, "max": 30}})
    registry = DataRegistry.open(tmp_path / "registry")
    head = git(registry.root, "rev-parse", "HEAD")
    before = bucket_objects(storage_env)

    with pytest.raises(GateFailedError) as failure:
        run_release(str(recipe), str(registry.root))

    message = str(failure.value)
    assert "manifest.caption: expect_column_value_lengths_to_be_between failed" in message
    assert "rows unexpected" in message
    assert git(registry.root, "rev-parse", "HEAD") == head
    assert git(registry.root, "tag") == ""
    assert git(registry.root, "status", "--porcelain") == ""
    assert not (registry.root / "data" / "tiny").exists()
    # in S3 only the shards pushed while generating: content-addressed objects that no DVC
    # listing, commit or tag names (a rerun finds them there; `dvc gc --cloud` drops them)
    pushed_early = set(bucket_objects(storage_env)) - set(before)
    cached = {dvc_object_key(storage_env, file_digest(path, "md5"))
              for path in (registry.scratch / "shards" / "tiny").rglob("*") if path.is_file()}
    assert pushed_early and pushed_early <= cached


def test_wrong_credentials_fail_before_any_work(tmp_path, storage_env, prefect, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    recipe = write_recipe(tmp_path / "tiny.yaml")
    registry = DataRegistry.open(tmp_path / "registry")
    head = git(registry.root, "rev-parse", "HEAD")

    with pytest.raises(StorageError) as failure:
        run_release(str(recipe), str(registry.root))

    assert "AWS_SECRET_ACCESS_KEY" in str(failure.value)
    assert "not-the-secret" not in str(failure.value)
    assert git(registry.root, "rev-parse", "HEAD") == head
    assert git(registry.root, "status", "--porcelain") == ""
    assert not (registry.root / "data").exists()
    assert not list((registry.scratch / "work").glob("*/release/shards/*.tar"))


def test_failing_shards_are_retried_and_the_release_is_complete(tmp_path, storage_env, prefect):
    recipe = write_recipe(tmp_path / "tiny.yaml", faults={"fail_attempts": 2})
    summary = run_release(str(recipe), str(tmp_path / "registry"))

    assert summary.tag == "tiny@v1"
    assert summary.retries == 4 * 2  # every shard failed twice, then succeeded
    checked, problems = verify_release(Path(summary.release_dir))
    assert problems == [] and checked == summary.samples


def test_shard_failing_beyond_its_retries_names_the_shard(tmp_path, prefect):
    recipe = write_recipe(tmp_path / "tiny.yaml", faults={"fail_attempts": 5, "shards": [2]})
    with pytest.raises(ShardFailedError, match=r"shard tiny-000002.tar failed after 3 attempts: .*injected fault: shard 2 attempt 3"):
        run_release(str(recipe), str(tmp_path / "registry"), publish=False)
