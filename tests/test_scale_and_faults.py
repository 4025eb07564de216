"""Scale-out on Dask, transient faults retried with backoff, and the run's figures as
Prefect artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_recipe as shapes_recipe_file

from flows.release import run_release
from synthfactory.release.build import injected_fault
from synthfactory.recipe import Faults
from synthfactory.release.verify import verify_release

pytestmark = pytest.mark.slow


def write_recipe(path: Path, **fields) -> Path:
    execution = {"runner": "thread", "workers": 2, "retries": 2, "retry_backoff_s": 0.05}
    return shapes_recipe_file(path, **{"samples": 400, "shard_size": 50, "seed": 3, "execution": execution, **fields})


def data_files(release_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(release_dir).as_posix(): p.read_bytes()
            for p in sorted(release_dir.rglob("*")) if p.is_file() and p.suffix in {".tar", ".parquet"}}


def test_an_existing_dask_cluster_runs_the_shards_with_one_plugin_per_worker(tmp_path, prefect):
    from distributed import Client, LocalCluster

    recipe = write_recipe(tmp_path / "scale.yaml")
    local = run_release(str(recipe), str(tmp_path / "local"), publish=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        on_dask = run_release(str(recipe), str(tmp_path / "dask"), publish=False, dask_address=cluster.scheduler_address)
        with Client(cluster) as client:
            loads = client.run(_plugin_cache_misses)

    assert data_files(Path(on_dask.release_dir)) == data_files(Path(local.release_dir))
    metrics = json.loads((Path(on_dask.release_dir) / "metrics.json").read_text())
    assert metrics["run"]["worker_processes"] == 2  # both Dask workers ran shards
    # each worker built each plug-in (generator + nothing else here) once, whatever its shard count
    assert sorted(loads.values()) == [1, 1]


def _plugin_cache_misses() -> int:
    from synthfactory.release import bundle

    return bundle._bundle.cache_info().misses


def test_a_local_dask_cluster_from_the_recipe(tmp_path, prefect):
    recipe = write_recipe(tmp_path / "scale.yaml", samples=200)
    summary = run_release(str(recipe), str(tmp_path / "registry"), publish=False,
                          overrides=["execution.runner=dask"])
    assert summary.samples + summary.rejected == 200
    assert verify_release(Path(summary.release_dir))[1] == []


def expected_retries(faults: Faults, seed: int, shards: int) -> int:
    retries = 0
    for shard in range(shards):
        attempt = 1
        while injected_fault(faults, seed, shard, attempt):
            attempt += 1
        retries += attempt - 1
    return retries


def test_transient_faults_are_retried_lose_nothing_and_are_reported(tmp_path, storage_env, prefect):
    import httpx
    from prefect.settings import PREFECT_API_URL

    faults = Faults(fail_rate=0.4)
    recipe = write_recipe(tmp_path / "scale.yaml", faults=faults.model_dump(), execution={
        "workers": 2, "retries": 6, "retry_backoff_s": 0.05})
    expected = expected_retries(faults, 3, 8)
    assert expected > 0

    summary = run_release(str(recipe), str(tmp_path / "registry"))

    assert summary.tag == "scale@v1"
    assert summary.retries == expected
    assert summary.samples + summary.rejected == 400
    assert verify_release(Path(summary.release_dir)) == (summary.samples, [])
    metrics = json.loads((Path(summary.release_dir) / "metrics.json").read_text())
    assert metrics["run"]["retries"] == expected
    assert metrics["run"]["shards_generated"] == 8

    def artifact(key: str):
        found = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter",
                           json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"}).json()
        assert found, f"no artifact {key}"
        return found[0]["data"]

    table, progress, link = (artifact(f"release-scale{suffix}") for suffix in ("", "-progress", "-report"))
    assert "## scale@v1" in table
    assert f"| shard retries | {expected} |" in table
    assert "| shards generated | 8 |" in table
    assert float(progress) == 100.0
    assert summary.report_url and summary.report_url in link  # the pushed report, presigned for browsers
    assert "response-content-type=text%2Fhtml" in link
