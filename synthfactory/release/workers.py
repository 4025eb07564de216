"""Where shard builds run: warm worker processes, threads of the flow host, or a Dask
cluster, behind one `ShardWorkers.build` call.

The Prefect shard tasks are threads of the flow host; each hands its shard to these
workers and waits for it. So a worker imports only what generating needs, never
Prefect: no API client, no task engine, no state round-trips per shard. The pool starts
as soon as the job is prepared, so the workers import and build their plug-ins while
the flow host is still starting Prefect. A worker's log records (WARNING and up) come
back with its result, so the run's logs still tell them.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from synthfactory.recipe import Execution, Recipe
from synthfactory.release.build import ShardResult, make_shard
from synthfactory.release.bundle import plugins_of
from synthfactory.release.shard_cache import ShardCache
from synthfactory.shards import ShardPlan


def warm(recipe: Recipe) -> None:
    """Runs first in each new worker: imports and builds the recipe's plug-ins (models load
    once per worker) before the first shard arrives."""
    plugins_of(recipe)


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def build_remotely(recipe: Recipe, plan: ShardPlan, cache: ShardCache, key: str, attempt: int) -> ShardResult:
    """`make_shard` in a worker process, its log records returned with the result
    instead of printed where nobody reads them."""
    logger = logging.getLogger("synthfactory")
    collected, propagate = _Collected(), logger.propagate
    logger.addHandler(collected)
    logger.propagate = False
    started = time.process_time()
    try:
        result = make_shard(recipe, plan, cache, key, attempt)
    finally:
        logger.removeHandler(collected)
        logger.propagate = propagate
    return replace(result, messages=tuple(collected.lines), cpu_seconds=time.process_time() - started)


class ShardWorkers:
    """The run's shard workers; `build` blocks the calling (task) thread until its shard is done."""

    def __init__(self, executor: cf.Executor | None, slots: int, description: str,
                 close: Callable[[], None] | None = None) -> None:
        self._executor = executor
        self.slots = slots  # shards that can run at once: the flow's task threads
        self.description = description
        self._close = close

    @classmethod
    def start(cls, execution: Execution, recipe: Recipe, shards_to_generate: int) -> ShardWorkers:
        """The recipe's choice of where shards run. One shard (or none: all in the cache)
        runs in the flow host: a pool would only add its start."""
        workers = execution.workers or os.cpu_count() or 1
        if execution.runner == "dask":
            return cls._on_dask(execution, recipe, workers)
        if execution.runner == "thread" or shards_to_generate <= 1:
            slots = workers if shards_to_generate > 1 else 1
            return cls(None, slots, "in this process" if slots == 1 else f"on {slots} threads")
        workers = min(workers, shards_to_generate)
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=warm, initargs=(recipe,))
        for _ in range(workers):  # spawn them all now: each starts importing at once
            pool.submit(os.getpid)
        return cls(pool, workers, f"on {workers} worker processes",
                   lambda: pool.shutdown(wait=True, cancel_futures=True))

    @classmethod
    def _on_dask(cls, execution: Execution, recipe: Recipe, workers: int) -> ShardWorkers:
        from distributed import Client, LocalCluster

        cluster = None
        if execution.dask_address:
            client = Client(execution.dask_address)
            where = f"on the Dask scheduler at {execution.dask_address}"
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                   processes=True, dashboard_address=None)
            client = Client(cluster)
            where = "on a local Dask cluster"
        client.run(warm, recipe)
        slots = sum(client.nthreads().values()) or 1

        def close() -> None:
            client.close()
            if cluster is not None:
                cluster.close()

        return cls(client.get_executor(pure=False), slots, f"{where} ({slots} worker threads)", close)

    @property
    def in_flight(self) -> int:
        """Shards to hand out at once: with workers in other processes, one queued behind
        each running shard, so a worker starts its next shard the moment it finishes one
        instead of idling through the task bookkeeping of the flow host."""
        return self.slots * 2 if self._executor is not None else self.slots

    def build(self, recipe: Recipe, plan: ShardPlan, cache: ShardCache, key: str, attempt: int) -> ShardResult:
        if self._executor is None:  # threads: records reach the run's logs directly
            started = time.thread_time()
            result = make_shard(recipe, plan, cache, key, attempt)
            return replace(result, cpu_seconds=time.thread_time() - started)
        return self._executor.submit(build_remotely, recipe, plan, cache, key, attempt).result()

    def close(self) -> None:
        """Let shards in flight finish into the cache (a rerun reuses them); start no more."""
        if self._close is not None:
            self._close()
            self._close = None


#: pools started for prepared jobs, by work dir, before their flow runs (`job.prepare_started`)
_STARTED: dict[Path, ShardWorkers] = {}


def started(job_work_dir: Path, workers: ShardWorkers) -> None:
    """Keep a prepared job's workers for its flow to take (`take`)."""
    _STARTED[job_work_dir] = workers


def take(work_dir: Path) -> ShardWorkers | None:
    return _STARTED.pop(work_dir, None)


def close_unused(work_dir: Path) -> None:
    """A job whose flow never took its workers (it failed first) stops them."""
    workers = take(work_dir)
    if workers is not None:
        workers.close()
