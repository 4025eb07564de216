"""Recipes against a served model: the llm-captions generator with `backend: {kind: openai}`
pointed at a real `transformers serve` (the tiny random-weight llama) behind the
fault-injecting proxy, through the release flow on the real Prefect API. Tokens land in the
manifest, usage and cost in metrics.json and the card; answers are paid for once; a budget
stops the run with its shards kept; a dead endpoint fails before anything is written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from flows.release import run_release
from synthfactory.daemons import free_ports
from synthfactory.models import ModelError
from synthfactory.release.cost import BudgetExceededError
from synthfactory.serving.testserver import Fault, FaultProxy, ServedModel, serve_tiny_lm
from synthfactory.shards import read_manifest

COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    with serve_tiny_lm(tmp_path_factory.mktemp("serve")) as server:
        yield server


@pytest.fixture
def proxy(served: ServedModel) -> Iterator[FaultProxy]:
    with FaultProxy(served.base_url) as running:
        yield running


def captions_recipe(path: Path, backend: dict[str, Any], **fields: Any) -> Path:
    """An instructions-style recipe (topics -> one line of text) on the given backend."""
    recipe = {
        "name": path.stem,
        "samples": 24,
        "shard_size": 8,
        "seed": 11,
        "generator": {"kind": "llm-captions", "params": {
            "backend": backend,
            "instruction": "Questions a student might ask, one per line.",
            "templates": [{"name": "question", "format": "topic: {concept} | question:"}],
            "examples": [{"template": "question", "concept": c, "caption": f"what is {c}?"}
                         for c in ("rain", "gravity", "sound")],
            "examples_per_prompt": 2,
            "concepts": [{"name": "topics", "weight": 1.0, "concepts": ["light", "heat", "plants", "stars", "rivers"]}],
            "max_new_tokens": 8,
            "batch_size": 8,
        }},
        "validation": {"caption_length": {"min": 0, "max": 400}, "min_accept_rate": 0.0},
        "execution": {"runner": "thread", "workers": 2, "retries": 0},
        "cost": {"usd_per_million_input_tokens": 0.15, "usd_per_million_output_tokens": 0.6},
        **fields,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def endpoint(proxy: FaultProxy, served: ServedModel, **fields: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": proxy.base_url, "model": served.model_id, "max_concurrency": 4,
            "timeout_s": 60, **fields}


def sent(proxy: FaultProxy) -> int:
    """Completion requests that reached the real server."""
    return sum(count for (path, _), count in proxy.forwarded.items() if path == COMPLETIONS)


@pytest.mark.slow
def test_a_release_from_an_endpoint_counts_tokens_and_cost_and_pays_once(tmp_path, served, proxy, prefect):
    proxy.inject(Fault.error(429, retry_after="1"), times=2, path=COMPLETIONS)  # busy: honoured, retried, counted
    recipe = captions_recipe(tmp_path / "served.yaml", endpoint(proxy, served))
    registry = tmp_path / "registry"

    first = run_release(str(recipe), str(registry), publish=False)

    release = Path(first.release_dir)
    metrics = json.loads((release / "metrics.json").read_text())
    usage = metrics["usage"]
    assert sent(proxy) == 24 and usage["requests"] == 26 and usage["retries"] == 2 and usage["throttled"] == 2
    assert usage["backoffs"] >= 1 and usage["cache_hits"] == 0 and usage["failures"] == 0
    manifest = read_manifest(release).to_pylist()
    assert len(manifest) + metrics["rejected"] == 24
    assert all(row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] <= 8 for row in manifest)
    expected = usage["prompt_tokens"] * 0.15 / 1e6 + usage["completion_tokens"] * 0.6 / 1e6
    assert metrics["cost_usd"]["total"] == pytest.approx(expected, abs=1e-6)
    assert "## Cost and usage" in (release / "README.md").read_text() and first.usage.startswith("$")
    assert "served (revision unknown)" in (release / "README.md").read_text()

    # Another shard layout: every shard is new, every request is not: the cache answers all.
    again = captions_recipe(tmp_path / "served.yaml", endpoint(proxy, served), shard_size=12)
    second = run_release(str(again), str(registry), publish=False)

    assert sent(proxy) == 24  # nothing re-sent
    rerun = json.loads((Path(second.release_dir) / "metrics.json").read_text())["usage"]
    assert rerun["cache_hits"] == 24 and rerun["requests"] == 0
    rows = read_manifest(Path(second.release_dir)).to_pylist()
    assert sorted(r["caption"] for r in rows) == sorted(r["caption"] for r in manifest)


@pytest.mark.slow
def test_a_request_that_keeps_failing_rejects_its_sample_with_the_reason(tmp_path, served, proxy, prefect):
    proxy.inject(Fault.error(500, message="model crashed"), times=None, path=COMPLETIONS)
    recipe = captions_recipe(tmp_path / "failing.yaml", endpoint(proxy, served, max_retries=1), samples=8)

    summary = run_release(str(recipe), str(tmp_path / "registry"), publish=False)

    rejected = pq.read_table(Path(summary.release_dir) / "rejected.parquet").to_pylist()
    assert len(rejected) == 8 and summary.samples == 0
    assert {r["reason"] for r in rejected} == {"caption endpoint: HTTP 500 after 2 attempts: model crashed"}
    usage = json.loads((Path(summary.release_dir) / "metrics.json").read_text())["usage"]
    assert usage["failures"] == 8 and usage["retries"] == 8 and usage["server_errors"] == 16


@pytest.mark.slow
def test_a_budget_stops_the_run_naming_the_spend_and_keeps_finished_shards(tmp_path, served, proxy, prefect):
    recipe = captions_recipe(tmp_path / "budget.yaml", endpoint(proxy, served, max_concurrency=1),
                             cost={"usd_per_million_input_tokens": 1e6}, budget_usd=1.0,  # $1 a prompt token
                             execution={"runner": "thread", "workers": 1, "retries": 0})
    registry = tmp_path / "registry"

    with pytest.raises(BudgetExceededError, match=r"budget_usd 1 reached: the 1 of 3 shards made so far cost \$\d+"):
        run_release(str(recipe), str(registry), publish=False)

    cache = registry / ".synthfactory" / "shards" / "budget"
    kept = len([p for p in cache.iterdir() if not p.name.startswith(".")])
    # the shard that crossed the budget, and the one a worker had already started, are kept
    assert 1 <= kept < 3 and sent(proxy) == 8 * kept
    assert not (registry / "data" / "budget").exists()

    # reached by the last shard, the budget has nothing left to stop: the release is made
    one_shard = captions_recipe(tmp_path / "budget.yaml", endpoint(proxy, served, max_concurrency=1), samples=8,
                                cost={"usd_per_million_input_tokens": 1e6}, budget_usd=1.0,
                                execution={"runner": "thread", "workers": 1, "retries": 0})
    made = run_release(str(one_shard), str(registry), publish=False)
    run = json.loads((Path(made.release_dir) / "metrics.json").read_text())["run"]
    assert made.samples + made.rejected == 8 and run["shards_reused"] == 1 and not run["usage_this_run"]
    assert sent(proxy) == 8 * kept  # nothing asked again


def test_a_bad_endpoint_block_is_refused_without_echoing_what_may_be_a_secret(tmp_path):
    from synthfactory.recipe import RecipeError, load_recipe
    from synthfactory.release.bundle import plugins_of

    leaky = captions_recipe(tmp_path / "leaky.yaml", {"kind": "openai", "base_url": "http://admin:hunter2@10.0.0.7/v1",
                                                       "model": "m", "api_key_env": "sk-live-hunter3"})
    with pytest.raises(RecipeError) as refused:
        plugins_of(load_recipe(leaky))
    assert "base_url" in str(refused.value) and "api_key_env" in str(refused.value)
    assert "hunter2" not in str(refused.value) and "hunter3" not in str(refused.value)


def test_a_dead_endpoint_fails_before_anything_is_written(tmp_path):
    (port,) = free_ports(1)
    recipe = captions_recipe(tmp_path / "dead.yaml", {"kind": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                                        "model": "synthfactory/tiny-llm"})
    with pytest.raises(ModelError, match=f"caption endpoint: .*http://127.0.0.1:{port}/v1"):
        run_release(str(recipe), str(tmp_path / "registry"), publish=False)
    assert not (tmp_path / "registry").exists()


@pytest.mark.slow
def test_the_shipped_instructions_recipe_runs_against_an_endpoint_by_its_backend_block(
    tmp_path, served, proxy, prefect, repo_root
):
    backend = json.dumps(endpoint(proxy, served))
    summary = run_release(
        str(repo_root / "recipes" / "instructions.yaml"), str(tmp_path / "registry"), samples=16, publish=False,
        # the backend block is the change; the rest fits a tiny random model in a test
        overrides=[f"generator.params.backend={backend}", "shard_size=8", "validation.min_accept_rate=0",
                   "validation.caption_length.min=0", "execution.runner=thread"],
    )
    assert sent(proxy) == 16
    metrics = json.loads((Path(summary.release_dir) / "metrics.json").read_text())
    assert metrics["usage"]["requests"] == 16 and metrics["cost_usd"]["total"] > 0


def test_the_synclr_recipe_takes_an_endpoint_in_its_backend_block(repo_root):
    from synthfactory.generators.llm_captions import OpenAIBackend
    from synthfactory.recipe import load_recipe

    block = '{kind: openai, base_url: "http://10.0.0.5:8000/v1", model: meta-llama/Llama-2-7b-hf, api_key_env: VLLM_API_KEY}'
    recipe = load_recipe(repo_root / "recipes" / "synclr.yaml", overrides=[f"generator.params.captions.params.backend={block}"])
    captions = recipe.generator.params["captions"]["params"]
    assert OpenAIBackend.model_validate(captions["backend"]).base_url == "http://10.0.0.5:8000/v1"


@pytest.mark.slow
def test_a_shard_killed_mid_way_reruns_without_resending_what_was_answered(tmp_path, served, proxy):
    """SIGKILL a shard worker while one request hangs; the rerun's requests that were
    answered before the kill come from the response cache (counted at the server)."""
    import signal
    import subprocess
    import sys
    import time

    from synthfactory.recipe import load_recipe
    from synthfactory.release.build import make_shard
    from synthfactory.release.shard_cache import ShardCache
    from synthfactory.shards import plan_shards

    path = captions_recipe(tmp_path / "killed.yaml", endpoint(proxy, served, max_concurrency=1), samples=8)
    shards, responses = tmp_path / "shards", tmp_path / "responses"
    worker = ("import sys; from synthfactory.recipe import load_recipe; from synthfactory.release.build import make_shard; "
              "from synthfactory.release.shard_cache import ShardCache; from synthfactory.shards import plan_shards; "
              "from pathlib import Path; recipe = load_recipe(sys.argv[1]); "
              "make_shard(recipe, plan_shards('killed', 8, 8)[0], ShardCache(Path(sys.argv[2]), Path(sys.argv[3])), 'k')")
    child = subprocess.Popen([sys.executable, "-c", worker, str(path), str(shards), str(responses)], start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while sent(proxy) < 3:  # some answered ...
            assert child.poll() is None and time.monotonic() < deadline, "the shard ended before it could be killed"
            time.sleep(0.05)
        proxy.inject(Fault.stall(600), path=COMPLETIONS, times=None)  # ... then the server hangs
        while sum(proxy.received.values()) == sum(proxy.forwarded.values()):
            assert time.monotonic() < deadline, "no request reached the hanging server"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    answered = sent(proxy)
    proxy.reset()

    rerun = make_shard(load_recipe(path), plan_shards("killed", 8, 8)[0], ShardCache(shards, responses), "k")

    assert answered >= 3 and answered + sent(proxy) == 8  # each of the 8 requests reached the server once
    assert rerun.usage["cache_hits"] == answered and rerun.usage["requests"] == 8 - answered
