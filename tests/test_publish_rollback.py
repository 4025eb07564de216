"""A publish that fails half-way (S3 goes down after the gate) leaves the registry exactly
as it was, a developer's uncommitted edits included; once S3 is back, the next run
publishes. Uses its own SeaweedFS so the outage is real."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_recipe

import synthfactory.release.gate
from flows.release import run_release
from synthfactory.registry import RegistryError
from synthfactory.s3server import EmbeddedS3

pytestmark = pytest.mark.slow


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def own_s3(tmp_path, monkeypatch) -> Iterator[tuple[EmbeddedS3, EmbeddedS3]]:
    """A SeaweedFS of this test's own (the factory pointed at it), and a second handle
    that restarts it on the same port, keys and data after an outage."""
    server = EmbeddedS3(tmp_path / "s3")
    config = server.start()
    restarted = EmbeddedS3(tmp_path / "s3", s3_port=int(config.endpoint_url.rsplit(":", 1)[1]),
                           access_key=config.access_key, secret_key=config.secret_key)
    for name, value in {
        "SYNTHFACTORY_S3_ENDPOINT": config.endpoint_url, "SYNTHFACTORY_S3_BUCKET": config.bucket,
        "AWS_ACCESS_KEY_ID": config.access_key, "AWS_SECRET_ACCESS_KEY": config.secret_key,
    }.items():
        monkeypatch.setenv(name, value)
    try:
        yield server, restarted
    finally:
        server.stop()
        restarted.stop()


def test_failed_push_rolls_back_exactly_and_a_rerun_publishes(tmp_path, prefect, monkeypatch, repo_root, own_s3):
    server, restarted = own_s3
    # The registry is a factory checkout with work in progress.
    registry = tmp_path / "factory"
    git(tmp_path, "clone", "--quiet", str(repo_root), str(registry))
    recipe = registry / "recipes" / "tiny.yaml"  # untracked, used in place
    write_recipe(recipe, samples=120, seed=1, generator={"kind": "procedural-shapes", "params": {"image_size": 32}},
                 validation={"share_significance": None},
                 execution={"runner": "thread", "workers": 2, "retries": 1, "retry_backoff_s": 0.1})
    assert run_release(str(recipe), str(registry)).tag == "tiny@v1"
    edited = registry / "synthfactory" / "shards.py"
    edited.write_text(edited.read_text() + "\n# work in progress\n")
    (registry / "notes.txt").write_text("mine")
    status, head, v1_data = git(registry, "status", "--porcelain"), git(registry, "rev-parse", "HEAD"), tree(registry / "data" / "tiny")
    dirty_code = edited.read_bytes()

    validate = synthfactory.release.gate.validate

    def validate_then_lose_s3(*args, **kwargs):
        result = validate(*args, **kwargs)
        server.stop()
        return result

    monkeypatch.setattr(synthfactory.release.gate, "validate", validate_then_lose_s3)
    with pytest.raises(RegistryError, match="dvc push tiny"):
        run_release(str(recipe), str(registry), seed=2)

    assert git(registry, "rev-parse", "HEAD") == head
    assert git(registry, "tag").split() == ["tiny@v1"]
    assert git(registry, "status", "--porcelain") == status
    assert edited.read_bytes() == dirty_code
    assert tree(registry / "data" / "tiny") == v1_data

    monkeypatch.setattr(synthfactory.release.gate, "validate", validate)
    restarted.start()  # same port, keys and data: the committed endpoint works again
    second = run_release(str(recipe), str(registry), seed=2)
    assert second.tag == "tiny@v2"
    assert (second.shards_generated, second.shards_reused) == (0, 2)  # the failed run's shards
    assert tree(registry / "data" / "tiny") != v1_data
    assert "seed: 2" in git(registry, "show", "tiny@v2:data/tiny/recipe.yaml")

    # The registry is a clone of the factory repo: a plain `dvc pull` at this dataset's tag
    # must work (no stage of a dataset without a lock entry, e.g. one the factory declared).
    from synthfactory.registry import dvc_executable
    from synthfactory.settings import resolve_storage

    clone = tmp_path / "consumer"
    git(tmp_path, "clone", "--quiet", "--branch", "tiny@v2", str(registry), str(clone))
    pulled = subprocess.run([dvc_executable(), "pull"], cwd=clone, capture_output=True, text=True,
                            env={**os.environ, **resolve_storage().subprocess_env()})
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert tree(clone / "data" / "tiny") == tree(registry / "data" / "tiny")


def test_a_short_s3_outage_during_publish_is_ridden_out(tmp_path, prefect, monkeypatch, own_s3):
    """S3 goes down right after the gate and comes back while the push waits to retry:
    the push is retried with backoff and the release completes, whole in S3."""
    import synthfactory.registry
    from synthfactory.registry import dvc_executable
    from synthfactory.release.verify import verify_release

    server, restarted = own_s3
    validate = synthfactory.release.gate.validate
    log_warning = synthfactory.registry.logger.warning
    failed_pushes: list[str] = []

    def validate_then_lose_s3(*args, **kwargs):
        result = validate(*args, **kwargs)
        server.stop()
        return result

    def back_after_a_failed_push(message: str, *args, **kwargs):
        """S3 returns once a push failed (whatever the machine's load), before the retry."""
        log_warning(message, *args, **kwargs)
        failed_pushes.append(message % args)
        if len(failed_pushes) == 1:
            restarted.start()

    monkeypatch.setattr(synthfactory.release.gate, "validate", validate_then_lose_s3)
    monkeypatch.setattr(synthfactory.registry.logger, "warning", back_after_a_failed_push)
    recipe = tmp_path / "tiny.yaml"
    write_recipe(recipe, samples=120, seed=1, generator={"kind": "procedural-shapes", "params": {"image_size": 32}},
                 validation={"share_significance": None},
                 execution={"runner": "thread", "workers": 2, "retries": 4, "retry_backoff_s": 1.0})
    summary = run_release(str(recipe), str(tmp_path / "registry"))
    assert summary.tag == "tiny@v1"
    assert summary.push_retries == len(failed_pushes) >= 1
    assert "dvc push of tiny@v1 failed (attempt 1)" in failed_pushes[0] and "Having any troubles" not in failed_pushes[0]

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", "--branch", "tiny@v1", str(tmp_path / "registry"), str(clone))
    subprocess.run([dvc_executable(), "pull", "--quiet"], cwd=clone, check=True,
                   env={**os.environ, **restarted.config.subprocess_env()})
    assert verify_release(clone / "data" / "tiny") == (summary.samples, [])


def test_a_refused_release_commit_leaves_nothing_staged(tmp_path, prefect, storage_env):
    """A pre-commit hook that refuses (as commit signing without a key, or a full disk
    would): files, HEAD and the index all go back, so the user's next plain `git commit`
    cannot commit half a release."""
    from synthfactory.registry import DataRegistry

    registry = tmp_path / "registry"
    DataRegistry.open(registry)
    hook = registry / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'refused by policy' >&2\nexit 1\n")
    hook.chmod(0o755)
    status, head = git(registry, "status", "--porcelain"), git(registry, "rev-parse", "HEAD")
    recipe = write_recipe(tmp_path / "tiny.yaml", samples=40, shard_size=20, validation={"share_significance": None})

    with pytest.raises(RegistryError, match="refused by policy"):
        run_release(str(recipe), str(registry))
    assert git(registry, "diff", "--cached", "--name-only") == ""
    assert git(registry, "status", "--porcelain") == status
    assert git(registry, "rev-parse", "HEAD") == head and git(registry, "tag") == ""
