"""Hostile input is refused before anything is written: recipes and `--set` values
(a Prefect UI parameter) are untrusted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from synthfactory.cli import app
from synthfactory.generators.inputs import MAX_INPUT_BYTES
from synthfactory.recipe import RecipeError, load_recipe


def text_recipe(tmp_path: Path, file: str) -> Path:
    recipe = tmp_path / "recipes" / "texts.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    (recipe.parent / "prompts.txt").write_text("a red cube\na blue ball\n")
    recipe.write_text(yaml.safe_dump({
        "name": "texts", "samples": 4, "shard_size": 2,
        "generator": {"kind": "text-list", "params": {"file": file}},
    }))
    return recipe


def test_an_input_file_in_the_recipes_directory_is_read(tmp_path):
    recipe = load_recipe(text_recipe(tmp_path, "prompts.txt"))
    assert recipe.generator.params["texts"] == ["a red cube", "a blue ball"]


@pytest.mark.parametrize(
    ("file", "problem"),
    [
        ("/proc/self/environ", "must be a path inside the recipe's directory"),
        ("../../etc/hostname", "must be a path inside the recipe's directory"),
        ("/dev/zero", "must be a path inside the recipe's directory"),
        ("leak.txt", "must be a path inside the recipe's directory"),  # a symlink out
        ("pipe", "is not a regular file"),
        ("huge.txt", f"more than the {MAX_INPUT_BYTES}"),
        ("missing.txt", "cannot read 'missing.txt'"),
    ],
)
def test_input_files_outside_the_recipe_or_not_plain_files_are_refused_naming_field_and_path(tmp_path, file, problem):
    recipe = text_recipe(tmp_path, file)
    secret = tmp_path / "secret.txt"
    secret.write_text("AWS_SECRET_ACCESS_KEY=hunter2\n")
    (recipe.parent / "leak.txt").symlink_to(secret)
    os.mkfifo(recipe.parent / "pipe")
    with (recipe.parent / "huge.txt").open("wb") as huge:
        huge.truncate(MAX_INPUT_BYTES + 1)
    with pytest.raises(RecipeError) as refused:
        load_recipe(recipe)
    message = str(refused.value)
    assert "generator.params: file: " in message and repr(file) in message and problem in message
    assert "hunter2" not in message


def test_an_override_reading_the_workers_environment_exits_2_and_writes_nothing(tmp_path):
    """`overrides` is editable in the Prefect UI: it must not publish /proc/self/environ."""
    recipe = text_recipe(tmp_path, "prompts.txt")
    registry = tmp_path / "registry"
    result = CliRunner().invoke(app, [
        "run", str(recipe), "--registry", str(registry), "--no-publish",
        "--set", "generator.params.file=/proc/self/environ",
    ])
    assert result.exit_code == 2, result.output
    assert "generator.params.file" in " ".join(result.output.split()) or "file: '/proc/self/environ'" in result.output
    assert not registry.exists()


def test_a_recipe_planning_more_shards_than_the_cap_is_refused_before_planning(tmp_path):
    recipe = text_recipe(tmp_path, "prompts.txt")
    with pytest.raises(RecipeError, match=r"samples 1000000000 in shards of shard_size 1 make 1000000000 shards, more than 100000"):
        load_recipe(recipe, samples=1_000_000_000, overrides=["shard_size=1"])


def test_a_set_value_that_is_not_yaml_exits_2_naming_the_override(tmp_path):
    recipe = text_recipe(tmp_path, "prompts.txt")
    registry = tmp_path / "registry"
    result = CliRunner().invoke(app, ["run", str(recipe), "--registry", str(registry), "--no-publish",
                                      "--set", "generator.params.texts=[a, b"])
    assert result.exit_code == 2, result.output
    assert "--set generator.params.texts: the value '[a, b' is not valid YAML" in " ".join(result.output.split())
    assert not registry.exists()


def test_a_shard_member_over_the_size_cap_is_refused_not_read(tmp_path, monkeypatch):
    from synthfactory import shards

    shard = tmp_path / "big.tar"
    shard.write_bytes(shards.tar_bytes([("000000", {"txt": b"x" * 64})]))
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 63)
    with pytest.raises(shards.ShardFormatError, match=r"000000.txt holds 64 bytes, more than 63"):
        list(shards.read_shard(shard))


@pytest.mark.parametrize("kind", ["a file", "a plain directory", "a subdirectory of a repo", "under a file"])
def test_a_registry_path_that_cannot_be_a_registry_exits_2_and_creates_nothing(tmp_path, kind):
    recipe = text_recipe(tmp_path, "prompts.txt")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "plain").mkdir()
    (tmp_path / "repo" / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "--quiet", str(tmp_path / "repo")], check=True)
    path = {"a file": "afile", "a plain directory": "plain", "a subdirectory of a repo": "repo/sub",
            "under a file": "afile/registry"}[kind]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".git" not in p.parts)
    result = CliRunner().invoke(app, ["run", str(recipe), "--registry", str(tmp_path / path), "--no-publish"])
    assert result.exit_code == 2, result.output
    assert str(tmp_path / path) in " ".join(result.output.replace("\n", "").split())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".git" not in p.parts) == before


def test_aws_keys_without_an_endpoint_mean_aws_not_the_embedded_server(monkeypatch):
    """The README's way to use AWS; the embedded server's loopback endpoint must never be
    committed into a release's .dvc/config by accident."""
    from synthfactory import settings

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    storage = settings.resolve_storage()
    assert storage.endpoint_url is None and storage.location == "AWS S3 (us-east-1)"
    assert storage.remote_url == "s3://synthfactory/dvcstore"


