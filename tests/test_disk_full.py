"""A disk that fills mid-run ends in one clear message, and loses nothing: a real full
filesystem (a tiny tmpfs mounted in a user namespace over the registry's DVC cache)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthfactory.files import disk_full
from synthfactory.registry import DataRegistry, RegistryError

CLI = str(Path(sys.executable).with_name("synthfactory"))
#: mount a small tmpfs at $1, then run the rest: a full disk without root or a loop device
MOUNT_THEN_RUN = 'mount -t tmpfs -o size=64k synthfactory-full "$1" && shift && exec "$@"'


def can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT_THEN_RUN, "sh", str(probe), "true"], capture_output=True)
    return done.returncode == 0


def test_full_disk_is_recognised_however_it_arrives() -> None:
    """An errno, or only the text a DVC command printed (the errno is gone by then)."""
    assert disk_full(OSError(28, "No space left on device"))
    dvc = RegistryError("`dvc commit` failed:\nERROR: unexpected error - [Errno 28] No space left on device")
    try:
        try:
            raise dvc
        except RegistryError as exc:
            raise RuntimeError("publish failed") from exc
    except RuntimeError as outer:
        assert disk_full(outer)
    assert not disk_full(OSError(13, "Permission denied"))


def test_a_disk_that_fills_while_dvc_commits_ends_in_one_line_and_the_rerun_releases(
    tmp_path: Path, repo_root: Path, storage_env, prefect: str
) -> None:
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("this machine does not allow user namespaces (unshare -rm) to mount a small tmpfs")
    recipe = yaml.safe_load((repo_root / "recipes" / "shapes.yaml").read_text())
    recipe.update(name="full", samples=200, shard_size=100)
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(recipe))
    registry = DataRegistry.open(tmp_path / "registry").root
    cache = registry / ".dvc" / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    full = subprocess.run(
        ["unshare", "-rm", "sh", "-c", MOUNT_THEN_RUN, "sh", str(cache), CLI, "run", str(path), "--registry", str(registry)],
        capture_output=True, text=True, env=os.environ, timeout=900,
    )
    assert full.returncode == 1, full.stdout + full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0] and "rerun" in errors[0], full.stderr
    assert "Traceback" not in full.stderr and "unexpected error" not in full.stderr  # DVC's raw line, in no log either
    assert not DataRegistry.existing(registry).tags("full")

    # The tmpfs is gone with the namespace: with room again, the rerun releases.
    again = subprocess.run([CLI, "run", str(path), "--registry", str(registry)], capture_output=True, text=True,
                           env=os.environ, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert DataRegistry.existing(registry).tags("full") == ["full@v1"]
