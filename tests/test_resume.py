"""Crash-safe resume: content-addressed shards, and runs killed with SIGKILL at several
points (mid-generation, mid-validation, mid-push, after the push, after the commit) whose
rerun publishes a release byte-identical to an uninterrupted run's, redoing at most the
shards that were in flight, and never leaves a tag pointing at data missing from S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_recipe as shapes_recipe_file

from synthfactory.release.build import injected_fault, make_shard
from synthfactory.recipe import load_recipe
from synthfactory.registry import dvc_executable
from synthfactory.release.verify import verify_release
from synthfactory.release.fingerprint import shard_keys
from synthfactory.release.shard_cache import ShardCache
from synthfactory.shards import plan_shards
from synthfactory.storage import minio_client

DATA_FILES = ("shards", "rejected", "manifest", "rejected.parquet")
SYNTHFACTORY = str(Path(sys.executable).with_name("synthfactory"))


def write_recipe(path: Path, **fields) -> Path:
    """16 shards; in threads unless `runner` is given (the kill mid-generation uses processes)."""
    return shapes_recipe_file(path, **{
        "samples": 1600, "shard_size": 100, "seed": 11,
        "generator": {"kind": "procedural-shapes", "params": {"image_size": 48, "classes": ["circle", "square", "star"]}},
        "validation": {"caption_length": {"min": 10, "max": 200}, "min_accept_rate": 0.9},
        **fields,
    })


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def data_bytes(release_dir: Path) -> dict[str, bytes]:
    files = {}
    for name in DATA_FILES:
        path = release_dir / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                files[file.relative_to(release_dir).as_posix()] = file.read_bytes()
    return files


# -- the shard cache, without Prefect ---------------------------------------------------

def test_shard_keys_ignore_sample_count_and_execution_but_not_content(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    more = recipe.model_copy(update={"samples": 1650, "execution": recipe.execution.model_copy(update={"workers": 8})})
    plans, more_plans = plan_shards("kills", 1600, 100), plan_shards("kills", 1650, 100)

    assert shard_keys(recipe, "c1", plans) == shard_keys(more, "c1", more_plans[:16])
    assert shard_keys(recipe, "c1", plans[:1]) != shard_keys(recipe, "c2", plans[:1])  # code changed
    reseeded = recipe.model_copy(update={"seed": 12})
    assert shard_keys(recipe, "c1", plans[:1]) != shard_keys(reseeded, "c1", plans[:1])
    assert shard_keys(recipe, "c1", plans[:1]) != shard_keys(recipe, "c1", plans[1:2])


def test_a_finished_shard_is_reused_and_a_damaged_one_regenerated(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", samples=200))
    cache = ShardCache(tmp_path / "cache")
    plan = plan_shards("kills", 200, 100)[1]
    (key,) = shard_keys(recipe, "c1", [plan])

    first = make_shard(recipe, plan, cache, key)
    tar = cache.entry(key) / "shards" / plan.name
    original = tar.read_bytes()
    again = make_shard(recipe, plan, cache, key)
    assert (first.reused, again.reused) == (False, True)
    assert (again.samples, again.rejected) == (first.samples, first.rejected)

    tar.write_bytes(original[: len(original) // 2])  # torn by a disk fault or a hand edit
    repaired = make_shard(recipe, plan, cache, key)
    assert not repaired.reused
    assert tar.read_bytes() == original
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".tmp-")]


def test_injected_fault_rate_is_deterministic_and_near_the_rate():
    from synthfactory.recipe import Faults

    faults = Faults(fail_rate=0.3)
    draws = [injected_fault(faults, 5, shard, attempt) for shard in range(500) for attempt in (1, 2)]
    assert draws == [injected_fault(faults, 5, shard, attempt) for shard in range(500) for attempt in (1, 2)]
    assert 0.25 < sum(draws) / len(draws) < 0.35


# -- real processes, killed -------------------------------------------------------------

def cli_env(storage, api_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "SYNTHFACTORY_S3_ENDPOINT": storage.endpoint_url,
        "SYNTHFACTORY_S3_BUCKET": storage.bucket,
        "SYNTHFACTORY_S3_PREFIX": storage.prefix,
        "AWS_ACCESS_KEY_ID": storage.access_key,
        "AWS_SECRET_ACCESS_KEY": storage.secret_key,
        **extra,
    }


def start_run(recipe: Path, registry: Path, env: dict[str, str]) -> subprocess.Popen:
    """`synthfactory run` in its own process group, so a kill takes the flow, its shard
    workers and any dvc/git child down together, as a preempted node would."""
    return subprocess.Popen(
        [SYNTHFACTORY, "run", str(recipe), "--registry", str(registry)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("kill point not reached in time")
        time.sleep(0.02)


def finished_entries(registry: Path) -> int:
    root = registry / ".synthfactory" / "shards" / "kills"
    return sum(1 for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else 0


def bucket_objects(storage) -> int:
    client = minio_client(storage)
    return sum(1 for _ in client.list_objects(storage.bucket, prefix=storage.prefix + "/", recursive=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect) -> dict[str, bytes]:
    """The data of an uninterrupted run of the same recipe."""
    root = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(root / "kills.yaml", execution={"runner": "thread", "workers": 2})
    proc = subprocess.run([SYNTHFACTORY, "run", str(recipe), "--registry", str(root / "registry"), "--no-publish"],
                          env={**os.environ, "PREFECT_API_URL": prefect}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return data_bytes(root / "registry" / "data" / "kills")


KILL_POINTS = ["generation", "validate", "push", "pushed", "committed"]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_anywhere_resumes_to_the_same_release(point, tmp_path, storage_env, prefect, reference):
    # Killed mid-generation: the whole process group, shard worker processes included.
    runner = "process" if point == "generation" else "thread"
    recipe = write_recipe(tmp_path / "kills.yaml", execution={"runner": runner, "workers": 2, "retries": 2,
                                                                "retry_backoff_s": 0.1})
    registry = tmp_path / "registry"
    env = cli_env(storage_env, prefect)
    crash = {"validate": "validate", "pushed": "pushed", "committed": "committed"}.get(point)
    proc = start_run(recipe, registry, {**env, "SYNTHFACTORY_CRASH_AT": crash} if crash else env)
    if point == "generation":  # a random moment once a few shards are durable
        target = 3 + int.from_bytes(os.urandom(1)) % 8
        wait_until(lambda: finished_entries(registry) >= target, proc)
        os.killpg(proc.pid, signal.SIGKILL)
    elif point == "push":  # as soon as the first object of the release lands in S3
        journals = registry / ".synthfactory" / "work"
        wait_until(lambda: any(journals.glob("*/publishing.json")) and bucket_objects(storage_env) > 0, proc)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()[-3000:]
    subprocess.run(["pkill", "-KILL", "-g", str(proc.pid)], check=False)  # stragglers of the group

    # Whatever state the kill left: no tag, so no tag can point at missing data.
    assert git(registry, "tag", "--list") == ""
    if point == "committed":  # as a git killed while tagging leaves them: recovery removes the run's own
        (registry / ".git" / "refs" / "tags" / "kills@v1.lock").write_text("")
        (registry / ".git" / "index.lock").write_text("")
    done_before = finished_entries(registry)
    assert done_before <= 16

    rerun = subprocess.run([SYNTHFACTORY, "run", str(recipe), "--registry", str(registry)],
                           env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "kills@v1" in rerun.stdout
    metrics = json.loads((registry / "data" / "kills" / "metrics.json").read_text())
    # Only the shards not durable at the kill are generated again (at most those in flight were lost).
    assert metrics["run"]["shards_reused"] == done_before
    assert metrics["run"]["shards_generated"] == 16 - done_before
    if point != "generation":
        assert metrics["run"]["shards_generated"] == 0
    assert data_bytes(registry / "data" / "kills") == reference
    assert git(registry, "status", "--porcelain") == ""
    assert len(git(registry, "log", "--format=%s").splitlines()) == 2  # "Initialise DVC" + one release
    assert not list((registry / ".synthfactory" / "work").iterdir())

    # The tag's data is in S3: a fresh clone pulls it whole.
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", "--branch", "kills@v1", str(registry), str(clone))
    subprocess.run([dvc_executable(), "pull", "--quiet"], cwd=clone, env={**os.environ, **storage_env.subprocess_env()},
                   check=True)
    checked, problems = verify_release(clone / "data" / "kills")
    assert problems == [] and checked == metrics["samples"]


def test_a_rerun_after_a_kill_past_the_tag_reports_that_release_not_a_duplicate(tmp_path, storage_env, prefect):
    """Killed during the clean-up after tagging: the rerun of the same command must not
    tag kills@v2 with the same bytes; --force still releases again."""
    recipe = write_recipe(tmp_path / "kills.yaml", samples=40, shard_size=20, execution={"runner": "thread", "workers": 1})
    registry = tmp_path / "registry"
    env = cli_env(storage_env, prefect)
    proc = start_run(recipe, registry, {**env, "SYNTHFACTORY_CRASH_AT": "tagged"})
    proc.wait(timeout=400)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()[-3000:]
    assert git(registry, "tag", "--list").split() == ["kills@v1"]

    rerun = subprocess.run([SYNTHFACTORY, "run", str(recipe), "--registry", str(registry)],
                           env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "kills@v1 is current" in " ".join(rerun.stdout.split())
    assert git(registry, "tag", "--list").split() == ["kills@v1"]
    assert git(registry, "status", "--porcelain") == ""
    assert not list((registry / ".synthfactory" / "work").iterdir())

    forced = subprocess.run([SYNTHFACTORY, "run", str(recipe), "--registry", str(registry), "--force"],
                            env=env, capture_output=True, text=True, timeout=400)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert git(registry, "tag", "--list").split() == ["kills@v1", "kills@v2"]


def test_runs_of_two_datasets_into_one_registry_at_once_both_publish(tmp_path, storage_env, prefect):
    registry = tmp_path / "registry"
    env = cli_env(storage_env, prefect)
    recipes = [write_recipe(tmp_path / f"{name}.yaml", name=name, samples=40, shard_size=20,
                            execution={"runner": "thread", "workers": 1}) for name in ("left", "right")]
    subprocess.run([SYNTHFACTORY, "run", str(recipes[0]), "--registry", str(registry), "--no-publish"],
                   env=env, check=True, capture_output=True)  # the registry exists before the race
    runs = [start_run(recipe, registry, env) for recipe in recipes]
    outputs = [run.communicate(timeout=400)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sorted(git(registry, "tag", "--list").split()) == ["left@v1", "right@v1"]
    assert git(registry, "status", "--porcelain") == ""


def test_recovery_never_overwrites_a_recipe_edited_after_the_kill(tmp_path, storage_env, prefect):
    """Killed after the push: the rerun must not restore its snapshot over a fix made
    since; it stops naming the file. With the edit moved aside, the rollback restores
    the recipe before it is read, and the rerun publishes what the killed run would have."""
    from synthfactory.registry import DataRegistry

    registry = tmp_path / "registry"
    DataRegistry.open(registry)
    (registry / "recipes").mkdir()
    recipe = write_recipe(registry / "recipes" / "kills.yaml", samples=40, shard_size=20,
                          execution={"runner": "thread", "workers": 1})
    original = recipe.read_text()
    env = cli_env(storage_env, prefect)
    proc = start_run(recipe, registry, {**env, "SYNTHFACTORY_CRASH_AT": "pushed"})
    proc.wait(timeout=400)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read()[-3000:]

    fixed = original.replace("seed: 11", "seed: 12")
    recipe.write_text(fixed)
    rerun = subprocess.run([SYNTHFACTORY, "run", str(recipe), "--registry", str(registry)],
                           env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr
    assert "recipes/kills.yaml changed since it was killed" in " ".join(rerun.stderr.split())
    assert recipe.read_text() == fixed and git(registry, "tag", "--list") == ""

    recipe.rename(tmp_path / "mine.yaml")
    rerun = subprocess.run([SYNTHFACTORY, "run", str(recipe), "--registry", str(registry)],
                           env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert recipe.read_text() == original and git(registry, "tag", "--list").split() == ["kills@v1"]


def test_a_no_publish_run_killed_inside_the_swap_leaves_data_as_it_was(tmp_path, prefect):
    """--no-publish swaps several entries into data/<dataset>/: killed after the first,
    the next run's recovery puts the previous ones back (all or nothing)."""
    from flows.release import run_release
    from synthfactory.registry import DataRegistry
    from synthfactory.release.recovery import recover_interrupted

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    recipe = write_recipe(tmp_path / "kills.yaml", samples=40, shard_size=20, execution={"runner": "thread", "workers": 1},
                          validation={"share_significance": None})
    registry = tmp_path / "registry"
    run_release(str(recipe), str(registry), publish=False)
    before = tree(registry / "data" / "kills")
    proc = subprocess.run([SYNTHFACTORY, "run", str(recipe), "--registry", str(registry), "--no-publish", "--seed", "12"],
                          env={**os.environ, "PREFECT_API_URL": prefect, "SYNTHFACTORY_CRASH_AT": "swapping"},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert tree(registry / "data" / "kills") != before  # half swapped

    assert recover_interrupted(DataRegistry(registry)) == [
        "kills: put back the data/ entries an interrupted --no-publish run was replacing"]
    assert tree(registry / "data" / "kills") == before
