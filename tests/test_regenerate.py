"""CI-triggered regeneration: only recipes whose inputs changed get a new release, and
the new commits and tags reach the git remote."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import shapes_recipe
import yaml
from typer.testing import CliRunner

from synthfactory.cli import app
from synthfactory.registry import DataRegistry
from synthfactory.release.regenerate import decide, recipe_paths

pytestmark = pytest.mark.slow


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def two_shapes(name: str, seed: int) -> dict:
    return shapes_recipe(
        name, samples=60, shard_size=30, seed=seed,
        generator={"kind": "procedural-shapes", "params": {"image_size": 24, "classes": ["circle", "square"]}},
        validation={"share_significance": None, "caption_length": {"min": 5, "max": 200}},
        execution={"runner": "thread", "workers": 1, "retries": 0},
    )


@pytest.fixture
def factory(tmp_path) -> tuple[Path, Path]:
    """A factory checkout with three recipes (one reads a text file) and a bare 'origin'."""
    origin, repo = tmp_path / "origin.git", tmp_path / "factory"
    git(tmp_path, "init", "--quiet", "--bare", str(origin))
    DataRegistry.open(repo)
    recipes = repo / "recipes"
    recipes.mkdir()
    (recipes / "alpha.yaml").write_text(yaml.safe_dump(two_shapes("alpha", 1)))
    (recipes / "beta.yaml").write_text(yaml.safe_dump(two_shapes("beta", 2)))
    (recipes / "prompts.txt").write_text("".join(f"prompt number {i} about a topic\n" for i in range(30)))
    (recipes / "gamma.yaml").write_text(yaml.safe_dump({
        "name": "gamma", "samples": 30, "shard_size": 15,
        "generator": {"kind": "text-list", "params": {"file": "prompts.txt"}},
        "validation": {"share_significance": None},
    }))
    git(repo, "add", "recipes")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "recipes")
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "--quiet", "origin", "HEAD:refs/heads/main")
    return repo, origin


def regenerate(repo: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["regenerate", "--registry", str(repo), *args])
    assert result.exit_code == 0, result.output
    return result.output


def tags(repo: Path) -> list[str]:
    return sorted(git(repo, "tag", "--list").split())


def test_only_the_changed_recipe_is_released_and_pushed(factory, storage_env, prefect):
    repo, origin = factory
    registry = DataRegistry(repo)
    assert [d.reason for d in decide(registry, recipe_paths(registry))] == ["never released"] * 3

    regenerate(repo)
    assert tags(repo) == ["alpha@v1", "beta@v1", "gamma@v1"]
    assert tags(origin) == tags(repo)
    assert git(origin, "rev-parse", "main") == git(repo, "rev-parse", "HEAD")
    assert not any(d.stale for d in decide(registry, recipe_paths(registry)))

    # One recipe edited and committed, as a push to main would bring it.
    before = git(repo, "rev-parse", "HEAD").strip()
    beta = repo / "recipes" / "beta.yaml"
    beta.write_text(yaml.safe_dump(two_shapes("beta", 3)))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-am", "reseed beta")
    output = regenerate(repo, "--since", before)
    assert "no input changed since" in output
    assert tags(repo) == ["alpha@v1", "beta@v1", "beta@v2", "gamma@v1"]
    assert tags(origin) == tags(repo)

    # A file the recipe reads counts as its input; without --since the fingerprints decide.
    with (repo / "recipes" / "prompts.txt").open("a") as prompts:
        prompts.write("one more prompt about something new\n")
    decisions = {d.dataset: d for d in decide(registry, recipe_paths(registry))}
    assert [name for name, d in decisions.items() if d.stale] == ["gamma"]
    assert decisions["gamma"].reason == "inputs differ from gamma@v1"
    regenerate(repo, "--no-push")
    assert tags(repo) == ["alpha@v1", "beta@v1", "beta@v2", "gamma@v1", "gamma@v2"]
    assert "gamma@v2" not in tags(origin)

    # Nothing changed: nothing released, by regenerate or by a scheduled run.
    assert "release" not in regenerate(repo, "--dry-run").split()
    from flows.release import release_flow

    skipped = release_flow(recipe_path=str(repo / "recipes" / "alpha.yaml"), registry=str(repo))
    assert (skipped.dataset, skipped.tag, skipped.up_to_date) == ("alpha", "alpha@v1", True)
    assert tags(repo) == ["alpha@v1", "beta@v1", "beta@v2", "gamma@v1", "gamma@v2"]
    assert not list((repo / ".synthfactory" / "work").iterdir())


def test_since_sees_files_with_spaces_and_non_ascii_names_and_takes_refs_only(factory):
    """`git diff --name-only` quotes such names and splitting on whitespace breaks them;
    a ref starting with `--` must not become a git option (`--output` writes a file)."""
    repo, _ = factory
    recipes = repo / "recipes"
    (recipes / "märz prompts.txt").write_text("".join(f"spring prompt {i} about a topic\n" for i in range(30)))
    (recipes / "delta.yaml").write_text(yaml.safe_dump({
        "name": "delta", "samples": 30, "shard_size": 15,
        "generator": {"kind": "text-list", "params": {"file": "märz prompts.txt"}},
    }))
    git(repo, "add", "recipes")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "delta")
    (recipes / "märz prompts.txt").write_text("".join(f"summer prompt {i} about a topic\n" for i in range(30)))
    registry = DataRegistry(repo)

    reasons = {d.dataset: d.reason for d in decide(registry, recipe_paths(registry), since="HEAD")}
    assert reasons == {"alpha": "no input changed since HEAD", "beta": "no input changed since HEAD",
                       "gamma": "no input changed since HEAD", "delta": "never released"}

    written = repo / "written-by-git.txt"
    result = CliRunner().invoke(app, ["regenerate", "--registry", str(repo), f"--since=--output={written}"])
    assert result.exit_code == 2, result.output
    assert "not a commit" in result.output and not written.exists()
