"""The machinery that keeps the flow close to a bare process pool: warm shard workers
that never import Prefect, their warnings carried back to the run, and finished shards
pushed to the DVC remote while later shards generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from flows.release import run_release
from synthfactory.files import file_digest
from synthfactory.recipe import load_recipe
from synthfactory.release.early_push import EarlyPush
from synthfactory.release.shard_cache import ShardCache
from synthfactory.release.workers import ShardWorkers
from synthfactory.shards import plan_shards
from synthfactory.storage import dvc_object_key, minio_client


def test_what_a_shard_worker_imports_leaves_prefect_gx_and_dvc_out():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, synthfactory.release.workers, synthfactory.generators.procedural; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'great_expectations', 'dvc', 'pandas', 'minio'}))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert loaded == "[]"


def test_worker_processes_build_shards_and_send_their_warnings_back(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "warm.yaml", samples=120, shard_size=60,
                                      execution={"runner": "process", "workers": 2}))
    cache = ShardCache(tmp_path / "cache")
    plans = plan_shards(recipe.name, recipe.samples, recipe.shard_size)
    workers = ShardWorkers.start(recipe.execution, recipe, shards_to_generate=len(plans))
    try:
        assert workers.description == "on 2 worker processes" and workers.slots == 2
        first = workers.build(recipe, plans[0], cache, "k0", attempt=1)
        assert first.samples + first.rejected == 60 and first.cpu_seconds > 0
        assert not first.worker.endswith(f":{__import__('os').getpid()}")  # made in another process
        (cache.entry("k0") / "shards" / plans[0].name).write_bytes(b"damaged")
        again = workers.build(recipe, plans[0], cache, "k0", attempt=1)
    finally:
        workers.close()
    assert not again.reused
    assert any("is damaged" in line and "made again" in line for line in again.messages), again.messages


def test_one_shard_to_make_runs_in_the_flow_host(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "one.yaml", execution={"runner": "process", "workers": 4}))
    workers = ShardWorkers.start(recipe.execution, recipe, shards_to_generate=1)
    assert (workers.description, workers.slots) == ("in this process", 1)
    workers.close()


@pytest.mark.slow
def test_shards_pushed_early_sit_where_dvc_keeps_them(tmp_path, storage_env, prefect):
    recipe = write_recipe(tmp_path / "early.yaml", samples=120, shard_size=40)
    summary = run_release(str(recipe), str(tmp_path / "registry"))
    client = minio_client(storage_env)
    stored = {o.object_name for o in client.list_objects(storage_env.bucket, prefix=storage_env.prefix + "/", recursive=True)}
    shards = sorted((Path(summary.release_dir) / "shards").glob("*.tar"))
    assert len(shards) == 3
    # the early pushes' keys are the ones dvc push uses: it found them there
    assert {dvc_object_key(storage_env, file_digest(shard, "md5")) for shard in shards} <= stored

    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"not in any release")
    push = EarlyPush(storage_env)
    push.shard_ready(extra, shards[0])
    pushed = push.finish()
    assert (pushed.files, pushed.present, pushed.failed) == (1, 1, 0)
    assert client.stat_object(storage_env.bucket, dvc_object_key(storage_env, file_digest(extra, "md5"))).size == 18
