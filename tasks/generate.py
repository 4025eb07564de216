"""The shard task, in a module of its own: pool workers import only what generating
needs (not GX, DVC or pandas), so a spawned worker is ready sooner.

One task per shard of many samples, never per sample: a task run costs 10-60 ms.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.runtime import task_run

from synthfactory.models import ModelError
from synthfactory.recipe import Recipe
from synthfactory.release.build import ShardResult, make_shard
from synthfactory.release.shard_cache import ShardCache
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
)
def generate_shard(recipe: Recipe, plan: ShardPlan, cache: ShardCache, key: str) -> ShardResult:
    """Generate one shard into the shard cache (or find it there); the attempt number
    makes retries visible in metrics."""
    return make_shard(recipe, plan, cache, key, attempt=task_run.run_count)
