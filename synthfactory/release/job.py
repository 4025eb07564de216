"""A release job: what the user asked for, checked and resolved before any work.

`prepare` turns a `ReleaseRequest` (CLI options or deployment parameters) into a
`ReleaseJob`: the validated recipe and run options, its plug-ins' models, the storage,
the registry, where the recipe and its files live there, the code the bytes depend on,
and a private work dir. Every check that can fail on bad input runs here, first.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import posixpath
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from synthfactory import settings
from synthfactory.recipe import Execution, Recipe, RecipeError, load_recipe
from synthfactory.files import try_flock
from synthfactory.registry import DataRegistry, RegistryError
from synthfactory.release.lineage import trace_lineage
from synthfactory.release.bundle import PluginBundle, plugins_of
from synthfactory.release.fingerprint import CodeFile, code_files, code_version, inputs_fingerprint, shard_keys
from synthfactory.release.recovery import OWNER_FILE, recover_interrupted
from synthfactory.release import workers as shard_workers
from synthfactory.release.shard_cache import ShardCache
from synthfactory.shards import ShardPlan, plan_shards
from synthfactory.storage import ensure_bucket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReleaseRequest:
    """A run as the user asked for it, unchecked: the release flow's parameters."""

    recipe_path: str
    registry: str = "."
    samples: int | None = None
    seed: int | None = None
    publish: bool = True
    overrides: tuple[str, ...] = ()
    workers: int | None = None
    dask_address: str | None = None
    force: bool = False

    def parameters(self) -> dict[str, Any]:
        """As the flow's keyword arguments."""
        return {
            "recipe_path": self.recipe_path, "registry": self.registry, "samples": self.samples, "seed": self.seed,
            "publish": self.publish, "overrides": list(self.overrides), "workers": self.workers,
            "dask_address": self.dask_address, "force": self.force,
        }


@dataclass(frozen=True)
class ReleaseJob:
    """Everything a run needs, resolved up front; holds no secrets (it is a task input)."""

    request: ReleaseRequest
    recipe: Recipe
    execution: Execution  # the recipe's, with the run's own choices of where shards run
    registry: DataRegistry
    recipe_source: Path
    recipe_file: str  # where the recipe lives inside the registry
    inputs: tuple[CodeFile, ...]  # (file the recipe reads, its path inside the registry)
    code: tuple[CodeFile, ...]  # (source file the bytes depend on, its path inside the registry)
    work_dir: Path
    code_version: str  # hash of the code files: part of every shard's cache key
    store: str = ""  # where a publishing run pushes ("s3://bucket/prefix at endpoint"), "" when not

    @property
    def plugins(self) -> PluginBundle:
        return plugins_of(self.recipe)

    @property
    def stage_dir(self) -> Path:
        """Becomes data/<dataset>/ when the gate passes."""
        return self.work_dir / "release"

    @property
    def cache(self) -> ShardCache:
        scratch = self.registry.scratch
        return ShardCache(scratch / "shards" / self.recipe.name, scratch / "responses" / self.recipe.name)

    @property
    def release_dir(self) -> Path:
        return self.registry.release_dir(self.recipe.name)

    @property
    def code_files(self) -> tuple[str, ...]:
        return tuple(relative for _, relative in self.code)

    @property
    def dependencies(self) -> list[str]:
        """What the dvc.yaml stage depends on: the recipe, the files it reads, the code."""
        return [self.recipe_file, *(relative for _, relative in self.inputs), *self.code_files]

    @property
    def command(self) -> str:
        """How `dvc repro` regenerates this release."""
        command = ["synthfactory", "run", self.recipe_file, "--no-publish"]
        if self.request.samples is not None:
            command += ["--samples", str(self.request.samples)]
        if self.request.seed is not None:
            command += ["--seed", str(self.request.seed)]
        for assignment in self.request.overrides:
            command += ["--set", assignment]
        return shlex.join(command)

    def plans(self) -> list[ShardPlan]:
        return plan_shards(self.recipe.name, self.recipe.samples, self.recipe.shard_size)

    @functools.cached_property
    def shard_keys(self) -> list[tuple[ShardPlan, str]]:
        plans = self.plans()
        return list(zip(plans, shard_keys(self.recipe, self.code_version, plans), strict=True))

    @functools.cached_property
    def shards_to_generate(self) -> int:
        """Shards the cache does not hold yet (counted once, when the run starts)."""
        return sum(self.cache.lookup(key) is None for _, key in self.shard_keys)

    @property
    def inputs_fingerprint(self) -> str:
        """Hash of everything the release's bytes depend on, not of how it runs."""
        return inputs_fingerprint(self.recipe, self.code_version)

    def tracked_files(self) -> list[str]:
        """Files a publish may rewrite besides the release entries; snapshotted for rollback."""
        return ["dvc.yaml", "dvc.lock", ".dvc/config", *self.dependencies, f"data/{self.recipe.name}/.gitignore"]


def execution_for(recipe: Recipe, workers: int | None = None, dask_address: str | None = None) -> Execution:
    """The recipe's execution settings with a run's own choices (they change where shards
    run, not what they hold); a bad value is a RecipeError naming the option."""
    update: dict[str, Any] = {"workers": workers} if workers else {}
    if dask_address:
        update.update(runner="dask", dask_address=dask_address)
    try:
        execution = Execution.model_validate({**recipe.execution.model_dump(), **update})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}, got {e['input']!r}" for e in exc.errors())
        raise RecipeError(f"invalid run option: {problems}") from None
    if execution.dask_address and _crosses_the_network(execution.dask_address):
        logger.warning(
            "dask_address %s: Dask sends pickles over plain tcp:// unencrypted and unauthenticated, and anyone "
            "who can reach the scheduler can run code on its workers; across a network use tls:// with "
            "certificates (see the README, Scale-out on Dask)", execution.dask_address,
        )
    return execution


