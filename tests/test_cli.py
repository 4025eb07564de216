"""The CLI as a user meets it: exit codes, one clear message, nothing written on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthfactory.registry import DataRegistry

CLI = [str(Path(sys.executable).with_name("synthfactory"))]


def synthfactory(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and ".git/" not in p.as_posix()}


NO_STORAGE = {"SYNTHFACTORY_S3_ENDPOINT": "", "SYNTHFACTORY_S3_BUCKET": "", "SYNTHFACTORY_ENV_FILE": ""}


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_bad_recipe_exits_2_naming_the_field_and_writes_nothing(tmp_path, repo_root, workers):
    recipe = yaml.safe_load((repo_root / "recipes" / "shapes.yaml").read_text())
    recipe["generator"]["params"]["image_size"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    existing = DataRegistry.open(tmp_path / "registry")
    before = snapshot(existing.root)

    for registry in (existing.root, tmp_path / "new-registry"):
        result = synthfactory("run", str(bad), "--registry", str(registry), *workers, cwd=tmp_path)
        assert result.returncode == 2
        assert "generator.params.image_size: must be ≥ 16, got 0" in result.stderr
        assert "Traceback" not in result.stderr
    assert snapshot(existing.root) == before
    assert not (tmp_path / "new-registry").exists()


def test_run_outside_a_git_repo_asks_for_a_registry(tmp_path, repo_root):
    result = synthfactory("run", str(repo_root / "recipes" / "shapes.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "not inside a git repository: pass --registry PATH" in result.stderr


def test_run_without_storage_fails_before_any_work(tmp_path, repo_root):
    env = {"SYNTHFACTORY_DATA_DIR": str(tmp_path / "data"), **NO_STORAGE}
    registry = tmp_path / "registry"
    result = synthfactory("run", str(repo_root / "recipes" / "shapes.yaml"), "--registry", str(registry), cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "no S3 storage configured" in result.stderr and "synthfactory s3 start" in result.stderr
    assert "Traceback" not in result.stderr
    assert not registry.exists()


def test_read_commands_refuse_a_directory_that_is_not_a_registry(tmp_path):
    (tmp_path / "plain").mkdir()
    for args in (["releases"], ["pull", "shapes@v1"]):
        result = synthfactory(*args, "--registry", str(tmp_path / "plain"), cwd=tmp_path, env=NO_STORAGE)
        assert result.returncode == 2, args
        assert "is not the top of a git repository" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "plain" / ".git").exists()
    validated = synthfactory("validate", str(tmp_path / "plain"), cwd=tmp_path)
    assert validated.returncode == 2 and "is not a release directory" in validated.stderr


@pytest.mark.slow
def test_releases_validate_and_pull(tmp_path, storage_env, prefect, repo_root):
    """run -> releases -> pull -> validate, each through the real CLI."""
    import os

    from prefect.settings import PREFECT_API_URL

    recipe = yaml.safe_load((repo_root / "recipes" / "shapes.yaml").read_text())
    recipe.update(name="cli", samples=300, shard_size=100)
    recipe["execution"] = {"workers": 2}
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(recipe))
    registry = tmp_path / "registry"
    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), **{k: v for k, v in os.environ.items() if k.startswith(("SYNTHFACTORY_", "AWS_"))}}

    ran = synthfactory("run", str(path), "--registry", str(registry), cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    assert "cli@v1: 300 samples" in ran.stdout
    assert f"pushed to s3://{os.environ['SYNTHFACTORY_S3_BUCKET']}/{os.environ['SYNTHFACTORY_S3_PREFIX']} at {os.environ['SYNTHFACTORY_S3_ENDPOINT']}" in ran.stdout

    listed = synthfactory("releases", "--registry", str(registry), cwd=tmp_path)
    assert listed.returncode == 0
    assert "cli@v1" in listed.stdout and "300" in listed.stdout

    pulled = synthfactory("pull", "cli", "--registry", str(registry), "--to", str(tmp_path / "pulled"), cwd=tmp_path, env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert len(list((tmp_path / "pulled" / "shards").glob("*.tar"))) == 3
    again = synthfactory("pull", "cli@v1", "--registry", str(registry), "--to", str(tmp_path / "pulled"), cwd=tmp_path, env=env)
    assert again.returncode == 2 and "already exists" in again.stderr

    checked = synthfactory("validate", str(tmp_path / "pulled"), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "300 samples match the manifest, 0 problems" in checked.stdout

    # Corrupt one shard: validate must notice.
    shard = sorted((tmp_path / "pulled" / "shards").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[2048] ^= 0xFF  # inside the first sample's image bytes
    shard.write_bytes(bytes(data))
    corrupted = synthfactory("validate", str(tmp_path / "pulled"), cwd=tmp_path)
    assert corrupted.returncode == 1
    assert "does not match its sha256" in corrupted.stderr


@pytest.mark.slow
def test_runs_share_one_local_prefect_server_and_a_failed_gate_is_one_message(tmp_path, repo_root):
    """No PREFECT_API_URL: the first run starts the local server, the next one reuses it;
    a failed gate ends in the one error line, its bracketed examples intact, no traceback."""
    import json
    import os
    import urllib.parse

    from synthfactory.local_api import RECORD, stop_local_api

    home = tmp_path / "data" / "prefect"
    env = {"SYNTHFACTORY_DATA_DIR": str(tmp_path / "data"), "PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
    # Half the slots go to scenes that cannot be placed (rejected): the achieved source
    # shares are skewed far past chance, so the gate's share test fails naming the source.
    crowded = {"max_objects": 8, "max_overlap": 0.0, "placement_attempts": 1}
    recipe = {"name": "skewed", "samples": 100, "shard_size": 100, "validation": {"min_accept_rate": 0.0},
              "generator": {"kind": "mix", "params": {"components": [
                  {"generator": {"kind": "procedural-shapes", "params": crowded}, "weight": 1, "name": "crowded"},
                  {"generator": {"kind": "procedural-shapes"}, "weight": 1, "name": "plain"}]}}}
    path = tmp_path / "skewed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        first = synthfactory("run", str(path), "--registry", str(tmp_path / "registry"), "--no-publish", cwd=tmp_path,
                             env={**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **env})
        server = json.loads((home / RECORD).read_text())
        second = synthfactory("run", str(path), "--registry", str(tmp_path / "registry"), "--no-publish", cwd=tmp_path,
                              env={**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **env})
        assert json.loads((home / RECORD).read_text()) == server  # the same server answered both
    finally:
        stop_local_api(home)
    for result in (first, second):
        assert result.returncode == 1, result.stderr
        output = result.stdout + result.stderr
        assert "Traceback" not in output and "temporary server" not in output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: validation gate failed for skewed")
        assert "e.g. [p_value=" in result.stderr and "source='crowded'" in result.stderr  # rich markup did not eat it
        # the Data Docs outlive the stage (the next run reuses it): a kept copy, linked
        data_docs = Path(urllib.parse.urlparse(errors[0].split("(Data Docs: ")[1].split(")")[0]).path)
        assert data_docs.is_relative_to(tmp_path / "data" / "reports" / "skewed") and data_docs.is_file()
        assert "Great Expectations" in data_docs.read_text() and (data_docs.parent.parent / "report" / "index.html").is_file()
    assert len(list((tmp_path / "data" / "reports" / "skewed").iterdir())) == 2  # one per run
