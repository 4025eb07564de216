"""What a Prefect UI user sees of a run: a name that says what it made (or that it skipped
or failed), log lines that tell the release, artifacts with the verdict and the pull
command, and form help for every parameter. On the real Prefect API."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_recipe

from flows.release import release_flow, run_release
from synthfactory.release.gate import GateFailedError


def flow_run_named(client, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    assert len(runs) == 1, f"expected one run named {name!r}, found {[r.name for r in runs]}"
    return runs[0]


def run_logs(client, run_id, wanted: str, deadline_s: float = 120) -> list[str]:
    """The run's log messages, polled until one contains `wanted` (logs ship in the background)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + deadline_s
    while True:
        messages = [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
        if any(wanted in message for message in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def test_runs_are_named_by_outcome_and_their_logs_tell_the_release(tmp_path: Path, storage_env, prefect: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    recipe = write_recipe(tmp_path / "story.yaml", samples=60, shard_size=20)
    registry = tmp_path / "registry"
    made = run_release(str(recipe), str(registry))
    skipped = run_release(str(recipe), str(registry))
    assert made.tag == "story@v1" and skipped.up_to_date
    failing = write_recipe(tmp_path / "story.yaml", samples=60, shard_size=20, validation={"caption_length": {"min": 10, "max": 30}})
    with pytest.raises(GateFailedError):
        run_release(str(failing), str(registry), force=True)

    with get_client(sync_client=True) as client:
        released = flow_run_named(client, "story@v1 · 60 samples")
        logs = run_logs(client, released.id, "released story@v1")
        expected = ["plan: 60 samples of story in 3 shards of 20; 3 to generate", "generated: 3 shards made",
                    "staged: 60 samples", "gate passed:", "released story@v1 (commit ",
                    f"synthfactory pull story@v1 --registry {registry}"]
        for line in expected:
            assert any(line in message for message in logs), (line, logs)

        skip = flow_run_named(client, "story: skipped (story@v1 is current)")
        assert any("skipped: story@v1 is current" in m for m in run_logs(client, skip.id, "skipped:"))
        assert flow_run_named(client, "story: failed").state.is_failed()

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["release-story"])),
                                          sort=ArtifactSort.CREATED_DESC)
        by_run = {artifact.flow_run_id: artifact.data for artifact in artifacts}
        assert "Gate: passed" in by_run[released.id] and "dvc get" in by_run[released.id]
        assert "story: skipped" in by_run[skip.id] and "synthfactory pull story@v1" in by_run[skip.id]
        report = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["release-story-report"])))
        link = next(artifact.data for artifact in report if artifact.flow_run_id == released.id)
        assert made.report_url and link.startswith("[") and made.report_url in link  # markdown: [text](url)
        with urllib.request.urlopen(made.report_url, timeout=30) as page:  # no credentials: the link is the key
            assert page.headers["Content-Type"].startswith("text/html")
            assert page.read() == (Path(made.release_dir) / "report" / "index.html").read_bytes()
        failed = flow_run_named(client, "story: failed")
        assert "gate failed, nothing published" in by_run[failed.id]
        assert "expect_column_value_lengths_to_be_between" in by_run[failed.id]


def test_every_parameter_of_the_release_form_is_explained() -> None:
    """The deployment's form (its OpenAPI schema) gives each field a type, default and help."""
    from prefect.utilities.callables import parameter_schema

    properties = parameter_schema(release_flow.fn).model_dump()["properties"]
    assert set(properties) == {"recipe_path", "registry", "samples", "seed", "publish", "overrides", "workers",
                               "dask_address", "force"}
    for name, field in properties.items():
        assert len(field.get("description", "")) > 20, name
        assert "type" in field or "anyOf" in field, name
