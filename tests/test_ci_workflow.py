"""The regeneration workflow (.github/workflows/regenerate.yml): pinned actions, secrets
only where releases happen, and its shell refusing a hostile `recipe` input. The
release step's script runs here with bash, against a stand-in `synthfactory`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "regenerate.yml"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps() -> list[dict]:
    return workflow()["jobs"]["regenerate"]["steps"]


def test_actions_are_pinned_by_commit_and_the_checkout_keeps_no_token():
    uses = [step["uses"] for step in steps() if "uses" in step]
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    checkout = next(step for step in steps() if step.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False


def test_secrets_are_only_in_the_release_steps_env():
    job = workflow()["jobs"]["regenerate"]
    assert "secrets." not in json.dumps(job.get("env", {}))
    for step in steps():
        holds_secrets = "secrets." in json.dumps(step) or "github.token" in json.dumps(step)
        assert holds_secrets == (step.get("name") == "Release"), step.get("name") or step.get("uses")


def run_release_step(tmp_path: Path, **env: str) -> tuple[int, list[list[str]]]:
    release = next(step for step in steps() if step.get("name") == "Release")
    stub = tmp_path / ".venv" / "bin" / "synthfactory"
    stub.parent.mkdir(parents=True, exist_ok=True)
    calls = tmp_path / "calls.jsonl"
    stub.write_text(f"#!/usr/bin/env python3\nimport json, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(0o755)
    full_env = {"PATH": "/usr/bin:/bin", "PUSH_TOKEN": "t0ken", "EVENT": "workflow_dispatch", "BEFORE": "", "RECIPE": "", **env}
    proc = subprocess.run(["bash", "-e", "-c", release["run"]], cwd=tmp_path, env=full_env, capture_output=True, text=True)
    made = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return proc.returncode, made


@pytest.mark.parametrize(("recipe", "expected"), [
    ("recipes/shapes.yaml", ["regenerate", "--", "recipes/shapes.yaml"]),
    ("recipes/synclr/v2.yml", ["regenerate", "--", "recipes/synclr/v2.yml"]),
    ("", ["regenerate"]),
])
def test_a_recipe_file_under_recipes_is_released(tmp_path, recipe, expected):
    assert run_release_step(tmp_path, RECIPE=recipe) == (0, [expected])


@pytest.mark.parametrize("recipe", [
    "recipes/x.yaml; touch pwned", "$(touch pwned)", "--since=--output=pwned", "recipes/../../etc/passwd.yaml",
    "recipes/a b.yaml", "/etc/passwd.yaml", "recipes/x.yaml\ntouch pwned",
])
def test_a_hostile_recipe_input_is_refused_before_anything_runs(tmp_path, recipe):
    assert run_release_step(tmp_path, RECIPE=recipe) == (2, [])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(("before", "expected"), [
    ("a" * 40, ["regenerate", "--since", "a" * 40]),
    ("0" * 40, ["regenerate"]),
    ("--output=pwned", ["regenerate"]),
])
def test_a_push_releases_what_changed_since_the_previous_head(tmp_path, before, expected):
    assert run_release_step(tmp_path, EVENT="push", BEFORE=before) == (0, [expected])