def _crosses_the_network(address: str) -> bool:
    """A plain tcp:// scheduler address that is not loopback."""
    scheme, _, rest = address.partition("://")
    host = rest.rsplit(":", 1)[0].strip("[]")
    if scheme != "tcp" or host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: it resolves somewhere on the network


class RunLockedError(RegistryError):
    """Another run of the dataset holds its run lock; the message names the holder."""


#: the locks this process holds for its jobs, by work dir: the dataset's run lock and
#: the work dir's owner lock (open descriptors; the kernel drops them if the process dies)
_HELD_LOCKS: dict[Path, tuple[int, ...]] = {}


def prepare(request: ReleaseRequest) -> ReleaseJob:
    """Recover what killed runs left (before the recipe is read: a rollback may restore
    it), check everything that can fail on bad input (recipe, run options, models,
    storage, registry path) before anything is created, then take the dataset's run lock
    and give the run a private work dir in the registry's scratch space."""
    registry_path = Path(request.registry)
    if registry_path.exists():
        recover_interrupted(DataRegistry.existing(registry_path), wait=False)
    recipe = load_recipe(request.recipe_path, samples=request.samples, seed=request.seed, overrides=request.overrides)
    execution = execution_for(recipe, request.workers, request.dask_address)
    plugins = plugins_of(recipe)
    plugins.preflight()
    store = ""
    if request.publish:
        storage = settings.resolve_storage()
        ensure_bucket(storage)
        store = f"{storage.remote_url} at {storage.location}"
    registry = DataRegistry.open(registry_path)
    recipe_source = Path(request.recipe_path).resolve()
    recipe_file, inputs = recipe_locations(recipe, recipe_source, registry)
    trace_lineage(recipe, plugins, registry, None)  # a parent release missing fails now, not after generating
    run_lock = _take_run_lock(registry, recipe.name)
    try:
        (registry.scratch / "work").mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix=f"{recipe.name}-", dir=registry.scratch / "work"))
        owner = try_flock(work_dir / OWNER_FILE)  # free: the directory is new and private
        code = code_files(plugins.plugins)
        job = ReleaseJob(request, recipe, execution, registry, recipe_source, recipe_file, inputs, code, work_dir,
                         code_version(code), store)
    except BaseException:
        os.close(run_lock)
        raise
    _HELD_LOCKS[work_dir] = (run_lock, owner) if owner is not None else (run_lock,)
    registry.lend_locks(_HELD_LOCKS[work_dir])
    return job


def prepare_started(request: ReleaseRequest) -> ReleaseJob:
    """`prepare` the job and start its workers at once, for its flow to take (`take`):
    they import and build plug-ins while the flow host starts Prefect."""
    job = prepare(request)
    try:
        shard_workers.started(job.work_dir, shard_workers.ShardWorkers.start(job.execution, job.recipe, job.shards_to_generate))
    except BaseException:
        release_locks(job)
        raise
    return job


def _take_run_lock(registry: DataRegistry, dataset: str) -> int:
    """One run of a dataset per registry at a time: two would prune, stage and publish
    over each other. Another dataset's run goes on beside it. A second run fails at once,
    naming the holder (recorded in the lock file)."""
    path = registry.scratch / "runs" / f"{dataset}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = try_flock(path)
    if fd is None:
        holder = path.read_text().strip() or "a process that has not said who it is yet"
        raise RunLockedError(
            f"another run of {dataset} is in progress in {registry.root} ({holder}): wait for it to end, or stop it"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: "
                  f"{shlex.join(sys.argv[:8])}\n".encode(), 0)
    return fd


def release_locks(job: ReleaseJob) -> None:
    """Let the next run of the dataset start (idempotent)."""
    job.registry.lend_locks(())
    for fd in _HELD_LOCKS.pop(job.work_dir, ()):
        os.close(fd)


def recipe_locations(recipe: Recipe, recipe_source: Path, registry: DataRegistry) -> tuple[str, tuple[CodeFile, ...]]:
    """Where the recipe, and each file it reads, lives inside the registry: (recipe path,
    ((file, its path), ...)). A recipe from outside goes to recipes/<name>.yaml."""
    try:
        recipe_file = recipe_source.relative_to(registry.root).as_posix()
    except ValueError:
        recipe_file = f"recipes/{recipe.name}.yaml"
    inputs = tuple(
        ((recipe_source.parent / name).resolve(), posixpath.normpath(posixpath.join(posixpath.dirname(recipe_file), name)))
        for name in recipe.input_files()
    )
    return recipe_file, inputs


def latest_release_with_inputs(registry: DataRegistry, dataset: str, fingerprint: str) -> str | None:
    """The latest release's tag if it was made from exactly these inputs, else None."""
    latest = registry.latest_tag(dataset)
    if latest is not None and registry.tag_note(latest).get("inputs_fingerprint") == fingerprint:
        return latest
    return None


def discard(job: ReleaseJob) -> None:
    """Drop a job's work dir without releasing (nothing else was written)."""
    shutil.rmtree(job.work_dir, ignore_errors=True)
    release_locks(job)
