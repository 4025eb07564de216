"""Making a staged release visible: into data/<dataset>/ only (`materialize`), or as a
versioned release (`publish`): under the registry lock, swap it in, sync the recipe and
code, record the DVC stage, push to S3, commit, tag. Either it all happens, or the
registry is put back exactly as it was (uncommitted edits included)."""

from __future__ import annotations

import json
import shutil
from typing import Any

from synthfactory.drills import crash_point
from synthfactory.files import file_digest
from synthfactory.registry import Release
from synthfactory.release.job import ReleaseJob
from synthfactory.release.recovery import SNAPSHOT_DIR, close_journal, recover, write_journal
from synthfactory.storage import StorageConfig


def _swap_journal(job: ReleaseJob) -> dict[str, Any]:
    """What a swap will move, for the journal that recovery reads: the staged entries and
    which of them data/<dataset>/ already has."""
    names = sorted(entry.name for entry in job.stage_dir.iterdir())
    return {"dataset": job.recipe.name, "names": names,
            "existing": [n for n in names if (job.release_dir / n).exists()]}


def _swap_in(job: ReleaseJob, names: list[str]) -> list[str]:
    """Move the staged entries into data/<dataset>/, setting the previous ones aside in
    the work dir (renames on one filesystem); DVC's .gitignore there is left alone."""
    previous = job.work_dir / "previous"
    previous.mkdir()
    job.release_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = job.release_dir / name
        if target.exists():
            target.rename(previous / name)
        (job.stage_dir / name).rename(target)
        crash_point("swapping")
    return names


def _swap_back(job: ReleaseJob, names: list[str]) -> None:
    previous = job.work_dir / "previous"
    for name in names:
        (job.release_dir / name).rename(job.stage_dir / name)
        if (previous / name).exists():
            (previous / name).rename(job.release_dir / name)
    previous.rmdir()
    if not any(job.release_dir.iterdir()):
        job.release_dir.rmdir()


def _keep_only_this_release(job: ReleaseJob) -> None:
    job.cache.prune(keep={key for _, key in job.shard_keys})


def materialize(job: ReleaseJob) -> None:
    """--no-publish: put the gated release in data/<dataset>/ without touching git or DVC,
    all or nothing: a journal names the entries first, so a run killed inside the swap
    is put back by the next run's recovery."""
    with job.registry.lock():
        journal = _swap_journal(job)
        write_journal(job.work_dir, journal)
        _swap_in(job, journal["names"])
        close_journal(job.work_dir)
        _keep_only_this_release(job)
    shutil.rmtree(job.work_dir)


def publish(job: ReleaseJob, storage: StorageConfig, metrics: dict[str, Any]) -> Release:
    """Under the registry lock: swap the release in, sync recipe and code, record the
    stage, push, commit, tag. On any failure the workspace goes back exactly as it was
    and the staged release back to the work dir.

    A journal is written first, so a run killed half-way through is rolled back by the
    next run the same way."""
    registry, name = job.registry, job.recipe.name
    with registry.lock():
        recover(registry)
        snapshot = registry.snapshot(job.tracked_files())
        tag = registry.next_tag(name)
        message = f"Release {tag}: {metrics['samples']} samples from {job.recipe_file}"
        snapshot.save(job.work_dir / SNAPSHOT_DIR)
        synced = [(job.recipe_source, job.recipe_file), *job.inputs, *job.code]
        journal = {
            **_swap_journal(job),
            "tag": tag,
            "base_commit": registry.git("rev-parse", "HEAD").strip(),
            "message": message,
            # what this publish writes, so a rollback never overwrites a later edit
            "written": {relative: file_digest(source) for source, relative in synced},
        }
        write_journal(job.work_dir, journal)
        swapped = _swap_in(job, journal["names"])
        try:
            for source, relative in synced:
                registry.sync_file(source, relative)
            registry.configure_remote(storage)
            registry.record_stage(name, job.command, job.dependencies)
            registry.dvc_commit(name)
            journal["written"] = {path: file_digest(registry.root / path) for path in snapshot.paths}
            write_journal(job.work_dir, journal)
            summary = {
                "samples": metrics["samples"],
                "rejected": metrics["rejected"],
                "inputs_fingerprint": job.inputs_fingerprint,
                "run": metrics.get("run", {}),
            }
            released = registry.commit_and_tag(
                name,
                tag,
                storage,
                paths=[*job.tracked_files(), f"data/{name}"],
                message=message,
                tag_note=f"{tag}\n\n{json.dumps(summary, sort_keys=True)}",
                push_retry_delays=job.execution.retry_delays(),
            )
        except BaseException as failure:
            try:
                # the index too: a refused commit (hook, signing, full disk) leaves the release
                # staged, and the user's next plain `git commit` would commit half of it
                registry.unstage(journal["base_commit"], [*snapshot.paths, f"data/{name}"])
                snapshot.restore()
                _swap_back(job, swapped)
                close_journal(job.work_dir)
            except Exception as rollback_failure:  # keep the original error in front
                failure.add_note(f"rolling back the registry also failed: {rollback_failure}")
            raise
        crash_point("tagged")
        close_journal(job.work_dir)
        _keep_only_this_release(job)
    shutil.rmtree(job.work_dir)
    return released
