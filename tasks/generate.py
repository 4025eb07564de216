"""The shard task: a thread of the flow host that hands its shard to the run's workers
(`synthfactory.release.workers`) and waits for it, so the UI shows each shard's state,
retries and logs while the workers themselves never import Prefect.

One task per shard of many samples, never per sample: a task run costs 10-60 ms.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from synthfactory.models import ModelError
from synthfactory.recipe import Recipe
from synthfactory.release.build import ShardResult
from synthfactory.release.shard_cache import ShardCache
from synthfactory.release.workers import ShardWorkers
from synthfactory.shards import ShardPlan


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Model errors (missing weights, out of memory) fail the same way every time."""
    try:
        state.result()
    except ModelError:
        return False
    except Exception:
        return True
    return True


@task(
    name="generate-shard",
    task_run_name="generate-{plan.name}",
    retries=3,
    retry_delay_seconds=1.0,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,  # the shard cache is the cache: inputs are not hashed per task
)
def generate_shard(workers: ShardWorkers, recipe: Recipe, plan: ShardPlan, cache: ShardCache, key: str) -> ShardResult:
    """Generate one shard into the shard cache (or find it there); the attempt number
    makes retries visible in metrics."""
    result = workers.build(recipe, plan, cache, key, attempt=task_run.run_count)
    for message in result.messages:
        get_run_logger().warning("%s", message)
    return result