def test_a_failed_push_is_reported_by_its_error_not_dvcs_footer():
    from synthfactory.registry import tool_error_line

    output = ("`dvc push shapes` failed in /r:\nCollecting\nERROR: failed to push data to the cloud - "
              "Unable to locate credentials\n\nHaving any troubles? Hit us up at https://dvc.org/support, "
              "we are always happy to help!")
    assert tool_error_line(output) == "ERROR: failed to push data to the cloud - Unable to locate credentials"
    assert tool_error_line("fatal: unable to create '/r/.git/refs/tags/a.lock': File exists.") .startswith("fatal:")


def test_a_second_run_of_a_dataset_fails_at_once_naming_the_first_and_another_dataset_goes_on(tmp_path):
    from synthfactory.release.job import ReleaseRequest, RunLockedError, prepare, release_locks

    recipe = text_recipe(tmp_path, "prompts.txt")
    other = tmp_path / "recipes" / "others.yaml"
    other.write_text(recipe.read_text().replace("name: texts", "name: others"))
    registry = str(tmp_path / "registry")
    first = prepare(ReleaseRequest(str(recipe), registry, publish=False))
    try:
        with pytest.raises(RunLockedError, match=rf"another run of texts is in progress in .*\(pid {os.getpid()} on "):
            prepare(ReleaseRequest(str(recipe), registry, publish=False))
        beside = prepare(ReleaseRequest(str(other), registry, publish=False))  # another dataset: goes on
        release_locks(beside)
        assert first.work_dir.exists()  # recovery in the other run's prepare left the live run's work dir
    finally:
        release_locks(first)
    again = prepare(ReleaseRequest(str(recipe), registry, publish=False))
    release_locks(again)
    assert not first.work_dir.exists()  # its owner let go: the next run's recovery removed it


def test_staging_a_shard_whose_cache_entry_lost_its_tar_fails_loudly(tmp_path):
    from synthfactory.release.shard_cache import ShardCache

    cache = ShardCache(tmp_path / "cache")
    staging = cache.staging_dir("k" * 64)
    (staging / "shards").mkdir()
    (staging / "shards" / "ds-000000.tar").write_bytes(b"tar")
    cache.commit(staging, "k" * 64, {"samples": 1})
    (cache.entry("k" * 64) / "shards" / "ds-000000.tar").unlink()  # as another run's prune did
    with pytest.raises(FileNotFoundError, match="shard ds-000000.tar: its cache entry .* is gone or damaged"):
        cache.link_into("k" * 64, "ds-000000.tar", tmp_path / "stage")


def test_recording_a_stage_drops_stages_of_datasets_never_released(tmp_path):
    """A registry cloned from an older factory checkout declares a `shapes` stage with no
    dvc.lock entry: at any other dataset's tag, a plain `dvc pull` failed on it."""
    from synthfactory.registry import DataRegistry

    registry = DataRegistry.open(tmp_path / "registry")
    registry.record_stage("shapes", "synthfactory run recipes/shapes.yaml --no-publish", [])
    registry.record_stage("tiny", "synthfactory run recipes/tiny.yaml --no-publish", [])
    stages = yaml.safe_load((registry.root / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["tiny"]


def test_a_dvc_child_holds_the_runs_locks_until_it_exits(tmp_path):
    """Killed mid-`dvc push`, the flow's locks would drop while DVC still writes; DVC
    children inherit them, so recovery and the next run wait for it to exit."""
    import threading
    import time

    from synthfactory.files import flock_held, try_flock
    from synthfactory.registry import DataRegistry

    registry = DataRegistry.open(tmp_path / "registry")
    lock, started, release = tmp_path / "run.lock", tmp_path / "child-started", tmp_path / "release-child"
    fd = try_flock(lock)
    registry.lend_locks((fd,))
    child = threading.Thread(target=registry._run, kwargs={"lend": True}, args=([sys.executable, "-c", (
        f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\n"
        f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.02)\n")],))
    child.start()
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.close(fd)  # the run dies; its child lives on
    for _ in range(10):
        assert flock_held(lock)
        time.sleep(0.05)
    release.touch()
    child.join(timeout=60)
    assert not flock_held(lock)


def test_a_permission_problem_is_one_line_naming_the_path_exit_2(tmp_path, monkeypatch):
    """(Root here reads and writes everything, so the denial is raised where the run starts.)"""
    import synthfactory.release.job

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/srv/registry/.synthfactory")

    monkeypatch.setattr(synthfactory.release.job, "prepare_started", denied)
    result = CliRunner().invoke(app, ["run", str(text_recipe(tmp_path, "prompts.txt")), "--registry", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "permission denied: /srv/registry/.synthfactory" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("address", "warned"), [
    ("tcp://10.0.0.5:8786", True), ("tcp://scheduler:8786", True), ("tcp://127.0.0.1:8786", False),
    ("tcp://localhost:8786", False), ("tcp://[::1]:8786", False), ("tls://10.0.0.5:8786", False),
])
def test_a_plain_tcp_dask_scheduler_off_loopback_gets_a_warning(tmp_path, caplog, address, warned):
    from synthfactory.release.job import execution_for

    recipe = load_recipe(text_recipe(tmp_path, "prompts.txt"))
    assert execution_for(recipe, dask_address=address).dask_address == address
    assert ("Dask sends pickles over plain tcp://" in caplog.text) == warned
